"""ctypes ``errcheck`` hooks for libkmod (modelled on pyudev's ``_ctypeslib/_errorcheckers.py``).

libkmod reports failure in two ways: most ``int`` functions return a *negative* errno
(``-ENOENT``, ``-EINVAL``...) and never touch ``errno``; the few constructors returning a
pointer return NULL and leave the cause in ``errno`` (only ``kmod_new``, whose sole
failure is an allocation).  Both become :class:`OSError` here, so every caller sees the
usual ``FileNotFoundError``/``PermissionError``... subclasses that ``OSError(errno, msg)``
picks by itself.
"""

from __future__ import annotations

import errno
import os
from ctypes import get_errno
from typing import Any


def _describe(func: Any, args: tuple[Any, ...]) -> tuple[str, str | None]:
    # Name the libkmod function, and the first string argument (a path or an alias):
    # "kmod_module_new_from_path: No such file or directory: '/x.ko'" says what failed.
    name = getattr(func, "__name__", "libkmod")
    for arg in args:
        if isinstance(arg, bytes):
            return name, os.fsdecode(arg)
    return name, None


def check_negative_errno(result: int, func: Any, args: tuple[Any, ...]) -> int:
    """For ``int`` functions returning ``-errno``: raise OSError, else pass ``result`` on."""
    if result < 0:
        errnum = -result
        name, subject = _describe(func, args)
        raise OSError(errnum, f"{name}: {os.strerror(errnum)}", subject)
    return result


def check_null_pointer(result: Any, func: Any, args: tuple[Any, ...]) -> Any:
    """For constructors returning a pointer: NULL means failure, the cause is in errno."""
    if not result:
        # kmod_new fails only when calloc/strdup do; errno may be 0 if libc did not set
        # it, in which case ENOMEM is still the only possible cause.
        errnum = get_errno() or errno.ENOMEM
        name, subject = _describe(func, args)
        raise OSError(errnum, f"{name}: {os.strerror(errnum)}", subject)
    return result
