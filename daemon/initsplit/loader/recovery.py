"""Per-module load markers, so a daemon killed mid-load leaves nothing half-loaded.

Before the core module goes in, the daemon writes a marker; it rewrites it when the
init module's init has succeeded (or when it falls back to a plain load) and
removes it when the load is over. A restarted daemon reads the markers first:

* "core": the core module may be in but its init never ran (the init module failed
  or was never loaded). If the init module is loaded, its init did succeed (the
  kernel finishes finit_module even for a killed caller) and it is only pending
  deletion. Otherwise the core is inert (->init and ->exit NULL) and is deleted so
  coldplug loads the module afresh.
* "init-done": the init module, if still loaded, is pending deletion; the marker
  is removed once the batch has deleted it.
* "plain": the original is (being) loaded plain; leave it alone.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import faults
from .kernel_state import proc_modules
from .results import UnloadBatch, UnloadTrigger
from .syscalls import delete_module


@dataclass(slots=True)
class Recovery:
    # (core module, init module) pairs whose init module is loaded, to delete.
    pending_init: list[tuple[str, str]] = field(default_factory=list)
    removed_cores: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class LoadMarkers:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, name: str) -> Path:
        return self.directory / name

    def _write(self, name: str, text: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self._path(name))

    def core(self, name: str, init_name: str) -> None:
        self._write(name, f"core {init_name}\n")

    def init_done(self, name: str, init_name: str) -> None:
        self._write(name, f"init-done {init_name}\n")

    def plain(self, name: str) -> None:
        self._write(name, "plain\n")

    def finish(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            pass

    def recover(self) -> Recovery:
        result = Recovery()
        try:
            entries = sorted(p for p in self.directory.iterdir() if not p.name.startswith("."))
        except FileNotFoundError:
            return result
        try:
            loaded = proc_modules()
        except OSError as exc:
            # Without the kernel's list nothing can be told apart: keep every marker.
            result.problems.append(f"cannot read /proc/modules: {exc.strerror}")
            return result
        for marker in entries:
            name = marker.name
            try:
                words = marker.read_text().split()
            except OSError as exc:
                result.problems.append(f"{name}: unreadable marker: {exc.strerror}")
                continue
            state = words[0] if words else ""
            init_name = words[1] if len(words) > 1 else ""
            if state in ("core", "init-done") and init_name in loaded:
                # Its init succeeded; the marker stays until the batch deletes it.
                result.pending_init.append((name, init_name))
                self.init_done(name, init_name)
                continue
            elif state == "core" and name in loaded:
                try:
                    delete_module(name)
                    result.removed_cores.append(name)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        result.problems.append(f"{name}: inert core module could not be removed: "
                                               f"{os.strerror(exc.errno or 0)}")
                        continue
            marker.unlink(missing_ok=True)
        return result


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
    freed = 0
    for core, name in pending:
        try:
            delete_module(name)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                # Someone else removed it: nothing of ours to report.
                markers.finish(core)
                continue
            failed.append((name, os.strerror(exc.errno or 0)))
            continue
        markers.finish(core)
        deleted.append(name)
        freed += sizes.get(name, 0)
        faults.hit("batch", core)
    return UnloadBatch(tuple(deleted), freed, tuple(failed), trigger, time.monotonic() - started)
