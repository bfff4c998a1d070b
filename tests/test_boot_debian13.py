"""initsplit installed into a whole Debian 13 system: trixie's dracut, systemd 257, udev,
Python 3.13, and Linux 6.12 with its .ko.xz modules.

initsplit's Debian package is installed with dpkg -i into an overlay of the cached
trixie root (its postinst compiles the bytecode with the root's own Python), dracut builds the initramfs with the initsplit module and its
pre-split cache (entries under NAME.ko for the image's NAME.ko.xz), and the disk
boots once in QEMU (TCG), with the installed defaults but TwoStage=always (as the
Debian 12 boots of tests/test_boot_integration.py: under the default
TwoStage=when-not-worse no root driver of 6.12 gains from a split, on 6.1 neither).
On 6.12 the modules split with one anchor per struct module_memory type of C, so
the daemons load them two-stage, checking C's placement per memory before I is
loaded, each without its BTF (Discard=btf): what the journal says came back must
be what the kernel shows. The two-stage faults are the Debian 12 boots'.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from initsplit.daemon.journal import (MESSAGE_ID_LOAD_FAILED, MESSAGE_ID_LOADED_PLAIN,
                                      MESSAGE_ID_LOADED_TWO_STAGE, MESSAGE_ID_SUMMARY, SYSLOG_IDENTIFIER)
from tests.testbed import debian_kernel
from tests.testbed.given_back import check_given_back
from tests.testbed.install import DAEMON_REPORT, INITRD_UNIT, ROOT_UNIT, install_initsplit
from tests.testbed.rootfs import RootFS, debian_rootfs
from tests.testbed.system import SystemBoot, SystemImage, boot_system, build_disk

pytestmark = pytest.mark.vm

# The root disk's driver and file system; on 6.12 virtio_pci is built in.
ROOT_TARGETS = ("virtio_blk", "ext4")
TWO_STAGE_DROPIN = "[Daemon]\nTwoStage=always\n"

REPORT = {
    **DAEMON_REPORT,
    "compression": "cat /sys/module/compression",
    "python": "python3 -c 'import sys; print(sys.version.split()[0])'",
}


@pytest.fixture(scope="module")
def rootfs() -> RootFS:
    return debian_rootfs(debian_kernel(release="13"))


@pytest.fixture(scope="module")
def image(rootfs: RootFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemImage]:
    out = tmp_path_factory.mktemp("boot-debian13")
    image = build_disk(rootfs, out=out, prepare=[install_initsplit(conf_dropins={"50-two-stage.conf": TWO_STAGE_DROPIN})],
                       report_commands=REPORT)
    yield image
    image.disk.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def booted(image: SystemImage) -> SystemBoot:
    return boot_system(image, timeout=480)


def entries(boot: SystemBoot, unit: str, message_id: str | None = None) -> list[dict]:
    return [e for e in boot.journal_json
            if e.get("SYSLOG_IDENTIFIER") == SYSLOG_IDENTIFIER and e.get("_SYSTEMD_UNIT") == unit
            and (message_id is None or e.get("MESSAGE_ID") == message_id)]


def at(entry: dict) -> int:
    return int(entry["__MONOTONIC_TIMESTAMP"])


def test_boots_debian13_to_multi_user(booted: SystemBoot, rootfs: RootFS) -> None:
    print(f"boot: {booted.duration:.1f}s wall; {booted.analyze.strip()}")
    assert not booted.timed_out and booted.complete, booted.report()
    failed = booted.sections.get("failed_status")
    assert booted.state == "running", (f"system is {booted.state}; failed units {booted.failed_units}\n"
                                       f"{failed.output if failed else ''}\n{booted.report()}")
    assert booted.sections["python"].output.strip().startswith("3.13."), booted.sections["python"].output
    assert booted.sections["compression"].output.strip() == "xz", booted.report()
    assert rootfs.kver.startswith("6.12."), rootfs.kver


def test_root_drivers_loaded_without_btf_by_the_initramfs_daemon(
        booted: SystemBoot, rootfs: RootFS) -> None:
    """The root disk's driver and file system, with what they need, come from the
    initramfs daemon, from the pre-split cache's decisions, each without its BTF,
    before switch-root: two-stage (C's placement checked per memory), never
    refused as a kernel initsplit does not know; every init module is deleted."""
    wanted = {ko.name.split(".ko")[0].replace("-", "_") for target in ROOT_TARGETS
              for ko in rootfs.kernel.module_deps(target)}
    assert {"virtio_blk", "ext4", "jbd2"} <= wanted, wanted
    loaded = entries(booted, INITRD_UNIT, MESSAGE_ID_LOADED_PLAIN) + \
        entries(booted, INITRD_UNIT, MESSAGE_ID_LOADED_TWO_STAGE)
    got = {e["INITSPLIT_MODULE"]: e for e in loaded}
    switch = next(at(e) for e in booted.journal_json if e.get("MESSAGE") == "Switching root.")
    for name in sorted(wanted):
        assert name in got, f"{name} not loaded by {INITRD_UNIT}: {sorted(got)}\n{booted.report()}"
        entry = got[name]
        assert "unsupported kernel" not in entry.get("INITSPLIT_REASON", ""), entry
        assert "struct module layout unknown" not in entry.get("INITSPLIT_REASON", ""), entry
        assert int(entry["INITSPLIT_BTF_BYTES"]) > 0, entry
        assert at(entry) < switch
    two_stage = {e["INITSPLIT_MODULE"] for unit in (INITRD_UNIT, ROOT_UNIT)
                 for e in entries(booted, unit, MESSAGE_ID_LOADED_TWO_STAGE)}
    print(f"\ntwo-stage on 6.12: {sorted(two_stage)}")
    assert {"virtio_blk", "ext4", "jbd2", "mbcache"} <= two_stage, (sorted(two_stage), booted.report())
    assert "__init" not in booted.sections["modules_after"].output, booted.sections["modules_after"].output
    for unit in (INITRD_UNIT, ROOT_UNIT):
        # No load fell back for a reason of initsplit's: C's placement, I refused.
        for e in entries(booted, unit, MESSAGE_ID_LOADED_PLAIN):
            assert "init module not loaded" not in e.get("INITSPLIT_REASON", ""), e
            assert "core module refused" not in e.get("INITSPLIT_REASON", ""), e
        # A module without its hardware fails as modprobe's would (ENODEV), and so
        # do the modules that need it; none fails for a reason of initsplit's (a
        # file it could not read or hand over).
        failed = {e["INITSPLIT_MODULE"]: e["MESSAGE"] for e in entries(booted, unit, MESSAGE_ID_LOAD_FAILED)}
        for name, message in failed.items():
            needs = re.search(r"dependency (\S+) failed to load", message)
            hardware = re.search(r"No such device|No such file or directory", message)
            assert (needs and needs.group(1) in failed) or hardware, (name, message)


def test_given_back_total_is_what_the_kernel_shows(booted: SystemBoot) -> None:
    """Both summaries' total is the sum of the modules' entries; each core size is
    /proc/modules' (the 6.12 layout model's, page-exact), and no module whose BTF
    was given back has a /sys/kernel/btf entry."""
    assert booted.sections["wait_daemon"].rc == 0, booted.report()
    result = check_given_back(booted.journal_json, proc_modules=booted.sections["modules_after"].output,
                              btf_listing=booted.sections["btf_after"].output, daemons=2)
    assert not result.problems, "\n".join(result.problems)
    assert result.btf > 0 and result.total > 0, result
    assert len(result.btf_confirmed) >= 20, result.btf_confirmed
    print(f"\nDebian 13: given back for good {result.total} bytes (BTF {result.btf}) over "
          f"{len(result.core_confirmed)} modules, as the kernel shows")


def test_real_root_daemon_exits_after_quiet(booted: SystemBoot) -> None:
    show = dict(line.split("=", 1) for line in booted.sections["wait_daemon"].output.split() if "=" in line)
    assert show == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1",
                    "ExecMainStatus": "0"}, booted.sections["wait_daemon"].output
    exiting = [e["MESSAGE"].split(" (peak RSS")[0] for e in entries(booted, ROOT_UNIT)
               if e["MESSAGE"].startswith("initsplitd exiting:")]
    assert exiting == ["initsplitd exiting: boot quiet"], exiting
    assert len(entries(booted, INITRD_UNIT, MESSAGE_ID_SUMMARY)) == 1
