"""Load one module two-stage (core, then init module), or plain, and never leave it half-loaded."""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .. import faults
from ..split.initresult import init_failure_errno
from .kernel_state import proc_modules
from .recovery import LoadMarkers
from .results import ModuleLoad
from .syscalls import delete_module, finit_module


@dataclass(frozen=True, slots=True)
class SplitPair:
    name: str
    init_name: str
    core: Path
    init: Path
    # From the cache manifest: the init module's init layout in pages (freed by the
    # kernel after init) and the original's core layout in bytes if loaded plain.
    init_pages: int | None = None
    plain_core_bytes: int | None = None


def load_plain(name: str, path: Path, *, params: str = "", reason: str = "") -> ModuleLoad:
    started = time.monotonic()
    try:
        finit_module(path, params)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return ModuleLoad(name, "already-loaded", reason="loaded by someone else",
                              seconds=time.monotonic() - started)
        return ModuleLoad(name, "failed", reason=f"{reason + '; ' if reason else ''}"
                          f"could not insert '{name}': {os.strerror(exc.errno or 0)}",
                          errno=exc.errno, seconds=time.monotonic() - started)
    sizes = _sizes()
    return ModuleLoad(name, "plain", reason=reason, core_bytes=sizes.get(name),
                      seconds=time.monotonic() - started)


def load_two_stage(pair: SplitPair, *, original: Path, params: str = "",
                   markers: LoadMarkers | None = None) -> ModuleLoad:
    """Load C with the module's parameters, then I, which runs the original init.

    Whatever goes wrong short of the init routine's own failure ends in a plain
    load of the original: a machine whose disk driver did not load does not boot.
    An init module that fails is freed by the kernel itself; C, whose ->exit is
    still NULL, is then deleted cleanly. I's wrapper tells the two failures apart
    (split/initresult.py): a kernel error from finit_module(I) means I was refused
    before its init ran, and the original is loaded plain; a biased result means
    the original init ran and failed, which is reported as modprobe reports it,
    without running that init a second time.
    """
    if markers is None:
        return _load_two_stage(pair, original, params, None)
    markers.core(pair.name, pair.init_name)
    result: ModuleLoad | None = None
    try:
        result = _load_two_stage(pair, original, params, markers)
        return result
    finally:
        # A two-stage load keeps its "init-done" marker until the batch has deleted
        # the init module (Service.unload_batch): a daemon killed in between leaves
        # the init module to the next daemon instead of to nobody.
        if result is None or result.mode != "two-stage":
            markers.finish(pair.name)


def _load_two_stage(pair: SplitPair, original: Path, params: str,
                    markers: LoadMarkers | None) -> ModuleLoad:
    started = time.monotonic()
    try:
        finit_module(pair.core, params)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return ModuleLoad(pair.name, "already-loaded", reason="loaded by someone else",
                              seconds=time.monotonic() - started)
        if markers:
            markers.plain(pair.name)
        return _retry_plain(pair.name, original, params, started,
                            f"core module refused: {os.strerror(exc.errno or 0)}")
    faults.hit("after-core", pair.name)
    try:
        init_errno = init_failure_errno(finit_module(pair.init, ""))
    except OSError as exc:
        why = f"init module failed: {os.strerror(exc.errno or 0)}"
        try:
            delete_module(pair.name)
        except OSError as del_exc:
            # C is inert (init and exit NULL) but cannot be removed: never load the
            # original on top of it; report loudly instead.
            return ModuleLoad(pair.name, "failed", errno=exc.errno,
                              reason=f"{why}; core module could not be removed: "
                                     f"{os.strerror(del_exc.errno or 0)}",
                              seconds=time.monotonic() - started)
        if markers:
            markers.plain(pair.name)
        return _retry_plain(pair.name, original, params, started, why)
    if init_errno is not None:
        return _init_failed(pair.name, init_errno, started)
    if markers:
        markers.init_done(pair.name, pair.init_name)
    faults.hit("after-init", pair.name)
    sizes = _sizes()
    return ModuleLoad(pair.name, "two-stage", init_module=pair.init_name,
                      core_bytes=sizes.get(pair.name), init_bytes=sizes.get(pair.init_name),
                      init_pages=pair.init_pages, plain_core_bytes=pair.plain_core_bytes,
                      seconds=time.monotonic() - started)


def _init_failed(name: str, init_errno: int, started: float) -> ModuleLoad:
    """The original init ran in I and failed: remove C and report it like modprobe."""
    reason = f"could not insert '{name}': {os.strerror(init_errno)}"
    try:
        delete_module(name)
    except OSError as exc:
        reason += f"; core module could not be removed: {os.strerror(exc.errno or 0)}"
    return ModuleLoad(name, "failed", reason=reason, errno=init_errno,
                      seconds=time.monotonic() - started)


def _retry_plain(name: str, original: Path, params: str, started: float, why: str) -> ModuleLoad:
    result = load_plain(name, original, params=params, reason=why)
    return ModuleLoad(result.module, result.mode, reason=result.reason, core_bytes=result.core_bytes,
                      errno=result.errno, seconds=time.monotonic() - started)


def _sizes() -> dict[str, int]:
    try:
        return proc_modules()
    except OSError:
        return {}
