"""A whole Debian system boots in QEMU from the test bed's disk image without
initsplit: this is the reference boot later daemon tests compare to, udev loading
the drivers itself. On both releases: Debian 12 (Linux 6.1, Python 3.11) and Debian
13 (Linux 6.12, Python 3.13, .ko.xz modules, merged /usr).

Per release, one image is built (cached debootstrap root + a plain dracut initramfs)
and booted once per module; each test then checks its own part of the report. The
root is the one a user has after `apt install ./initsplit_*.deb` and `apt purge
initsplit`: initsplit's package is installed with dpkg -i and purged again with
dpkg --purge (tests/testbed/install.py) before dracut runs, so the same boot shows
that a purge leaves a system that boots with udev's own loading: multi-user, the
drivers in, no initsplit unit, file or diversion left, udev's own 80-drivers.rules
back. Nothing is skipped: if the root, the image or QEMU cannot be had, the fixtures
raise TestbedError.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.testbed import debian_kernel
from tests.testbed.install import install_initsplit
from tests.testbed.rootfs import PACKAGES, RootFS, debian_rootfs
from tests.testbed.system import (
    GuestFile,
    SystemBoot,
    SystemImage,
    boot_system,
    build_disk,
    parse_report,
)

# Runs from a report command (after multi-user) with Debian's own interpreter and
# python3-* packages: what the daemon will use.
GUEST_PY_CHECK = r"""
import sys
import elftools
import elftools.elf.elffile
import pyudev
from systemd import journal

print("python", sys.version.split()[0], sys.executable)
print("pyelftools", elftools.__version__)
print("pyudev", pyudev.__version__)
ctx = pyudev.Context()
print("block", " ".join(sorted(d.sys_name for d in ctx.list_devices(subsystem="block"))))
with open("/proc/modules") as fh:
    print("modules", len(fh.readlines()))
"""

# A unit of the caller's (units=) that logs through python3-systemd with a custom
# field, to show that units, extra files and structured journal fields all arrive.
HELLO_UNIT = """[Unit]
Description=initsplit test bed: hello from the guest

[Service]
Type=oneshot
ExecStart=/usr/bin/python3 /usr/local/lib/isplit-test/hello.py

