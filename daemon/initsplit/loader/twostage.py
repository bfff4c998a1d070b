"""Load one module two-stage (core, then init module), or plain, and never leave it half-loaded."""

from __future__ import annotations

import errno
import os
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from .. import faults
from ..fsio import OpenFile
from .kernel_state import proc_modules
from .recovery import LoadMarkers
from .results import ModuleLoad
from .syscalls import delete_module, finit_module, finit_module_path


@dataclass(frozen=True, slots=True)
class SplitPair:
    """A split ready to load: both modules open, checked, and loaded from these descriptors.

    Whoever holds a pair closes it; load_two_stage() does so when it returns.
    """

    name: str
    init_name: str
    core: OpenFile
    init: OpenFile
    # From the cache manifest: the init module's init layout in pages (freed by the
    # kernel after init) and the original's core layout in bytes if loaded plain.
    init_pages: int | None = None
    plain_core_bytes: int | None = None

    def close(self) -> None:
        try:
            self.core.close()
        finally:
            self.init.close()


def load_plain(name: str, path: Path, *, params: str = "", reason: str = "") -> ModuleLoad:
    started = time.monotonic()
    try:
        finit_module_path(path, params)
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
    still NULL, is then deleted cleanly. The kernel does not tell us whether I
    failed in its init routine or before it, so the original is loaded plain in
    both cases: a genuine init failure then fails again exactly as modprobe would
    report it, and any other failure is repaired.

    The pair's files are closed when this returns, whatever happened: the daemon
    loads hundreds of modules and must not keep a descriptor per module.
    """
    with closing(pair):
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
        finit_module(pair.core.fileno(), params)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return ModuleLoad(pair.name, "already-loaded", reason="loaded by someone else",
                              seconds=time.monotonic() - started)
        if markers:
            markers.plain(pair.name)
        return _retry_plain(pair.name, original, params, started,
                            f"core module refused: {os.strerror(exc.errno or 0)}")
    if markers:
        # From here a restarted daemon must be able to tell our C from an original
        # someone else loads under the same name once C is gone (recovery.py).
        markers.core_loaded(pair.name, pair.init_name)
    faults.hit("after-core", pair.name)
    try:
        finit_module(pair.init.fileno(), "")
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
    if markers:
        markers.init_done(pair.name, pair.init_name)
    faults.hit("after-init", pair.name)
    sizes = _sizes()
    return ModuleLoad(pair.name, "two-stage", init_module=pair.init_name,
                      core_bytes=sizes.get(pair.name), init_bytes=sizes.get(pair.init_name),
                      init_pages=pair.init_pages, plain_core_bytes=pair.plain_core_bytes,
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
