"""initsplitd's service loop when things go wrong: a two-stage path that raises, a
modprobe install command that hangs, a long drain under a systemd watchdog,
aliases whose loads failed, and device events reported twice.

The kernel is a fake (finit_module/delete_module replaced in the loader), so these
run anywhere; tests/test_daemon_vm.py runs the daemon against a real one.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from initsplit.daemon.service import Service, Settings
from initsplit.loader import twostage
from initsplit.loader.results import ModuleLoad
from initsplit.loader.twostage import SplitPair


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
    def __init__(self) -> None:
        self._r, self._w = os.pipe()

    def fileno(self) -> int:
        return self._r

    def coldplug(self) -> list[Request]:
        return []

    def read_ready(self) -> list[Request]:
        return []


class Resolver:
    """Each alias is one module of the same name, in a fake module tree."""

    def __init__(self, tree: Path) -> None:
        self.tree = tree
        self.calls: list[str] = []

    def resolve(self, alias: str) -> list[Step]:
        self.calls.append(alias)
        return [Step(alias, self.tree / f"{alias}.ko")]


class Reporter:
    def __init__(self) -> None:
        self.loads: list[ModuleLoad] = []
        self.messages: list[str] = []

    def module_loaded(self, load: ModuleLoad) -> None:
        self.loads.append(load)

    def batch_unloaded(self, batch) -> None: ...
    def summary(self, **_) -> None: ...

    def log(self, priority: int, message: str, **fields) -> None:
        self.messages.append(message)


class Notifier:
    def __init__(self, interval: float | None = None) -> None:
        self.interval = interval
        self.pings: list[float] = []

    def ready(self, status: str = "") -> None: ...
    def status(self, text: str) -> None: ...
    def stopping(self) -> None: ...

    def watchdog(self) -> None:
        self.pings.append(time.monotonic())

    def watchdog_interval(self) -> float | None:
        return self.interval


class Markers:
    """LoadMarkers in memory; ``fail`` names the operations that raise ENOSPC."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.fail = fail
        self.state: dict[str, str] = {}

    def _do(self, op: str, name: str, value: str | None) -> None:
        if op in self.fail:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"/run/initsplit/loading/.{name}.tmp")
        if value is None:
            self.state.pop(name, None)
        else:
            self.state[name] = value

    def core(self, name: str, init_name: str) -> None:
        self._do("core", name, f"core {init_name}")

    def core_loaded(self, name: str, init_name: str) -> None:
        self._do("core_loaded", name, f"core-loaded {init_name}")

    def init_done(self, name: str, init_name: str) -> None:
        self._do("init_done", name, f"init-done {init_name}")

    def plain(self, name: str) -> None:
        self._do("plain", name, "plain")

    def finish(self, name: str) -> None:
        self._do("finish", name, None)

    def recover(self):
        raise AssertionError("not used here")


class Provider:
    """Every module is split into TREE/NAME.core.ko and TREE/NAME__init.ko."""

    def __init__(self, tree: Path, error: Exception | None = None) -> None:
        self.tree = tree
        self.error = error

    def get(self, path: Path) -> SplitPair:
        if self.error is not None:
            raise self.error
        name = path.name.removesuffix(".ko")
        return SplitPair(name, f"{name}__init", FakeFile(f"{name}.core.ko"), FakeFile(f"{name}__init.ko"))

    released = 0
    runtime_dir = Path("/run/initsplit-test")

    def release_runtime_splits(self) -> int:
        self.released += 1
        return 0


class FakeFile:
    """A checked, open split module (fsio.OpenFile) as far as the loader uses one:
    its descriptor, which the fake kernel maps back to the file name."""

    by_fd: dict[int, str] = {}

    def __init__(self, name: str) -> None:
        self.name = name
        self.fd = 10_000 + len(FakeFile.by_fd)
        FakeFile.by_fd[self.fd] = name

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None: ...


class Kernel:
    """finit_module/delete_module for file names as Provider makes them.

    ``refuse`` maps a file name to what loading it raises; the kernel refuses a
    second module of a name already loaded with EEXIST, as the real one does.
    """

    def __init__(self, refuse: dict[str, BaseException] | None = None,
                 undeletable: bool = False) -> None:
        self.refuse = refuse or {}
        self.undeletable = undeletable
        self.loaded: dict[str, str] = {}  # module name -> file it came from
        self.calls: list[str] = []

    def finit_module(self, target: int | Path, params: str = "") -> int:
        """finit_module(2) of a split's descriptor, or of an original's path (the
        loader's finit_module_path); returns the raw result: 0, as the kernel does
        for a module whose init succeeded (a failing init comes back biased,
        split/initresult.py)."""
        file = FakeFile.by_fd[target] if isinstance(target, int) else target.name
        self.calls.append(f"load {file}")
        if file in self.refuse:
            raise self.refuse[file]
        name = file.removesuffix(".ko").removesuffix(".core")
        if name in self.loaded:
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
        self.loaded[name] = file
        return 0

    def delete_module(self, name: str, **_: object) -> None:
        self.calls.append(f"delete {name}")
        if self.undeletable:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        if self.loaded.pop(name, None) is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))


