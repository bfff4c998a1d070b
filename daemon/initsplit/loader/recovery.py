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
from dataclasses import dataclass, field
from pathlib import Path

from ..fsio import atomic_write
from .kernel_state import proc_modules
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
        atomic_write(self._path(name), text.encode(), make_parents=True)

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
        loaded = proc_modules()
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
