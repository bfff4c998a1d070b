"""initsplit installed into a whole Debian 12 system: dracut initramfs, systemd, udev.

initsplit's Debian package is installed with dpkg -i into an overlay of the cached
Debian root (tests/testbed/install.py: its postinst diverts udev's 80-drivers.rules
and enables the real-root unit), dracut builds the initramfs with the initsplit
module (the dracut.conf.d snippet the package ships asks for it), and the disk boots
in QEMU (TCG) twice:

* normally: initsplitd in the initramfs loads the root disk's drivers two-stage from
  the pre-split cache, initsplitd-settle holds the root mount until they are in, the
  daemon gives the init modules back and is stopped before switch-root; initsplitd on
  the real root serves the rest of boot from the pre-split cache the package's kernel
  hook built at installation (nothing split on the fly, peak RSS below issue 12's
  goal of 30 MB) and
  exits once boot has been quiet;
* with `initsplit=off`: the same daemons load every module plain.

One image, two boots (each ~1.5 min under TCG): every test below reads one of them.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from initsplit.daemon.journal import (
    MESSAGE_ID_BATCH_UNLOADED,
    MESSAGE_ID_LOADED_PLAIN,
    MESSAGE_ID_LOADED_TWO_STAGE,
    MESSAGE_ID_SUMMARY,
    SYSLOG_IDENTIFIER,
)
from initsplit.daemon.udev_source import valid_alias
from initsplit.loader.kernel_state import parse_proc_modules
from initsplit.split.decide import decide, manifest_reason
from initsplit.split.policy import SplitOptions
from tests.testbed import debian_kernel
from tests.testbed.given_back import check_given_back
from tests.testbed.cpio import read_initramfs
from tests.testbed.install import (DAEMON_REPORT, INITRD_UNIT, ROOT_UNIT, RULE, SETTLE_UNIT, REAL_ROOT_PEAK_RSS_BYTES,
                                   install_initsplit, peak_rss_bytes, split_on_the_fly_problems)
from tests.testbed.rootfs import RootFS, debian_rootfs
from tests.testbed.system import SystemBoot, SystemImage, boot_system, build_disk

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parent.parent

# What the root disk needs and the initramfs daemon loads: the disk driver, the file
# system (requested as fs-ext4 by the disk's udev event) and its dependencies.
# virtio_pci (with virtio, virtio_ring, virtio_pci_{legacy,modern}_dev) is not among
# them: systemd 252 loads it itself when it starts in QEMU (kmod_setup()), before any
# unit runs, so it is always a plain load by PID 1.
ROOT_DRIVERS = ("virtio_blk", "ext4", "jbd2", "mbcache", "crc16")
PID1_DRIVERS = ("virtio_pci", "virtio", "virtio_ring")

OFF_REASON = "initsplit=off on the kernel command line"

REPORT = {
    # verify checks unit syntax, dependencies and that ExecStart= exists; --man=no
    # because the guest has no man pages (Documentation= names initsplitd(8)).
    "verify": f"systemd-analyze verify --man=no {ROOT_UNIT} {INITRD_UNIT} {SETTLE_UNIT}",
    **DAEMON_REPORT,
    # What the daemons left in /run: nothing but the fault hook's record, if any.
    # udev's own view of the devices the hostile rule gave a MODALIAS.
    "hostile": "for d in null zero full random urandom kmsg; do "
               "echo \"$d: $(udevadm info -q property -n /dev/$d | sed -n 's/^MODALIAS=//p')\"; done",
    "run_state": "echo \"markers: $(ls -A /run/initsplit/loading 2>/dev/null | tr '\\n' ' ')\"; "
                 "echo \"active: $([ -e /run/initsplit/active ] && echo on || echo off)\"; "
                 "echo \"fired: $(ls -A /run/initsplit/faults-fired 2>/dev/null | tr '\\n' ' ')\"",
}

# Full-system boots with a fault injected (initsplit.faults) into the initramfs daemon
# and another into the real-root daemon, through systemd.setenv= on the kernel command
# line; both must end in a system that booted with every driver and nothing left over.
FAULT_BOOTS = {
    # Killed before READY (the start job fails); on the real root right after a
    # core module went in.
    "initrd-before-ready+root-after-core": "initrd/before-ready=kill,root/after-core=kill",
    # The root file system's core module is in, its init never ran: until the inert
    # core is gone ext4 looks loaded. On the real root an exception on the main thread.
    "initrd-ext4-core+root-raise": "initrd/after-core:ext4=kill,root/request=raise",
    # The disk driver's init ran, nobody recorded it; on the real root killed during
    # the batch of init-module deletions.
    "initrd-after-init+root-batch": "initrd/after-init:virtio_blk=kill,root/batch=kill",
    # Killed while systemd stops it for switch-root; on the real root after an init.
    "initrd-stop+root-after-init": "initrd/stop=kill,root/after-init=kill",
    # An exception in a worker as it starts the disk driver's load (and, on the real
    # root, the first module's): that module is loaded plain.
    "initrd-worker-raise+root-worker-raise": "initrd/worker:virtio_blk=raise,root/worker=raise",
    # The disk driver's load hangs in the initramfs: the daemon gives up after the
    # initramfs default LoadTimeoutSec= (30 s), well before systemd's 90 s wait for
    # the root device, and udev loads the driver. (A worker that hangs on the real
    # root is a case of tests/test_daemon_vm.py, with a short LoadTimeoutSec=.)
    "initrd-disk-driver-hang": "initrd/worker:virtio_blk=hang",
}


# Devices whose MODALIAS a udev rule of the test image replaces with something
# hostile: udevd broadcasts it, and both daemons get it as any other event (the
# memory devices exist on every machine and need no driver).
HOSTILE_MODALIAS = {
    "null": "$$(reboot -f)",                 # udev makes "$$" a literal "$"
    "zero": "../../../../../../usr/bin/sh",
    "full": "*",
    "random": "ext4 vfat",
    "urandom": "caf\u00e9",                  # not ASCII
    # Read as an option by a tool. (A value longer than any alias may be cannot come
    # this way: udev refuses a property value that long; tests/test_udev_source.py
    # covers it.)
    "kmsg": "--show-depends",
}
HOSTILE_RULES = "".join(f'SUBSYSTEM=="mem", KERNEL=="{k}", ENV{{MODALIAS}}="{v}"\n'
                        for k, v in HOSTILE_MODALIAS.items())


TWO_STAGE_DROPIN = "[Daemon]\nTwoStage=always\n"
ALWAYS = SplitOptions(two_stage="always")


@pytest.fixture(scope="module")
def rootfs() -> RootFS:
    return debian_rootfs(debian_kernel())


@pytest.fixture(scope="module")
def image(rootfs: RootFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemImage]:
    out = tmp_path_factory.mktemp("boot-integration")
    # The boots exercise two-stage loads and their faults: TwoStage=always, for the
    # image's `initsplit split` and its daemons alike (the default weighs the init
    # module's slab and loads every module of Debian 6.1 plain).
    extra = {
        "/etc/udev/rules.d/70-isplit-hostile.rules": HOSTILE_RULES.encode(),
        "/etc/dracut.conf.d/70-isplit-hostile.conf":
            b'install_items+=" /etc/udev/rules.d/70-isplit-hostile.rules "\n',
    }
    # The postinst runs the kernel hook, as on a user's machine: the real root's
    # pre-split cache of the whole tree (~75 s and ~350 MB more in the image), made
    # with TwoStage=always too (`initsplit split` reads the drop-in).
    image = build_disk(rootfs, out=out,
                       prepare=[install_initsplit(conf_dropins={"50-two-stage.conf": TWO_STAGE_DROPIN},
                                                  real_root_cache=True)],
                       extra_files=extra, report_commands=REPORT)
    yield image
    image.disk.unlink(missing_ok=True)  # ~750 MB; initrd and dracut.log stay


@pytest.fixture(scope="module")
def booted(image: SystemImage) -> SystemBoot:
    return boot_system(image, timeout=420)


@pytest.fixture(scope="module")
def booted_off(image: SystemImage) -> SystemBoot:
    return boot_system(image, append="initsplit=off", timeout=420)


@pytest.fixture(scope="module", params=list(FAULT_BOOTS))
def fault_boot(request: pytest.FixtureRequest, image: SystemImage) -> tuple[str, SystemBoot]:
    spec = FAULT_BOOTS[request.param]
    return spec, boot_system(image, append=f"systemd.setenv=INITSPLIT_FAULT={spec}", timeout=480)


# --- helpers --------------------------------------------------------------------------


def daemon_entries(boot: SystemBoot, unit: str, message_id: str | None = None) -> list[dict]:
    return [e for e in boot.journal_json
            if e.get("SYSLOG_IDENTIFIER") == SYSLOG_IDENTIFIER and e.get("_SYSTEMD_UNIT") == unit
            and (message_id is None or e.get("MESSAGE_ID") == message_id)]


def loads(boot: SystemBoot, unit: str) -> dict[str, dict]:
    """Module name -> its load entry (two-stage or plain) from the daemon in `unit`."""
    out = {}
    for mid in (MESSAGE_ID_LOADED_TWO_STAGE, MESSAGE_ID_LOADED_PLAIN):
        for e in daemon_entries(boot, unit, mid):
            out[e["INITSPLIT_MODULE"]] = e
    return out


def at(entry: dict) -> int:
    return int(entry["__MONOTONIC_TIMESTAMP"])


def first(boot: SystemBoot, pattern: str) -> dict:
    for e in boot.journal_json:
        msg = e.get("MESSAGE")
        if isinstance(msg, str) and re.search(pattern, msg):
            return e
    raise AssertionError(f"no journal entry matching {pattern!r}\n{boot.report()}")


def modules_after(boot: SystemBoot) -> dict[str, int]:
    """Module name -> size, from /proc/modules after the real-root daemon exited."""
    sec = boot.sections.get("modules_after")
    assert sec is not None and sec.rc == 0, boot.report()
    return parse_proc_modules(sec.output)


def expected_mode(rootfs: RootFS, module: str) -> tuple[str, str]:
    """("two-stage", "") if the splitter splits the module, else ("plain", reason)."""
    path = next((rootfs.path / "lib/modules" / rootfs.kver / "kernel").rglob(f"{module}.ko"))
    decision = decide(path.read_bytes(), ALWAYS)
    if decision.outcome == "split":
        return "two-stage", ""
    return "plain", manifest_reason(decision)


def reached_multi_user(boot: SystemBoot) -> None:
    assert not boot.timed_out, boot.report()
    assert boot.complete, boot.report()
    failed = boot.sections.get("failed_status")
    assert boot.state == "running", (
        f"system is {boot.state}; failed units {boot.failed_units}\n"
        f"{failed.output if failed else ''}\n{boot.report()}")


# --- the image ------------------------------------------------------------------------


def test_image_has_initsplit(image: SystemImage) -> None:
    log = image.dracut_log.read_text()
    assert "*** Including module: initsplit ***" in log, log
    added = re.search(r"initsplit: (\d+) files, ([\d.]+) MB added \(python ([\d.]+) MB, cache ([\d.]+) MB\)", log)
    assert added, log
    assert not re.search(r"(?i)initsplit.*(error|fail)|python-closure", log), log
    print(f"image: {image.timings}; initrd {image.initrd.stat().st_size / 1e6:.1f} MB; {added.group(0)}")


def test_initramfs_contents(image: SystemImage) -> None:
    files = read_initramfs(image.initrd)
    moddir = f"usr/lib/modules/{image.kver}/"
    cache = f"usr/lib/initsplit/cache/{image.kver}/"
    kos = {name[len(moddir):]: data for name, data in files.items()
           if name.startswith(moddir) and name.endswith(".ko")}
    assert {"kernel/fs/ext4/ext4.ko", "kernel/drivers/block/virtio_blk.ko"} <= set(kos), sorted(kos)
    # Every module dracut put in the image (--drivers ones included, which dracut adds
    # after all its modules' install()) has a cache entry made from exactly that file.
    for rel, data in kos.items():
        manifest = files.get(f"{cache}{rel}.initsplit")
        assert isinstance(manifest, bytes), f"no cache manifest for {rel}"
        entry = json.loads(manifest)
        assert entry["source_sha256"] == hashlib.sha256(data).hexdigest(), rel
        if entry["decision"] == "split":
            core, init = files[f"{cache}{rel}"], files[f"{cache}{Path(rel).parent}/{entry['init_file']}"]
            assert hashlib.sha256(core).hexdigest() == entry["core_sha256"], rel
            assert hashlib.sha256(init).hexdigest() == entry["init_sha256"], rel
    # depmod's view is dracut's own: the originals, nothing of the cache.
    dep = files[f"{moddir}modules.dep"].decode()
    listed = {line.split(":")[0] for line in dep.splitlines() if line}
    assert listed == set(kos), (sorted(listed ^ set(kos)))
    assert "initsplit" not in dep and "__init" not in dep
    # The daemon, its units (enabled), config and udev rules.
    for name in ("usr/lib/initsplit/initsplitd", "usr/lib/initsplit/initsplitd-settle",
                 "usr/lib/initsplit/initsplitd-handback", "usr/bin/python3.11",
                 "usr/lib/systemd/system/initsplitd-initrd.service",
                 "usr/lib/systemd/system/initsplitd-settle.service",
                 "etc/initsplit/initsplitd.conf", "usr/lib/systemd/catalog/initsplit.catalog",
                 "usr/lib/x86_64-linux-gnu/libkmod.so.2", "usr/lib/x86_64-linux-gnu/libudev.so.1",
                 "usr/lib/x86_64-linux-gnu/libsystemd.so.0",
                 "usr/lib/initsplit/python/initsplit/daemon/main.py",
                 "usr/lib/python3/dist-packages/pyudev/core.py",
                 "usr/lib/python3/dist-packages/elftools/elf/elffile.py"):
        assert name in files, name
    wants = {"sysinit.target.wants": INITRD_UNIT, "initrd-root-fs.target.wants": SETTLE_UNIT}
    for target, unit in wants.items():
        link = files.get(f"etc/systemd/system/{target}/{unit}")
        assert isinstance(link, str) and link.endswith(f"/systemd/system/{unit}"), (target, link)
    # initsplit's rule at udev's name (dracut's inst_rules takes it through the
    # postinst's link to the package's RULE: a copy, or the link and its target).
    rule = files.get("usr/lib/udev/rules.d/80-drivers.rules")
    if isinstance(rule, str):  # dracut makes an absolute link relative
        rule = files.get(posixpath.normpath(posixpath.join("usr/lib/udev/rules.d", rule)).lstrip("/"))
    assert rule == (REPO / "udev/80-drivers.rules").read_bytes(), sorted(n for n in files if "80-drivers" in n)
    assert not [n for n in files if "80-drivers.rules.udev" in n]
    # Only the part of the standard library the daemon imports, with its bytecode.
    stdlib = [n for n in files if n.startswith("usr/lib/python3.11/") and n.endswith(".py")]
    assert 50 < len(stdlib) < 250, len(stdlib)
    assert not [n for n in stdlib if n.startswith(("usr/lib/python3.11/email/", "usr/lib/python3.11/tkinter/",
                                                    "usr/lib/python3.11/test/"))]
    assert "usr/lib/python3.11/__pycache__/os.cpython-311.pyc" in files
    assert "usr/lib/initsplit/python/initsplit/daemon/__pycache__/service.cpython-311.pyc" in files
    assert not [n for n in files if "lib-dynload/_hashlib" in n]
    # The command line, its reports, the tree splitter and the signer stay out
    # (dracut/90initsplit/python-closure.py).
    pkg = "usr/lib/initsplit/python/initsplit/"
    assert f"{pkg}daemon/service.py" in files
    left_out = ("cli", "analyze", "__main__", "tree", "signing")
    assert not [n for n in files if n.startswith(tuple(f"{pkg}{m}." for m in left_out)
                                                 + tuple(f"{pkg}__pycache__/{m}." for m in left_out))]


def test_units_verify(booted: SystemBoot) -> None:
    sec = booted.sections["verify"]
    assert sec.rc == 0 and not sec.output.strip(), booted.report()


# --- normal boot ----------------------------------------------------------------------


def test_reaches_multi_user(booted: SystemBoot) -> None:
    print(f"boot: {booted.duration:.1f}s wall; {booted.analyze.strip()}")
    reached_multi_user(booted)


def test_root_drivers_loaded_by_initramfs_daemon(booted: SystemBoot, rootfs: RootFS) -> None:
    got = loads(booted, INITRD_UNIT)
    switch = at(first(booted, r"^Switching root\.$"))
    for module in ROOT_DRIVERS:
        assert module in got, f"{module} not loaded by {INITRD_UNIT}: {sorted(got)}\n{booted.report()}"
        entry = got[module]
        mode, reason = expected_mode(rootfs, module)
        assert entry["INITSPLIT_MODE"] == mode, entry
        if mode == "two-stage":
            assert entry["INITSPLIT_INIT_MODULE"] == f"{module}__init", entry
        else:
            assert entry["INITSPLIT_REASON"] == reason, entry
        assert at(entry) < switch
    # Most of them are split: the test means something.
    assert sum(got[m]["INITSPLIT_MODE"] == "two-stage" for m in ROOT_DRIVERS) >= 4, got
    # The root was mounted only after the daemon had loaded ext4 (initsplitd-settle).
    mounted = at(first(booted, r"^EXT4-fs \(vda\): mounted filesystem"))
    settled = at(first(booted, rf"^Finished {re.escape(SETTLE_UNIT)}"))
    assert at(got["ext4"]) < settled < mounted
    for module in PID1_DRIVERS:
        assert module in booted.modules, booted.proc_modules


def test_no_init_module_left(booted: SystemBoot) -> None:
    assert booted.sections["wait_daemon"].rc == 0, booted.report()
    left = [m for m in modules_after(booted) if m.endswith("__init")]
    assert not left, booted.sections["modules_after"].output
    state = booted.sections["run_state"].output
    assert re.search(r"^markers: *$", state, re.M), state
    assert "active: off" in state and re.search(r"^fired: *$", state, re.M), state


def test_core_sizes_match_proc_modules(booted: SystemBoot) -> None:
    sizes = modules_after(booted)
    checked = 0
    for unit in (INITRD_UNIT, ROOT_UNIT):
        for entry in daemon_entries(booted, unit, MESSAGE_ID_LOADED_TWO_STAGE):
            module = entry["INITSPLIT_MODULE"]
            assert int(entry["INITSPLIT_CORE_BYTES"]) == sizes[module], (unit, entry, sizes.get(module))
            assert int(entry["INITSPLIT_INIT_BYTES"]) > 0, entry
            checked += 1
    assert checked >= 10, checked


def test_batches_and_summaries(booted: SystemBoot) -> None:
    for unit in (INITRD_UNIT, ROOT_UNIT):
        two_stage = {e["INITSPLIT_INIT_MODULE"] for e in daemon_entries(booted, unit, MESSAGE_ID_LOADED_TWO_STAGE)}
        batches = daemon_entries(booted, unit, MESSAGE_ID_BATCH_UNLOADED)
        assert batches, f"no batch from {unit}\n{booted.report()}"
        deleted = [m for b in batches for m in b["INITSPLIT_BATCH_MODULES"].split()]
        # Every init module of this daemon was given back, once, and nothing failed.
        assert sorted(deleted) == sorted(two_stage), (unit, deleted, two_stage)
        assert all(b["INITSPLIT_BATCH_FAILED_COUNT"] == "0" for b in batches), batches
        assert sum(int(b["INITSPLIT_FREED_BYTES"]) for b in batches) >= 4096 * len(two_stage)
        summaries = daemon_entries(booted, unit, MESSAGE_ID_SUMMARY)
        assert len(summaries) == 1, (unit, summaries)
        summary = summaries[0]
        assert int(summary["INITSPLIT_TOTAL_TWO_STAGE"]) == len(two_stage), summary
        assert int(summary["INITSPLIT_TOTAL_BATCHES"]) == len(batches), summary
        assert int(summary["INITSPLIT_TOTAL_FREED_BYTES"]) == sum(int(b["INITSPLIT_FREED_BYTES"]) for b in batches)


def test_given_back_total_is_what_the_kernel_shows(booted: SystemBoot) -> None:
    """Both summaries' given-back total is the sum of the modules' entries, and the
    kernel shows its parts: core sizes in /proc/modules, no /sys/kernel/btf entry
    for a module whose BTF was given back (tests/testbed/given_back.py)."""
    assert booted.sections["btf_after"].rc == 0, booted.report()
    result = check_given_back(booted.journal_json, proc_modules=booted.sections["modules_after"].output,
                              btf_listing=booted.sections["btf_after"].output, daemons=2)
    assert not result.problems, "\n".join(result.problems)
    # The root drivers at least, loaded by the initramfs daemon without their BTF.
    assert set(ROOT_DRIVERS) <= set(result.btf_confirmed), result.btf_confirmed
    assert result.btf > 0 and result.total != 0, result
    print(f"\ngiven back for good: {result.total} bytes (BTF {result.btf}) over "
          f"{len(result.core_confirmed)} modules, as the kernel shows")


def test_initramfs_daemon_stopped_before_switch_root(booted: SystemBoot) -> None:
    switch = at(first(booted, r"^Switching root\.$"))
    entries = daemon_entries(booted, INITRD_UNIT)
    assert entries and all(at(e) < switch for e in entries), booted.report()
    # systemd stopped it for initrd-switch-root.target (Conflicts=): it gave the
    # pending init modules back in a final batch and wrote its summary first.
    exiting = [e for e in entries if e["MESSAGE"].startswith("initsplitd exiting:")]
    assert [e["MESSAGE"].split(" (peak RSS")[0] for e in exiting] == \
        ["initsplitd exiting: stop requested"], exiting
    # The daemon reports its own cost (getrusage): bench/ and the demo print it.
    assert int(exiting[0]["INITSPLIT_PEAK_RSS_KIB"]) > 0, exiting
    batches = daemon_entries(booted, INITRD_UNIT, MESSAGE_ID_BATCH_UNLOADED)
    summary = daemon_entries(booted, INITRD_UNIT, MESSAGE_ID_SUMMARY)[0]
    assert batches[-1]["INITSPLIT_TRIGGER"] in ("stop", "quiet", "batch-size")
    assert at(batches[-1]) <= at(summary) <= at(exiting[0])
    stopping = at(first(booted, rf"^Stopping {re.escape(INITRD_UNIT)}"))
    stopped = at(first(booted, rf"^Stopped {re.escape(INITRD_UNIT)}"))
    # Its last entry can reach journald a few ms after systemd logged "Stopped"
    # (the journal stamps entries as it receives them; one CI run saw 6 ms): the
    # order that matters is that it exited after the stop began and before switch-root.
    assert stopping < at(exiting[0]) < switch and stopping < stopped < switch
    # Stopped cleanly, not killed at the timeout.
    assert not [e for e in booted.journal_json if e.get("_SYSTEMD_UNIT") == "init.scope"
                and INITRD_UNIT in str(e.get("MESSAGE")) and "SIGKILL" in str(e.get("MESSAGE"))]


def test_real_root_daemon_exits_after_quiet(booted: SystemBoot) -> None:
    switch = at(first(booted, r"^Switching root\.$"))
    entries = daemon_entries(booted, ROOT_UNIT)
    assert entries and all(at(e) > switch for e in entries), booted.report()
    assert "initsplitd exiting: boot quiet" in [e["MESSAGE"].split(" (peak RSS")[0] for e in entries], \
        booted.report()
    show = dict(line.split("=", 1) for line in booted.sections["wait_daemon"].output.split() if "=" in line)
    assert show == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1",
                    "ExecMainStatus": "0"}, booted.sections["wait_daemon"].output
    # It loaded the real root's own drivers (those the initramfs did not have).
    assert daemon_entries(booted, ROOT_UNIT, MESSAGE_ID_LOADED_TWO_STAGE), booted.report()
    # From the kernel hook's cache: nothing split on the fly, below issue 12's goal of 30 MB.
    problems = split_on_the_fly_problems(entries)
    assert not problems, problems
    peak = peak_rss_bytes(entries)
    print(f"\nDebian 12 real-root daemon: peak RSS {peak / 1e6:.1f} MB")
    assert peak < REAL_ROOT_PEAK_RSS_BYTES, f"peak RSS {peak / 1e6:.1f} MB"


# --- initsplit=off --------------------------------------------------------------------


def test_initsplit_off_loads_plain(booted_off: SystemBoot) -> None:
    print(f"boot initsplit=off: {booted_off.duration:.1f}s wall; {booted_off.analyze.strip()}")
    reached_multi_user(booted_off)
    assert not [m for m in modules_after(booted_off) if m.endswith("__init")], booted_off.report()
    for unit in (INITRD_UNIT, ROOT_UNIT):
        assert not daemon_entries(booted_off, unit, MESSAGE_ID_LOADED_TWO_STAGE), booted_off.report()
        plain = daemon_entries(booted_off, unit, MESSAGE_ID_LOADED_PLAIN)
        assert plain, f"{unit} loaded nothing\n{booted_off.report()}"
        assert all(e["INITSPLIT_REASON"] == OFF_REASON for e in plain), plain
        notice = [e for e in daemon_entries(booted_off, unit) if OFF_REASON in e["MESSAGE"]
                  and "loading every module plain" in e["MESSAGE"]]
        assert notice, booted_off.report()
    got = loads(booted_off, INITRD_UNIT)
    for module in ROOT_DRIVERS:
        assert got.get(module, {}).get("INITSPLIT_MODE") == "plain", (module, sorted(got))


# --- faults ---------------------------------------------------------------------------


def test_fault_boot_reaches_multi_user_with_every_driver(fault_boot: tuple[str, SystemBoot]) -> None:
    spec, boot = fault_boot
    if "initrd/stop=kill" in spec and boot.failed_units == [INITRD_UNIT]:
        # Killed while systemd stopped it for switch-root: nothing can restart it
        # there, and systemd keeps its failure for the real root to show. The
        # system is degraded by that record only; the rest must hold as always.
        assert boot.state == "degraded" and boot.complete and not boot.timed_out, boot.report()
    else:
        reached_multi_user(boot)
    assert boot.sections["wait_daemon"].rc == 0, boot.report()
    state = boot.sections["run_state"].output
    # Both faults fired (else the boot proves nothing) ...
    fired = set(re.search(r"^fired: (.*)$", state, re.M).group(1).split())
    wanted = {part.split("/", 1)[1].rsplit("=", 1)[0] for part in spec.split(",")}
    assert {w if ":" in w else f"{w}:*" for w in wanted} == fired, state
    # ... and nothing is left: no init module, no load marker, udev's loading is on.
    assert re.search(r"^markers: *$", state, re.M) and "active: off" in state, state
    after = modules_after(boot)
    assert not [m for m in after if m.endswith("__init")], boot.sections["modules_after"].output
    for module in (*ROOT_DRIVERS, *PID1_DRIVERS):
        assert module in after, (spec, module, sorted(after))


def test_fault_boot_journal_says_what_happened(fault_boot: tuple[str, SystemBoot]) -> None:
    spec, boot = fault_boot
    for part in spec.split(","):
        stage, what = part.split("/", 1)
        unit = INITRD_UNIT if stage == "initrd" else ROOT_UNIT
        said = [e["MESSAGE"] for e in boot.journal_json
                if e.get("_SYSTEMD_UNIT") == unit and isinstance(e.get("MESSAGE"), str)]
        if what.endswith("=kill"):
            expected = "initsplitd-handback: initsplitd ended with signal"
        elif what.endswith("=hang"):
            expected = "initsplitd gives up: load of"
        elif what.startswith("worker"):
            expected = "loaded plain (two-stage load not possible: InjectedFault"
        else:
            expected = "initsplitd failed: InjectedFault"
        assert any(expected in m for m in said), (unit, expected, said)
        if expected.startswith(("initsplitd failed", "initsplitd gives up")):
            # A daemon that fails still says whether it split on the fly (main.py
            # report_splitter_use()), between its start and its last word.
            entries = [e for e in boot.journal_json if e.get("_SYSTEMD_UNIT") == unit]
            last = max(i for i, e in enumerate(entries) if expected in str(e.get("MESSAGE")))
            start = max(i for i, e in enumerate(entries[:last])
                        if str(e.get("MESSAGE")).startswith("initsplitd starting"))
            assert any("INITSPLIT_SPLIT_ON_THE_FLY" in e for e in entries[start:last]), \
                (unit, [e.get("MESSAGE") for e in entries[start:last + 1]])
    if "after-core:ext4" in spec:
        # The killed daemon's inert ext4 core was removed before anything else ran.
        assert any("ext4: removed the inert core module" in str(e.get("MESSAGE"))
                   for e in boot.journal_json), boot.report()


def test_hostile_modalias_strings_load_nothing(booted: SystemBoot) -> None:
    # udevd gave the memory devices the hostile MODALIAS values (the rule worked) ...
    reached_multi_user(booted)
    seen = dict(line.split(": ", 1) for line in booted.sections["hostile"].output.splitlines()
                if ": " in line)
    for device, value in HOSTILE_MODALIAS.items():
        assert seen.get(device) == value.replace("$$", "$"), (device, seen.get(device))
    got = {**loads(booted, INITRD_UNIT), **loads(booted, ROOT_UNIT)}
    # ... the daemons loaded no module because of them, and warned of the invalid ones.
    for name in got:
        assert name not in ("sh", "vfat", "reboot", "*") and "/" not in name, (name, sorted(got))
    warned = [e["MESSAGE"] for e in daemon_entries(booted, ROOT_UNIT)
              if "ignoring invalid module alias" in e["MESSAGE"]]
    for device, value in HOSTILE_MODALIAS.items():
        if not valid_alias(value.replace("$$", "$")):
            assert any(f"/devices/virtual/mem/{device}'" in m for m in warned), (device, "\n".join(warned))
    for unit in (INITRD_UNIT, ROOT_UNIT):
        said = [e["MESSAGE"] for e in daemon_entries(booted, unit)]
        assert not [m for m in said if "Traceback" in m or "initsplitd failed" in m], said
