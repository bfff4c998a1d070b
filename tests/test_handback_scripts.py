"""bin/initsplitd-handback (ExecStopPost= of both units) and bin/initsplitd-settle
with a dead daemon's flag: run for real with /bin/sh, a fake udevadm on PATH and the
run directory moved to a temporary one."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def script(tmp_path: Path, name: str) -> Path:
    """The script with /run/initsplit replaced by a directory of the test's."""
    text = (REPO / "bin" / name).read_text().replace("run=/run/initsplit", f"run={tmp_path}/run")
    assert f"run={tmp_path}/run" in text, name
    out = tmp_path / name
    out.write_text(text)
    return out


@pytest.fixture
def fake_udevadm(tmp_path: Path) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "udevadm.log"
    (bindir / "udevadm").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    (bindir / "udevadm").chmod(0o755)
    # initsplitd --recover as the handback calls it: it removes the markers.
    (bindir / "initsplitd").write_text(
        f'#!/bin/sh\necho "initsplitd $*" >> {log}\nrm -rf {tmp_path}/run/loading\n')
    (bindir / "initsplitd").chmod(0o755)
    # systemctl show -P ActiveState UNIT: what the test writes to unit-state, and
    # "inactive" when it wrote nothing.
    (bindir / "systemctl").write_text(
        f'#!/bin/sh\necho "systemctl $*" >> {tmp_path}/systemctl.log\n'
        f'cat {tmp_path}/unit-state 2>/dev/null || echo inactive\n')
    (bindir / "systemctl").chmod(0o755)
    (tmp_path / "run").mkdir()
    return log


def run(tmp_path: Path, path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, PATH=f"{tmp_path}/bin:{os.environ['PATH']}",
                INITSPLITD=f"{tmp_path}/bin/initsplitd", **env)
    return subprocess.run(["/bin/sh", str(path), *args], env=full, capture_output=True,
                          text=True, timeout=30)


def start_fake_daemon(tmp_path: Path, trap: str, *, prelude: str = "") -> subprocess.Popen[bytes]:
    """A stand-in daemon: a #! script named initsplitd (its comm) that runs *trap* on
    SIGUSR1, returned once the trap is in place (SIGUSR1 before it would kill it)."""
    fake = tmp_path / "initsplitd"
    fake.write_text(f"#!/bin/sh\n{prelude}trap '{trap}' USR1\ntouch {tmp_path}/trap-ready\n"
                    "while :; do sleep 0.05; done\n")
    fake.chmod(0o755)
    daemon = subprocess.Popen([str(fake)])
    deadline = time.monotonic() + 10
    while not (tmp_path / "trap-ready").exists():
        if time.monotonic() >= deadline or daemon.poll() is not None:
            daemon.kill()
            raise AssertionError("the stand-in daemon did not set its trap")
        time.sleep(0.01)
    return daemon


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_handback_after_clean_exit_only_removes_the_flag(tmp_path: Path, fake_udevadm: Path) -> None:
    flag = tmp_path / "run/active"
    os.symlink(f"/proc/{dead_pid()}", flag)
    result = run(tmp_path, script(tmp_path, "initsplitd-handback"), SERVICE_RESULT="success")
    assert result.returncode == 0, result
    assert not flag.is_symlink()
    assert not fake_udevadm.exists()


@pytest.mark.parametrize("result_name", ["signal", "exit-code", "watchdog", "timeout"])
def test_handback_after_unclean_end_replays_devices(tmp_path: Path, fake_udevadm: Path,
                                                    result_name: str) -> None:
    os.symlink(f"/proc/{dead_pid()}", tmp_path / "run/active")
    result = run(tmp_path, script(tmp_path, "initsplitd-handback"), SERVICE_RESULT=result_name,
                 EXIT_CODE="killed", EXIT_STATUS="KILL")
    assert result.returncode == 0, result
    assert not (tmp_path / "run/active").is_symlink()
    # Recovery first (the inert core modules go), then udev replays the devices.
    assert fake_udevadm.read_text() == "initsplitd --recover\ntrigger --type=devices --action=add\n"
    assert f"ended with {result_name}" in result.stderr


