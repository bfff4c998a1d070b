"""initsplitd on a real kernel with real QEMU devices, fed by raw kernel uevents (no udevd).

The guest is a busybox initramfs that runs the daemon in a chroot of the cached
debootstrap root (Debian's python3, python3-pyudev, python3-pyelftools,
python3-systemd, kmod and the kernel's module tree), exported read-only
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

It boots once per kernel: Debian 12's Linux 6.1 runs every case; Debian 13's Linux
6.12 (its own debootstrap root, python3.13) runs the normal case, the SIGKILL case
and the fault cases whose kernel interaction differs there (FAULT_CASES_612):
killed or failing between C and I (an inert C that recovery deletes, a C deleted
before the original loads: 6.12 frees C's memories, up to four, not one layout),
after I's init (I adopted by the next run), killed while I's init probed a
controller (the driver core's swallowed probe failure), in and before the final
batch delete (the batch deletes I's memories). The others exercise the daemon's
own bookkeeping (READY, the worker timeout, /run full, install commands,
softdeps, the cache's checks), which does not depend on the kernel; leaving them
out halves the 6.12 boot's cases (its CI cost: see README, "make test").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from initsplit.modfile import read_module
from tests.testbed import (
    HOST_ROOT_SETUP,
    BootResult,
    DebianKernel,
    boot,
    debian_kernel,
    debian_rootfs,
    dmesg_problems,
    host_root_files,
)
from tests.testbed import script_section as section
from tests.testbed.fixtures import vmshare  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parent.parent
AHCI_MARK = b"ISPLIT-AHCI-DISK"
USB_MARK = b"ISPLIT-USB-STICK"
# Drivers of the devices below; each must be loaded two-stage by the daemon.
DRIVERS = ("e1000", "virtio_rng", "ahci", "sd_mod", "xhci_pci", "usb_storage")

# TwoStage=always: these boots exercise the two-stage loads and their faults; the
# default (when-not-worse) weighs the init module's slab and loads every module of
# Debian 6.1 plain (split/decide.py).
CONFIG = """[Daemon]
TwoStage=always
QuietPeriodSec=1
ExitAfterQuietSec=4
Workers=2
RuntimeDir=/run/initsplit
"""

# The same with no quiet batch before the daemon stops: every init module is still
# pending when it stops (as at switch-root) and in its final batch.
# (BatchSize= too: 32 pending init modules would start a batch of their own.)
CONFIG_HOLD = CONFIG.replace("QuietPeriodSec=1", "QuietPeriodSec=600") + "BatchSize=100000\n"

# The same, with a stuck load given up on after 30 s (a worker that hangs): long
# enough that no load but the hung one lasts it, splits made at boot under TCG on
# a busy host included (5 s did not, once).
CONFIG_HANG = CONFIG + "LoadTimeoutSec=30s\n"
# An install command that hangs is killed after 3 s.
CONFIG_INSTALL = CONFIG + "InstallCommandTimeoutSec=3s\n"
# The pre-split cache of some drivers, damaged by prepare_share() in every way the
# daemon must refuse (a symlink, a world-writable file, a stale manifest).
CONFIG_BADCACHE = CONFIG + "CacheDir=/srv/cache\n"
BAD_CACHE = {"e1000": "a symlink", "ahci": "world-writable", "virtio_rng": "does not match"}

# A private modprobe.d for the cases that need one, bind-mounted over the host
# root's (read-only) /etc/modprobe.d for the first run.
MODPROBE_D = r"""
mkdir -p /tmp/mpd && cp -a /host/etc/modprobe.d/. /tmp/mpd/ 2>/dev/null
printf '%s\n' "$1" > /tmp/mpd/isplit-case.conf
mount --bind /tmp/mpd /host/etc/modprobe.d
"""
MODPROBE_D_UNDO = "umount /host/etc/modprobe.d; rm -rf /tmp/mpd"


@dataclass(frozen=True)
class FaultCase:
    """One case of the matrix: a first run that meets a fault, then a second run."""

    fault: str = ""          # INITSPLIT_FAULT of the first run
    conf: str = "conf"       # configuration root of the first run, below /srv
    first_rc: int = 137      # 137: killed; 1: gave up with an error; 0: coped
    first_says: str = ""     # in the first run's log
    second_says: str = ""    # in the second run's log
    setup: str = ""          # shell run before the first run ...
    undo: str = ""           # ... and after it


# Each fault fires once per boot (its state lives in /run/initsplit/faults-fired), so
# every case names its own point or module.
FAULT_CASES: dict[str, FaultCase] = {
    # Killed before READY: nothing is marked half-done, the second run loads all.
    "kill-before-ready": FaultCase("before-ready=kill"),
    # C of sd_mod is in, its init never ran: recovery deletes the inert C.
    "kill-after-core": FaultCase("after-core:sd_mod=kill",
                                 second_says="sd_mod: removed the inert core module"),
    # e1000's init ran, the main thread never recorded it: recovery adopts the init module.
    "kill-after-init": FaultCase("after-init:e1000=kill", second_says="init modules pending deletion"),
    # Killed while ahci's init probed the controller: the probe's kthread_create()
    # fails with -EINTR in a dying task, the driver core swallows the error and
    # the controller stays unbound with ahci LIVE (loader/reprobe.py; seen in
    # bench/kill_stress.py). Deterministically: killed right after ahci's init,
    # then the controllers unbound as that failed probe leaves them. The second
    # run probes the unbound devices again and the AHCI disk comes back.
    "probe-failed-in-dying-daemon": FaultCase(
        "after-init:ahci=kill", second_says="devices again that a killed initsplitd left without a driver",
        undo="for d in /sys/bus/pci/drivers/ahci/0000:*; do echo ${d##*/} > /sys/bus/pci/drivers/ahci/unbind; done"),
    # Killed during the final batch, right after its first init module was deleted.
    "kill-in-batch": FaultCase("batch=kill", "conf-hold", second_says="init modules pending deletion"),
    # Killed while stopping (as at switch-root), before the final batch.
    "kill-at-stop": FaultCase("stop=kill", "conf-hold", second_says="init modules pending deletion"),
    # An exception on the main thread: the daemon exits 1 with udev's loading back on.
    "raise-in-request": FaultCase("request=raise", first_rc=1,
                                  first_says="initsplitd failed: InjectedFault"),
    # An exception in a worker before anything is loaded: that module loads plain.
    "raise-in-worker": FaultCase("worker:ahci=raise", first_rc=0,
                                 first_says="ahci: loaded plain (two-stage load not possible: "
                                            "InjectedFault"),
    # An exception with C in the kernel: C is deleted first, then the original loads.
    "raise-after-core": FaultCase("after-core:xhci_pci=raise", first_rc=0,
                                  first_says="xhci_pci: loaded plain (init module not loaded: "
                                             "InjectedFault"),
    # A worker that never returns: given up on after LoadTimeoutSec=, exit 1.
    "hang-in-worker": FaultCase("worker:virtio_rng=hang", "conf-hang", first_rc=1,
                                first_says="initsplitd gives up: load of virtio_rng still running"),
    # /run full: no crash marker can be written, so nothing loads two-stage.
    "run-full": FaultCase(first_rc=0, first_says="No space left on device",
                          setup="mkdir -p /host/run/initsplit/loading; "
                                "mount -t tmpfs -o size=4k,mode=755 tmpfs /host/run/initsplit/loading; "
                                "dd if=/dev/zero of=/host/run/initsplit/loading/.fill bs=1k count=64 2>/dev/null",
                          undo="umount /host/run/initsplit/loading"),
    # An install command that hangs the first time: killed after 3 s, e1000 fails;
    # the second run's retry runs it again and it loads.
    "install-hangs": FaultCase(conf="conf-install", first_rc=0,
                               first_says="did not finish within 3 s",
                               setup="set -- 'install e1000 /bin/sh -c \"[ -e /run/isplit-hung ] || "
                                     "{ touch /run/isplit-hung; sleep 600; }; "
                                     "/sbin/modprobe --ignore-install e1000\"'" + MODPROBE_D,
                               undo=MODPROBE_D_UNDO),
    # A soft dependency without a file: it once made the scheduler wait for ever.
    "missing-softdep": FaultCase(first_rc=0, first_says="e1000: loaded two-stage",
                                 setup="set -- 'softdep e1000 pre: isplit_missing_dep'" + MODPROBE_D,
                                 undo=MODPROBE_D_UNDO),
    # Damaged cache entries: each of those modules loads plain, with the reason.
    "bad-cache": FaultCase(conf="conf-badcache", first_rc=0, first_says=BAD_CACHE["e1000"]),
}

RELEASES = ("12", "13")  # Debian 12 (Linux 6.1), Debian 13 (Linux 6.12)
# The fault cases of the 6.12 boot (see the module docstring).
FAULT_CASES_612 = ("kill-after-core", "kill-after-init", "probe-failed-in-dying-daemon",
                   "kill-in-batch", "kill-at-stop", "raise-after-core")
assert set(FAULT_CASES_612) <= set(FAULT_CASES)


def fault_cases(release: str) -> tuple[str, ...]:
    """The fault cases the boot of *release*'s kernel runs, in FAULT_CASES' order."""
    return tuple(n for n in FAULT_CASES if release == "12" or n in FAULT_CASES_612)


# Tests that read one fault case's section, by the case: generated only for the
# releases whose boot runs it.
CASE_OF_TEST = {"test_bad_cache_entries_each_load_plain_with_the_reason": "bad-cache",
                "test_run_full_loads_every_driver_plain": "run-full"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One module-scoped boot per release; test_fault_case once per case that boot runs."""
    if "kernel" not in metafunc.fixturenames:
        return
    if "name" in metafunc.fixturenames:
        pairs = [(r, n) for r in RELEASES for n in fault_cases(r)]
        metafunc.parametrize(("kernel", "name"), pairs, indirect=["kernel"], scope="module",
                             ids=[f"debian{r}-{n}" for r, n in pairs])
        return
    case = CASE_OF_TEST.get(metafunc.function.__name__)
    releases = [r for r in RELEASES if case is None or case in fault_cases(r)]
    metafunc.parametrize("kernel", releases, indirect=True, scope="module",
                         ids=[f"debian{r}" for r in releases])


