"""initsplit installed into a whole Debian 13 system: trixie's dracut, systemd 257, udev,
Python 3.13, and Linux 6.12 with its .ko.xz modules.

initsplit's Debian package is installed with dpkg -i into an overlay of the cached
trixie root (its postinst compiles the bytecode with the root's own Python), dracut builds the initramfs with the initsplit module and its
pre-split cache (entries under NAME.ko for the image's NAME.ko.xz), and the disk
boots once in QEMU (TCG), with the installed defaults; the postinst builds the real
root's pre-split cache (the kernel hook), so the real-root daemon splits nothing. On 6.12 the splitter refuses
every module ("unsupported kernel": its tables are 6.1's), so both daemons load
every module plain, without its BTF (Discard=btf): what the journal says came back
must be what the kernel shows. The two-stage machinery and its faults are the
Debian 12 boots' (tests/test_boot_integration.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from initsplit.daemon.journal import (MESSAGE_ID_LOAD_FAILED, MESSAGE_ID_LOADED_PLAIN,
                                      MESSAGE_ID_LOADED_TWO_STAGE, MESSAGE_ID_SUMMARY, SYSLOG_IDENTIFIER)
from tests.testbed import debian_kernel
from tests.testbed.given_back import check_given_back
from tests.testbed.install import (DAEMON_REPORT, INITRD_UNIT, ROOT_UNIT, REAL_ROOT_PEAK_RSS_BYTES,
                                   install_initsplit, peak_rss_bytes, split_on_the_fly_problems)
from tests.testbed.rootfs import RootFS, debian_rootfs
from tests.testbed.system import SystemBoot, SystemImage, boot_system, build_disk

pytestmark = pytest.mark.vm

# The root disk's driver and file system; on 6.12 virtio_pci is built in.
ROOT_TARGETS = ("virtio_blk", "ext4")

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
    # The postinst runs the kernel hook, as on a user's machine: the real root's
    # pre-split cache of the whole 6.12 tree.
    image = build_disk(rootfs, out=out, prepare=[install_initsplit(real_root_cache=True)],
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


def test_root_drivers_loaded_plain_without_btf_by_the_initramfs_daemon(
        booted: SystemBoot, rootfs: RootFS) -> None:
    """The root disk's driver and file system, with what they need, come from the
    initramfs daemon, from the pre-split cache's decisions: plain (6.12 is not split),
    each without its BTF, before switch-root."""
    wanted = {ko.name.split(".ko")[0].replace("-", "_") for target in ROOT_TARGETS
              for ko in rootfs.kernel.module_deps(target)}
    assert {"virtio_blk", "ext4", "jbd2"} <= wanted, wanted
    got = {e["INITSPLIT_MODULE"]: e for e in entries(booted, INITRD_UNIT, MESSAGE_ID_LOADED_PLAIN)}
    switch = next(at(e) for e in booted.journal_json if e.get("MESSAGE") == "Switching root.")
    for name in sorted(wanted):
        assert name in got, f"{name} not loaded by {INITRD_UNIT}: {sorted(got)}\n{booted.report()}"
        entry = got[name]
        assert entry["INITSPLIT_REASON"].startswith("refused: unsupported kernel: 6.12."), entry
        assert int(entry["INITSPLIT_BTF_BYTES"]) > 0, entry
        assert at(entry) < switch
    for unit in (INITRD_UNIT, ROOT_UNIT):
        assert not entries(booted, unit, MESSAGE_ID_LOADED_TWO_STAGE), unit
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
    assert result.btf > 0 and result.total == result.btf, result
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


def test_real_root_daemon_served_by_the_hook_built_cache(booted: SystemBoot) -> None:
    """The kernel hook's cache (run by the postinst) has every module the real root
    loads: its daemon splits nothing on the fly."""
    root = entries(booted, ROOT_UNIT)
    assert entries(booted, ROOT_UNIT, MESSAGE_ID_LOADED_PLAIN), booted.report()
    problems = split_on_the_fly_problems(root)
    assert not problems, problems


@pytest.mark.xfail(strict=True, reason="issue 12's goal is not met on Debian 13 (Python 3.13): "
                   "34.2 and 35.8 MB measured from the cache (PERFORMANCE.md)")
def test_real_root_daemon_peak_rss(booted: SystemBoot) -> None:
    """Issue 12's goal, from the cache: the real-root daemon's peak RSS below 30 MB."""
    peak = peak_rss_bytes(entries(booted, ROOT_UNIT))
    print(f"\nDebian 13 real-root daemon: peak RSS {peak / 1e6:.1f} MB")
    assert peak < REAL_ROOT_PEAK_RSS_BYTES, f"peak RSS {peak / 1e6:.1f} MB"
