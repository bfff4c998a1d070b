"""Deterministic fault injection: the test hook of the fault-tolerance tests.

A boot component must survive anything that happens to it, and the tests prove it
by making the daemon fail at named points instead of hoping a timed kill lands in
the right window. The hook is read once from the daemon's environment:

    INITSPLIT_FAULT=[STAGE/]POINT[:MODULE]=ACTION[,...]

* STAGE: ``initrd`` or ``root`` (where /etc/initrd-release exists or not); none
  means both. A full-system test sets the variable with ``systemd.setenv=`` on the
  kernel command line, which reaches the initramfs and the real root alike.
* POINT: one of POINTS below; MODULE narrows a per-module point to one module
  (none: the first module that reaches it).
* ACTION: ``kill`` (SIGKILL to the daemon itself: nothing of Python runs after it),
  ``raise`` (an InjectedFault exception at that point), ``hang`` (the calling thread
  sleeps for ever: a stuck syscall or command).

Each fault fires once per boot: the first hit leaves a file in STATE_DIR (a tmpfs
that lives as long as the boot), so a daemon that systemd restarts runs clean and
the test sees recovery rather than a crash loop. Without the variable every hit()
is a dictionary lookup that finds nothing.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

ENV = "INITSPLIT_FAULT"
# /run survives switch-root (systemd moves it onto the real root), so "once per
# boot" holds across the initramfs and the real-root daemon.
STATE_DIR = Path("/run/initsplit/faults-fired")

POINTS = frozenset({
    "before-ready",   # coldplug submitted, READY not yet sent
    "after-core",     # C is in the kernel, I not yet loaded (worker)
    "after-init",     # I's init succeeded, the main thread has not recorded it (worker)
    "worker",         # a worker starts a two-stage load: nothing is loaded yet
    "batch",          # during the batch: MODULE's init module has just been deleted
    "stop",           # stop requested (SIGTERM at switch-root), before the final batch
    "request",        # the main thread is handling a request (an exception "anywhere")
})
ACTIONS = frozenset({"kill", "raise", "hang"})


class InjectedFault(RuntimeError):
    """Raised at a fault point whose action is ``raise``."""


@dataclass(frozen=True, slots=True)
class Fault:
    point: str
    module: str
    action: str

    @property
    def key(self) -> str:
        return f"{self.point}:{self.module or '*'}"


def parse(spec: str, *, in_initrd: bool) -> tuple[dict[str, list[Fault]], list[str]]:
    """Faults by point for this stage, and the parts of *spec* that make no sense."""
    faults: dict[str, list[Fault]] = {}
    errors: list[str] = []
    stage = "initrd" if in_initrd else "root"
    for part in filter(None, (p.strip() for p in spec.split(","))):
        where, sep, action = part.rpartition("=")
        scope, slash, point_module = where.rpartition("/")
        point, _, module = point_module.partition(":")
        if not sep or point not in POINTS or action not in ACTIONS or \
                (slash and scope not in ("initrd", "root")):
            errors.append(part)
            continue
        if slash and scope != stage:
            continue
        faults.setdefault(point, []).append(Fault(point, module, action))
    return faults, errors


class FaultPoints:
    def __init__(self, faults: dict[str, list[Fault]] | None = None, *,
                 state_dir: Path = STATE_DIR) -> None:
        self._faults = faults or {}
        self._state_dir = state_dir
        self._lock = threading.Lock()

    def hit(self, point: str, module: str = "") -> None:
        candidates = self._faults.get(point)
        if not candidates:
            return
        for fault in candidates:
            if fault.module and fault.module != module:
                continue
            if not self._claim(fault):
                continue
            self._fire(fault, module)

    def _claim(self, fault: Fault) -> bool:
        """True for the first hit of *fault* in this boot (the marker is made first)."""
        with self._lock:
            try:
                self._state_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self._state_dir / fault.key.replace("/", "_"),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                return False
            except OSError:
                # Cannot remember it: fire anyway, a test that sees a crash loop says so.
                return True
            os.close(fd)
            return True

    @staticmethod
    def _fire(fault: Fault, module: str) -> None:
        where = f"{fault.point}{':' + module if module else ''}"
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.action == "hang":
            threading.Event().wait()
        raise InjectedFault(f"fault injected at {where}")


# The daemon's instance; main() replaces it from the environment. The loader and the
# service call points.hit(...) through this module so they need no extra argument.
points = FaultPoints()


def install_from_environment(*, in_initrd: bool) -> list[str]:
    """Arm the faults named in INITSPLIT_FAULT; returns the parts that were ignored."""
    global points
    spec = os.environ.get(ENV, "")
    if not spec:
        return []
    faults, errors = parse(spec, in_initrd=in_initrd)
    points = FaultPoints(faults)
    return errors


def hit(point: str, module: str = "") -> None:
    points.hit(point, module)
