"""initsplitd on a real kernel with real QEMU devices, fed by raw kernel uevents (no udevd).

The guest is a busybox initramfs that runs the daemon in a chroot of the cached
debootstrap root (Debian's python3, python3-pyudev, python3-pyelftools,
python3-systemd, kmod and the Debian 6.1 kernel's module tree), exported read-only
over virtio-9p, with this checkout shared beside it at /mnt. QEMU adds devices whose drivers are modules:
an e1000 NIC, a virtio RNG, a disk on the q35 AHCI controller, and a USB stick on an
xHCI controller. The daemon must coldplug them, load every driver two-stage, let
the devices work, delete every init module when boot goes quiet, and exit.
A second boot kills the daemon with SIGKILL in the middle of coldplug and starts
it again: every device must still end up with its driver, nothing half-loaded.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.testbed import (
    HOST_ROOT_SETUP,
    BootResult,
    DebianKernel,
    boot,
    debian_rootfs,
    dmesg_problems,
    host_root_files,
)
from tests.testbed import script_section as section
from tests.testbed.fixtures import kernel, vmshare  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parent.parent
AHCI_MARK = b"ISPLIT-AHCI-DISK"
USB_MARK = b"ISPLIT-USB-STICK"
# Drivers of the devices below; each must be loaded two-stage by the daemon.
DRIVERS = ("e1000", "virtio_rng", "ahci", "sd_mod", "xhci_pci", "usb_storage")

CONFIG = """[Daemon]
QuietPeriodSec=1
ExitAfterQuietSec=6
Workers=2
RuntimeDir=/run/initsplit
"""

GUEST_SETUP = HOST_ROOT_SETUP + r"""
export PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/mnt/daemon
daemon() {
    hostrun /usr/bin/python3 -m initsplit.daemon --source kernel --config-root /srv/conf "$@"
}
check_devices() {
    echo "modules: $(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
    cut -d' ' -f1,2 /proc/modules | sed 's/^/size /'
    for n in /sys/class/net/*; do
        d=$(basename $(readlink $n/device/driver 2>/dev/null) 2>/dev/null); echo "net $(basename $n) driver=$d"
    done
    echo "rng: $(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)"
    dd if=/dev/hwrng of=/tmp/rng bs=16 count=1 2>/dev/null && echo "rng read $(wc -c < /tmp/rng) bytes"
    for d in /sys/block/sd*; do
        b=$(basename $d)
        echo "disk $b: $(dd if=/dev/$b bs=16 count=1 2>/dev/null)"
    done
}
"""

FIRST_BOOT = GUEST_SETUP + r"""
echo "== daemon"
daemon 2>/tmp/daemon.log; echo "daemon rc=$?"
cat /tmp/daemon.log
echo "== devices"
check_devices
echo "== end"
"""

KILL_BOOT = GUEST_SETUP + r"""
echo "== kill"
daemon 2>/tmp/first.log &
pid=$!
# Let it get into coldplug (imports take ~2 s under TCG, much more on a loaded
# host), then kill it hard right after its first two-stage load.
i=0
while [ $i -lt 1200 ] && ! grep -q "loaded two-stage" /tmp/first.log 2>/dev/null; do sleep 0.1; i=$((i+1)); done
kill -9 $pid; wait $pid; echo "killed rc=$?"
echo "loaded before kill: $(grep -c 'loaded two-stage' /tmp/first.log)"
echo "modules at kill: $(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
echo "== restart"
daemon 2>/tmp/second.log; echo "daemon rc=$?"
cat /tmp/second.log
echo "== devices"
check_devices
echo "== end"
"""


@pytest.fixture(scope="module")
def shared(vmshare: Path) -> Path:
    conf = vmshare / "conf/etc/initsplit"
    conf.mkdir(parents=True)
    (conf / "initsplitd.conf").write_text(CONFIG)
    for name, mark in (("ahci.img", AHCI_MARK), ("usb.img", USB_MARK)):
        with (vmshare / name).open("wb") as f:
            f.write(mark)
            f.truncate(8 * 1024 * 1024)
    return vmshare


def run_boot(kernel: DebianKernel, shared: Path, script: str) -> BootResult:  # noqa: F811
    rootfs = debian_rootfs(kernel)
    devices = [
        "-device", "e1000",
        "-device", "virtio-rng-pci",
        "-drive", f"file={shared / 'ahci.img'},if=none,id=ahcidisk,format=raw,snapshot=on",
        "-device", "ide-hd,drive=ahcidisk,bus=ide.0",
        "-device", "qemu-xhci,id=xhci",
        "-drive", f"file={shared / 'usb.img'},if=none,id=usbstick,format=raw,snapshot=on",
        "-device", "usb-storage,bus=xhci.0,drive=usbstick",
    ]
    return boot(kernel, script=script, files=host_root_files(kernel), host_root=rootfs.path,
                shares={"/mnt": REPO, "/srv": shared}, qemu_args=devices, timeout=480,
                memory_mb=1024)


@pytest.fixture(scope="module")
def first(kernel: DebianKernel, shared: Path) -> BootResult:  # noqa: F811
    return run_boot(kernel, shared, FIRST_BOOT)


@pytest.fixture(scope="module")
def killed(kernel: DebianKernel, shared: Path) -> BootResult:  # noqa: F811
    return run_boot(kernel, shared, KILL_BOOT)


def assert_devices_work(result: BootResult) -> None:
    out = section(result, "devices")
    modules = set(re.search(r"^modules: (.*)$", out, re.M).group(1).split())
    assert set(DRIVERS) <= modules, out
    assert not [m for m in modules if m.endswith("__init")], out
    assert re.search(r"^net \S+ driver=e1000$", out, re.M), out
    assert "rng: virtio_rng" in out and "rng read 16 bytes" in out, out
    disks = "\n".join(line for line in out.splitlines() if line.startswith("disk "))
    assert AHCI_MARK.decode() in disks and USB_MARK.decode() in disks, out


def test_daemon_loads_every_driver_two_stage(first: BootResult) -> None:
    assert first.ok, first.report()
    log = section(first, "daemon")
    assert "daemon rc=0" in log, log
    sizes = dict(re.findall(r"^size (\S+) (\d+)$", section(first, "devices"), re.M))
    for driver in DRIVERS:
        line = re.search(rf"{driver}: loaded two-stage \(core (\d+) bytes, init module \d+ bytes, "
                         rf"[+-]\d+ pages against a plain load\)", log)
        assert line, f"{driver} not two-stage with its figures:\n{log}"
        # The journal's figure is the kernel's own.
        assert line.group(1) == sizes[driver], (driver, line.group(0), sizes[driver])
    assert "initsplitd exiting: boot quiet" in log, log
    assert re.search(r"freed \d+ init modules?", log), log


def test_devices_work_and_no_init_module_remains(first: BootResult) -> None:
    assert_devices_work(first)


def test_first_boot_clean(first: BootResult) -> None:
    problems = dmesg_problems(first.dmesg, tainted=first.tainted, allowed_taint="E")
    assert not problems, "\n".join(problems) + "\n" + first.report()


def test_killed_mid_coldplug_and_restarted(killed: BootResult) -> None:
    assert killed.ok, killed.report()
    kill = section(killed, "kill")
    assert "killed rc=137" in kill, kill
    loaded_before = int(re.search(r"loaded before kill: (\d+)", kill).group(1))
    assert loaded_before >= 1, kill
    restart = section(killed, "restart")
    assert "daemon rc=0" in restart, restart
    assert_devices_work(killed)
    problems = dmesg_problems(killed.dmesg, tainted=killed.tainted, allowed_taint="E")
    assert not problems, "\n".join(problems) + "\n" + killed.report()
