"""initsplitd on a real kernel with real QEMU devices, fed by raw kernel uevents (no udevd).

The guest is a busybox initramfs that runs the daemon in a chroot of the cached
debootstrap root (Debian's python3, python3-pyudev, python3-pyelftools,
python3-systemd, kmod and the Debian 6.1 kernel's module tree), exported read-only
over virtio-9p, with this checkout shared beside it at /mnt. QEMU adds devices whose
drivers are modules: an e1000 NIC, a virtio RNG, a disk on the q35 AHCI controller,
and a USB stick on an xHCI controller.

One boot runs every case in turn; before each, every module the cases loaded is
removed again, so each case starts from devices without drivers:

* "normal": the daemon coldplugs the devices, loads every driver two-stage, lets
  the devices work, deletes every init module when boot goes quiet, and exits.
* the fault matrix: the daemon is made to fail at a named point through its test
  hook (INITSPLIT_FAULT, daemon/initsplit/faults.py), deterministically, then is
  started again as systemd would restart it. After the second run every device has
  its driver, no init module and no load marker is left, and the logs say what
  happened.
* "sigkill": a SIGKILL from outside, to the daemon's own pid, in the middle of
  coldplug: wherever it lands, the same must hold.
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
ExitAfterQuietSec=4
Workers=2
RuntimeDir=/run/initsplit
"""

# The same with no quiet batch before the daemon stops: every init module is still
# pending when it stops (as at switch-root) and in its final batch.
CONFIG_HOLD = CONFIG.replace("QuietPeriodSec=1", "QuietPeriodSec=600")

# name -> (INITSPLIT_FAULT of the first run, what the second run's log must say,
# configuration of the first run). Each fault fires once per boot (its state lives
# in /run/initsplit/faults-fired), so every case names its own point or module.
FAULT_CASES: dict[str, tuple[str, str, str]] = {
    # Killed before READY: nothing is marked half-done, the second run loads all.
    "kill-before-ready": ("before-ready=kill", "", "conf"),
    # C of sd_mod is in, its init never ran: recovery deletes the inert C.
    "kill-after-core": ("after-core:sd_mod=kill", "sd_mod: removed the inert core module", "conf"),
    # e1000's init ran, the main thread never recorded it: recovery adopts the init module.
    "kill-after-init": ("after-init:e1000=kill", "init modules pending deletion", "conf"),
    # Killed during the final batch, right after its first init module was deleted.
    "kill-in-batch": ("batch=kill", "init modules pending deletion", "conf-hold"),
    # Killed while stopping (as at switch-root), before the final batch.
    "kill-at-stop": ("stop=kill", "init modules pending deletion", "conf-hold"),
    # An exception on the main thread: the daemon exits 1 with udev's loading back on.
    "raise-in-request": ("request=raise", "", "conf"),
}

