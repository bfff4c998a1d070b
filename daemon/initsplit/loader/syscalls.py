"""finit_module(2) and delete_module(2) through ctypes.

Python has no binding for either, and the daemon must not depend on kmod's
insmod/rmmod binaries. Shaped like pyudev's ctypes layer: the foreign functions
are declared once, and an errcheck hook turns a -1 return into OSError(errno).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from pathlib import Path

from ..modfile import CompressedModuleError, compression_of, kernel_decompresses, read_module

# Syscall numbers from arch/x86/entry/syscalls/syscall_64.tbl.
_SYSCALLS = {
    "x86_64": {"finit_module": 313, "delete_module": 176},
    # include/uapi/asm-generic/unistd.h, used by arm64 and riscv64.
    "aarch64": {"finit_module": 273, "delete_module": 106},
    "riscv64": {"finit_module": 273, "delete_module": 106},
}

# include/uapi/linux/module.h, the one finit_module() flag we pass: the file is
# compressed and the kernel decompresses it (CONFIG_MODULE_DECOMPRESS, 6.1+).
MODULE_INIT_COMPRESSED_FILE = 4
# include/uapi/asm-generic/fcntl.h: the delete_module() flag we pass.
O_NONBLOCK = os.O_NONBLOCK


def _errcheck(result: int, func: object, args: tuple) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.errcheck = _errcheck  # type: ignore[assignment]


def _number(name: str) -> int:
    table = _SYSCALLS.get(platform.machine())
    if table is None:
        raise OSError(errno.ENOSYS, f"{name}: unsupported architecture {platform.machine()}")
    return table[name]


def finit_module(fd: int, params: str = "", *, flags: int = 0) -> int:
    """Load the module the kernel reads from *fd*, with *params* (the kernel's "a=1 b=2" syntax).

    The kernel reads the whole file from offset 0 itself (kernel/module/main.c,
    finit_module -> kernel_read_file_from_fd(fd, 0, ...)); the seek only makes the
    descriptor's position agree. The bytes loaded are those of the open file, so
    a caller that checked the file through this descriptor loads what it checked.

    Returns the call's result when it is not an error: 0, or the out-of-range
    value an initsplit init module returns for a failed init (split/initresult.py).
    """
    os.lseek(fd, 0, os.SEEK_SET)
    return _syscall(ctypes.c_long(_number("finit_module")), ctypes.c_int(fd),
                    ctypes.c_char_p(params.encode()), ctypes.c_int(flags))


def finit_module_path(path: Path, params: str = "", *, flags: int = 0) -> int:
    """Load the module file at *path*, following symlinks as modprobe does.

    Only for originals from the kernel's module tree, which the kernel checks itself
    when it enforces signatures; split modules are loaded from checked descriptors.
    A compressed original (NAME.ko.xz) is handed over compressed when the kernel
    decompresses its format, as kmod does, and decompressed here otherwise
    (initsplit/modfile.py); the kernel checks the signature of the ELF either way.
    """
    kind = compression_of(path)
    if kind is not None and not kernel_decompresses(kind):
        try:
            data = read_module(path)
        except CompressedModuleError as exc:
            raise OSError(errno.ENOEXEC, f"{path.name}: {exc}") from None
        fd = os.memfd_create(path.name, os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            return finit_module(fd, params, flags=flags)
        finally:
            os.close(fd)
    if kind is not None:
        flags |= MODULE_INIT_COMPRESSED_FILE
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return finit_module(fd, params, flags=flags)
    finally:
        os.close(fd)


def delete_module(name: str, *, flags: int = O_NONBLOCK) -> None:
    """Unload module *name*; O_NONBLOCK makes a busy module fail with EWOULDBLOCK/EBUSY."""
    _syscall(ctypes.c_long(_number("delete_module")), ctypes.c_char_p(name.encode()),
             ctypes.c_uint(flags))