def make_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, kernel: Kernel | None = None,
                 markers: Markers | None = None, provider: Provider | None = None,
                 notifier: Notifier | None = None, **settings) -> tuple[Service, Reporter]:
    kernel = kernel or Kernel()
    monkeypatch.setattr(twostage, "finit_module", kernel.finit_module)
    monkeypatch.setattr(twostage, "finit_module_path", kernel.finit_module)
    monkeypatch.setattr(twostage, "delete_module", kernel.delete_module)
    monkeypatch.setattr(twostage, "_sizes", lambda: {})
    # The fake kernel places C where the layout model says (kernel_state.placement_problem).
    monkeypatch.setattr(twostage, "placement_problem", lambda name, expected, **_: None)
    reporter = Reporter()
    service = Service(settings=Settings(**settings), resolver=Resolver(tmp_path), source=Source(),
                      provider=provider or Provider(tmp_path), reporter=reporter,
                      notifier=notifier or Notifier(), markers=markers or Markers())
    return service, reporter


def serve(service: Service, *aliases: str) -> None:
    for alias in aliases:
        service.handle_request(Request((alias,)))
    service.settle()


def only_load(reporter: Reporter) -> ModuleLoad:
    assert len(reporter.loads) == 1, reporter.loads
    return reporter.loads[0]


# ---------------------------------------------------------------- the two-stage path raises


def test_crash_marker_that_cannot_be_written_means_a_plain_load(tmp_path, monkeypatch) -> None:
    kernel = Kernel()
    markers = Markers(fail=("core",))
    service, reporter = make_service(tmp_path, monkeypatch, kernel=kernel, markers=markers)
    serve(service, "ext4")
    load = only_load(reporter)
    assert load.mode == "plain", load
    assert "No space left on device" in load.reason
    assert kernel.calls == ["load ext4.ko"]  # C never went in: no marker, no two-stage
    assert kernel.loaded == {"ext4": "ext4.ko"}
    service.scheduler.shutdown()


def test_split_provider_error_means_a_plain_load(tmp_path, monkeypatch) -> None:
    kernel = Kernel()
    service, reporter = make_service(tmp_path, monkeypatch, kernel=kernel,
                                     provider=Provider(tmp_path, RuntimeError("cache index corrupt")))
    serve(service, "virtio_blk")
    load = only_load(reporter)
    assert load.mode == "plain" and "cache index corrupt" in load.reason, load
    assert kernel.loaded == {"virtio_blk": "virtio_blk.ko"}
    service.scheduler.shutdown()


def test_marker_failing_after_the_init_ran_keeps_the_two_stage_load(tmp_path, monkeypatch) -> None:
    """C and I are in and init has run: loading the original as well is impossible
    (EEXIST) and would be reported as someone else's load; the module is two-stage."""
    kernel = Kernel()
    markers = Markers(fail=("init_done",))
    service, reporter = make_service(tmp_path, monkeypatch, kernel=kernel, markers=markers)
    serve(service, "ext4")
    load = only_load(reporter)
    assert load.mode == "two-stage", load
    assert kernel.calls == ["load ext4.core.ko", "load ext4__init.ko"]
    assert service.pending_init == [("ext4", "ext4__init")]
    # The "core" marker stays: a restarted daemon finds the init module loaded and
    # treats it as pending deletion (loader/recovery.py).
    assert markers.state == {"ext4": "core-loaded ext4__init"}
    service.scheduler.shutdown()


def test_marker_failing_after_an_init_failure_still_loads_plain(tmp_path, monkeypatch) -> None:
    kernel = Kernel(refuse={"ext4__init.ko": OSError(errno.EINVAL, os.strerror(errno.EINVAL))})
    markers = Markers(fail=("plain",))
    service, reporter = make_service(tmp_path, monkeypatch, kernel=kernel, markers=markers)
    serve(service, "ext4")
    load = only_load(reporter)
    assert load.mode == "plain" and "init module failed" in load.reason, load
    assert kernel.calls == ["load ext4.core.ko", "load ext4__init.ko", "delete ext4", "load ext4.ko"]
    # No "core" marker is left for the plainly loaded original: a restarted daemon
    # would delete it as an inert core.
    assert markers.state == {}
    service.scheduler.shutdown()