[Install]
WantedBy=multi-user.target
"""
HELLO_PY = b"""from systemd import journal
journal.send("isplit hello from the guest", ISPLIT_TEST="hello")
"""


# What the purge of initsplit must have left: each prints nothing when all is well.
PURGED_REPORT = {
    "initsplit_package": "dpkg-query -W -f='${db:Status-Abbrev}' initsplit 2>/dev/null; true",
    "initsplit_diversions": "dpkg-divert --list | grep -i -e initsplit -e 80-drivers; true",
    "initsplit_files": "ls -d /usr/lib/initsplit /usr/bin/initsplit /etc/initsplit /run/initsplit "
                       "/etc/kernel/postinst.d/initsplit /etc/kernel/postrm.d/initsplit "
                       "/usr/lib/dracut/modules.d/90initsplit /usr/lib/systemd/catalog/initsplit.catalog "
                       "/lib/udev/rules.d/80-drivers.rules.udev /usr/lib/udev/rules.d/80-drivers.rules.udev-usr "
                       "2>/dev/null; true",
    "initsplit_units": "systemctl list-unit-files --no-legend --no-pager 'initsplit*'; "
                       "systemctl list-units --all --no-legend --no-pager --plain 'initsplit*'; "
                       "ls /etc/systemd/system/*.wants | grep initsplit; true",
    # udev's own rule back under the name udev ships it as, with udev's bytes.
    "udev_rule": "cd / && grep -E ' (usr/)?lib/udev/rules.d/80-drivers.rules$' "
                 "/var/lib/dpkg/info/udev.md5sums | md5sum -c --strict",
}


@pytest.fixture(scope="module", params=["12", "13"], ids=["debian12", "debian13"])
def rootfs(request: pytest.FixtureRequest) -> RootFS:
    return debian_rootfs(debian_kernel(release=request.param))


@pytest.fixture(scope="module")
def image(rootfs: RootFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemImage]:
    image = build_disk(
        rootfs,
        out=tmp_path_factory.mktemp("system"),
        prepare=[install_initsplit(purge=True)],
        extra_files={"/usr/local/lib/isplit-test/hello.py": GuestFile(HELLO_PY, 0o644),
                     "/usr/local/lib/isplit-test/check.py": GUEST_PY_CHECK.encode()},
        units={"isplit-hello.service": HELLO_UNIT},
        report_commands={
            "python": "python3 /usr/local/lib/isplit-test/check.py",
            "uname": "uname -r",
            "failed_status": "systemctl status --failed --no-pager --full --lines=30",
            **PURGED_REPORT,
        },
    )
    yield image
    # pytest keeps the temporary directories of the last three runs; the disk is
    # ~750 MB of them (initrd and dracut.log stay for post-mortems).
    image.disk.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def booted(image: SystemImage) -> SystemBoot:
    return boot_system(image, timeout=300)


@pytest.mark.vm
def test_image_built(rootfs: RootFS, image: SystemImage) -> None:
    for path in (image.disk, image.initrd, image.kernel, image.vmlinux):
        assert path.is_file(), path
    assert set(PACKAGES) <= set(rootfs.packages)
    # The timings are the point of this print (pytest -s / -rP show it).
    print(f"rootfs: cold build {rootfs.build_seconds:.0f}s, {rootfs.size_bytes / 1e6:.0f} MB; "
          f"image: {image.timings}; initrd {image.initrd.stat().st_size / 1e6:.1f} MB")


@pytest.mark.vm
def test_reaches_multi_user(booted: SystemBoot, rootfs: RootFS) -> None:
    print(f"boot: {booted.duration:.1f}s wall; {booted.analyze.strip()}")
    assert not booted.timed_out, booted.report()
    assert booted.complete, booted.report()
    assert booted.reached_multi_user, booted.report()
    # This image has nothing but Debian packages and the test bed's setup, so any
    # failed unit ("degraded") is a defect of that setup, not something to tolerate.
    failed = booted.sections.get("failed_status")
    assert booted.state == "running", (
        f"system is {booted.state}; failed units {booted.failed_units}\n"
        f"{failed.output if failed else ''}\n{booted.report()}"
    )
    assert booted.sections["uname"].output.strip() == rootfs.kver, booted.report()


@pytest.mark.vm
def test_root_drivers_loaded_in_initramfs(booted: SystemBoot, rootfs: RootFS) -> None:
    # The Debian kernels have virtio_blk and ext4 as modules (6.1 virtio_pci too; 6.12
    # builds it in): the root could not have been mounted unless the initramfs
    # loaded them.
    modular = [name for name in ("virtio_pci", "virtio_blk", "ext4") if rootfs.kernel.module_deps(name)]
    assert {"virtio_blk", "ext4"} <= set(modular), modular
    for name in modular:
        assert name in booted.modules, f"{name} not in /proc/modules\n{booted.proc_modules}"
    entries = booted.journal_json
    switch = [e for e in entries if e.get("MESSAGE") == "Switching root."]
    assert switch, "no 'Switching root.' in the journal: " + booted.report()
    switch_at = int(switch[0]["__MONOTONIC_TIMESTAMP"])

    def first_kernel(pattern: str) -> int:
        for e in entries:
            msg = e.get("MESSAGE")
            if e.get("_TRANSPORT") == "kernel" and isinstance(msg, str) and re.search(pattern, msg):
                return int(e.get("_SOURCE_MONOTONIC_TIMESTAMP", e["__MONOTONIC_TIMESTAMP"]))
        raise AssertionError(f"no kernel message matching {pattern!r}\n{booted.report()}")

    assert first_kernel(r"^virtio_blk .*\[vda\]") < switch_at
    assert first_kernel(r"^EXT4-fs \(vda\): mounted filesystem") < switch_at


@pytest.mark.vm
def test_journal_collected(booted: SystemBoot) -> None:
    assert "Reached target multi-user.target" in booted.journal, booted.report()
    entries = booted.journal_json
    assert len(entries) > 100, booted.report()
    boot_ids = {e.get("_BOOT_ID") for e in entries}
    assert len(boot_ids) == 1, boot_ids  # initramfs entries carry the same boot ID
    hello = [e for e in entries if e.get("ISPLIT_TEST") == "hello"]
    assert hello and hello[0]["MESSAGE"] == "isplit hello from the guest", booted.report()
    # The initramfs part of the boot is in the same journal.
    assert any(e.get("MESSAGE") == "Switching root." for e in entries)


@pytest.mark.vm
def test_guest_python(booted: SystemBoot, rootfs: RootFS) -> None:
    sec = booted.sections["python"]
    assert sec.rc == 0, booted.report()
    lines = dict(line.split(" ", 1) for line in sec.output.splitlines() if " " in line)
    assert lines["python"].startswith(rootfs.kernel.release.python + "."), sec.output
    assert lines["python"].endswith("/usr/bin/python3"), sec.output
    assert "vda" in lines["block"].split(), sec.output
    assert int(lines["modules"]) > 3, sec.output


@pytest.mark.vm
def test_purged_initsplit_left_udev_loading(booted: SystemBoot) -> None:
    """The image's root had initsplit installed and purged: nothing of it is left,
    udev's own 80-drivers.rules is back, and no initsplit unit ran (the drivers
    were loaded by udev: test_root_drivers_loaded_in_initramfs)."""
    for name in PURGED_REPORT:
        sec = booted.sections[name]
        assert sec.rc == 0, booted.report()
        if name == "udev_rule":
            assert re.fullmatch(r"\S*lib/udev/rules\.d/80-drivers\.rules: OK\n?", sec.output), sec.output
        else:
            assert not sec.output.strip(), f"{name}:\n{sec.output}"
    ran = [e for e in booted.journal_json if str(e.get("_SYSTEMD_UNIT", "")).startswith("initsplit")
           or e.get("SYSLOG_IDENTIFIER") in ("initsplitd", "initsplit")]
    assert not ran, ran[:3]
    # udev's module loading ran: the report's /proc/modules has more than the
    # initramfs's root drivers.
    assert len(booted.modules) > 5, booted.proc_modules


def test_parse_report() -> None:
    text = (
        "noise\n@@ISPLIT-REPORT-BEGIN@@\n"
        "@@ISPLIT-SECTION a@@\nline1\nline2\n\n@@ISPLIT-SECTION-END a rc=0@@\n"
        "@@ISPLIT-SECTION empty@@\n\n@@ISPLIT-SECTION-END empty rc=3@@\n"
        "@@ISPLIT-SECTION nonl@@\nx\n@@ISPLIT-SECTION-END nonl rc=0@@\n"
        "@@ISPLIT-SECTION cut@@\npartial"
    )
    sections, complete = parse_report(text)
    assert not complete
    assert sections["a"].output == "line1\nline2\n" and sections["a"].rc == 0
    assert sections["empty"].output == "" and sections["empty"].rc == 3
    assert sections["nonl"].output == "x"
    assert sections["cut"].output == "partial" and sections["cut"].rc is None
    assert parse_report("no report at all") == ({}, False)
