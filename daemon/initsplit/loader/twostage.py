"""Load one module two-stage (core, then init module), or plain, and never leave it half-loaded."""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from .. import faults
from ..fsio import OpenFile
from ..split.initresult import init_failure_errno
from .kernel_state import module_state, placement_problem, proc_modules
from .recovery import LoadMarkers
from .results import ModuleLoad
from .syscalls import delete_module, finit_module, finit_module_path

log = logging.getLogger(__name__)
# Where the kernel lists a loaded module's sections (/sys/module/NAME/sections).
SYS_ROOT = Path("/sys")


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
    # C lacks the original's BTF (Discard=btf): what the kernel would have kept for
    # it; 0 when C has it.
    btf_bytes: int = 0
    # C lacks its data symbols' names (Discard=kallsyms-data): the core layout
    # bytes a plain load would have kept for them.
    kallsyms_bytes: int = 0
    # (section, offset from C's struct module) of each section of C that I reaches,
    # by the layout model (SplitModule.reached): checked against where the kernel
    # put C before I is loaded. Empty: nothing to check against, no two-stage load.
    reached: tuple[tuple[str, int], ...] = ()
    # On 6.12 instead (one allocation per struct module_memory type): (section,
    # its memory's anchor section, offset from it), SplitModule.reached_from.
    reached_from: tuple[tuple[str, str, int], ...] = ()
    # The unreclaimable slab the two-stage load takes more than the plain one
    # (layout/twostage_slab.py): the init module's sysfs and section attributes,
    # and the holes they leave in slabs that live objects share once it is deleted.
    twostage_slab_bytes: int = 0

    def close(self) -> None:
        try:
            self.core.close()
        finally:
            self.init.close()


# A plain load refused EBUSY: how long it waits for a namesake being deleted
# (GOING: its ->exit may take a while), and how often it is tried again once the
# namesake reads as gone, this far apart.
GOING_WAIT_SEC = 5.0
BUSY_RETRIES = 3
BUSY_RETRY_SEC = 0.1


def _may_retry_busy(name: str) -> bool:
    """Whether a load of NAME that the kernel refused with EBUSY is worth one more try.

    kernel/module/main.c add_unformed_module() (Debian 6.1.192) waits for a
    namesake that is COMING or UNFORMED, then refuses the new module with EEXIST
    if the namesake is LIVE and with EBUSY otherwise: when it is GOING or UNFORMED
    on its way out (delete_module(): recovery removing an inert core, an rmmod;
    free_module() tears sysfs down first, so its state reads as gone while it is
    still in the list), and when its own load failed. In the first case the device
    would be left without its driver once the deletion ends; the second costs a
    few more runs of an init that fails anyway. So: wait while the namesake is
    GOING, then a bounded number of tries while it reads as gone; never when it is
    LIVE or COMING.
    """
    deadline = time.monotonic() + GOING_WAIT_SEC
    while (state := module_state(name)) == "going" and time.monotonic() < deadline:
        time.sleep(0.05)
    if state is None:
        time.sleep(BUSY_RETRY_SEC)
    return state is None


def load_plain(name: str, path: Path, *, params: str = "", reason: str = "") -> ModuleLoad:
    started = time.monotonic()
    try:
        for attempt in range(BUSY_RETRIES + 1):
            try:
                finit_module_path(path, params)
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or attempt == BUSY_RETRIES or not _may_retry_busy(name):
                    raise
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


# Why a rewritten original (Discard=) is loaded again as the original: the
# kernel refused the file itself. Its signature is gone (module_sig_check():
# EKEYREJECTED, ENOKEY, EBADMSG, ENOPKG; EPERM under lockdown), a security module
# refused the copy (EACCES: IMA appraisal, an LSM), or it rejected the ELF
# (ENOEXEC); or a namesake is being deleted (EBUSY), which load_plain() waits out.
# An init's own failure is not among the reasons: a missing BTF cannot make an
# init fail. Only a module with BTF ids can ask for its BTF from its init
# (register_btf_kfunc_id_set(), and in 6.1.192 even that only warns), and such a
# module keeps its BTF (split/decide.py). So a failing init runs once, as with
# modprobe, unless it fails with one of these codes, which an init hardly returns.
REWRITE_REFUSED_ERRNOS = frozenset({errno.EKEYREJECTED, errno.ENOKEY, errno.EBADMSG, errno.ENOPKG,
                                    errno.EPERM, errno.EACCES, errno.ENOEXEC, errno.EBUSY})


