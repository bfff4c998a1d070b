"""Run module loads on a small worker pool: dependencies first, independent modules in parallel.

All bookkeeping happens on the daemon's main thread (the one that also owns the
libkmod context); workers only run the load function and post the result back
through a queue and a wake-up pipe the main loop polls.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from ..loader.results import ModuleLoad

log = logging.getLogger(__name__)


class Step(Protocol):
    name: str


@dataclass(slots=True)
class _Waiting:
    step: Step
    # Not settled yet: required modules (a failure fails this step too) ...
    deps: set[str] = field(default_factory=set)
    # ... and modules it merely loads after (softdeps: a failure is only logged).
    after: set[str] = field(default_factory=set)


class LoadScheduler:
    def __init__(self, *, workers: int, load: Callable[[Step], ModuleLoad]) -> None:
        self._load = load
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="load")
        self._results: queue.SimpleQueue[tuple[str, ModuleLoad]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # name -> "waiting" | "running" | "done" | "failed". One entry per module name
        # ever submitted, so it is bounded by the module tree the resolver reads.
        self.state: dict[str, str] = {}
        self._waiting: dict[str, _Waiting] = {}
        self._running = 0
        # name -> when its load started (time.monotonic), while it runs.
        self._started: dict[str, float] = {}

    def fileno(self) -> int:
        return self._wake_r

    @property
    def idle(self) -> bool:
        return self._running == 0 and not self._waiting

    def submit(self, steps: Sequence[Step]) -> list[ModuleLoad]:
        """Queue the steps of one request (in modprobe order).

        A module queued, running or loaded is not loaded again. One whose load
        failed is tried again: a later request comes from a later event (udev
        runs `kmod load` again for each), and the cause may be gone by then
        (firmware that appeared, a transient error). Nothing is retried
        without a new request, so a module that keeps failing costs one attempt
        per event, never a loop.

        Returns loads that failed at once because a dependency had already failed.
        """
        immediate: list[ModuleLoad] = []
        for index, step in enumerate(steps):
            if self.state.get(step.name) in ("waiting", "running", "done"):
                continue
            # A step that names its requirements waits for exactly those (and for its
            # "after" names, whose failure it ignores, as modprobe ignores a failed
            # softdep); otherwise for everything before it in the request (modprobe
            # order is a valid order), failing with any of them.
            required = getattr(step, "requires", None)
            if required is None:
                wanted, soft = {s.name for s in steps[:index]}, set()
            else:
                wanted, soft = set(required), set(getattr(step, "after", ()))
            deps = {d for d in self._known(step, wanted) if self.state[d] != "done"}
            after = {d for d in self._known(step, soft) if self.state[d] in ("waiting", "running")}
            failed = [d for d in deps if self.state[d] == "failed"]
            if failed:
                self.state[step.name] = "failed"
                immediate.append(ModuleLoad(step.name, "failed",
                                            reason=f"dependency {failed[0]} failed to load"))
                continue
            if deps or after:
                self.state[step.name] = "waiting"
                self._waiting[step.name] = _Waiting(step, deps, after)
            else:
                self._start(step)
        return immediate

    def _known(self, step: Step, wanted: set[str]) -> set[str]:
        """The requirements this scheduler has been given; the others are dropped.

        Earlier steps of the same submit() are known by now, so an unknown name is
        one that nothing will ever load: waiting for it would keep the daemon busy
        forever.  It is treated as absent rather than failed.  The resolver names
        only earlier steps of its own answer, so such a name is a bug or a step the
        caller left out (a builtin one, which is in the kernel).  What a module
        really needs the kernel checks itself: a missing symbol fails finit_module
        with ENOENT, as modprobe's load would fail.  Failing the step here instead
        would refuse loads that modprobe makes, since modprobe ignores a softdep
        that cannot be loaded (libkmod-module.c: "Ignore errors from softdeps").
        """
        unknown = wanted - self.state.keys()
        if unknown:
            log.warning("%s: requirements %s were never submitted; not waiting for them",
                        step.name, ", ".join(sorted(unknown)))
        return wanted - unknown

    def forget(self, name: str) -> None:
        """A loaded module that is gone again (an inert core module removed): the next
        request for it loads it again, and every alias that led to it is served again."""
        if self.state.get(name) == "done":
            del self.state[name]

    def stuck(self, *, now: float, limit: float) -> list[str]:
        """Modules whose load has run for longer than *limit* seconds."""
        return sorted(name for name, since in self._started.items() if now - since > limit)

    def _start(self, step: Step) -> None:
        self.state[step.name] = "running"
        self._running += 1
        self._started[step.name] = time.monotonic()
        self._pool.submit(self._run, step)

    def _run(self, step: Step) -> None:
        try:
            result = self._load(step)
        except Exception as exc:  # a loader bug must not wedge the scheduler
            result = ModuleLoad(step.name, "failed", reason=f"internal error: {type(exc).__name__}: {exc}")
        self._results.put((step.name, result))
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    def collect(self) -> list[ModuleLoad]:
        """Take finished loads (main thread) and start what they unblocked."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        finished: list[ModuleLoad] = []
        while True:
            try:
                name, result = self._results.get_nowait()
            except queue.Empty:
                break
            self._running -= 1
            self._started.pop(name, None)
            ok = result.mode != "failed"
            self.state[name] = "done" if ok else "failed"
            finished.append(result)
            settled = [(name, ok)]
            while settled:  # a failure cascades to everything waiting on it
                dep, dep_ok = settled.pop()
                for waiting_name, waiting in list(self._waiting.items()):
                    if dep not in waiting.deps and dep not in waiting.after:
                        continue
                    if dep in waiting.deps and not dep_ok:
                        del self._waiting[waiting_name]
                        self.state[waiting_name] = "failed"
                        finished.append(ModuleLoad(waiting_name, "failed",
                                                   reason=f"dependency {dep} failed to load"))
                        settled.append((waiting_name, False))
                        continue
                    waiting.deps.discard(dep)
                    waiting.after.discard(dep)
                    if not waiting.deps and not waiting.after:
                        del self._waiting[waiting_name]
                        self._start(waiting.step)
        return finished

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
        os.close(self._wake_r)
        os.close(self._wake_w)
