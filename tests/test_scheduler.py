"""The load scheduler: dependencies first, each module once, failures cascade, parallel where independent."""

from __future__ import annotations

import select
import threading
import time
from dataclasses import dataclass

from initsplit.daemon.scheduler import LoadScheduler
from initsplit.loader.results import ModuleLoad


@dataclass(frozen=True)
class Step:
    name: str


def run_until_idle(scheduler: LoadScheduler, timeout: float = 10.0) -> list[ModuleLoad]:
    done: list[ModuleLoad] = []
    deadline = time.monotonic() + timeout
    while not scheduler.idle:
        assert time.monotonic() < deadline, "scheduler never became idle"
        select.select([scheduler.fileno()], [], [], 0.5)
        done += scheduler.collect()
    return done


def test_dependencies_load_first_and_each_module_once() -> None:
    order: list[str] = []
    lock = threading.Lock()

    def load(step: Step) -> ModuleLoad:
        with lock:
            order.append(step.name)
        time.sleep(0.01)
        return ModuleLoad(step.name, "plain")

    scheduler = LoadScheduler(workers=2, load=load)
    scheduler.submit([Step("crc16"), Step("mbcache"), Step("jbd2"), Step("ext4")])
    scheduler.submit([Step("jbd2"), Step("ocfs2")])  # jbd2 already queued: not again
    done = run_until_idle(scheduler)
    scheduler.shutdown()
    assert sorted(order) == sorted(["crc16", "mbcache", "jbd2", "ext4", "ocfs2"])
    assert len(order) == len(set(order))
    assert order.index("ext4") > max(order.index(d) for d in ("crc16", "mbcache", "jbd2"))
    assert order.index("ocfs2") > order.index("jbd2")
    assert {d.module for d in done} == set(order)


def test_independent_modules_run_in_parallel() -> None:
    active = 0
    peak = 0
    lock = threading.Lock()

    def load(step: Step) -> ModuleLoad:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.1)
        with lock:
            active -= 1
        return ModuleLoad(step.name, "plain")

    scheduler = LoadScheduler(workers=2, load=load)
    for name in ("a", "b", "c", "d"):
        scheduler.submit([Step(name)])
    run_until_idle(scheduler)
    scheduler.shutdown()
    assert peak == 2


def test_failure_cascades_to_dependents_and_later_requests() -> None:
    def load(step: Step) -> ModuleLoad:
        if step.name == "base":
            return ModuleLoad(step.name, "failed", reason="could not insert 'base': No such device")
        return ModuleLoad(step.name, "plain")

    scheduler = LoadScheduler(workers=2, load=load)
    scheduler.submit([Step("base"), Step("mid"), Step("top")])
    done = {d.module: d for d in run_until_idle(scheduler)}
    assert done["base"].mode == "failed"
    assert done["mid"].mode == "failed" and "dependency base" in done["mid"].reason
    assert done["top"].mode == "failed"
    # A later request tries the failed module again (it comes from a later event);
    # what needs it waits for that attempt and fails with it, instead of hanging.
    assert scheduler.submit([Step("base"), Step("other")]) == []
    again = {d.module: d for d in run_until_idle(scheduler)}
    assert again["base"].mode == "failed"
    assert again["other"].mode == "failed" and "dependency base" in again["other"].reason
    assert scheduler.idle
    scheduler.shutdown()


def test_failed_module_is_retried_by_a_later_request_only() -> None:
    attempts: list[str] = []

    def load(step: Step) -> ModuleLoad:
        attempts.append(step.name)
        if attempts.count(step.name) == 1:  # the firmware appears after the first try
            return ModuleLoad(step.name, "failed", reason="firmware not found")
        return ModuleLoad(step.name, "plain")

    scheduler = LoadScheduler(workers=1, load=load)
    scheduler.submit([Step("iwlwifi")])
    assert [d.mode for d in run_until_idle(scheduler)] == ["failed"]
    time.sleep(0.2)
    assert scheduler.idle and attempts == ["iwlwifi"]  # no retry on its own
    scheduler.submit([Step("iwlwifi")])
    scheduler.submit([Step("iwlwifi")])  # while the retry runs: not a third attempt
    assert [d.mode for d in run_until_idle(scheduler)] == ["plain"]
    scheduler.submit([Step("iwlwifi")])  # loaded: never again
    assert scheduler.idle and attempts == ["iwlwifi", "iwlwifi"]
    scheduler.shutdown()


