"""Letting libkmod read a kernel command line other than this machine's.

libkmod (kmod 30 to 34, ``kmod_config_parse_kcmdline()`` in libkmod-config.c) takes the
``module.param=value`` and ``modprobe.blacklist=`` words of the kernel command line
from /proc/cmdline. It reads them once, while kmod_new() reads the configuration, and
has no API to give it any other text. The daemon resolves for this machine's own
command line, and libkmod reads that one itself.

A Resolver can still be told to assume another command line: the modprobe comparison
tests, the test bed's load_set.py and ``initsplitd --kernel-cmdline`` do this. For
those the context is created in a short-lived thread that has its own private mount
namespace, with the text bind-mounted over /proc/cmdline. The tests do the same for
modprobe with ``unshare -m``. This is skipped when the text gives libkmod the same as
this machine's (see libkmod_sees_the_same()). This way libkmod parses every command line itself,
quirks included, and initsplit carries no port of its parser.

This needs CAP_SYS_ADMIN. No other thread sees the mount, and it goes away with the
thread.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from ctypes import c_char_p, get_errno
from typing import TypeVar

from . import _libkmod as k

PROC_CMDLINE = "/proc/cmdline"

# <sched.h>, <sys/mount.h>
CLONE_NEWNS = 0x00020000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

T = TypeVar("T")


def libkmod_sees_the_same(cmdline: str) -> bool:
    """Would libkmod take from ``cmdline`` what it takes from /proc/cmdline anyway?

    Yes if it is the same text; an unreadable /proc/cmdline counts as "", since libkmod
    then reads nothing either. Yes also if neither gives libkmod anything. A module
    option or ``modprobe.blacklist=`` needs a dot, so a text without one gives nothing
    ("" for instance). And what /proc/cmdline gives is all that a context without any
    configuration holds.
    """
    try:
        with open(PROC_CMDLINE, "rb") as f:
            own = f.read()
    except OSError:
        own = b""
    raw = cmdline.encode("utf-8", "surrogateescape")
    return raw == own or (b"." not in raw and not proc_cmdline_gives_libkmod_anything())


def proc_cmdline_gives_libkmod_anything() -> bool:
    """Does libkmod find module options or blacklist entries in /proc/cmdline?"""
    lib = k.libkmod()
    ctx = lib.kmod_new(b"/", (c_char_p * 1)(None))  # no configuration paths at all
    try:
        for entries in (lib.kmod_config_get_options, lib.kmod_config_get_blacklists):
            it = entries(ctx)
            try:
                if lib.kmod_config_iter_next(it):
                    return True
            finally:
                lib.kmod_config_iter_free_iter(it)
        return False
    finally:
        lib.kmod_unref(ctx)


def call_seeing_cmdline(cmdline: str, fn: Callable[[], T]) -> T:
    """``fn()``, run in a thread that reads ``cmdline`` from /proc/cmdline.

    Returns what ``fn()`` returns, or raises what it raises. Raises PermissionError if
    this process may not make a mount namespace.
    """
    fd, source = tempfile.mkstemp(prefix="initsplit-cmdline-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cmdline.encode("utf-8", "surrogateescape"))
        result: list[T] = []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                # unshare(CLONE_NEWNS) in one thread gives only that thread a new
                # namespace (the kernel unshares its fs_struct with it). Everything is
                # made private first, so the bind mount cannot propagate back to the
                # namespace it was copied from, which systemd mounts shared.
                _check(k.libc().unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
                _check(k.libc().mount(None, b"/", None, MS_REC | MS_PRIVATE, None),
                       "mount --make-rprivate /")
                _check(k.libc().mount(os.fsencode(source), PROC_CMDLINE.encode(), None,
                                      MS_BIND, None), f"mount --bind {source} {PROC_CMDLINE}")
                result.append(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                failure.append(exc)

        thread = threading.Thread(target=run, name="initsplit-kmod-cmdline")
        thread.start()
        thread.join()
        if failure:
            raise failure[0]
        return result[0]
    finally:
        os.unlink(source)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        errnum = get_errno()
        raise OSError(errnum, f"{what}: {os.strerror(errnum)} (libkmod reads the kernel"
                              f" command line only from {PROC_CMDLINE}; showing it another"
                              " one needs CAP_SYS_ADMIN)")