def test_settle_with_a_dead_daemons_flag_signals_nobody(tmp_path: Path, fake_udevadm: Path) -> None:
    # A stale flag must neither make settle wait nor signal a pid that may be reused.
    os.symlink(f"/proc/{os.getpid()}", tmp_path / "run/active")  # a live pid, but not initsplitd
    result = run(tmp_path, script(tmp_path, "initsplitd-settle"), "5")
    assert result.returncode == 0, result
    # No daemon to wait for: udev loads the modules itself, and a dead daemon's
    # handback may be replaying the devices, so udev is settled once more.
    first, second = fake_udevadm.read_text().splitlines()
    assert first == "settle --timeout=5" and second.startswith("settle --timeout="), (first, second)
    os.remove(tmp_path / "run/active")
    os.symlink(f"/proc/{dead_pid()}", tmp_path / "run/active")
    assert run(tmp_path, script(tmp_path, "initsplitd-settle"), "5").returncode == 0


def test_settle_signals_a_live_initsplitd_and_waits_for_it(tmp_path: Path, fake_udevadm: Path) -> None:
    # It answers SIGUSR1 by writing the settled flag after a moment, as the daemon does.
    daemon = start_fake_daemon(tmp_path, f"sleep 0.3; echo $$ > {tmp_path}/run/settled; exit 0")
    try:
        os.symlink(f"/proc/{daemon.pid}", tmp_path / "run/active")
        result = run(tmp_path, script(tmp_path, "initsplitd-settle"), "5")
        assert result.returncode == 0, result
        assert (tmp_path / "run/settled").read_text().strip() == str(daemon.pid)
        assert daemon.wait(timeout=5) == 0  # it got SIGUSR1
    finally:
        daemon.kill()


def test_settle_waits_for_a_dead_daemons_recovery(tmp_path: Path, fake_udevadm: Path) -> None:
    # The daemon died with a load half-done: its marker stays until the handback's
    # recovery removed the inert core module. Mounting the root before that would
    # find the file system driver "loaded" and fail.
    os.symlink(f"/proc/{dead_pid()}", tmp_path / "run/active")
    (tmp_path / "run/loading").mkdir()
    (tmp_path / "run/loading/ext4").write_text("core ext4__init\n")
    settle = subprocess.Popen(["/bin/sh", str(script(tmp_path, "initsplitd-settle")), "10"],
                              env=dict(os.environ, PATH=f"{tmp_path}/bin:{os.environ['PATH']}"))
    time.sleep(1.5)
    assert settle.poll() is None, "settle returned while the marker was there"
    (tmp_path / "run/loading/ext4").unlink()
    assert settle.wait(timeout=5) == 0
    # The second settle (after the recovery) gets what is left of the 10 s.
    first, second = fake_udevadm.read_text().splitlines()
    assert first == "settle --timeout=10" and second.startswith("settle --timeout="), (first, second)
    assert 1 <= int(second.split("=")[1]) <= 9


def test_settle_waits_for_recovery_when_the_daemon_dies_while_it_waits(
        tmp_path: Path, fake_udevadm: Path) -> None:
    # The daemon dies (as on SIGKILL) after settle signalled it, leaving a marker:
    # settle must not return before the recovery has removed it.
    daemon = start_fake_daemon(tmp_path, "exit 9")
    (tmp_path / "run/loading").mkdir()
    (tmp_path / "run/loading/ext4").write_text("core ext4__init\n")
    try:
        os.symlink(f"/proc/{daemon.pid}", tmp_path / "run/active")
        settle = subprocess.Popen(["/bin/sh", str(script(tmp_path, "initsplitd-settle")), "10"],
                                  env=dict(os.environ, PATH=f"{tmp_path}/bin:{os.environ['PATH']}"))
        assert daemon.wait(timeout=5) == 9
        time.sleep(0.5)
        assert settle.poll() is None, "settle returned while the dead daemon's marker was there"
        (tmp_path / "run/loading/ext4").unlink()
        assert settle.wait(timeout=5) == 0
    finally:
        daemon.kill()