def test_loader_exception_becomes_a_failed_load() -> None:
    def load(step: Step) -> ModuleLoad:
        raise RuntimeError("boom")

    scheduler = LoadScheduler(workers=1, load=load)
    scheduler.submit([Step("x")])
    done = run_until_idle(scheduler)
    scheduler.shutdown()
    assert done[0].mode == "failed" and "boom" in done[0].reason


@dataclass(frozen=True)
class Needs:
    name: str
    requires: tuple[str, ...] = ()


def test_a_requirement_never_submitted_is_not_waited_for(caplog) -> None:
    """A name nobody submitted would keep the scheduler busy forever (and the daemon's
    drain spinning): it is treated as absent, and said so."""
    loaded: list[str] = []

    def load(step: Needs) -> ModuleLoad:
        loaded.append(step.name)
        return ModuleLoad(step.name, "plain")

    scheduler = LoadScheduler(workers=1, load=load)
    scheduler.submit([Needs("virtio_ring"), Needs("virtio_blk", ("virtio_ring", "ghost"))])
    done = run_until_idle(scheduler, timeout=5.0)
    scheduler.shutdown()
    assert [d.module for d in done] == ["virtio_ring", "virtio_blk"]
    assert loaded == ["virtio_ring", "virtio_blk"]
    assert "ghost" in caplog.text and "never submitted" in caplog.text


def test_a_requirement_named_later_in_the_request_cannot_deadlock() -> None:
    """Steps come in modprobe order; one that names a later step (or two that name
    each other) must not wait for ever."""
    scheduler = LoadScheduler(workers=1, load=lambda step: ModuleLoad(step.name, "plain"))
    scheduler.submit([Needs("a", ("b",)), Needs("b", ("a",))])
    done = run_until_idle(scheduler, timeout=5.0)
    scheduler.shutdown()
    assert sorted(d.module for d in done) == ["a", "b"]


@dataclass(frozen=True)
class Probe:
    name: str
    requires: tuple[str, ...] = ()
    after: tuple[str, ...] = ()


def test_a_failed_softdep_does_not_fail_what_loads_after_it() -> None:
    """modprobe ignores a softdep that fails (crc32c_intel refuses a CPU without
    SSE4.2 with ENODEV) but stops at a required module that fails: ext4 must still
    load after the first, and not after the second. Either way what comes after
    waits until the earlier module has settled."""
    events: list[tuple[str, str]] = []
    lock = threading.Lock()

    def load(step: Probe) -> ModuleLoad:
        with lock:
            events.append(("start", step.name))
        time.sleep(0.1)
        with lock:
            events.append(("end", step.name))
        if step.name in ("crc32c_intel", "mbcache"):
            return ModuleLoad(step.name, "failed", reason="No such device")
        return ModuleLoad(step.name, "plain")

    scheduler = LoadScheduler(workers=2, load=load)
    scheduler.submit([Probe("crc32c_intel"), Probe("jbd2", after=("crc32c_intel",)),
                      Probe("ext4", ("jbd2",), ("crc32c_intel",))])
    scheduler.submit([Probe("mbcache"), Probe("ext2", ("mbcache",)),
                      Probe("helper", (), ("mbcache",))])
    done = {d.module: d for d in run_until_idle(scheduler)}
    scheduler.shutdown()
    assert done["jbd2"].mode == "plain" and done["ext4"].mode == "plain"
    assert done["ext2"].mode == "failed" and "dependency mbcache" in done["ext2"].reason
    assert done["helper"].mode == "plain"
    assert ("start", "ext2") not in events
    for first, then in (("crc32c_intel", "jbd2"), ("jbd2", "ext4"), ("mbcache", "helper")):
        assert events.index(("end", first)) < events.index(("start", then)), (first, then)