def test_error_between_core_and_init_deletes_the_core_first(tmp_path, monkeypatch) -> None:
    kernel = Kernel(refuse={"ext4__init.ko": ValueError("embedded null byte")})
    service, reporter = make_service(tmp_path, monkeypatch, kernel=kernel)
    serve(service, "ext4")
    load = only_load(reporter)
    assert load.mode == "plain" and "ValueError: embedded null byte" in load.reason, load
    assert kernel.calls == ["load ext4.core.ko", "load ext4__init.ko", "delete ext4", "load ext4.ko"]
    assert kernel.loaded == {"ext4": "ext4.ko"}
    service.scheduler.shutdown()


def test_core_that_cannot_be_deleted_is_never_loaded_over(tmp_path, monkeypatch) -> None:
    kernel = Kernel(refuse={"ext4__init.ko": ValueError("boom")}, undeletable=True)
    service, reporter = make_service(tmp_path, monkeypatch, kernel=kernel)
    serve(service, "ext4")
    load = only_load(reporter)
    assert load.mode == "failed" and "core module could not be removed" in load.reason, load
    assert "load ext4.ko" not in kernel.calls
    # The inert core is still in the kernel: its marker stays for a later recovery.
    assert service.markers.state == {"ext4": "core-loaded ext4__init"}
    service.scheduler.shutdown()


def test_init_failure_whose_core_cannot_be_deleted_keeps_the_marker(tmp_path, monkeypatch) -> None:
    from initsplit.split.initresult import encode

    kernel = Kernel(undeletable=True)
    original = kernel.finit_module

    def failing_init(target, params=""):
        result = original(target, params)
        return encode(-errno.ENODEV) if FakeFile.by_fd.get(target, "").endswith("__init.ko") else result

    kernel.finit_module = failing_init  # type: ignore[method-assign]
    service, reporter = make_service(tmp_path, monkeypatch, kernel=kernel)
    serve(service, "ext4")
    load = only_load(reporter)
    assert load.mode == "failed" and load.core_left, load
    assert load.reason.startswith("could not insert 'ext4': No such device; core module could not be removed")
    assert service.markers.state == {"ext4": "core-loaded ext4__init"}
    service.scheduler.shutdown()


def test_an_init_result_past_int_max_is_still_reported(tmp_path, monkeypatch) -> None:
    # os.strerror() raises OverflowError for it; nothing may escape with C in.
    from initsplit.loader import twostage as ts

    assert ts._strerror(2**31) == "error 2147483648"
    assert ts._strerror(errno.ENODEV) == "No such device"


# ---------------------------------------------------------------- install commands


