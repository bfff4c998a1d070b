"""initsplit: load Linux kernel modules in two stages so their init memory can be given back."""

__version__ = "0.1.0"
