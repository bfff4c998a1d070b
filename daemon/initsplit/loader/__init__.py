"""Loading modules into the running kernel: syscalls, two-stage loads, batched unloads."""