def test_settle_waits_while_systemd_restarts_the_daemon(tmp_path: Path, fake_udevadm: Path) -> None:
    # The daemon died and its recovery is done, but systemd is about to start it
    # again (Restart=on-failure, RestartSec=): the new daemon loads two-stage, so
    # settle waits for it, signals it, and returns only once it has settled.
    os.symlink(f"/proc/{dead_pid()}", tmp_path / "run/active")
    (tmp_path / "unit-state").write_text("activating\n")
    settle = subprocess.Popen(["/bin/sh", str(script(tmp_path, "initsplitd-settle")), "10"],
                              env=dict(os.environ, PATH=f"{tmp_path}/bin:{os.environ['PATH']}"))
    try:
        time.sleep(0.5)
        assert settle.poll() is None, "settle returned while systemd was restarting the daemon"
        daemon = start_fake_daemon(
            tmp_path, f"echo USR1 >> {fake_udevadm}; echo $$ > {tmp_path}/run/settled; exit 0")
        # The flag is replaced in one step, and only then does the unit say
        # "active" (systemd does so on READY=1, after the daemon set the flag).
        os.symlink(f"/proc/{daemon.pid}", tmp_path / "run/active.new")
        os.replace(tmp_path / "run/active.new", tmp_path / "run/active")
        (tmp_path / "unit-state").write_text("active\n")
        assert settle.wait(timeout=5) == 0
        assert daemon.wait(timeout=5) == 0  # the restarted daemon got SIGUSR1
        # The dead daemon's handback replayed every device (udevadm trigger): those
        # events went through udev before the restarted daemon was signalled, so
        # they are in its queue when it settles (the root's fs-TYPE among them).
        lines = fake_udevadm.read_text().splitlines()
        assert len(lines) == 3 and lines[0] == "settle --timeout=10", lines
        assert lines[1].startswith("settle --timeout=") and lines[2] == "USR1", lines
        assert "show -P ActiveState initsplitd-initrd.service" in (tmp_path / "systemctl.log").read_text()
    finally:
        settle.kill()
        if "daemon" in locals():
            daemon.kill()


def test_settle_gives_up_on_a_unit_that_stays_activating(tmp_path: Path, fake_udevadm: Path) -> None:
    os.symlink(f"/proc/{dead_pid()}", tmp_path / "run/active")
    (tmp_path / "unit-state").write_text("activating\n")
    started = time.monotonic()
    result = run(tmp_path, script(tmp_path, "initsplitd-settle"), "1")
    assert result.returncode == 0 and "did not settle within 1s" in result.stderr, result
    assert 0.9 < time.monotonic() - started < 5


def test_settle_signals_a_daemon_that_came_up_while_it_asked_systemd(
        tmp_path: Path, fake_udevadm: Path) -> None:
    # Between settle's look at the flag (the dead daemon's) and its question to
    # systemd, the restarted daemon set its flag and said READY=1: the unit is
    # "active". Returning then would mount the root while that daemon loads.
    # systemctl here does what the new daemon did in that moment.
    daemon = start_fake_daemon(
        tmp_path, f"echo USR1 >> {fake_udevadm}; echo $$ > {tmp_path}/run/settled; exit 0")
    try:
        (tmp_path / "bin/systemctl").write_text(
            f"#!/bin/sh\nln -sfn /proc/{daemon.pid} {tmp_path}/run/active\necho active\n")
        os.symlink(f"/proc/{dead_pid()}", tmp_path / "run/active")
        result = run(tmp_path, script(tmp_path, "initsplitd-settle"), "10")
        assert result.returncode == 0, result
        assert daemon.wait(timeout=5) == 0  # it got SIGUSR1
        assert fake_udevadm.read_text().splitlines()[-1] == "USR1"
    finally:
        daemon.kill()


def test_settle_asks_again_while_a_settle_made_loads(tmp_path: Path, fake_udevadm: Path) -> None:
    # The first settle loaded the disk driver; the disk it added asks for its file
    # system's driver only once udev has processed its event. So: udev settled,
    # the daemon asked again, until a settle made no load.
    daemon = start_fake_daemon(
        tmp_path, f"n=$((n + 1)); echo USR1 >> {fake_udevadm}; "
        f"if [ $n -lt 3 ]; then echo \"$$ 2\" > {tmp_path}/run/settled; "
        f"else echo \"$$ 0\" > {tmp_path}/run/settled; fi", prelude="n=0\n")
    try:
        os.symlink(f"/proc/{daemon.pid}", tmp_path / "run/active")
        result = run(tmp_path, script(tmp_path, "initsplitd-settle"), "10")
        assert result.returncode == 0, result
        lines = fake_udevadm.read_text().splitlines()
        assert [l.split("=")[0] for l in lines] == [
            "settle --timeout", "USR1", "settle --timeout", "USR1", "settle --timeout", "USR1"], lines
        assert daemon.poll() is None  # answered three times, still there
    finally:
        daemon.kill()
