"""initsplitd's settle handshake (SIGUSR1 -> /run/initsplit/settled), as
initsplitd-settle uses it before the initramfs mounts the root: the flag appears
only once every queued event has been served and its loads have finished."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from initsplit.daemon.service import Service, Settings
from initsplit.daemon.splits import SplitProvider
from initsplit.loader.recovery import LoadMarkers
from initsplit.loader.results import ModuleLoad


@dataclass(frozen=True)
class Step:
    name: str
    path: Path | None = None
    options: str = ""
    install_command: str | None = None
    builtin: bool = False


@dataclass(frozen=True)
class Request:
    aliases: tuple[str, ...]
    devpath: str = "/devices/test"
    action: str = "add"
    source: str = "udev"  # a live event: each one is a new request


class Source:
    def __init__(self, on_coldplug=None) -> None:
        self.queued: list[Request] = []
        self._r, self._w = os.pipe()
        self.on_coldplug = on_coldplug

    def fileno(self) -> int:
        return self._r

    def coldplug(self):
        if self.on_coldplug:
            self.on_coldplug()
        return []

    def read_ready(self) -> list[Request]:
        out, self.queued = self.queued, []
        return out


class Resolver:
    def resolve(self, alias: str) -> list[Step]:
        return [Step(alias)]


class Reporter:
    def __init__(self) -> None:
        self.loaded: list[str] = []

    def module_loaded(self, load: ModuleLoad) -> None:
        self.loaded.append(load.module)

    def batch_unloaded(self, batch) -> None: ...
    def summary(self, **_) -> None: ...
    def log(self, priority: int, message: str, **fields) -> None: ...


class Notifier:
    def ready(self, status: str = "") -> None: ...
    def status(self, text: str) -> None: ...
    def watchdog(self) -> None: ...
    def stopping(self) -> None: ...
    def watchdog_interval(self) -> None: return None


def make_service(tmp_path: Path, source: Source, **settings) -> tuple[Service, Reporter]:
    reporter = Reporter()
    service = Service(
        settings=Settings(settled_flag=tmp_path / "settled", **settings),
        resolver=Resolver(), source=source,
        provider=SplitProvider(modules_dir=tmp_path, cache_dir=tmp_path / "c", runtime_dir=tmp_path / "r"),
        reporter=reporter, notifier=Notifier(), markers=LoadMarkers(tmp_path / "loading"),
    )

    def slow_load(step: Step) -> ModuleLoad:
        time.sleep(0.2)
        return ModuleLoad(step.name, "plain")

    service.scheduler._load = slow_load  # type: ignore[attr-defined]
    return service, reporter


def test_settle_waits_for_queued_events_and_loads(tmp_path: Path) -> None:
    source = Source()
    service, reporter = make_service(tmp_path, source)
    source.queued = [Request(("fs-ext4",)), Request(("virtio:d00000002v00001AF4",))]
    service.settle()
    assert sorted(reporter.loaded) == ["fs-ext4", "virtio:d00000002v00001AF4"]
    # The flag says how many loads this settle waited for: initsplitd-settle asks
    # again (after settling udev) until one made none.
    assert (tmp_path / "settled").read_text() == f"{os.getpid()} 2\n"
    service.settle()
    assert (tmp_path / "settled").read_text() == f"{os.getpid()} 0\n"
    service.scheduler.shutdown()


def test_sigusr1_settles_the_running_daemon(tmp_path: Path) -> None:
    def signal_ourselves() -> None:
        # Like initsplitd-settle: the event is already queued when SIGUSR1 arrives.
        source.queued = [Request(("fs-ext4",))]
        os.kill(os.getpid(), signal.SIGUSR1)

    source = Source(on_coldplug=signal_ourselves)
    service, reporter = make_service(tmp_path, source, exit_after_quiet=0.5, quiet_period=0.1)
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        assert service.run() == 0
    finally:
        signal.signal(signal.SIGUSR1, previous)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert reporter.loaded == ["fs-ext4"]
    assert (tmp_path / "settled").exists()


def test_settled_flag_is_not_written_through_a_planted_symlink(tmp_path: Path) -> None:
    # The old writer used the predictable temp name .settled.PID and followed a symlink there.
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / f".settled.{os.getpid()}").symlink_to(victim)
    source = Source()
    service, _ = make_service(tmp_path, source)
    service.settle()
    service.scheduler.shutdown()
    assert victim.read_text() == "precious"
    assert not (tmp_path / "settled").is_symlink()
    assert (tmp_path / "settled").read_text().split()[0] == str(os.getpid())
