"""The fault-injection hook (initsplit.faults) and what the service does when a fault
fires: udev's own loading is back on (the active flag dangles or is gone) whatever
happened. The kernel-level fault matrix is in tests/test_daemon_vm.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from initsplit import faults
from tests.test_service_settle import Request, Source, make_service
from tests.trusted_dir import trusted_tmp  # noqa: F401  (pytest fixture)

REPO = Path(__file__).resolve().parent.parent


def restore_signals() -> None:
    """Undo the handlers Service.run() installs, for the tests that follow."""
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def test_parse_stages_points_modules_and_errors() -> None:
    spec = "after-core:sd_mod=kill, initrd/stop=hang,root/batch=raise,bogus=kill,worker=explode,x/stop=kill"
    faults_initrd, errors = faults.parse(spec, in_initrd=True)
    assert errors == ["bogus=kill", "worker=explode", "x/stop=kill"]
    assert faults_initrd == {
        "after-core": [faults.Fault("after-core", "sd_mod", "kill")],
        "stop": [faults.Fault("stop", "", "hang")],
    }
    faults_root, _ = faults.parse(spec, in_initrd=False)
    assert set(faults_root) == {"after-core", "batch"}


def test_fires_once_per_boot_and_only_for_its_module(tmp_path: Path) -> None:
    parsed, _ = faults.parse("worker:e1000=raise,batch=raise", in_initrd=False)
    points = faults.FaultPoints(parsed, state_dir=tmp_path / "fired")
    points.hit("worker", "ahci")          # another module: nothing
    points.hit("after-core", "e1000")     # another point: nothing
    with pytest.raises(faults.InjectedFault, match="worker:e1000"):
        points.hit("worker", "e1000")
    points.hit("worker", "e1000")         # fired already in this boot
    with pytest.raises(faults.InjectedFault):
        points.hit("batch", "ahci")       # no module named: the first one
    # A new daemon in the same boot (same state dir) does not fire them again.
    again = faults.FaultPoints(parsed, state_dir=tmp_path / "fired")
    again.hit("worker", "e1000")
    again.hit("batch", "xhci_pci")
    assert sorted(p.name for p in (tmp_path / "fired").iterdir()) == ["batch:*", "worker:e1000"]


def test_no_spec_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(faults.ENV, raising=False)
    monkeypatch.setattr(faults, "points", faults.FaultPoints())
    assert faults.install_from_environment(in_initrd=False) == []
    faults.hit("worker", "e1000")
    faults.hit("stop")


def test_kill_is_sigkill(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        from pathlib import Path
        from initsplit import faults
        parsed, _ = faults.parse("stop=kill", in_initrd=False)
        faults.FaultPoints(parsed, state_dir=Path({str(tmp_path)!r})).hit("stop")
        print("survived")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO / "daemon")))
    assert run.returncode == -signal.SIGKILL, run
    assert "survived" not in run.stdout


def test_active_flag_is_a_link_to_our_proc_entry_and_goes_on_an_exception(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flag = tmp_path / "run/active"
    seen: list[str] = []

    def coldplug_checks_flag() -> None:
        seen.append(os.readlink(flag))
        assert os.path.exists(flag)  # what udev's TEST== sees: our live /proc entry

    source = Source(on_coldplug=coldplug_checks_flag)
    source.queued = []
    service, _ = make_service(tmp_path, source, active_flag=flag, exit_after_quiet=0.3)
    parsed, _ = faults.parse("before-ready=raise", in_initrd=False)
    monkeypatch.setattr(faults, "points", faults.FaultPoints(parsed, state_dir=tmp_path / "fired"))
    try:
        with pytest.raises(faults.InjectedFault):
            service.run()
    finally:
        restore_signals()
    assert seen == [f"/proc/{os.getpid()}"]
    assert not flag.exists() and not flag.is_symlink()


def test_active_flag_of_a_dead_daemon_dangles(tmp_path: Path) -> None:
    # What a SIGKILL leaves: the link names a pid that is gone, so udev's TEST== fails.
    child = subprocess.Popen(["sleep", "0"])
    child.wait()
    flag = tmp_path / "active"
    os.symlink(f"/proc/{child.pid}", flag)
    assert flag.is_symlink() and not os.path.exists(flag)


def test_active_flag_not_ours_is_left_alone(tmp_path: Path) -> None:
    flag = tmp_path / "active"
    os.symlink("/proc/1", flag)  # another (live) daemon's
    service, _ = make_service(tmp_path, Source(), active_flag=flag)
    service._set_active(False)
    assert os.readlink(flag) == "/proc/1"
    service.scheduler.shutdown()


def test_request_exception_hands_back_and_gives_back_init_modules(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = Source()
    source.queued = []
    service, _ = make_service(tmp_path, source, active_flag=tmp_path / "active")
    deleted: list[str] = []
    monkeypatch.setattr("initsplit.loader.recovery.delete_module", lambda name: deleted.append(name))
    # The init module's init succeeded (this host may have no /proc/modules to say so).
    monkeypatch.setattr(type(service.markers), "init_state", lambda self, name: "live", raising=False)
    service.pending_init.append(("e1000", "e1000__init"))
    parsed, _ = faults.parse("request=raise", in_initrd=False)
    monkeypatch.setattr(faults, "points", faults.FaultPoints(parsed, state_dir=tmp_path / "fired"))

    def coldplug():
        return [Request(("pci:v00008086d0000100E",))]

    monkeypatch.setattr(source, "coldplug", coldplug)
    try:
        with pytest.raises(faults.InjectedFault):
            service.run()
    finally:
        restore_signals()
    assert deleted == ["e1000__init"]
    assert not (tmp_path / "active").is_symlink()


def test_recover_only_clears_markers_of_modules_not_loaded(
        trusted_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    # initsplitd --recover, as initsplitd-handback runs it after an unclean end. The
    # markers name modules that are not loaded: they are dropped and nothing is
    # deleted (the VM tests cover markers of modules really loaded).
    from initsplit.daemon import main as daemon_main

    conf = trusted_tmp / "etc/initsplit"
    conf.mkdir(parents=True)
    runtime = trusted_tmp / "run/initsplit"
    (conf / "initsplitd.conf").write_text(f"[Daemon]\nRuntimeDir={runtime}\n")
    (runtime / "loading").mkdir(parents=True)
    (runtime / "loading/isplit_absent").write_text("core isplit_absent__init\n")
    (runtime / "loading/isplit_gone").write_text("init-done isplit_gone__init\n")
    monkeypatch.setattr("initsplit.loader.recovery.proc_modules", lambda *_: {"ext4": 4096})
    reprobed: list[bool] = []
    monkeypatch.setattr(daemon_main, "reprobe_unbound", lambda: reprobed.append(True) or [])
    assert daemon_main.main(["--recover", "--config-root", str(trusted_tmp), "--kernel-cmdline", ""]) == 0
    assert list((runtime / "loading").iterdir()) == []
    assert reprobed == [True]  # after an unclean end, unbound devices are probed again


def test_recovery_keeps_markers_when_the_kernel_list_is_unreadable(
        trusted_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from initsplit.loader.recovery import LoadMarkers

    def unreadable(*_: object) -> dict[str, int]:
        raise FileNotFoundError(2, "No such file or directory")

    markers = LoadMarkers(trusted_tmp)
    markers.core("ext4", "ext4__init")
    monkeypatch.setattr("initsplit.loader.recovery.proc_modules", unreadable)
    result = markers.recover()
    assert result.problems == ["cannot read /proc/modules: No such file or directory"]
    assert (trusted_tmp / "ext4").read_text() == "core ext4__init\n"


def test_a_stuck_load_ends_the_daemon_with_udev_loading_back_on(tmp_path: Path) -> None:
    import threading

    from initsplit.daemon.service import LoadStuck

    release = threading.Event()
    source = Source()
    source.queued = []
    service, _ = make_service(tmp_path, source, active_flag=tmp_path / "active",
                              load_timeout=0.5, exit_after_quiet=30)

    def coldplug():
        return [Request(("pci:v00008086d0000100E",))]

    def hung_load(step):  # a worker that never returns (a hung command, say)
        release.wait(30)
        raise AssertionError("released")

    source.coldplug = coldplug  # type: ignore[method-assign]
    service.scheduler._load = hung_load  # type: ignore[attr-defined]
    try:
        with pytest.raises(LoadStuck, match=r"load of pci:v00008086d0000100E still running after 0.5 s"):
            service.run()
    finally:
        release.set()
        restore_signals()
    assert not (tmp_path / "active").is_symlink()
