"""ctypes declarations for libkmod.so.2 (style: pyudev's ``_ctypeslib/libudev.py``).

Only the stdlib is available where initsplitd runs (Debian 12's python3 inside the
initramfs), so libkmod is reached through ctypes rather than a compiled binding.
Every prototype below was checked against ``/usr/include/libkmod.h`` of kmod 30
(Debian 12's libkmod-dev); the soname is pinned to 2, the ABI those prototypes describe.
(kmod_module_probe_insert_module() was checked against libkmod.h of upstream tag v30;
it is unchanged in v34, Debian 13's.)

Rules for callers (libkmod's, restated because ctypes will not enforce them):

* libkmod is **not thread-safe**: one ``kmod_ctx`` and everything obtained from it must
  be used by one thread at a time (cmdline.py creates a context in a helper thread
  that ends before the context is used).
* A Python callback (log_fn, print_action) must not raise, and its CFUNCTYPE object
  must stay referenced for as long as libkmod may call it.
* Strings returned as ``const char *`` are owned by libkmod; ``c_char_p`` restypes copy
  them into ``bytes`` at once, so nothing here keeps a borrowed pointer.
* Every ``struct kmod_module *`` handed out (by ``kmod_module_new_*`` or
  ``kmod_module_get_module``) carries one reference to drop with ``kmod_module_unref``;
  every ``struct kmod_list *`` of modules is dropped with ``kmod_module_unref_list``.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Callable, Iterator
from ctypes import (
    CDLL,
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char_p,
    c_int,
    c_size_t,
    c_uint,
    c_ulong,
    c_void_p,
)
from typing import Any

from ._errorcheckers import check_negative_errno, check_null_pointer

SONAME = "libkmod.so.2"


# Opaque handles: the structs are private to libkmod; declaring them empty gives each
# handle its own pointer type, so ctypes rejects a kmod_list* passed as a kmod_module*.
class kmod_ctx(Structure):  # noqa: N801 - libkmod's name
    pass


class kmod_module(Structure):  # noqa: N801
    pass


class kmod_list(Structure):  # noqa: N801
    pass


class kmod_config_iter(Structure):  # noqa: N801
    pass


kmod_ctx_p = POINTER(kmod_ctx)
kmod_module_p = POINTER(kmod_module)
kmod_list_p = POINTER(kmod_list)
kmod_config_iter_p = POINTER(kmod_config_iter)

# enum kmod_filter (kmod_module_apply_filter)
KMOD_FILTER_BLACKLIST = 0x00001
KMOD_FILTER_BUILTIN = 0x00002

# enum kmod_module_initstate (kmod_module_get_initstate; negative = not in the kernel)
KMOD_MODULE_BUILTIN = 0
KMOD_MODULE_LIVE = 1
KMOD_MODULE_COMING = 2
KMOD_MODULE_GOING = 3

# enum kmod_probe (kmod_module_probe_insert_module).  initsplit passes DRY_RUN always:
# without it libkmod would insert the modules and run install commands itself.
KMOD_PROBE_IGNORE_LOADED = 0x00008
KMOD_PROBE_DRY_RUN = 0x00010
KMOD_PROBE_APPLY_BLACKLIST = 0x20000
KMOD_PROBE_APPLY_BLACKLIST_ALIAS_ONLY = 0x40000

# <syslog.h> priorities, which libkmod's logging uses.
LOG_ERR = 3
LOG_WARNING = 4
LOG_NOTICE = 5
LOG_INFO = 6
LOG_DEBUG = 7

# void (*log_fn)(void *data, int priority, const char *file, int line, const char *fn,
#                const char *format, va_list args)
# va_list travels as a pointer on x86-64 (an array type that decays) and on aarch64
# (a 32-byte struct, passed by reference under AAPCS64), so c_void_p carries it to
# vsnprintf unchanged there.  On other ABIs we leave libkmod's own stderr logger.
KMOD_LOG_FN = CFUNCTYPE(None, c_void_p, c_int, c_char_p, c_int, c_char_p, c_char_p, c_void_p)
LOG_FN_SUPPORTED = platform.machine() in {"x86_64", "aarch64"}

# kmod_module_probe_insert_module()'s callbacks:
#   int (*run_install)(struct kmod_module *m, const char *cmdline, void *data)
#   void (*print_action)(struct kmod_module *m, bool install, const char *options)
# ``m`` is borrowed for the duration of the call.  A Python callback must not raise
# (ctypes would print the exception and return to C as if nothing happened) and its
# CFUNCTYPE object must outlive the call.  ``KMOD_RUN_INSTALL_FN()`` is NULL.
KMOD_RUN_INSTALL_FN = CFUNCTYPE(c_int, kmod_module_p, c_char_p, c_void_p)
KMOD_PRINT_ACTION_FN = CFUNCTYPE(None, kmod_module_p, c_bool, c_char_p)

_ctx = kmod_ctx_p
_mod = kmod_module_p
_list = kmod_list_p
_iter = kmod_config_iter_p

# name: (argtypes, restype)
SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    # context
    "kmod_new": ([c_char_p, POINTER(c_char_p)], _ctx),
    "kmod_unref": ([_ctx], _ctx),
    "kmod_set_log_fn": ([_ctx, KMOD_LOG_FN, c_void_p], None),
    "kmod_get_log_priority": ([_ctx], c_int),
    "kmod_set_log_priority": ([_ctx, c_int], None),
    "kmod_get_dirname": ([_ctx], c_char_p),
    "kmod_load_resources": ([_ctx], c_int),
    "kmod_unload_resources": ([_ctx], None),
    # lists (kmod_list_foreach is a macro over kmod_list_next; see iter_list)
    "kmod_list_next": ([_list, _list], _list),
    "kmod_list_prev": ([_list, _list], _list),
    "kmod_list_last": ([_list], _list),
    # configuration, as parsed from modprobe.d, modules.softdep and /proc/cmdline
    "kmod_config_get_options": ([_ctx], _iter),
    "kmod_config_get_blacklists": ([_ctx], _iter),
    "kmod_config_iter_next": ([_iter], c_bool),
    "kmod_config_iter_free_iter": ([_iter], None),
    # modules
    "kmod_module_new_from_name": ([_ctx, c_char_p, POINTER(_mod)], c_int),
    "kmod_module_new_from_path": ([_ctx, c_char_p, POINTER(_mod)], c_int),
    "kmod_module_new_from_lookup": ([_ctx, c_char_p, POINTER(_list)], c_int),
    "kmod_module_new_from_name_lookup": ([_ctx, c_char_p, POINTER(_mod)], c_int),
    "kmod_module_new_from_loaded": ([_ctx, POINTER(_list)], c_int),
    "kmod_module_ref": ([_mod], _mod),
    "kmod_module_unref": ([_mod], _mod),
    "kmod_module_unref_list": ([_list], c_int),
    "kmod_module_get_module": ([_list], _mod),
    "kmod_module_get_name": ([_mod], c_char_p),
    "kmod_module_get_path": ([_mod], c_char_p),
    "kmod_module_get_options": ([_mod], c_char_p),
    "kmod_module_get_install_commands": ([_mod], c_char_p),
    "kmod_module_get_remove_commands": ([_mod], c_char_p),
    "kmod_module_get_dependencies": ([_mod], _list),
    "kmod_module_get_softdeps": ([_mod, POINTER(_list), POINTER(_list)], c_int),
    "kmod_module_apply_filter": ([_ctx, c_int, _list, POINTER(_list)], c_int),
    "kmod_module_get_initstate": ([_mod], c_int),
    "kmod_module_probe_insert_module": (
        [_mod, c_uint, c_char_p, KMOD_RUN_INSTALL_FN, c_void_p, KMOD_PRINT_ACTION_FN], c_int),
    "kmod_module_initstate_str": ([c_int], c_char_p),
    "kmod_module_get_info": ([_mod, POINTER(_list)], c_int),
    "kmod_module_info_get_key": ([_list], c_char_p),
    "kmod_module_info_get_value": ([_list], c_char_p),
    "kmod_module_info_free_list": ([_list], None),
}

# Functions whose failure is an exception.  Deliberately absent:
# kmod_module_get_initstate (a negative return is the normal "not in the kernel"),
# kmod_load_resources (the caller words its own error), and the getters that return
# NULL for "none" (path, options, install commands, dependencies).
ERROR_CHECKERS: dict[str, Callable[..., Any]] = {
    "kmod_new": check_null_pointer,
    "kmod_config_get_options": check_null_pointer,
    "kmod_config_get_blacklists": check_null_pointer,
    "kmod_module_new_from_name": check_negative_errno,
    "kmod_module_new_from_path": check_negative_errno,
    "kmod_module_new_from_lookup": check_negative_errno,
    "kmod_module_new_from_name_lookup": check_negative_errno,
    "kmod_module_new_from_loaded": check_negative_errno,
    "kmod_module_get_softdeps": check_negative_errno,
    # > 0 is no error: the KMOD_PROBE_APPLY_BLACKLIST* flag that stopped the probe
    "kmod_module_probe_insert_module": check_negative_errno,
    "kmod_module_apply_filter": check_negative_errno,
    "kmod_module_get_info": check_negative_errno,
}


def _declare(lib: CDLL, signatures: dict[str, tuple[list[Any], Any]],
             error_checkers: dict[str, Callable[..., Any]]) -> CDLL:
    for name, (argtypes, restype) in signatures.items():
        # A missing symbol is an AttributeError here, at load time, rather than at the
        # first call deep inside a resolve.
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = restype
        checker = error_checkers.get(name)
        if checker is not None:
            function.errcheck = checker
    return lib


@functools.cache
def libkmod() -> CDLL:
    """The loaded library with every prototype above declared (loaded once)."""
    try:
        lib = CDLL(SONAME, use_errno=True)
    except OSError as exc:
        raise OSError(f"cannot load {SONAME} (Debian package libkmod2): {exc}") from exc
    return _declare(lib, SIGNATURES, ERROR_CHECKERS)


@functools.cache
def libc() -> CDLL:
    """libc, for vsnprintf(3) (libkmod's log messages), unshare(2) and mount(2) (cmdline.py).

    ``CDLL(None)`` is the running python's own symbol namespace, which has libc without
    needing ldconfig's cache (absent in initramfs).
    """
    lib = CDLL(None, use_errno=True)
    lib.vsnprintf.argtypes = [c_void_p, c_size_t, c_char_p, c_void_p]
    lib.vsnprintf.restype = c_int
    lib.unshare.argtypes = [c_int]
    lib.unshare.restype = c_int
    lib.mount.argtypes = [c_char_p, c_char_p, c_char_p, c_ulong, c_void_p]
    lib.mount.restype = c_int
    return lib


def iter_list(lib: CDLL, head: Any) -> Iterator[Any]:
    """``kmod_list_foreach``: yield each entry of the list starting at ``head``.

    libkmod's lists are circular (the last entry links back to the first), and
    ``kmod_list_next(head, entry)`` returns NULL after the last one, which is how the C
    macro terminates; the entries themselves must be read with accessor functions.
    """
    entry = head
    while entry:
        yield entry
        entry = lib.kmod_list_next(head, entry)


def decode(raw: bytes | None) -> str | None:
    """libkmod strings are bytes from config files and paths: decode them like os.fsdecode."""
    return None if raw is None else raw.decode("utf-8", "surrogateescape")
