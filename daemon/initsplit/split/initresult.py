"""How the init module tells the daemon that the original init ran and failed.

The init wrapper (codegen.init_wrapper) returns the original init's result through
finit_module() itself, in a form no earlier failure of the same call can take.

The kernel's path, kernel/module/main.c of 6.1:

* SYSCALL_DEFINE3(finit_module) ends with ``return load_module(&info, uargs, flags);``
* load_module() ends with ``return do_init_module(mod);``
* do_init_module() runs ``ret = do_one_initcall(mod->init)`` (init/main.c, which
  returns fn()'s value, or -EPERM for a blacklisted initcall without calling it);
  ``if (ret < 0) goto fail_free_freeinit;`` ... ``return ret;``. After a successful
  init it returns 0 and has no failure path left; its only earlier failure is
  -ENOMEM from kmalloc, before the init routine.
* Every failure before the init routine (ELF checks, unknown symbols, CRC
  mismatches, EEXIST, ...) is a kernel error code, -MAX_ERRNO..-1
  (include/linux/err.h).

The wrapper turns an init failure -E with 1 <= E <= MAX_ERRNO into
-(INIT_FAILED_BIAS + E). That is outside the error range, so glibc's syscall()
(sysdeps/unix/sysv/linux/x86_64/syscall.S: ``cmpq $-4095, %rax; jae error``)
returns it as the call's result instead of -1 with errno. A result below
-MAX_ERRNO therefore proves that the original init ran; an error in range proves
that it did not. A negative value below -MAX_ERRNO that the init routine returned
itself passes unchanged: it is already outside the range.

This leaves nothing behind in the kernel, before or after success: no parameter,
no sysfs file, no data in the core module. The price: someone who loads an init
module by hand with insmod sees an odd message for a failing init (kmod and
busybox report errno only when the call returns -1), and an audit or trace of the
syscall shows the biased value.
"""

from __future__ import annotations

from .tables import MAX_ERRNO

# Any constant with MAX_ERRNO < BIAS and BIAS + MAX_ERRNO < 2**31 works; this one
# shows up as -65536 - E in strace, easy to recognise.
INIT_FAILED_BIAS = 0x10000


def encode(init_result: int) -> int:
    """What the wrapper returns for the original init's *init_result* (a C int)."""
    if -MAX_ERRNO <= init_result < 0:
        return init_result - INIT_FAILED_BIAS
    return init_result


def init_failure_errno(result: int) -> int | None:
    """The errno of a failed init routine from finit_module's *result*, or None.

    None means the result does not come from a failed init (0 for success; an
    in-range error never reaches here, the syscall binding raises it). For an
    init routine that returned a value outside the kernel's error range, the
    magnitude is reported as is, as modprobe would.
    """
    if result >= -MAX_ERRNO:
        return None
    unbiased = result + INIT_FAILED_BIAS
    if -MAX_ERRNO <= unbiased < 0:
        return -unbiased
    return -result