def load_rewritten(name: str, rewritten: OpenFile, *, original: Path, params: str = "",
                   reason: str = "", btf_bytes: int = 0, kallsyms_bytes: int = 0) -> ModuleLoad:
    """Load the original without its Discard= classes plain, from the open *rewritten*.

    A module the kernel refuses this way (REWRITE_REFUSED_ERRNOS) is loaded again as
    the original: no load may fail that the original would pass. Any other failure
    is the module's own and is reported, as modprobe reports it. Closes *rewritten*.
    """
    with closing(rewritten):
        started = time.monotonic()
        try:
            finit_module(rewritten.fileno(), params)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                return ModuleLoad(name, "already-loaded", reason="loaded by someone else",
                                  seconds=time.monotonic() - started)
            if exc.errno not in REWRITE_REFUSED_ERRNOS:
                return ModuleLoad(name, "failed", errno=exc.errno,
                                  reason=f"{reason + '; ' if reason else ''}"
                                  f"could not insert '{name}': {os.strerror(exc.errno or 0)}",
                                  seconds=time.monotonic() - started)
            why = (f"{reason + '; ' if reason else ''}without what Discard= drops: "
                   f"{os.strerror(exc.errno or 0)}")
            return _retry_plain(name, original, params, started, f"{why}; loaded with it")
    sizes = _sizes()
    return ModuleLoad(name, "plain", reason=reason, core_bytes=sizes.get(name),
                      seconds=time.monotonic() - started, btf_bytes=btf_bytes or None,
                      kallsyms_bytes=kallsyms_bytes or None)


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

    Raises only while the kernel holds nothing of the module: when the first
    crash marker cannot be written (a two-stage load would not be crash-safe) or
    C's finit_module() fails with something other than OSError. The caller then
    loads the original plain. Once C is in, every error is handled here, because
    only here is it known whether C must be deleted first: a plain load on top of
    an inert C would fail with EEXIST and leave the device without its driver.

    The pair's files are closed when this returns, whatever happened: the daemon
    loads hundreds of modules and must not keep a descriptor per module.
    """
    with closing(pair):
        if markers is None:
            return _load_two_stage(pair, original, params, _Markers(None))
        markers.core(pair.name, pair.init_name)
        later = _Markers(markers)
        result: ModuleLoad | None = None
        try:
            result = _load_two_stage(pair, original, params, later)
            return result
        finally:
            # A two-stage load keeps its "init-done" marker until the batch has deleted
            # the init module (Service.unload_batch): a daemon killed in between leaves
            # the init module to the next daemon instead of to nobody.
            if result is None or (result.mode != "two-stage" and not result.core_left):
                later.finish(pair.name)

class _Markers:
    """The crash markers once C may be in the kernel: a marker that cannot be
    rewritten (/run full, say) must not abort a load half-way, so each failure is
    logged and the safest marker possible is left (see loader/recovery.py)."""

    def __init__(self, markers: LoadMarkers | None) -> None:
        self._markers = markers

    def core_loaded(self, name: str, init_name: str) -> None:
        # Left at "core", the marker still names our C; only the identity check
        # against an original loaded under the same name is weaker (recovery.py).
        self._try("core-loaded", name, lambda m: m.core_loaded(name, init_name))

    def init_done(self, name: str, init_name: str) -> None:
        # Left at "core", the marker means the same to a restarted daemon as long
        # as the init module is loaded: pending deletion.
        self._try("init-done", name, lambda m: m.init_done(name, init_name))

    def plain(self, name: str) -> None:
        # A "core" marker left behind would make a restarted daemon delete the
        # original loaded plain as if it were an inert core: remove it instead.
        if not self._try("plain", name, lambda m: m.plain(name)):
            self.finish(name)

    def finish(self, name: str) -> None:
        self._try("finish", name, lambda m: m.finish(name))

    def _try(self, what: str, name: str, update: Callable[[LoadMarkers], None]) -> bool:
        if self._markers is None:
            return True
        try:
            update(self._markers)
        except Exception as exc:  # noqa: BLE001 - the load goes on either way
            log.warning("%s: cannot update its crash marker (%s): %s: %s",
                        name, what, type(exc).__name__, exc)
            return False
        return True


def _load_two_stage(pair: SplitPair, original: Path, params: str,
                    markers: _Markers) -> ModuleLoad:
    started = time.monotonic()
    try:
        finit_module(pair.core.fileno(), params)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return ModuleLoad(pair.name, "already-loaded", reason="loaded by someone else",
                              seconds=time.monotonic() - started)
        markers.plain(pair.name)
        return _retry_plain(pair.name, original, params, started,
                            f"core module refused: {os.strerror(exc.errno or 0)}")
    # The kernel holds C now: nothing may escape before C is deleted or I has run.
    try:
        # From here a restarted daemon must be able to tell our C from an original
        # someone else loads under the same name once C is gone (recovery.py).
        markers.core_loaded(pair.name, pair.init_name)
        faults.hit("after-core", pair.name)
        # I reaches C by offsets from C's struct module (6.1) or from the anchor of
        # each of C's memories (6.12), and the kernel follows some
        # of I's pointers into C while it loads I (jump_label_add_module() writes to a
        # static key of C that I's jump entries name), before I's init can check
        # anything: C must lie where the layout model put it, or I stays out.
        misplaced = placement_problem(pair.name, pair.reached, from_anchors=pair.reached_from,
                                      sys_root=SYS_ROOT)
        if misplaced is not None:
            return _remove_core_then_plain(pair, original, params, started,
                                           f"init module not loaded: {misplaced}", markers, None)
        init_errno = init_failure_errno(finit_module(pair.init.fileno(), ""))
    except Exception as exc:  # noqa: BLE001 - OSError from the kernel, or a bug
        if isinstance(exc, OSError) and exc.errno is not None:
            why = f"init module failed: {os.strerror(exc.errno)}"
        else:
            why = f"init module not loaded: {type(exc).__name__}: {exc}"
        return _remove_core_then_plain(pair, original, params, started, why, markers,
                                       getattr(exc, "errno", None))
    if init_errno is not None:
        # Run once, with its BTF or without (see REWRITE_REFUSED_ERRNOS).
        return _init_failed(pair.name, init_errno, started)
    markers.init_done(pair.name, pair.init_name)
    faults.hit("after-init", pair.name)
    sizes = _sizes()
    return ModuleLoad(pair.name, "two-stage", init_module=pair.init_name,
                      core_bytes=sizes.get(pair.name), init_bytes=sizes.get(pair.init_name),
                      init_pages=pair.init_pages, plain_core_bytes=pair.plain_core_bytes,
                      seconds=time.monotonic() - started, btf_bytes=pair.btf_bytes or None,
                      kallsyms_bytes=pair.kallsyms_bytes or None,
                      twostage_slab_bytes=pair.twostage_slab_bytes or None)


def _init_failed(name: str, init_errno: int, started: float) -> ModuleLoad:
    """The original init ran in I and failed: remove C and report it like modprobe."""
    reason = f"could not insert '{name}': {_strerror(init_errno)}"
    core_left = False
    try:
        delete_module(name)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            reason += f"; core module could not be removed: {_strerror(exc.errno or 0)}"
            core_left = True
    return ModuleLoad(name, "failed", reason=reason, errno=init_errno, core_left=core_left,
                      seconds=time.monotonic() - started)


def _strerror(number: int) -> str:
    """os.strerror() for any number an init routine may return (it raises past INT_MAX)."""
    try:
        return os.strerror(number)
    except (ValueError, OverflowError):
        return f"error {number}"


def _remove_core_then_plain(pair: SplitPair, original: Path, params: str, started: float,
                            why: str, markers: _Markers, error: int | None) -> ModuleLoad:
    try:
        delete_module(pair.name)
    except Exception as exc:  # noqa: BLE001 - whatever it is, C may still be in
        if not (isinstance(exc, OSError) and exc.errno == errno.ENOENT):
            # C is inert (init and exit NULL) but cannot be removed: never load the
            # original on top of it; report loudly, and keep its marker for recovery.
            detail = _strerror(exc.errno or 0) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            return ModuleLoad(pair.name, "failed", errno=error, core_left=True,
                              reason=f"{why}; core module could not be removed: {detail}",
                              seconds=time.monotonic() - started)
    markers.plain(pair.name)
    return _retry_plain(pair.name, original, params, started, why)


def _retry_plain(name: str, original: Path, params: str, started: float, why: str) -> ModuleLoad:
    result = load_plain(name, original, params=params, reason=why)
    return ModuleLoad(result.module, result.mode, reason=result.reason, core_bytes=result.core_bytes,
                      errno=result.errno, seconds=time.monotonic() - started)


def _sizes() -> dict[str, int]:
    try:
        return proc_modules()
    except OSError:
        return {}