GUEST_SETUP = HOST_ROOT_SETUP + r"""
export PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/mnt/daemon
FAULT=
CONF=/srv/conf
daemon() {
    hostrun /usr/bin/env INITSPLIT_FAULT="$FAULT" \
        /usr/bin/python3 -m initsplit.daemon --source kernel --config-root "$CONF" "$@"
}
# What the host root needs stays; every module a case loaded goes again.
KEEP=" $(cut -d' ' -f1 /proc/modules | tr '\n' ' ') "
reset_modules() {
    for pass in 1 2 3 4 5 6 7 8; do
        for m in $(cut -d' ' -f1 /proc/modules); do
            case "$KEEP" in *" $m "*) continue ;; esac
            rmmod "$m" 2>/dev/null
        done
    done
    echo "modules after reset: $(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
}
check_devices() {
    echo "modules: $(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
    cut -d' ' -f1,2 /proc/modules | sed 's/^/size /'
    echo "markers: $(ls /host/run/initsplit/loading 2>/dev/null | tr '\n' ' ')"
    echo "active flag: $(readlink /host/run/initsplit/active 2>/dev/null || echo none)"
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
# SIGKILL from outside, to the daemon's own pid, DELAY seconds after its first
# two-stage load (bench/kill_stress.py varies the delay).
sigkill_case() {
    echo "== case $1"
    reset_modules
    # The daemon itself, not a subshell: chroot execs python3, so $! is its pid.
    TMPDIR=/run/tmp chroot /host /usr/bin/python3 -m initsplit.daemon --source kernel \
        --config-root /srv/conf 2>/tmp/first.log &
    pid=$!
    i=0
    while [ $i -lt 1200 ] && ! grep -q "loaded two-stage" /tmp/first.log 2>/dev/null; do sleep 0.1; i=$((i+1)); done
    sleep "$2"
    kill -9 $pid; wait $pid; echo "killed rc=$?"
    echo "process gone: $([ -e /proc/$pid ] && echo no || echo yes)"
    echo "loaded before kill: $(grep -c 'loaded two-stage' /tmp/first.log)"
    echo "active flag between: $([ -e /host/run/initsplit/active ] && echo on || echo off)"
    daemon 2>/tmp/second.log; echo "second rc=$?"
    echo "-- first log"; cat /tmp/first.log
    echo "-- second log"; cat /tmp/second.log
    echo "-- devices"
    check_devices
}
fault_case() {
    echo "== case $1"
    reset_modules
    FAULT=$2 CONF=/srv/$3
    daemon 2>/tmp/first.log; echo "first rc=$?"
    FAULT= CONF=/srv/conf
    echo "fired: $(ls /host/run/initsplit/faults-fired 2>/dev/null | tr '\n' ' ')"
    echo "active flag between: $([ -e /host/run/initsplit/active ] && echo on || echo off)"
    echo "modules between: $(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
    daemon 2>/tmp/second.log; echo "second rc=$?"
    echo "-- first log"; cat /tmp/first.log
    echo "-- second log"; cat /tmp/second.log
    echo "-- devices"
    check_devices
}
"""


def guest_script() -> str:
    cases = "\n".join(f"fault_case {name} '{spec}' {conf}"
                      for name, (spec, _, conf) in FAULT_CASES.items())
    return GUEST_SETUP + r"""
echo "== case normal"
daemon 2>/tmp/daemon.log; echo "daemon rc=$?"
cat /tmp/daemon.log
echo "-- devices"
check_devices
""" + cases + r"""
sigkill_case sigkill 0
echo "== end"
"""


def prepare_share(share: Path) -> Path:
    """The configurations and the two disk images the guest reads from /srv."""
    for root, text in (("conf", CONFIG), ("conf-hold", CONFIG_HOLD)):
        conf = share / root / "etc/initsplit"
        conf.mkdir(parents=True)
        (conf / "initsplitd.conf").write_text(text)
    for name, mark in (("ahci.img", AHCI_MARK), ("usb.img", USB_MARK)):
        with (share / name).open("wb") as f:
            f.write(mark)
            f.truncate(8 * 1024 * 1024)
    return share


def boot_with_devices(kernel: DebianKernel, share: Path, script: str, *,  # noqa: F811
                      timeout: float) -> BootResult:
    """Boot *script* with the host root, this checkout, *share* and the devices."""
    rootfs = debian_rootfs(kernel)
    devices = [
        "-device", "e1000",
        "-device", "virtio-rng-pci",
        "-drive", f"file={share / 'ahci.img'},if=none,id=ahcidisk,format=raw,snapshot=on",
        "-device", "ide-hd,drive=ahcidisk,bus=ide.0",
        "-device", "qemu-xhci,id=xhci",
        "-drive", f"file={share / 'usb.img'},if=none,id=usbstick,format=raw,snapshot=on",
        "-device", "usb-storage,bus=xhci.0,drive=usbstick",
    ]
    return boot(kernel, script=script, files=host_root_files(kernel), host_root=rootfs.path,
                shares={"/mnt": REPO, "/srv": share}, qemu_args=devices, timeout=timeout,
                memory_mb=1024)


@pytest.fixture(scope="module")
def matrix(kernel: DebianKernel, vmshare: Path) -> BootResult:  # noqa: F811
    return boot_with_devices(kernel, prepare_share(vmshare), guest_script(), timeout=1500)


def part(text: str, name: str) -> str:
    """The "-- NAME" part of a case section, up to the next "-- " line."""
    start = text.find(f"-- {name}\n")
    assert start >= 0, f"no part {name!r} in\n{text}"
    end = text.find("\n-- ", start + 1)
    return text[start:end if end >= 0 else None]