@pytest.fixture(scope="module")
def kernel(request: pytest.FixtureRequest) -> DebianKernel:
    """The kernel of the release pytest_generate_tests() gives."""
    return debian_kernel(release=request.param)


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
    echo "markers: $(ls -A /host/run/initsplit/loading 2>/dev/null | tr '\n' ' ')"
    echo "active flag: $(readlink /host/run/initsplit/active 2>/dev/null || echo none)"
    for n in /sys/class/net/*; do
        d=$(basename $(readlink $n/device/driver 2>/dev/null) 2>/dev/null); echo "net $(basename $n) driver=$d"
    done
    echo "rng: $(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)"
    echo "btf: $(ls /sys/kernel/btf 2>/dev/null | tr '\n' ' ')"
    dd if=/dev/hwrng of=/tmp/rng bs=16 count=1 2>/dev/null && echo "rng read $(wc -c < /tmp/rng) bytes"
    # SCSI disks are probed asynchronously (sd_mod), a USB stick after usb-storage's
    # delay_use (1 s): give both a moment after the daemon returned. A driver that
    # is not really there (an inert core module) never makes a disk, however long.
    i=0
    while [ $i -lt 100 ] && [ "$(ls -d /sys/block/sd* 2>/dev/null | wc -l)" -lt 2 ]; do
        sleep 0.1; i=$((i+1))
    done
    echo "disks after $((i / 10)).$((i % 10)) s"
    for d in /sys/block/sd*; do
        b=$(basename $d)
        echo "disk $b: $(dd if=/dev/$b bs=16 count=1 2>/dev/null)"
    done
    # A device left without a driver although its module is loaded (a probe that
    # failed): says which, for the post-mortem of a miss.
    for d in /sys/bus/pci/devices/*; do
        [ -e $d/driver ] || echo "pci unbound: $(basename $d) $(cat $d/modalias 2>/dev/null)"
    done
    echo "ahci driver: $(ls /sys/bus/pci/drivers/ahci 2>/dev/null | tr '\n' ' ')"
    for m in sd_mod usb_storage ahci; do
        echo "state $m: $(cat /sys/module/$m/initstate 2>/dev/null) refcnt=$(cat /sys/module/$m/refcnt 2>/dev/null)" \
             "init sections: $(ls /sys/module/$m/sections 2>/dev/null | sed -n 's/^\(\.init.*\)/\1/p' | tr '\n' ' ')"
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
    case_undo
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


def guest_script(release: str) -> str:
    cases = "\n".join(
        f"case_undo() {{ :; {c.undo}\n}}\n{c.setup}\nfault_case {name} '{c.fault}' {c.conf}"
        for name, c in FAULT_CASES.items() if name in fault_cases(release))
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


def prepare_share(share: Path, kernel: DebianKernel) -> Path:  # noqa: F811
    """The configurations, the two disk images and the damaged cache the guest reads
    from /srv (the share is exported with security_model=none: the guest sees the
    host's owners and modes)."""
    share.chmod(0o755)
    for root, text in (("conf", CONFIG), ("conf-hold", CONFIG_HOLD), ("conf-hang", CONFIG_HANG),
                       ("conf-install", CONFIG_INSTALL), ("conf-badcache", CONFIG_BADCACHE)):
        conf = share / root / "etc/initsplit"
        conf.mkdir(parents=True)
        (conf / "initsplitd.conf").write_text(text)
    for name, mark in (("ahci.img", AHCI_MARK), ("usb.img", USB_MARK)):
        with (share / name).open("wb") as f:
            f.write(mark)
            f.truncate(8 * 1024 * 1024)
    if "bad-cache" in fault_cases(kernel.release.version):
        make_bad_cache(share / "cache" / kernel.kver, debian_rootfs(kernel).path / "lib/modules" / kernel.kver)
    return share


def make_bad_cache(cache: Path, tree: Path) -> None:
    """Real cache entries of BAD_CACHE's modules, each damaged as BAD_CACHE says."""
    from initsplit.cache import write_entry
    from initsplit.split.decide import decide, layout_figures
    from initsplit.split.policy import SplitOptions

    for module in BAD_CACHE:
        # The file may spell the name with "-" (virtio-rng.ko for virtio_rng).
        source = next(p for p in tree.rglob("*.ko") if p.stem.replace("-", "_") == module)
        relpath = source.relative_to(tree)
        data = source.read_bytes()
        always = SplitOptions(two_stage="always")
        decision = decide(data, always)
        assert decision.outcome == "split" and decision.split, (module, decision.outcome)
        result = decision.split
        write_entry(cache, relpath, source=data, decision="split", name=result.name,
                    options=always.tag,
                    init_name=result.init_name, core=result.core, init=result.init,
                    discarded=",".join(decision.discarded), btf_bytes=decision.btf_bytes,
                    reached=result.reached, **layout_figures(decision))
        core = cache / relpath
        if module == "e1000":      # the core module is a symlink to a copy of itself
            core.rename(core.with_name("e1000.real"))
            core.symlink_to("e1000.real")
        elif module == "ahci":     # the init module is world-writable
            core.with_name("ahci__init.ko").chmod(0o666)
        else:                      # the core module was changed after the manifest
            with core.open("ab") as f:
                f.write(b"\0")
    for directory in [cache, *(p for p in cache.rglob("*") if p.is_dir())]:
        directory.chmod(0o755)


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


# One boot per release for the whole run. pytest orders module-scoped parameters by
# their index in each parametrize() call, and test_fault_case's (release, case) pairs
# index the release differently from the other tests, so it may set the 6.1 kernel
# up again after the 6.12 one: the boot must not run again then.
_BOOTS: dict[str, BootResult] = {}


@pytest.fixture(scope="module")
def matrix(kernel: DebianKernel, vmshare: Path) -> BootResult:  # noqa: F811
    release = kernel.release.version
    if release not in _BOOTS:
        # A share of its own per release: the module-scoped vmshare serves both boots.
        share = vmshare / f"debian{release}"
        share.mkdir()
        _BOOTS[release] = boot_with_devices(kernel, prepare_share(share, kernel), guest_script(release),
                                            timeout=2400)
    return _BOOTS[release]


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


def test_daemon_loads_every_driver_two_stage(matrix: BootResult, kernel: DebianKernel) -> None:  # noqa: F811
    out = section(matrix, "case normal")
    assert "daemon rc=0" in out, out
    sizes = dict(re.findall(r"^size (\S+) (\d+)$", out, re.M))
    btf = set(re.search(r"^btf: (.*)$", out, re.M).group(1).split())
    assert "vmlinux" in btf, btf  # the kernel has BTF; the modules' is what went
    for driver in DRIVERS:
        line = re.search(rf"{driver}: loaded two-stage \(core (\d+) bytes, init module \d+ bytes, "
                         rf"[+-]\d+ pages against a plain load, (\d+) bytes of slab more than a "
                         rf"plain load, BTF (\d+) bytes given back\)", out)
        assert line, f"{driver} not two-stage with its figures:\n{out}"
        # The journal's figure is the kernel's own.
        assert line.group(1) == sizes[driver], (driver, line.group(0), sizes[driver])
        # Discard=btf: the kernel holds no BTF for it, and the journal says what the
        # original's would have kept (layout/btf.py).
        assert driver not in btf, (driver, btf)
        assert int(line.group(3)) == original_btf_bytes(kernel, driver), line.group(0)
        # The slab its init module costs, by the model the policy weighs.
        assert int(line.group(2)) == twostage_slab(kernel, driver), line.group(0)
    assert "initsplitd exiting: boot quiet" in out, out
    assert re.search(r"freed \d+ init modules?", out), out


def twostage_slab(kernel: DebianKernel, module: str) -> int:  # noqa: F811
    """What decide() weighs for *module* under the daemon's rules (layout/twostage_slab.py)."""
    from initsplit.layout.rules import rules_for_tree
    from initsplit.split.decide import decide
    from initsplit.split.policy import SplitOptions

    options = SplitOptions(two_stage="always", rules=rules_for_tree(kernel.modules_dir))
    decision = decide(read_module(kernel.module_deps(module)[-1]), options)
    assert decision.outcome == "split" and decision.twostage_slab_bytes > 0, decision
    return decision.twostage_slab_bytes


def original_btf_bytes(kernel: DebianKernel, module: str) -> int:  # noqa: F811
    from initsplit.elf.discard import sections
    from initsplit.layout.btf import btf_kept_bytes, kernel_model

    data = read_module(kernel.module_deps(module)[-1])
    btf = next(s for s in sections(data) if s.name == ".BTF")
    return btf_kept_bytes(data[btf.offset:btf.offset + btf.size], module,
                          kernel=kernel_model(kernel.kver))


def test_devices_work_and_no_init_module_remains(matrix: BootResult) -> None:
    assert_devices_work(part(section(matrix, "case normal"), "devices"))


def test_fault_case(matrix: BootResult, name: str) -> None:
    c = FAULT_CASES[name]
    case = section(matrix, f"case {name}")
    assert_reset(case)
    first = part(case, "first log")
    if c.fault:
        # The fault really fired, at its point (a case whose fault never fires proves nothing).
        point = c.fault.rsplit("=", 1)[0]
        key = point if ":" in point else f"{point}:*"
        assert re.search(rf"^fired: .*{re.escape(key)}", case, re.M), case
    assert f"first rc={c.first_rc}\n" in case, case
    if c.first_says:
        assert c.first_says in first, first
    if c.first_rc == 1:
        assert "udev loads modules itself" in first, first
    # Whatever happened, udev's own loading was back on as soon as the daemon was gone.
    assert "active flag between: off" in case, case
    assert "second rc=0" in case, case
    if c.second_says:
        assert c.second_says in part(case, "second log"), case
    assert_devices_work(part(case, "devices"))


def test_bad_cache_entries_each_load_plain_with_the_reason(matrix: BootResult) -> None:
    first = part(section(matrix, "case bad-cache"), "first log")
    for module, why in BAD_CACHE.items():
        line = re.search(rf"^(?:<\d>)?{module}: loaded plain \((.*)\)$", first, re.M)
        assert line and why in line.group(1), (module, why, first)


def test_run_full_loads_every_driver_plain(matrix: BootResult) -> None:
    first = part(section(matrix, "case run-full"), "first log")
    for driver in DRIVERS:
        assert re.search(rf"^(?:<\d>)?{driver}: loaded plain \(.*No space left on device", first, re.M), \
            (driver, first)


def test_external_sigkill_mid_coldplug(matrix: BootResult) -> None:
    case = section(matrix, "case sigkill")
    assert_reset(case)
    assert "killed rc=137" in case and "process gone: yes" in case, case
    assert "active flag between: off" in case, case
    loaded_before = int(re.search(r"loaded before kill: (\d+)", case).group(1))
    assert loaded_before >= 1, case
    assert "second rc=0" in case, case
    assert_devices_work(part(case, "devices"))


# The kernel's own WARN for a module init killed in the middle of registering a
# crypto algorithm: crypto/api.c crypto_wait_for_test() does WARN_ON() on the result
# of wait_for_completion_killable(), which a dying task gets at once. The SIGKILL
# cases kill the daemon mid-coldplug, where the crypto modules load; modprobe
# killed there (udev's event timeout) meets the same WARN.
KILLED_CRYPTO_INIT = re.compile(r"WARNING: .* at crypto/api\.c:\d+ crypto_wait_for_test\b")


def test_boot_clean(matrix: BootResult) -> None:
    accepted = KILLED_CRYPTO_INIT.search(matrix.dmesg) is not None
    problems = dmesg_problems(matrix.dmesg, tainted=matrix.tainted, allow=(KILLED_CRYPTO_INIT,),
                              allowed_taint="EW" if accepted else "E")
    assert not problems, "\n".join(problems) + "\n" + matrix.report()