def fake_modprobe(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "modprobe"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def run_with_deadline(function: Callable[[], ModuleLoad], seconds: float) -> ModuleLoad:
    """function() on a thread; fail (instead of hanging the test run) if it is not done in time."""
    import threading

    result: list[ModuleLoad] = []
    thread = threading.Thread(target=lambda: result.append(function()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"still running after {seconds} s"
    return result[0]


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # dead, waiting to be reaped by whoever adopted it


def test_hanging_install_command_is_killed_with_its_children(tmp_path, monkeypatch) -> None:
    # The install command's child holds modprobe's stdout open, as a daemon it
    # starts would: killing modprobe alone would leave the wait for output hanging.
    script = fake_modprobe(tmp_path, f'sleep 20 &\necho $! > {tmp_path}/child.pid\nwait')
    service, _ = make_service(tmp_path, monkeypatch, modprobe=str(script), modprobe_timeout=0.5)
    started = time.monotonic()
    load = run_with_deadline(lambda: service._load(Step("r8169", None, install_command="sleep")), 10.0)
    assert time.monotonic() - started < 5.0
    assert load.mode == "failed" and "did not finish within 0.5 s" in load.reason, load
    assert load.errno == errno.ETIMEDOUT
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 5.0
    while not process_gone(child):
        assert time.monotonic() < deadline, f"the install command's child {child} survived"
        time.sleep(0.05)
    service.scheduler.shutdown()


def test_install_command_results(tmp_path, monkeypatch) -> None:
    ok = fake_modprobe(tmp_path, "exit 0")
    service, _ = make_service(tmp_path, monkeypatch, modprobe=str(ok))
    assert service._load(Step("r8169", install_command="true")).mode == "handed-to-modprobe"
    service.settings.modprobe = str(fake_modprobe(tmp_path, 'echo "modprobe: FATAL: no" >&2; exit 1'))
    load = service._load(Step("r8169", install_command="false"))
    assert (load.mode, load.reason) == ("failed", "modprobe: FATAL: no")
    service.settings.modprobe = str(tmp_path / "absent")
    load = service._load(Step("r8169", install_command="x"))
    assert load.mode == "failed" and "cannot run" in load.reason
    service.scheduler.shutdown()


# ---------------------------------------------------------------- watchdog


def test_drain_keeps_pinging_the_watchdog(tmp_path, monkeypatch) -> None:
    """settle() (and the stop path) wait for every load in flight; with WatchdogSec=
    set, systemd kills a daemon silent for that long (twice the notifier's interval)."""
    interval = 0.25
    notifier = Notifier(interval)
    service, reporter = make_service(tmp_path, monkeypatch, notifier=notifier)

    def slow_load(step: Step) -> ModuleLoad:
        time.sleep(1.5)
        return ModuleLoad(step.name, "plain")

    service.scheduler._load = slow_load  # type: ignore[attr-defined]
    started = time.monotonic()
    serve(service, "slow")
    ended = time.monotonic()
    assert [load.module for load in reporter.loads] == ["slow"]
    times = [started, *notifier.pings, ended]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(notifier.pings) >= 4, notifier.pings
    assert max(gaps) < 2 * interval, gaps
    service.scheduler.shutdown()


# ---------------------------------------------------------------- aliases served


def test_alias_whose_load_failed_is_retried_by_a_later_event(tmp_path, monkeypatch) -> None:
    """udev runs `kmod load` for every event: firmware that appeared since, or a
    transient error, must not keep the device without its driver for the boot."""
    kernel = Kernel(refuse={"iwlwifi.ko": OSError(errno.ENOENT, os.strerror(errno.ENOENT))})
    service, reporter = make_service(tmp_path, monkeypatch, kernel=kernel, plain_only="test")
    serve(service, "iwlwifi")
    assert [load.mode for load in reporter.loads] == ["failed"]
    serve(service)  # nothing is retried without a new request
    assert kernel.calls == ["load iwlwifi.ko"]
    del kernel.refuse["iwlwifi.ko"]  # the firmware is there now
    serve(service, "iwlwifi")
    assert [load.mode for load in reporter.loads] == ["failed", "plain"]
    serve(service, "iwlwifi")  # loaded: neither resolved nor loaded again
    assert kernel.calls == ["load iwlwifi.ko", "load iwlwifi.ko"]
    assert service.resolver.calls == ["iwlwifi", "iwlwifi"]
    service.scheduler.shutdown()


def test_alias_whose_resolution_failed_is_retried(tmp_path, monkeypatch) -> None:
    service, reporter = make_service(tmp_path, monkeypatch, plain_only="test")
    resolve = service.resolver.resolve
    failures = [RuntimeError("modules.dep names a missing file")]

    def flaky(alias: str) -> list[Step]:
        if failures:
            raise failures.pop()
        return resolve(alias)

    monkeypatch.setattr(service.resolver, "resolve", flaky)
    serve(service, "e1000e")
    assert reporter.loads == [] and "missing file" in reporter.messages[-1]
    serve(service, "e1000e")
    assert [(load.module, load.mode) for load in reporter.loads] == [("e1000e", "plain")]
    service.scheduler.shutdown()


def test_served_aliases_are_bounded(tmp_path, monkeypatch) -> None:
    from initsplit.daemon import service as service_module

    monkeypatch.setattr(service_module, "MAX_SERVED_ALIASES", 8)
    service, reporter = make_service(tmp_path, monkeypatch, plain_only="test")
    serve(service, "keep", *(f"usb:v{n:04X}" for n in range(20)))
    assert len(service.requests._served) == 8
    serve(service, "keep")  # forgotten: resolved again (the module is not loaded again)
    assert service.resolver.calls.count("keep") == 2
    serve(service, *(f"usb:v{n:04X}" for n in range(100, 107)))
    serve(service, "keep")  # the oldest now, but asked for again ...
    serve(service, "usb:v0200")
    serve(service, "keep")  # ... so not the one forgotten
    assert service.resolver.calls.count("keep") == 2
    assert sum(1 for load in reporter.loads if load.module == "keep") == 1
    service.scheduler.shutdown()


# ---------------------------------------------------------------- one device event, reported twice
# The event source remembers nothing: a device that appears between opening the
# monitor and enumerating, or that udevd's coldplug trigger re-announces, arrives
# from coldplug and then live, and a re-enumeration after a netlink overflow
# reports every device again. Service.requests (RequestFilter) tells these from
# new requests. They matter for a module whose load failed: a new request tries
# it again, a duplicate report must not.

ENUMERATED = Request((), "", action="enumerated", source="coldplug")
WIFI = "/devices/pci0000:00/0000:00:14.3"


def handle(service: Service, *requests: Request) -> None:
    for request in requests:
        service.handle_request(request)
    service.settle()


def refusing(*files: str) -> Kernel:
    return Kernel(refuse={f: OSError(errno.ENOENT, os.strerror(errno.ENOENT)) for f in files})


def test_a_coldplug_report_and_its_live_echo_count_once(tmp_path, monkeypatch) -> None:
    kernel = refusing("iwlwifi.ko")
    service, reporter = make_service(tmp_path, monkeypatch, kernel=kernel, plain_only="test")
    handle(service, Request(("iwlwifi",), WIFI, source="coldplug"), ENUMERATED)
    assert [load.mode for load in reporter.loads] == ["failed"]
    activity = service.last_activity
    handle(service, Request(("iwlwifi",), WIFI, source="kernel"))  # the echo, after the failure
    assert kernel.calls == ["load iwlwifi.ko"]
    assert service.last_activity == activity  # a duplicate is no activity either
    # A re-enumeration reports the device again: still the same event.
    handle(service, Request(("iwlwifi",), WIFI, source="coldplug"), ENUMERATED)
    assert kernel.calls == ["load iwlwifi.ko"]
    # A further live "add" of the device is a new request (udev runs `kmod load`
    # again), and so is another device's.
    handle(service, Request(("iwlwifi",), WIFI, source="kernel"))
    assert kernel.calls == ["load iwlwifi.ko"] * 2
    handle(service, Request(("iwlwifi",), "/devices/pci0000:00/0000:00:1c.0", source="kernel"))
    assert kernel.calls == ["load iwlwifi.ko"] * 3
    assert service.resolver.calls == ["iwlwifi"] * 3
    service.scheduler.shutdown()


def test_a_live_report_is_not_repeated_by_a_re_enumeration(tmp_path, monkeypatch) -> None:
    kernel = refusing("iwlwifi.ko")
    service, _ = make_service(tmp_path, monkeypatch, kernel=kernel, plain_only="test")
    handle(service, Request(("iwlwifi",), WIFI, source="udev"))
    handle(service, Request(("iwlwifi",), WIFI, source="coldplug"), ENUMERATED)
    assert kernel.calls == ["load iwlwifi.ko"]
    service.scheduler.shutdown()


def test_a_remove_forgets_the_device(tmp_path, monkeypatch) -> None:
    # Replugged after coldplug reported it: the "add" after the "remove" is no echo.
    kernel = refusing("iwlwifi.ko")
    service, _ = make_service(tmp_path, monkeypatch, kernel=kernel, plain_only="test")
    handle(service, Request(("iwlwifi",), WIFI, source="coldplug"), ENUMERATED)
    handle(service, Request((), WIFI, action="remove", source="kernel"))
    assert kernel.calls == ["load iwlwifi.ko"]
    handle(service, Request(("iwlwifi",), WIFI, source="kernel"))
    assert kernel.calls == ["load iwlwifi.ko"] * 2
    service.scheduler.shutdown()


def test_an_enumeration_forgets_the_devices_it_no_longer_reports(tmp_path, monkeypatch) -> None:
    # Their "remove" may have been lost in the overflow that made the source
    # enumerate again; a device it still reports keeps awaiting its echo.
    kernel = refusing("iwlwifi.ko", "btusb.ko")
    service, _ = make_service(tmp_path, monkeypatch, kernel=kernel, plain_only="test")
    bt = "/devices/pci0000:00/0000:00:14.0/usb1/1-10/1-10:1.0"
    handle(service, Request(("iwlwifi",), WIFI, source="coldplug"), Request(("btusb",), bt, source="coldplug"),
           ENUMERATED)
    handle(service, Request(("btusb",), bt, source="coldplug"), ENUMERATED)
    handle(service, Request(("iwlwifi",), WIFI, source="kernel"), Request(("btusb",), bt, source="kernel"))
    assert kernel.calls == ["load iwlwifi.ko", "load btusb.ko", "load iwlwifi.ko"]
    service.scheduler.shutdown()


def test_an_echo_counts_per_alias_not_per_device(tmp_path, monkeypatch) -> None:
    # udevd's event carries what its rules found since coldplug read the database
    # (fs-TYPE once blkid ran): that alias is new, the others are the echo.
    kernel = refusing("virtio_blk.ko")
    service, _ = make_service(tmp_path, monkeypatch, kernel=kernel, plain_only="test")
    disk = "/devices/pci0000:00/0000:00:04.0/virtio1/block/vda"
    handle(service, Request(("virtio_blk",), disk, source="coldplug"), ENUMERATED)
    handle(service, Request(("virtio_blk", "fs-ext4"), disk, source="udev"))
    assert kernel.calls == ["load virtio_blk.ko", "load fs-ext4.ko"]
    service.scheduler.shutdown()


def test_the_memory_of_devices_is_bounded(tmp_path, monkeypatch) -> None:
    from initsplit.daemon import service as service_module

    monkeypatch.setattr(service_module, "MAX_DEVICE_ALIASES", 8)
    kernel = refusing("iwlwifi.ko")
    service, _ = make_service(tmp_path, monkeypatch, kernel=kernel, plain_only="test")
    handle(service, Request(("iwlwifi",), WIFI, source="coldplug"))
    # A flood of devices, and of aliases of one device.
    handle(service, *(Request((f"usb:v{n:04X}",), f"/devices/usb{n}", source="coldplug") for n in range(20)))
    handle(service, *(Request((f"acpi:X{n}:",), "/devices/LNXSYSTM:00", source="udev") for n in range(20)))
    assert service.requests._pairs <= 8
    assert sum(len(d.aliases) for d in service.requests._devices.values()) == service.requests._pairs
    # The device heard from least recently was forgotten: its echo passes for a new
    # request (at worst one more attempt, as here).
    handle(service, Request(("iwlwifi",), WIFI, source="kernel"))
    assert kernel.calls.count("load iwlwifi.ko") == 2
    service.scheduler.shutdown()


# ---------------------------------------------------------------- init modules the kernel keeps


def test_init_module_the_kernel_will_not_delete_yet_is_tried_again(tmp_path, monkeypatch) -> None:
    # EBUSY from delete_module: the init module is still COMING (a killed daemon's
    # finit_module, which the kernel completes) or in use. A later batch tries it
    # again, after another quiet period, a bounded number of times.
    from initsplit.daemon import service as service_module
    from initsplit.loader.results import UnloadBatch

    tries: list[list[tuple[str, str]]] = []

    def busy_batch(pending, markers, *, trigger):
        tries.append(list(pending))
        return UnloadBatch((), 0, tuple((i, "busy") for _, i in pending), trigger, busy=tuple(pending))

    monkeypatch.setattr(service_module, "delete_init_modules", busy_batch)
    service, _ = make_service(tmp_path, monkeypatch)
    service.pending_init = [("dummy", "dummy__init")]
    service.last_activity = -100.0
    assert service.unload_batch("quiet") is not None
    assert service.last_activity > 0  # the next try waits for another quiet period
    while service.unload_batch("quiet") is not None:
        pass
    assert tries == [[("dummy", "dummy__init")]] * service_module.MAX_DELETE_TRIES


# ---------------------------------------------------------------- the stop hands over


def test_stop_serves_an_event_udev_skipped_but_broadcast_late(tmp_path, monkeypatch) -> None:
    # udev's rules saw the active flag (so udev did not load the module) just
    # before the daemon removed it; udevd broadcasts the event only after that,
    # while the event is still in its queue. The stopping daemon must wait for
    # udev's queue, then read its socket, or the device is left without a driver.
    import threading

    from initsplit.loader.recovery import Recovery

    class RecoveringMarkers(Markers):
        def recover(self) -> Recovery:
            return Recovery()

    queue = tmp_path / "udev-queue"
    queue.write_text("")

    class LateSource(Source):
        def __init__(self) -> None:
            super().__init__()
            self.broadcast: list[Request] = []

        def read_ready(self) -> list[Request]:
            ready, self.broadcast = self.broadcast, []
            return ready

    source = LateSource()

    def udevd_finishes_the_event() -> None:
        time.sleep(0.3)
        source.broadcast.append(Request(("dummy",)))
        queue.unlink()

    service, reporter = make_service(tmp_path, monkeypatch, markers=RecoveringMarkers(),
                                     active_flag=tmp_path / "active", udev_queue=queue,
                                     plain_only="no batch to delete in this test")
    service.source = source
    service.stop_requested = True
    threading.Thread(target=udevd_finishes_the_event).start()
    assert service.run() == 0
    assert [(load.module, load.mode) for load in reporter.loads] == [("dummy", "plain")]
    assert not (tmp_path / "active").exists()


# ---------------------------------------------------------------- a namesake on its way out


def test_plain_load_waits_for_a_namesake_being_deleted(monkeypatch) -> None:
    # add_unformed_module() (6.1.192) refuses a module with EBUSY for as long as its
    # namesake is GOING (an rmmod whose ->exit takes a while): the load waits that
    # out, however many refusals that would be, and then loads.
    reads = [0]

    def module_state(name: str) -> str | None:
        reads[0] += 1
        return "going" if reads[0] <= 20 else None

    def finit_module_path(path: Path, params: str = "") -> int:
        if reads[0] <= 20:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        return 0

    monkeypatch.setattr(twostage, "finit_module_path", finit_module_path)
    monkeypatch.setattr(twostage, "module_state", module_state)
    monkeypatch.setattr(twostage, "_sizes", lambda: {})
    monkeypatch.setattr(twostage, "BUSY_RETRY_SEC", 0.0)
    monkeypatch.setattr(twostage.time, "sleep", lambda seconds: None)
    load = twostage.load_plain("dummy", Path("/lib/modules/dummy.ko"))
    assert load.mode == "plain", load


@pytest.mark.parametrize(("namesake", "tries"), [
    (None, 1 + twostage.BUSY_RETRIES),  # gone (or its own load failed): a bounded number
    ("coming", 1),                      # still loading: the kernel means "not again now"
])
def test_plain_load_refused_busy_is_tried_a_bounded_number_of_times(monkeypatch, namesake, tries) -> None:
    calls: list[str] = []

    def finit_module_path(path: Path, params: str = "") -> int:
        calls.append(str(path))
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

    monkeypatch.setattr(twostage, "finit_module_path", finit_module_path)
    monkeypatch.setattr(twostage, "module_state", lambda name: namesake)
    monkeypatch.setattr(twostage, "BUSY_RETRY_SEC", 0.0)
    load = twostage.load_plain("dummy", Path("/lib/modules/dummy.ko"))
    assert load.mode == "failed" and load.errno == errno.EBUSY, load
    assert len(calls) == tries


def test_main_loop_does_not_spin_while_a_load_runs_past_the_quiet_period(tmp_path, monkeypatch) -> None:
    # Pending init modules and a quiet period long over, but a load in flight (a
    # split at boot takes a minute on a slow machine): nothing can happen before
    # it ends, so select() must not be given a deadline in the past.
    service, _ = make_service(tmp_path, monkeypatch, load_timeout=0.0)
    service.pending_init = [("dummy", "dummy__init")]
    service.last_activity = service.clock() - 1000.0
    assert service._next_deadline(service.clock()) == 0.0  # idle: the batch is due
    monkeypatch.setattr(type(service.scheduler), "idle", property(lambda self: False))
    assert service._next_deadline(service.clock()) > 60.0


def test_a_removed_inert_core_is_loaded_again(tmp_path, monkeypatch) -> None:
    # The batch found a pending init module gone without success and removed the
    # inert core: the device would have no driver unless the daemon loads it again.
    from initsplit.daemon import service as service_module
    from initsplit.loader.results import UnloadBatch

    kernel = Kernel()

    def inert_core_removed(pending, markers, *, trigger):
        kernel.loaded.pop("dummy"), kernel.loaded.pop("dummy__init")
        return UnloadBatch((), 0, (), trigger, removed_cores=("dummy",))

    monkeypatch.setattr(service_module, "delete_init_modules", inert_core_removed)
    service, reporter = make_service(tmp_path, monkeypatch, kernel=kernel)
    serve(service, "dummy")
    assert [l.mode for l in reporter.loads] == ["two-stage"]
    service.unload_batch("quiet")
    service.settle()
    assert [l.mode for l in reporter.loads] == ["two-stage", "two-stage"], reporter.loads
    assert any("removed the inert core module" in m for m in reporter.messages)


def test_an_inert_core_removed_by_the_final_batch_is_loaded_before_exit(tmp_path, monkeypatch) -> None:
    # After a clean exit nobody replays the devices: the stopping daemon itself
    # loads again what its final batch found inert and removed.
    from initsplit.daemon import service as service_module
    from initsplit.loader.recovery import Recovery
    from initsplit.loader.results import UnloadBatch

    class RecoveringMarkers(Markers):
        def recover(self) -> Recovery:
            return Recovery(pending_init=[("dummy", "dummy__init")])

    kernel = Kernel()
    kernel.loaded["dummy"] = "dummy.core.ko"  # the inert core a killed daemon left
    batches: list[str] = []

    def final_batch(pending, markers, *, trigger):
        batches.append(trigger)
        if len(batches) == 1:
            kernel.loaded.pop("dummy")
            return UnloadBatch((), 0, (), trigger, removed_cores=("dummy",))
        return UnloadBatch(tuple(i for _, i in pending), 0, (), trigger)

    monkeypatch.setattr(service_module, "delete_init_modules", final_batch)
    service, reporter = make_service(tmp_path, monkeypatch, kernel=kernel, markers=RecoveringMarkers())
    service.stop_requested = True
    assert service.run() == 0
    assert [(l.module, l.mode) for l in reporter.loads] == [("dummy", "two-stage")], reporter.loads
    assert batches == ["stop", "stop"]
    assert service.provider.released == 1  # a clean exit gives /run's splits back


def test_a_failed_daemon_keeps_the_splits_for_its_restart(tmp_path, monkeypatch) -> None:
    # The restarted daemon's recovery and coldplug use them again.
    from initsplit.loader.recovery import Recovery

    class NoMarkers(Markers):
        def recover(self) -> Recovery:
            return Recovery()

    def broken(**_kwargs):
        raise RuntimeError("journal gone")

    service, reporter = make_service(tmp_path, monkeypatch, markers=NoMarkers())
    monkeypatch.setattr(reporter, "summary", broken)
    service.stop_requested = True
    with pytest.raises(RuntimeError, match="journal gone"):
        service.run()
    assert service.provider.released == 0


def test_an_unsettled_init_module_is_tried_for_a_while_not_a_number_of_times(tmp_path, monkeypatch) -> None:
    from initsplit.daemon import service as service_module
    from initsplit.loader.results import UnloadBatch

    pair = ("dummy", "dummy__init")
    monkeypatch.setattr(service_module, "delete_init_modules",
                        lambda pending, markers, *, trigger: UnloadBatch(
                            (), 0, (), trigger, busy=tuple(pending), unsettled=tuple(pending)))
    service, _ = make_service(tmp_path, monkeypatch)
    now = [0.0]
    service.clock = lambda: now[0]
    service.pending_init = [pair]
    for _ in range(10):  # more than MAX_DELETE_TRIES batches, within the time
        service.unload_batch("quiet")
        now[0] += 5.0
    assert service._busy_init == [pair]
    now[0] += service_module.UNSETTLED_WAIT_SEC
    service.unload_batch("quiet")
    assert service._busy_init == []


@pytest.mark.parametrize("dead", ["markers", "flag", None])
def test_a_daemon_that_died_has_its_unbound_devices_probed_again(tmp_path, monkeypatch, dead) -> None:
    # A probe in a dying daemon's thread fails (kthread_create() returns -EINTR)
    # and the driver core swallows it (loader/reprobe.py): the next daemon asks
    # the kernel to probe unbound devices again, but only after a daemon died.
    from initsplit.loader.recovery import Recovery

    class DeadMarkers(Markers):
        def recover(self) -> Recovery:
            return Recovery(found_markers=dead == "markers")

    flag = tmp_path / "active"
    if dead == "flag":
        flag.symlink_to("/proc/999999999")  # a pid that cannot exist
    calls: list[bool] = []
    service, reporter = make_service(tmp_path, monkeypatch, markers=DeadMarkers(), active_flag=flag,
                                     reprobe=lambda: calls.append(True) or ["pci/0000:00:1f.2"])
    service.recover()
    assert calls == ([True] if dead else [])
    assert any("probed 1 devices again" in m for m in reporter.messages) == bool(dead)


def test_a_module_a_live_patch_refers_to_keeps_its_data_symbols(tmp_path, monkeypatch) -> None:
    # Discard=kallsyms-data took its data symbols' names (kallsyms_bytes): a live
    # patch that refers to the module would find none and the kernel would refuse
    # the module. The original goes in, plain.
    from initsplit.daemon import service as service_module

    class WithoutNames(Provider):
        def get(self, path: Path) -> SplitPair:
            pair = super().get(path)
            return SplitPair(pair.name, pair.init_name, pair.core, pair.init, kallsyms_bytes=8192)

    kernel = Kernel()
    patched: list[str] = []
    monkeypatch.setattr(service_module, "livepatch_targets", lambda name: patched.append(name) or True)
    service, reporter = make_service(tmp_path, monkeypatch, kernel=kernel, provider=WithoutNames(tmp_path))
    serve(service, "virtio_blk")
    load = only_load(reporter)
    assert load.mode == "plain" and load.reason == "a live patch refers to it: loaded with its data symbols"
    assert kernel.loaded == {"virtio_blk": "virtio_blk.ko"} and patched == ["virtio_blk"]
    service.scheduler.shutdown()


def test_a_module_nobody_here_decompresses_goes_to_modprobe(tmp_path, monkeypatch) -> None:
    # A .ko.zst on a kernel without zstd decompression, and a Python without zstd
    # (3.11, 3.13): modprobe loads it, through libkmod's decompressor; the driver
    # is never left out.
    from initsplit import modfile

    monkeypatch.setattr(modfile, "kernel_decompresses", lambda kind, **_: False)
    monkeypatch.setattr(modfile, "python_decompresses", lambda kind: kind != "zstd")
    calls = tmp_path / "calls"
    ok = fake_modprobe(tmp_path, f'echo "$@" >> {calls}')
    service, _ = make_service(tmp_path, monkeypatch, modprobe=str(ok))
    load = service._load(Step("r8169", tmp_path / "r8169.ko.zst"))
    assert load.mode == "handed-to-modprobe" and "neither the kernel nor this Python" in load.reason, load
    assert calls.read_text().split() == ["r8169"]
    service.scheduler.shutdown()
