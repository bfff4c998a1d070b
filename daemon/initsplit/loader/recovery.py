"""Per-module load markers, so a daemon killed mid-load leaves nothing half-loaded.

The protocol. One file per module, DIR/NAME (DIR is /run/initsplit/loading), always
replaced whole (fsio.atomic_write: temp file, rename), holding one line:

* ``core INIT``: written before the core module C goes in; C may or may not be in.
* ``core-loaded INIT ADDR``: C is in, and the kernel put its struct module at ADDR
  (hex, from /sys/module/NAME/sections/.gnu.linkonce.this_module; ``-`` when the
  kernel hides addresses). Recorded right after finit_module(C) returned.
* ``init-done INIT``: the init module I's init succeeded; kept until the batch has
  deleted I, so a daemon killed in between leaves I to the next one. I is deleted
  only under this marker, or under none (ready_to_delete_init): once I's init has
  run, C is the live driver (its ->exit set by I's wrapper), and a ``core`` or
  ``core-loaded`` marker left beside it after I is gone would make a restarted
  daemon take the driver for an inert core and delete it under its device.
* ``plain``: the original is (being) loaded plain; it is left alone.

The marker is removed when the load is over. A restarted daemon, before coldplug:

* I is loaded and LIVE: its init succeeded and only its deletion is pending. The
  kernel finishes finit_module() even for a killed caller, so I may not be
  settled yet: COMING (its init running; it may yet fail), or on its way out
  after a failed init (GOING, then its sysfs gone while /proc/modules still
  lists it). Recovery waits for I to settle, LIVE or gone (all markers together
  at most settle_wait seconds: the handback runs within systemd's stop timeout);
  if I is gone then, its init failed or never ran, C is inert and is handled as
  below. If I has not settled, its marker is left exactly as it is and the pair
  is pending: the batch acts on it only once I is LIVE, and if I goes instead,
  removes the inert C (delete_init_modules).
* ``core`` or ``core-loaded`` and NAME is loaded: NAME is deleted only when it is
  provably our inert C (->init and ->exit NULL, nothing to undo), so that coldplug
  loads the module afresh. It may instead be the original, loaded plain by someone
  else (the kernel's request_module -> modprobe, systemd-modules-load, udev once the
  daemon was gone) after our C was removed or never got in; deleting that would run
  its cleanup under a live driver. See _not_our_core() for the identity test.
* Anything else: nothing of ours is loaded; the marker goes.
* A loaded init module with no marker (its marker could not be rewritten to
  ``init-done`` and was removed before the deletion): pending deletion too. It
  is recognised by its name, init_module_name() of a loaded module.

Temp files an interrupted write left (``.NAME.*.tmp``) are removed. A marker
directory that anyone but root (or our user) could write is not acted upon.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .. import faults
from ..fsio import Untrusted, atomic_write, directory_problem, is_leftover_temp, open_checked, read_fd
from ..split.names import init_module_name
from .kernel_state import module_address, module_sections, module_state, proc_modules
from .results import UnloadBatch, UnloadTrigger
from .syscalls import delete_module

InitState = Literal["live", "gone", "unsettled"]

_MARKER_LIMIT = 4096
_NO_ADDRESS = "-"
# Seconds one recovery waits, for all its init modules together, for those that
# have not settled (LIVE or gone). initsplitd-handback runs recovery, then udev's
# replay, within the unit's TimeoutStopSec= (30 s).
SETTLE_WAIT_SEC = 10.0


@dataclass(slots=True)
class Recovery:
    # (core module, init module) pairs whose init module is loaded, to delete.
    pending_init: list[tuple[str, str]] = field(default_factory=list)
    removed_cores: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # Markers of a dead daemon were found: it was killed in the middle of loads.
    found_markers: bool = False


@dataclass(frozen=True, slots=True)
class _Marker:
    state: str
    init_name: str = ""
    # C's struct module address recorded by "core-loaded", when the kernel showed it.
    address: int | None = None

    @classmethod
    def parse(cls, text: str) -> _Marker:
        words = text.split()
        address = None
        if len(words) > 2 and words[2] != _NO_ADDRESS:
            try:
                address = int(words[2], 16)
            except ValueError:
                pass
        return cls(words[0] if words else "", words[1] if len(words) > 1 else "", address)


class LoadMarkers:
    def __init__(self, directory: Path, *, sys_root: Path = Path("/sys"),
                 proc_root: Path = Path("/proc"), settle_wait: float = SETTLE_WAIT_SEC) -> None:
        self.directory = directory
        self.sys_root = sys_root
        self.proc_root = proc_root
        self.settle_wait = settle_wait

    def init_state(self, name: str) -> InitState:
        """Where the init module NAME stands: "live" (its init succeeded), "gone", or
        "unsettled": COMING (init running), GOING (init failed, or being deleted), or
        listed in /proc/modules without sysfs (kernel/module/main.c: load_module()
        lists it before mod_sysfs_setup(), free_module() tears sysfs down before
        unlisting it; m_show() hides only UNFORMED modules)."""
        try:
            listed = name in proc_modules(self.proc_root / "modules")
        except OSError:
            return "unsettled"
        if not listed:
            return "gone"
        return "live" if module_state(name, sys_root=self.sys_root) == "live" else "unsettled"

    def _wait_settled(self, name: str, deadline: float) -> InitState:
        while (state := self.init_state(name)) == "unsettled" and time.monotonic() < deadline:
            time.sleep(0.05)
        return state

    def marker_state(self, name: str) -> str:
        """The state word of NAME's marker ("" when there is none or it is unusable)."""
        return self._state(name)

    def _path(self, name: str) -> Path:
        return self.directory / name

    def _write(self, name: str, text: str) -> None:
        atomic_write(self._path(name), text.encode(), make_parents=True)

    def core(self, name: str, init_name: str) -> None:
        self._write(name, f"core {init_name}\n")

    def core_loaded(self, name: str, init_name: str) -> None:
        """C is in: record where the kernel put it, so recovery can tell it from the original."""
        address = module_address(name, sys_root=self.sys_root)
        try:
            self._write(name, f"core-loaded {init_name} {_NO_ADDRESS if address is None else hex(address)}\n")
        except OSError:
            pass  # the "core" marker stays: the section test alone still tells C apart

    def init_done(self, name: str, init_name: str) -> None:
        self._write(name, f"init-done {init_name}\n")

    def plain(self, name: str) -> None:
        self._write(name, "plain\n")

    def finish(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            pass

    def ready_to_delete_init(self, name: str, init_name: str) -> None:
        """Make sure no ``core``/``core-loaded`` marker outlives I (see the module docstring).

        The marker normally says ``init-done`` already; it does not when rewriting it
        failed after I's init (/run full) or recovery could not rewrite it. Then it is
        rewritten now or, failing that, removed: a loaded I with no marker is still
        found by recovery (by its name), a C whose init has run under a stale
        ``core`` marker would be deleted. Raises OSError when even removing fails;
        I must then stay loaded.
        """
        if self._state(name) == "init-done":
            return
        try:
            self.init_done(name, init_name)
        except OSError:
            self.finish(name)

    def _read(self, name: str) -> _Marker:
        """NAME's marker; OSError or Untrusted when it cannot be used."""
        with open_checked(self._path(name)) as f:
            return _Marker.parse(read_fd(f.fileno(), limit=_MARKER_LIMIT).decode(errors="replace"))

    def _state(self, name: str) -> str:
        try:
            return self._read(name).state
        except (OSError, Untrusted):
            return ""

    def recover(self) -> Recovery:
        result = Recovery()
        deadline = time.monotonic() + self.settle_wait
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            names = []
        else:
            problem = directory_problem(self.directory)
            if problem:
                result.problems.append(f"load markers in {self.directory} not used: {problem}")
                return result
        try:
            loaded = proc_modules(self.proc_root / "modules")
        except OSError as exc:
            # Without the kernel's list nothing can be told apart: keep every marker.
            result.problems.append(f"cannot read /proc/modules: {exc.strerror}")
            return result
        for name in names:
            if is_leftover_temp(name):
                self._path(name).unlink(missing_ok=True)
            elif not name.startswith("."):
                result.found_markers = True
                try:
                    self._recover_one(name, loaded, result, deadline)
                except OSError as exc:
                    # One marker that cannot be handled (ENOSPC on a full /run while
                    # rewriting it, say) must not stop the recovery of the others.
                    result.problems.append(f"{name}: marker not handled: {exc.strerror or exc}")
        # Init modules whose marker was removed before their deletion (ready_to_delete_init).
        pending = {init for _, init in result.pending_init}
        for core in sorted(loaded):
            init = init_module_name(core)
            if init in loaded and init not in pending and core not in names:
                result.pending_init.append((core, init))
        return result

    def _recover_one(self, name: str, loaded: dict[str, int], result: Recovery,
                     deadline: float) -> None:
        path = self._path(name)
        try:
            marker = self._read(name)
        except Untrusted as exc:
            result.problems.append(f"{name}: marker not used: {exc}")
            return
        except OSError as exc:
            result.problems.append(f"{name}: unreadable marker: {exc.strerror}")
            return
        if marker.state in ("core", "core-loaded", "init-done") and marker.init_name in loaded:
            state = self._wait_settled(marker.init_name, deadline)
            if state == "unsettled":
                # Left exactly as it is ("init-done" now could be a lie): the batch
                # acts on it once I has settled (delete_init_modules).
                result.problems.append(f"{name}: {marker.init_name} has not finished loading "
                                       "or unloading yet; left for later")
                result.pending_init.append((name, marker.init_name))
                return
            if state == "gone":
                # Its init failed (or never ran) after all: the kernel freed I, and C,
                # if it is in, is inert.
                loaded.pop(marker.init_name, None)
        if marker.state in ("core", "core-loaded", "init-done") and marker.init_name in loaded:
            # Its init succeeded; the marker stays until the batch deletes it. If it
            # cannot be rewritten, "core ..." with the init module loaded means the
            # same to the next recovery.
            result.pending_init.append((name, marker.init_name))
            try:
                self.init_done(name, marker.init_name)
            except OSError as exc:
                result.problems.append(f"{name}: marker kept as it was: {exc.strerror or exc}")
            return
        if marker.state in ("core", "core-loaded") and name in loaded:
            if not self._remove_inert_core(name, marker, result):
                return
        path.unlink(missing_ok=True)

    def remove_if_inert(self, name: str, result: Recovery) -> None:
        """NAME's init module went away without succeeding: delete NAME if it is our
        inert core (the marker says so and the identity check agrees), then drop the
        marker; it stays when the core module cannot be deleted."""
        try:
            marker = self._read(name)
        except (OSError, Untrusted) as exc:
            result.problems.append(f"{name}: marker not used: {exc}")
            return
        try:
            loaded = proc_modules(self.proc_root / "modules")
        except OSError as exc:
            result.problems.append(f"cannot read /proc/modules: {exc.strerror}")
            return
        if marker.state in ("core", "core-loaded") and name in loaded:
            if not self._remove_inert_core(name, marker, result):
                return
        self.finish(name)

    def _remove_inert_core(self, name: str, marker: _Marker, result: Recovery) -> bool:
        """Delete NAME if it is our inert core; False when the marker must stay."""
        why_not = self._not_our_core(name, marker.address)
        if why_not:
            result.problems.append(f"{name}: left alone: it is loaded, but {why_not}")
            return True
        for attempt in range(3):
            try:
                delete_module(name)
                result.removed_cores.append(name)
                return True
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return True
                if exc.errno == errno.EINTR and attempt < 2:
                    continue  # a signal while waiting for the module mutex
                result.problems.append(f"{name}: inert core module could not be removed: "
                                       f"{os.strerror(exc.errno or 0)}")
                return False
        return False

    def _not_our_core(self, name: str, address: int | None) -> str | None:
        """Why the loaded NAME is not provably our inert core module C, or None if it is.

        The kernel lists a module's allocated sections in /sys/module/NAME/sections
        for as long as it is loaded, .init.* included after init was freed
        (kernel_state.module_sections). Only modules with .init sections are split,
        and C has none (they all went to the init module): an original loaded plain
        lists them, C never does. When the marker recorded C's struct module address,
        the loaded NAME must also be at that address. The address alone proves
        nothing: vmalloc hands a freed range to the next module, and in the loader
        VM test dummy loaded plain, deleted, then its C loaded got the same address.
        """
        sections = module_sections(name, sys_root=self.sys_root)
        if sections is None:
            return "the kernel lists no sections for it, so it cannot be told from the original"
        init = sorted(s for s in sections if s.startswith(".init"))
        if init:
            return f"it has {', '.join(init)}: it is the original, loaded plain by someone else"
        if address is not None:
            now = module_address(name, sys_root=self.sys_root)
            if now != address:
                where = "an address the kernel does not show" if now is None else hex(now)
                return f"its struct module is at {where}, not at {address:#x} where our core module was"
        return None


# delete_module() errors after which a later try may succeed: EBUSY while the
# module is not LIVE or in use, EAGAIN (kernel/module/main.c delete_module(),
# try_stop_module()).
# EINTR: a signal (SIGUSR1 from initsplitd-settle, SIGTERM) while delete_module()
# waited for the module mutex (mutex_lock_interruptible).
_TRY_AGAIN = frozenset({errno.EBUSY, errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR})


def delete_init_modules(pending: list[tuple[str, str]], markers: LoadMarkers, *,
                        trigger: UnloadTrigger) -> UnloadBatch:
    """Delete the init modules of *pending* (core, init module) pairs whose init succeeded.

    A deleted init module's marker goes with it; one that cannot be deleted keeps
    its marker, so a later daemon still knows it is ours.
    """
    started = time.monotonic()
    try:
        sizes = proc_modules()
    except OSError:
        sizes = {}
    deleted: list[str] = []
    failed: list[tuple[str, str]] = []
    busy: list[tuple[str, str]] = []
    unsettled: list[tuple[str, str]] = []
    freed = 0
    inert = Recovery()
    for core, name in pending:
        state = markers.init_state(name)
        if state == "unsettled":
            # Its init still runs (and may fail) or it is on its way out: the marker
            # must not say init-done, and there is nothing to delete yet.
            failed.append((name, "has not finished loading or unloading"))
            busy.append((core, name))
            unsettled.append((core, name))
            continue
        if state == "gone":
            if markers.marker_state(core) == "init-done":
                markers.finish(core)  # someone else deleted it after its init succeeded
            else:
                # Its init never succeeded: C is inert and looks loaded; remove it so
                # that the module can be loaded again.
                markers.remove_if_inert(core, inert)
            continue
        try:
            markers.ready_to_delete_init(core, name)
        except OSError as exc:
            failed.append((name, f"its load marker cannot be updated: {os.strerror(exc.errno or 0)}"))
            continue
        try:
            delete_module(name)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                # Someone else removed it: nothing of ours to report.
                markers.finish(core)
                continue
            failed.append((name, os.strerror(exc.errno or 0)))
            if exc.errno in _TRY_AGAIN:
                busy.append((core, name))
            continue
        markers.finish(core)
        deleted.append(name)
        freed += sizes.get(name, 0)
        faults.hit("batch", core)
    for problem in inert.problems:  # "NAME: what", as recovery words them
        module, _, text = problem.partition(": ")
        failed.append((module, text))
    return UnloadBatch(tuple(deleted), freed, tuple(failed), trigger, time.monotonic() - started,
                       busy=tuple(busy), unsettled=tuple(unsettled),
                       removed_cores=tuple(inert.removed_cores))