def devices_problems(out: str) -> list[str]:
    """How the devices part *out* breaks the invariant; empty when it holds."""
    found = re.search(r"^modules: (.*)$", out, re.M)
    if not found:
        return ["no module list (the case did not finish)"]
    modules = set(found.group(1).split())
    problems = [f"{d} not loaded" for d in DRIVERS if d not in modules]
    problems += [f"{m} left loaded" for m in sorted(modules) if m.endswith("__init")]
    if not re.search(r"^markers: *$", out, re.M):
        problems.append("load markers left")
    if not re.search(r"^active flag: none$", out, re.M):
        problems.append("active flag left")
    if not re.search(r"^net \S+ driver=e1000$", out, re.M):
        problems.append("no e1000 network device")
    if "rng: virtio_rng" not in out or "rng read 16 bytes" not in out:
        problems.append("virtio RNG not working")
    disks = "\n".join(line for line in out.splitlines() if line.startswith("disk "))
    if AHCI_MARK.decode() not in disks or USB_MARK.decode() not in disks:
        problems.append("a disk cannot be read")
    return problems


def assert_devices_work(out: str) -> None:
    problems = devices_problems(out)
    assert not problems, "; ".join(problems) + "\n" + out


def assert_reset(case: str) -> None:
    """Every case starts from devices without drivers: else it proves nothing."""
    after = re.search(r"^modules after reset: (.*)$", case, re.M)
    assert after, case
    assert not set(DRIVERS) & set(after.group(1).split()), case


def test_matrix_boot_completed(matrix: BootResult) -> None:
    assert matrix.ok, matrix.report()
    assert "== end" in matrix.script_output, matrix.report()


def test_daemon_loads_every_driver_two_stage(matrix: BootResult) -> None:
    out = section(matrix, "case normal")
    assert "daemon rc=0" in out, out
    sizes = dict(re.findall(r"^size (\S+) (\d+)$", out, re.M))
    for driver in DRIVERS:
        line = re.search(rf"{driver}: loaded two-stage \(core (\d+) bytes, init module \d+ bytes, "
                         rf"[+-]\d+ pages against a plain load\)", out)
        assert line, f"{driver} not two-stage with its figures:\n{out}"
        # The journal's figure is the kernel's own.
        assert line.group(1) == sizes[driver], (driver, line.group(0), sizes[driver])
    assert "initsplitd exiting: boot quiet" in out, out
    assert re.search(r"freed \d+ init modules?", out), out


def test_devices_work_and_no_init_module_remains(matrix: BootResult) -> None:
    assert_devices_work(part(section(matrix, "case normal"), "devices"))


@pytest.mark.parametrize("name", FAULT_CASES)
def test_fault_case(matrix: BootResult, name: str) -> None:
    spec, said, _ = FAULT_CASES[name]
    case = section(matrix, f"case {name}")
    assert_reset(case)
    action = spec.rsplit("=", 1)[1]
    point = spec.rsplit("=", 1)[0]
    first = part(case, "first log")
    # The fault really fired, at its point (a case whose fault never fires proves nothing).
    key = point if ":" in point else f"{point}:*"
    assert re.search(rf"^fired: .*{re.escape(key)}", case, re.M), case
    if action == "kill":
        assert "first rc=137" in case, case
    else:
        assert "first rc=1" in case, case
        assert "fault injected at" in first and "udev loads modules itself" in first, first
    # Whatever happened, udev's own loading was back on as soon as the daemon was gone.
    assert "active flag between: off" in case, case
    assert "second rc=0" in case, case
    if said:
        assert said in part(case, "second log"), case
    assert_devices_work(part(case, "devices"))


def test_external_sigkill_mid_coldplug(matrix: BootResult) -> None:
    case = section(matrix, "case sigkill")
    assert_reset(case)
    assert "killed rc=137" in case and "process gone: yes" in case, case
    assert "active flag between: off" in case, case
    loaded_before = int(re.search(r"loaded before kill: (\d+)", case).group(1))
    assert loaded_before >= 1, case
    assert "second rc=0" in case, case
    assert_devices_work(part(case, "devices"))


def test_boot_clean(matrix: BootResult) -> None:
    problems = dmesg_problems(matrix.dmesg, tainted=matrix.tainted, allowed_taint="E")
    assert not problems, "\n".join(problems) + "\n" + matrix.report()
