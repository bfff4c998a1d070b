"""initsplitd's event source against the real kernel, a real udevd and real rule files.

Nothing is mocked. Kernel uevents are produced by writing "add" (and once "remove")
to the uevent files of this machine's PCI devices, which makes the kernel re-send
the device's uevent (the same thing `udevadm trigger` does). The udev source is
tested against systemd-udevd itself: the one installed, or else the one from the
Debian udev package matching the installed libudev1, downloaded into the test
bed's cache. That udevd runs in a private mount namespace (its own /run, /dev and
rule directories, holding only the test's rules), so it cannot change the host.

These tests need root (they write to /sys and use unshare). When the machine cannot
produce what a test needs, the test fails with the reason; none of them skip.
"""

from __future__ import annotations

import json
import logging
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from initsplit.daemon.service import RequestFilter
from initsplit.daemon.udev_source import (
    ENUMERATED,
    MAX_ALIAS_LEN,
    MIRRORED_RULES,
    RECEIVE_BUFFER_SIZE,
    Source,
    UDEV_CONTROL,
    ModuleRequest,
    RootDevice,
    UdevSource,
    parse_uevent,
    requests_for_device,
    valid_alias,
)
from tests.testbed import _util as testbed
from tests.testbed.kernel import cache_dir

REPO = Path(__file__).resolve().parent.parent
SYS = Path("/sys")
LOGGER = "initsplit.daemon.udev_source"


def no_attributes(name: str) -> str | None:
    return None


# ---------------------------------------------------------------------------
# What this machine's /sys says, computed independently of the code under test


def sysfs_modalias_devices() -> dict[str, str]:
    """devpath -> modalias for every kobject under /sys/devices that can send uevents
    (it has a subsystem link) and has MODALIAS in its uevent file or a modalias
    attribute."""
    found: dict[str, str] = {}
    for root, _dirs, files in os.walk(SYS / "devices"):
        here = Path(root)
        if "uevent" not in files or not (here / "subsystem").is_symlink():
            continue
        try:
            env = parse_uevent((here / "uevent").read_text())
        except OSError:
            continue
        alias = env.get("MODALIAS")
        if not alias and "modalias" in files:
            try:
                alias = (here / "modalias").read_text().rstrip("\n")
            except OSError:
                alias = None
        if alias:
            found["/" + here.relative_to(SYS).as_posix()] = alias
    return found


def all_modalias_files() -> set[str]:
    """The contents of every modalias attribute under /sys/devices, subsystem or not."""
    out = set()
    for root, _dirs, files in os.walk(SYS / "devices"):
        if "modalias" in files:
            try:
                out.add((Path(root) / "modalias").read_text().rstrip("\n"))
            except OSError:
                pass
    return out


def pci_devices() -> dict[str, str]:
    """devpath -> modalias of this machine's PCI devices; at least one or the kernel
    tests cannot run."""
    devs = {}
    for link in sorted((SYS / "bus" / "pci" / "devices").glob("*")):
        devpath = "/" + link.resolve().relative_to(SYS).as_posix()
        devs[devpath] = (link / "modalias").read_text().rstrip("\n")
    assert devs, "this machine has no PCI device whose uevent could be re-triggered"
    return devs


def trigger(devpath: str, action: str = "add") -> None:
    """Make the kernel re-send a uevent for a device (needs root)."""
    (SYS / devpath.lstrip("/") / "uevent").write_text(action)


def collect(
    src: UdevSource, done: Callable[[list[ModuleRequest]], bool], timeout: float = 5.0
) -> list[ModuleRequest]:
    """read_ready() whenever the fd is readable, until done(requests) or timeout."""
    got: list[ModuleRequest] = []
    deadline = time.monotonic() + timeout
    while not done(got):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        readable, _, _ = select.select([src.fileno()], [], [], left)
        if readable:
            got += src.read_ready()
    return got


def settle(src: UdevSource, quiet: float = 0.3) -> list[ModuleRequest]:
    """Everything that arrives until the socket has been quiet for `quiet` seconds."""
    got: list[ModuleRequest] = []
    while select.select([src.fileno()], [], [], quiet)[0]:
        got += src.read_ready()
    return got


def by_devpath(reqs: Iterable[ModuleRequest]) -> dict[str, list[ModuleRequest]]:
    """The "add" requests, by device."""
    out: dict[str, list[ModuleRequest]] = {}
    for r in reqs:
        if r.action == "add":
            out.setdefault(r.devpath, []).append(r)
    return out


def new_requests(requests: RequestFilter, reqs: Iterable[ModuleRequest]) -> dict[str, list[tuple[str, ...]]]:
    """What the service's RequestFilter takes for new requests among `reqs`: devpath
    -> the new aliases of each (with nothing served, every new alias is resolved)."""
    out: dict[str, list[tuple[str, ...]]] = {}
    for r in reqs:
        aliases = requests.new_aliases(r)
        if aliases:
            out.setdefault(r.devpath, []).append(aliases)
    return out


# ---------------------------------------------------------------------------
# Debian's udev package (rules files, systemd-udevd)


def udev_package_root() -> Path:
    """The Debian udev package matching the installed libudev1, extracted in the test
    bed's cache (downloaded with apt-get the first time)."""
    version = testbed.run(
        ["dpkg-query", "-W", "-f=${Version}", "libudev1"], what="ask dpkg for libudev1's version"
    ).strip()
    if not version:
        raise testbed.TestbedError("libudev1 is not installed (python3-pyudev needs it)")
    base = cache_dir() / "udev" / version
    root = base / "root"
    if (base / "READY").exists():
        return root
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    pattern = f"udev_{version.replace(':', '%3a')}_*.deb"
    with testbed.file_lock(cache_dir() / "locks" / "apt.lock"):
        if (base / "READY").exists():
            return root
        found = sorted(debs.glob(pattern))
        if not found:
            testbed.run(
                ["apt-get", "download", f"udev={version}"], what=f"download udev={version}", cwd=debs, timeout=600
            )
            found = sorted(debs.glob(pattern))
        if not found:
            raise testbed.TestbedError(f"apt-get download udev={version} left no {pattern} in {debs}")
        shutil.rmtree(root, ignore_errors=True)
        base.mkdir(parents=True, exist_ok=True)
        testbed.run(["dpkg-deb", "-x", found[-1], root], what=f"extract {found[-1]}", timeout=300)
        (base / "READY").write_text(version + "\n")
    return root


def rules_file(name: str) -> Path:
    """A rules file as udevd would read it here: the installed one, else the package's."""
    for d in (Path("/usr/lib/udev/rules.d"), Path("/lib/udev/rules.d")):
        if (d / name).exists():
            return d / name
    pkg = udev_package_root()
    for d in (pkg / "usr/lib/udev/rules.d", pkg / "lib/udev/rules.d"):
        if (d / name).exists():
            return d / name
    raise testbed.TestbedError(f"Debian's udev package has no {name}")


def udevd_command() -> list[str]:
    """argv prefix that runs systemd-udevd (udevadm dispatches on argv[0])."""
    for path in (Path("/lib/systemd/systemd-udevd"), Path("/usr/lib/systemd/systemd-udevd")):
        if path.exists():
            return [str(path)]
    udevadm = udev_package_root() / "bin" / "udevadm"
    if not udevadm.exists():
        raise testbed.TestbedError(f"{udevadm} missing from the extracted udev package")
    return ["bash", "-c", f'exec -a systemd-udevd "{udevadm}"']


# ---------------------------------------------------------------------------
# The rules: what 80-drivers.rules loads must be requested


def test_mirrored_rules_are_exactly_debians_kmod_lines() -> None:
    """Every `kmod load` line of the real rule files is mirrored, and nothing else."""
    real = []
    for name in ("80-drivers.rules", "80-debian-compat.rules"):
        text = rules_file(name).read_text()
        if name == "80-drivers.rules":
            lines = [ln.strip() for ln in text.splitlines()]
            # All of them sit behind this, which requests_for_device() implements too.
            assert lines.index('ACTION!="add", GOTO="drivers_end"') < min(
                i for i, ln in enumerate(lines) if "kmod load" in ln
            )
        real += [ln.strip() for ln in text.splitlines() if "kmod load" in ln and not ln.lstrip().startswith("#")]
    assert real == list(MIRRORED_RULES)
    # No other installed rules file uses the kmod builtin behind our back.
    for d in (Path("/usr/lib/udev/rules.d"), udev_package_root() / "lib/udev/rules.d"):
        for f in sorted(d.glob("*.rules")):
            if f.name not in ("80-drivers.rules", "80-debian-compat.rules"):
                assert "kmod load" not in f.read_text(), f"{f} also loads modules"


# Captured from this machine (kernel uevent of a virtio-net PCI function, received by
# the kernel source; and a CPU).
VIRTIO_PCI = {
    "ACTION": "add",
    "DEVPATH": "/devices/pci0000:00/0000:00:03.0",
    "DRIVER": "virtio-pci",
    "MODALIAS": "pci:v00001AF4d00001041sv00001AF4sd00001041bc02sc00i00",
    "PCI_CLASS": "20000",
    "PCI_ID": "1AF4:1041",
    "PCI_SLOT_NAME": "0000:00:03.0",
    "PCI_SUBSYS_ID": "1AF4:1041",
    "SEQNUM": "820",
    "SUBSYSTEM": "pci",
    "SYNTH_UUID": "0",
}
CPU0 = {
    "DEVPATH": "/devices/system/cpu/cpu0",
    "SUBSYSTEM": "cpu",
    "MODALIAS": "cpu:type:x86,ven0002fam0019mod0011:feature:,0000,0001,0002,0003,0004,0005,0006,0007,"
    "0008,0009,000B,000C,000D,000E,000F,0010,0011,0013,0017,0018,0019,001A,001C,0020,0021,0022,0023",
}
NET_LO = {
    "ACTION": "add", "DEVPATH": "/devices/virtual/net/lo", "SUBSYSTEM": "net", "INTERFACE": "lo", "IFINDEX": "1"
}


def test_modalias_is_loaded_as_is() -> None:
    assert requests_for_device(VIRTIO_PCI, no_attributes) == [VIRTIO_PCI["MODALIAS"]]
    assert requests_for_device(CPU0, no_attributes) == [CPU0["MODALIAS"]]
    assert requests_for_device(NET_LO, no_attributes) == []


def test_only_add_events_request() -> None:
    for action in ("remove", "change", "bind", "unbind", "move", "online", "offline"):
        assert requests_for_device({**VIRTIO_PCI, "ACTION": action}, no_attributes) == []
    coldplug = {k: v for k, v in VIRTIO_PCI.items() if k != "ACTION"}  # uevent files carry no ACTION
    assert requests_for_device(coldplug, no_attributes) == [VIRTIO_PCI["MODALIAS"]]


def test_every_device_of_this_machine() -> None:
    """Real uevent properties of every device here give exactly their MODALIAS."""
    devices = sysfs_modalias_devices()
    assert devices, "no device under /sys/devices has a modalias"
    for devpath, alias in devices.items():
        env = parse_uevent((SYS / devpath.lstrip("/") / "uevent").read_text())
        env["DEVPATH"] = devpath
        env["SUBSYSTEM"] = os.path.basename(os.readlink(SYS / devpath.lstrip("/") / "subsystem"))

        def attrs(name: str, d: str = devpath) -> str | None:
            p = SYS / d.lstrip("/") / name
            return p.read_text() if p.exists() else None

        assert requests_for_device(env, attrs) == [alias], devpath


def test_modalias_attribute_fallback() -> None:
    # Properties without MODALIAS (the cpu subsystem root has only the attribute).
    props = {"DEVPATH": "/devices/system/cpu", "SUBSYSTEM": "cpu"}
    assert requests_for_device(props, lambda n: "cpu:type:x86\n" if n == "modalias" else None) == ["cpu:type:x86"]
    # A MODALIAS property wins; the attribute is not even read.
    assert requests_for_device(VIRTIO_PCI, lambda n: pytest.fail("read")) == [VIRTIO_PCI["MODALIAS"]]
    # A reader that raises is a device without the attribute.
    assert requests_for_device(NET_LO, lambda n: 1 / 0) == []  # type: ignore[return-value]


# Properties as the kernel's uevent callbacks produce them (tifm_uevent, memstick_uevent,
# scsi_bus_uevent, module kobjects) and, for mtd, as udev's mtd_probe imports them.
@pytest.mark.parametrize(
    "props, expected",
    [
        (
            {"DEVPATH": "/devices/pci0000:00/0000:00:1e.0/0000:06:05.2/tifm_sd0:0", "SUBSYSTEM": "tifm",
             "TIFM_CARD_TYPE": "SD"},
            ["tifm_sd"],
        ),
        ({"DEVPATH": "/devices/x/tifm_ms0:1", "SUBSYSTEM": "tifm", "TIFM_CARD_TYPE": "MS"}, ["tifm_ms"]),
        ({"DEVPATH": "/devices/x/tifm_xd0:2", "SUBSYSTEM": "tifm", "TIFM_CARD_TYPE": "xD"}, []),
        (
            {"DEVPATH": "/devices/pci0000:00/0000:00:1e.0/0000:06:05.3/memstick0/memstick0:7a2c",
             "SUBSYSTEM": "memstick", "MEMSTICK_TYPE": "01", "MEMSTICK_CATEGORY": "00", "MEMSTICK_CLASS": "00"},
            ["ms_block", "mspro_block"],
        ),
        ({"DEVPATH": "/devices/x/i2o/iop0/0", "SUBSYSTEM": "i2o"}, ["i2o_block"]),
        ({"ACTION": "add", "DEVPATH": "/module/parport_pc", "SUBSYSTEM": "module"}, ["ppdev"]),
        ({"ACTION": "add", "DEVPATH": "/module/parport", "SUBSYSTEM": "module"}, []),
        ({"ACTION": "remove", "DEVPATH": "/module/parport_pc", "SUBSYSTEM": "module"}, []),
        (
            {"DEVPATH": "/devices/virtual/mtd/mtd0/mtd0ro", "SUBSYSTEM": "mtd", "MTD_FTL": "smartmedia"},
            ["sm_ftl"],
        ),
        ({"DEVPATH": "/devices/virtual/mtd/mtd0", "SUBSYSTEM": "mtd", "MTD_FTL": "smartmedia"}, []),
        ({"DEVPATH": "/devices/virtual/mtd/mtd0/mtd0ro", "SUBSYSTEM": "mtd"}, []),
        (
            {"DEVPATH": "/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0", "SUBSYSTEM": "scsi",
             "DEVTYPE": "scsi_device", "MODALIAS": "scsi:t-0x00"},
            ["scsi:t-0x00", "sg"],
        ),
        ({"DEVPATH": "/devices/x/host0", "SUBSYSTEM": "scsi", "DEVTYPE": "scsi_host"}, []),
    ],
)
def test_subsystem_rules(props: dict[str, str], expected: list[str]) -> None:
    assert requests_for_device(props, no_attributes) == expected


GARBAGE_ALIASES = [
    "",
    "pci:v1/../../etc",
    "/lib/modules/x.ko",
    "-r",
    "--force",
    "pci:v1 d2",
    "pci:v1\td2",
    "pci:\nv1",
    "pci:\x00v1",
    "pci:\x7fv1",
    "pci:\x1bv1",
    "caf\u00e9",
    "pci:\udcff\udcfe",  # undecodable bytes, as surrogateescape keeps them
    "a" * (MAX_ALIAS_LEN + 1),
]


@pytest.mark.parametrize("alias", GARBAGE_ALIASES, ids=range(len(GARBAGE_ALIASES)))
def test_garbage_modalias_is_logged_and_skipped(alias: str, caplog: pytest.LogCaptureFixture) -> None:
    assert not valid_alias(alias)
    props = {"DEVPATH": "/devices/x/tifm0:0", "SUBSYSTEM": "tifm", "TIFM_CARD_TYPE": "SD", "MODALIAS": alias}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = requests_for_device(props, no_attributes)
    # An empty MODALIAS is "no MODALIAS" (ENV{MODALIAS}=="?*"), not garbage.
    assert got == ["tifm_sd"]
    if alias:
        assert "invalid module alias" in caplog.text


def test_valid_aliases() -> None:
    for alias in ("pci:v00008086d00000D57sv00000000sd00000000bc06sc00i00", "ms_block", "acpi:PNP0A08:PNP0A03:",
                  "a" * MAX_ALIAS_LEN, "input:b0011v0001p0001eAB41-e0,1,4,11,14,k71,72,73,ramlsfw",
                  # QEMU's DMI modalias: the BIOS date has slashes.
                  "dmi:bvnSeaBIOS:bvr1.16.2-debian-1.16.2-1:bd04/01/2014:br0.0:svnQEMU:"
                  "pnStandardPC(Q35+ICH9,2009):pvrpc-q35-7.2:cvnQEMU:ct1:cvrpc-q35-7.2:sku:"):
        assert valid_alias(alias), alias
    assert not valid_alias(None)
    assert not valid_alias(b"pci:v1")


# A udev "add" event of a virtio disk partition holding ext4, as udev 252 sends it
# after its blkid builtin and 60-persistent-storage.rules have run.
ROOT_PARTITION = {
    "DEVPATH": "/devices/pci0000:00/0000:00:02.0/virtio1/block/vda/vda2", "SUBSYSTEM": "block",
    "DEVTYPE": "partition", "DEVNAME": "/dev/vda2", "MAJOR": "254", "MINOR": "2",
    "DEVLINKS": "/dev/disk/by-path/pci-0000:00:02.0-part2 /dev/disk/by-label/Debian\\x20root "
                "/dev/disk/by-uuid/5c8f9a3e-1b2d-4c5e-9f10-3a4b5c6d7e8f "
                "/dev/disk/by-partuuid/6e2b1a4c-02",
    "ID_FS_TYPE": "ext4", "ID_FS_USAGE": "filesystem",
    "ID_FS_UUID": "5c8f9a3e-1b2d-4c5e-9f10-3a4b5c6d7e8f", "ID_FS_UUID_ENC": "5c8f9a3e-1b2d-4c5e-9f10-3a4b5c6d7e8f",
    "ID_FS_LABEL": "Debian_root", "ID_FS_LABEL_ENC": "Debian\\x20root",
    "ID_PART_ENTRY_UUID": "6e2b1a4c-02", "ID_PART_ENTRY_NAME": "root\\x20part",
}


@pytest.mark.parametrize("root", [
    "/dev/vda2", "UUID=5c8f9a3e-1b2d-4c5e-9f10-3a4b5c6d7e8f", "UUID=5C8F9A3E-1B2D-4C5E-9F10-3A4B5C6D7E8F",
    "PARTUUID=6E2B1A4C-02", "LABEL=Debian root", "LABEL=Debian_root", "PARTLABEL=root part",
    "/dev/disk/by-uuid/5c8f9a3e-1b2d-4c5e-9f10-3a4b5c6d7e8f", "/dev/disk/by-path/pci-0000:00:02.0-part2",
    "254:2", "fe02", "block:/dev/vda2",
])
def test_root_device_requests_its_file_system_driver(root: str) -> None:
    # udev's blkid builtin sets ID_FS_*; mount(2) would have the kernel load "fs-ext4".
    device = RootDevice.from_cmdline(f'BOOT_IMAGE=/vmlinuz root="{root}" ro quiet')
    assert device is not None and device.matches(ROOT_PARTITION), device
    assert requests_for_device(ROOT_PARTITION, no_attributes, root=device) == ["fs-ext4"]


@pytest.mark.parametrize("root", [
    "/dev/vda", "/dev/vda1", "UUID=5c8f9a3e", "PARTUUID=6e2b1a4c-01", "LABEL=debian_root", "PARTLABEL=root",
    "254:1", "/dev/disk/by-uuid/0000",
])
def test_other_roots_do_not_match(root: str) -> None:
    device = RootDevice.parse(root)
    assert device is not None and not device.matches(ROOT_PARTITION)
    assert requests_for_device(ROOT_PARTITION, no_attributes, root=device) == []


def test_no_file_system_driver_for_other_block_devices() -> None:
    """udev never loads a file system driver because a device carries that file
    system (the kernel asks for fs-TYPE when something mounts it): a USB stick with
    an exotic file system must not get its driver loaded at boot."""
    stick = {"DEVPATH": "/devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1:1.0/host6/target6:0:0/6:0:0:0/block/sdb/sdb1",
             "SUBSYSTEM": "block", "DEVNAME": "/dev/sdb1", "ID_FS_TYPE": "exfat", "ID_FS_USAGE": "filesystem",
             "ID_FS_UUID": "1234-ABCD", "DEVLINKS": "/dev/disk/by-uuid/1234-ABCD"}
    assert requests_for_device(stick, no_attributes) == []
    assert requests_for_device(stick, no_attributes, root=RootDevice.parse("/dev/vda2")) == []
    # Without root= (or with one naming no block device) nothing asks for a file system.
    assert requests_for_device(ROOT_PARTITION, no_attributes) == []


def test_root_device_file_system_rules() -> None:
    root = RootDevice.parse("/dev/vda2")
    for usage, fstype in (("other", "swap"), ("crypto", "crypto_LUKS"), ("raid", "linux_raid_member")):
        props = {**ROOT_PARTITION, "ID_FS_USAGE": usage, "ID_FS_TYPE": fstype}
        assert requests_for_device(props, no_attributes, root=root) == []
    assert requests_for_device({**ROOT_PARTITION, "SUBSYSTEM": "scsi"}, no_attributes, root=root) == []
    assert requests_for_device({**ROOT_PARTITION, "ACTION": "change"}, no_attributes, root=root) == []


def test_root_from_the_kernel_command_line() -> None:
    parse = RootDevice.from_cmdline
    assert parse("root=/dev/sda1 ro root=/dev/vda2") == RootDevice("node", "/dev/vda2")  # the last counts
    assert parse("root=/dev/vda2 -- root=/dev/sda1") == RootDevice("node", "/dev/vda2")  # init's, not ours
    assert parse('root="LABEL=my root" ro') == RootDevice("LABEL", "my root")
    assert parse("root=801") == RootDevice("devnum", "8:1")  # hexadecimal, as name_to_dev_t reads it
    for cmdline in ("quiet", "root=nfs", "root=/dev/nfs nfsroot=10.0.0.1:/srv", "root=live:CDLABEL=x",
                    "root=PARTUUID=6e2b1a4c-02/PARTNROFF=1", "root=UUID=", "root=fstab"):
        device = parse(cmdline)
        assert device is None or not device.matches(ROOT_PARTITION), cmdline


def test_udev_source_takes_root_from_the_command_line(tmp_path: Path) -> None:
    event = {**ROOT_PARTITION, "ACTION": "add"}
    src = UdevSource(source="kernel", sys_root=tmp_path, kernel_cmdline="root=UUID=5c8f9a3e-1b2d-4c5e-9f10-3a4b5c6d7e8f")
    request = src._request(dict(event), "udev")
    assert request is not None and request.aliases == ("fs-ext4",)
    other = UdevSource(source="kernel", sys_root=tmp_path, kernel_cmdline="root=/dev/sda1")
    assert other._request(dict(event), "udev") is None
    # By default the command line is this machine's.
    assert UdevSource(source="kernel").root == RootDevice.from_cmdline(Path("/proc/cmdline").read_text())


def test_random_properties_never_raise() -> None:
    rng = random.Random(20250611)
    alphabet = "".join(map(chr, range(0, 0x80))) + "\u00e9\udcff/=-.*?[]"
    keys = ["ACTION", "DEVPATH", "SUBSYSTEM", "MODALIAS", "TIFM_CARD_TYPE", "DEVTYPE", "MTD_FTL", "X"]
    for _ in range(3000):
        props = {}
        for k in keys:
            if rng.random() < 0.6:
                props[k] = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        for k, choices in (("SUBSYSTEM", ["tifm", "memstick", "scsi", "module", "i2o", "mtd"]),
                           ("ACTION", ["add"]), ("TIFM_CARD_TYPE", ["SD", "MS"])):
            if rng.random() < 0.5:
                props[k] = rng.choice(choices)
        for alias in requests_for_device(props, lambda n: props.get("X")):
            assert valid_alias(alias)


# ---------------------------------------------------------------------------
# Coldplug


def test_coldplug_kernel_lists_every_device_with_a_modalias() -> None:
    expected = sysfs_modalias_devices()
    assert expected, "no device under /sys/devices has a modalias: coldplug cannot be checked"
    with UdevSource(source="kernel") as src:
        reqs = list(src.coldplug())
    assert reqs[-1] == ENUMERATED and ENUMERATED not in reqs[:-1]  # the end, for the service
    reqs = reqs[:-1]
    got = by_devpath(reqs)
    for devpath, alias in expected.items():
        assert [r.aliases for r in got.get(devpath, [])] == [(alias,)], devpath
    assert set(got) == set(expected)  # no module here is parport_pc: nothing else
    for r in reqs:
        assert r.source == "coldplug" and r.action == "add"
        assert r.subsystem == os.path.basename(os.readlink(SYS / r.devpath.lstrip("/") / "subsystem"))
    # Every modalias attribute under /sys (even of kobjects without a subsystem, like
    # the cpu root, whose modalias is cpu0's) is among the requested aliases.
    assert all_modalias_files() <= {a for r in reqs for a in r.aliases}
    # The PCI devices are there, with their sysfs modalias.
    for devpath, alias in pci_devices().items():
        assert got[devpath][0].aliases == (alias,)


def test_coldplug_libudev_enumeration_agrees_with_the_sysfs_walk(caplog: pytest.LogCaptureFixture) -> None:
    """The udev source enumerates through libudev (udev database included); on the same
    machine it must find the same requests as the kernel source's own /sys walk."""
    with UdevSource(source="kernel") as k:
        walk = {(r.devpath, r.aliases, r.subsystem) for r in k.coldplug()}
    with caplog.at_level(logging.WARNING, logger=LOGGER), UdevSource(source="udev") as u:
        assert u.source == "udev"
        enum = {(r.devpath, r.aliases, r.subsystem) for r in u.coldplug()}
    assert walk and enum == walk
    if not UDEV_CONTROL.exists():
        assert "udevd is not running" in caplog.text


def test_coldplug_requires_the_monitor_first() -> None:
    src = UdevSource(source="kernel")
    with pytest.raises(RuntimeError):
        list(src.coldplug())
    with pytest.raises(RuntimeError):
        src.read_ready()
    with pytest.raises(ValueError):
        UdevSource(source="netlink")  # type: ignore[arg-type]


def _make_fake_sys(root: Path) -> None:
    """A /sys-shaped tree with good and hostile uevent/modalias contents."""
    (root / "bus" / "pci").mkdir(parents=True)
    (root / "bus" / "acpi").mkdir(parents=True)

    def dev(name: str, uevent: bytes | None, modalias: bytes | None = None, subsystem: str | None = "pci") -> Path:
        d = root / "devices" / name
        d.mkdir(parents=True)
        if uevent is not None:
            (d / "uevent").write_bytes(uevent)
        if modalias is not None:
            (d / "modalias").write_bytes(modalias)
        if subsystem:
            os.symlink(os.path.relpath(root / "bus" / subsystem, d), d / "subsystem")
        return d

    dev("good0", b"DRIVER=x\nMODALIAS=pci:v00001AF4d00001041\nPCI_ID=1AF4:1041\n")
    dev("good0/child", b"MODALIAS=virtio:d00000001v00001AF4\n", subsystem="acpi")
    dev("attr_only", b"", modalias=b"acpi:PNP0501:\n", subsystem="acpi")
    dev("no_subsystem", b"MODALIAS=pci:nosubsys\n", subsystem=None)
    dev("non_utf8", b"MODALIAS=pci:\xff\xfe\n")
    dev("slash", b"MODALIAS=pci:../../../etc/passwd\n")
    dev("ctrl", b"MODALIAS=pci:\x01\x02\n")
    dev("nul", b"MODALIAS=pci:v1\x00evil\n")
    dev("dash", b"MODALIAS=--help\n")
    dev("long", b"MODALIAS=" + b"a" * 5000 + b"\n")
    dev("huge_uevent", b"X=" + b"y" * (200 * 1024) + b"\nMODALIAS=pci:huge\n")
    dev("binary", bytes(random.Random(1).randrange(256) for _ in range(3000)))
    dev("no_equals", b"MODALIAS\n\n=\n==\nMODALIAS")
    dev("bad_attr", b"", modalias=b"acpi:\xc3\xa9\n", subsystem="acpi")
    d = dev("uevent_is_dir", None)
    (d / "uevent").mkdir()
    os.symlink("..", root / "devices" / "good0" / "loop")  # a symlink cycle, not followed
    (root / "module" / "parport_pc").mkdir(parents=True)
    (root / "module" / "parport").mkdir(parents=True)


@pytest.mark.parametrize("source", ["kernel", "udev"])  # libudev cannot read another sys_root: walked too
def test_coldplug_survives_hostile_sysfs(source: Source, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _make_fake_sys(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER), UdevSource(source=source, sys_root=tmp_path) as src:
        reqs = {r.devpath: (r.aliases, r.subsystem) for r in src.coldplug() if r != ENUMERATED}
    assert reqs == {
        "/devices/good0": (("pci:v00001AF4d00001041",), "pci"),
        "/devices/good0/child": (("virtio:d00000001v00001AF4",), "acpi"),
        "/devices/attr_only": (("acpi:PNP0501:",), "acpi"),
        "/module/parport_pc": (("ppdev",), "module"),
    }
    for bad in ("\\udcff", "../../../etc/passwd", "--help", "aaaa", "\\x01", "\\x00", "acpi:\u00e9"):
        assert bad in caplog.text, bad
    assert "oversized sysfs file" in caplog.text


# ---------------------------------------------------------------------------
# Live kernel uevents


def test_auto_source_follows_udevd() -> None:
    with UdevSource() as src:
        assert src.source == ("udev" if UDEV_CONTROL.exists() else "kernel")
        assert src.fileno() >= 0
    with UdevSource(source="kernel") as src:
        assert src.source == "kernel"


def test_kernel_source_receives_retriggered_pci_uevents() -> None:
    pci = pci_devices()
    with UdevSource(source="kernel") as src:
        # A 128 MiB buffer (the kernel reports twice what was set), as root.
        sock = socket.socket(fileno=os.dup(src.fileno()))
        try:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= RECEIVE_BUFFER_SIZE
        finally:
            sock.close()
        for devpath in pci:
            trigger(devpath)
        reqs = collect(src, lambda got: set(pci) <= {r.devpath for r in got})
        got = by_devpath(reqs)
        for devpath, alias in pci.items():
            assert devpath in got, f"no kernel uevent received for {devpath}"
            r = got[devpath][0]
            assert r == ModuleRequest(
                aliases=(alias,), devpath=devpath, subsystem="pci", action="add", source="kernel"
            )
        src.close()
        src.close()  # idempotent
    with pytest.raises(RuntimeError):
        src.fileno()


def test_no_request_for_non_add_events() -> None:
    # Except "remove", which is passed on (test_duplicates_between_coldplug_and_live_events).
    devpath = next(iter(pci_devices()))
    with UdevSource(source="kernel") as src:
        trigger(devpath, "change")
        trigger(devpath, "add")  # the marker that everything before has arrived
        reqs = collect(src, lambda got: any(r.devpath == devpath for r in got))
        mine = [r for r in reqs if r.devpath == devpath]
        assert len(mine) == 1 and mine[0].action == "add"


def test_duplicates_between_coldplug_and_live_events() -> None:
    """The monitor is opened before enumerating: a device announced in between is
    reported twice, by coldplug and live, and the service's RequestFilter takes it
    for one request; later explicit re-triggers are new requests (udev would run
    `kmod load` again too); a remove is passed on and forgets the device."""
    pci = pci_devices()
    assert len(pci) >= 2, "need two PCI devices to trigger"
    (devpath, alias), (other, other_alias) = list(pci.items())[:2]
    requests = RequestFilter({})
    with UdevSource(source="kernel") as src:
        trigger(devpath)  # lands in the gap: queued on the socket, and seen by coldplug
        cold = list(src.coldplug())
        assert cold[-1] == ENUMERATED
        new = new_requests(requests, cold)
        assert new[devpath] == [(alias,)] and new[other] == [(other_alias,)]
        # The queued live event comes too (the source remembers nothing) ...
        echo = settle(src)
        assert [(r.source, r.aliases) for r in echo if r.devpath == devpath] == [("kernel", (alias,))]
        # ... and is coldplug's echo: no new request.
        assert devpath not in new_requests(requests, echo)
        # A second coldplug (as after an overflow) reports everything again: nothing new.
        assert new_requests(requests, src.coldplug()) == {}
        # A later explicit re-trigger is a new request.
        trigger(devpath)
        again = collect(src, lambda got: any(r.devpath == devpath for r in got))
        assert new_requests(requests, again).get(devpath) == [(alias,)]
        assert new_requests(requests, src.coldplug()) == {}
        # remove + add (what replugging does) of a device only coldplug reported:
        # the remove is passed on and forgets it, so the add is not taken for
        # coldplug's echo.
        trigger(other, "remove")
        trigger(other, "add")
        replug = collect(src, lambda got: any(r.devpath == other and r.action == "add" for r in got))
        assert [(r.action, r.source, r.aliases) for r in replug if r.devpath == other] == [
            ("remove", "kernel", ()), ("add", "kernel", (other_alias,))]
        assert new_requests(requests, replug).get(other) == [(other_alias,)]


def test_overflow_reenumerates_instead_of_dying(caplog: pytest.LogCaptureFixture) -> None:
    pci = pci_devices()
    expected = sysfs_modalias_devices()
    with UdevSource(source="kernel") as src:
        # Shrink the socket's buffer to the kernel's minimum and flood it.
        sock = socket.socket(fileno=os.dup(src.fileno()))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 0)
            for _ in range(30):
                for devpath in pci:
                    trigger(devpath)
            time.sleep(0.2)
            with caplog.at_level(logging.WARNING, logger=LOGGER):
                reqs = src.read_ready()
            assert "ENOBUFS" in caplog.text, "the flood did not overflow the netlink socket"
            # Nothing is lost: every device with a modalias was reported, live or by
            # the re-enumeration, and the service takes each for one request.
            assert set(expected) <= set(by_devpath(reqs))
            assert any(r.source == "coldplug" for r in reqs) and reqs[-1] == ENUMERATED
            new = new_requests(RequestFilter({}), reqs)
            assert set(expected) <= set(new)
            for devpath in pci:
                assert len(new[devpath]) == 1, new[devpath]
            # The source keeps working.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            settle(src)
            target = next(iter(pci))
            trigger(target)
            trigger(target)
            after = collect(src, lambda got: any(r.devpath == target for r in got))
            assert any(r.devpath == target and r.source == "kernel" for r in after)
        finally:
            sock.close()


CHILD_PRELUDE = f"""
import json, logging, select, sys, time
sys.path[:0] = [{str(REPO / "daemon")!r}, {str(REPO)!r}]
from initsplit.daemon.udev_source import UdevSource

class Keep(logging.Handler):
    records = []
    def emit(self, record):
        Keep.records.append(record.getMessage())

logging.basicConfig(level=logging.INFO)
logging.getLogger().addHandler(Keep())

def collect(src, done, timeout=10.0):
    got, deadline = [], time.monotonic() + timeout
    while not done(got) and time.monotonic() < deadline:
        if select.select([src.fileno()], [], [], max(0.0, deadline - time.monotonic()))[0]:
            got += src.read_ready()
    return got

def req(r):
    return dict(aliases=list(r.aliases), devpath=r.devpath, subsystem=r.subsystem,
                action=r.action, source=r.source)
"""


def test_receive_buffer_fallback_without_cap_net_admin(tmp_path: Path) -> None:
    """Without CAP_NET_ADMIN the 128 MiB buffer is refused: logged, and events still flow."""
    devpath, alias = next(iter(pci_devices().items()))
    script = tmp_path / "child.py"
    script.write_text(CHILD_PRELUDE + textwrap.dedent(f"""
        import socket, os
        with UdevSource(source="kernel") as src:
            s = socket.socket(fileno=os.dup(src.fileno()))
            rcvbuf = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            s.close()
            open("/sys{devpath}/uevent", "w").write("add")
            got = collect(src, lambda g: any(r.devpath == {devpath!r} for r in g))
        print(json.dumps(dict(rcvbuf=rcvbuf, requests=[req(r) for r in got], log=Keep.records)))
    """))
    proc = subprocess.run(
        ["setpriv", "--inh-caps=-net_admin", "--ambient-caps=-net_admin", "--bounding-set=-net_admin",
         sys.executable, script],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["rcvbuf"] < RECEIVE_BUFFER_SIZE
    assert any("CAP_NET_ADMIN" in m for m in out["log"]), out["log"]
    expected = dict(aliases=[alias], devpath=devpath, subsystem="pci", action="add", source="kernel")
    assert expected in out["requests"], out["requests"]


# ---------------------------------------------------------------------------
# The udev source, with a real systemd-udevd


def test_udev_source_with_real_udevd(tmp_path: Path) -> None:
    """systemd-udevd, in a private mount namespace with only our rules, processes the
    kernel's uevents and re-broadcasts them; UdevSource picks the udev source by
    itself, sees the properties as udev rules left them, and drops garbage the
    rules put into MODALIAS."""
    pci = list(pci_devices().items())
    assert len(pci) >= 3, "need three PCI devices to trigger"
    (good, good_alias), (slashed, _), (binary, _) = pci[:3]
    kname = {d: d.rsplit("/", 1)[1] for d, _ in pci}
    rules = tmp_path / "50-initsplit-test.rules"
    rules.write_bytes(
        f'ACTION=="add", SUBSYSTEM=="pci", KERNEL=="{kname[good]}", ENV{{MODALIAS}}="initsplit:udev-rules-ran"\n'
        f'ACTION=="add", SUBSYSTEM=="pci", KERNEL=="{kname[slashed]}", ENV{{MODALIAS}}="pci:../../evil"\n'.encode()
        + f'ACTION=="add", SUBSYSTEM=="pci", KERNEL=="{kname[binary]}", ENV{{MODALIAS}}="pci:'.encode()
        + b'\xff\xfe"\n'
    )
    child = tmp_path / "child.py"
    child.write_text(CHILD_PRELUDE + textwrap.dedent(f"""
        src = UdevSource()
        src.start()
        cold = [req(r) for r in src.coldplug()]
        # The garbage devices twice: each event's garbage is logged.
        for d in {[good, slashed, binary, slashed, binary]!r}:
            open("/sys" + d + "/uevent", "w").write("add")
        def done(got):
            bad = [m for m in Keep.records if "ignoring" in m]
            return any(r.devpath == {good!r} for r in got) and len(bad) >= 4
        got = collect(src, done)
        print(json.dumps(dict(source=src.source, coldplug=cold, requests=[req(r) for r in got], log=Keep.records)))
        src.close()
    """))
    # Everything udevd could touch is private: /run (its control socket and database),
    # /dev (device node symlinks) and the rule directories (only our rules are read).
    masks = [d for d in ("/etc/udev/rules.d", "/usr/lib/udev/rules.d", "/lib/udev/rules.d",
                         "/usr/local/lib/udev/rules.d") if Path(d).is_dir() and not Path(d).is_symlink()]
    udevd = " ".join(f"'{a}'" for a in udevd_command())
    script = tmp_path / "ns.sh"
    script.write_text(textwrap.dedent(f"""\
        set -eu
        mount --make-rprivate /
        mount -t tmpfs initsplit-test /run
        mount -t tmpfs initsplit-test /dev
        mknod -m 666 /dev/null c 1 3
        for d in {" ".join(masks)}; do mount -t tmpfs initsplit-test "$d"; done
        mkdir -p /run/udev/rules.d
        cp '{rules}' /run/udev/rules.d/
        SYSTEMD_LOG_TARGET=console SYSTEMD_LOG_LEVEL=info {udevd} 2>'{tmp_path}/udevd.log' &
        udevd=$!
        trap 'kill $udevd; wait $udevd || true' EXIT
        i=0
        while [ ! -S /run/udev/control ]; do
            i=$((i+1))
            [ $i -lt 100 ] || {{ echo "udevd did not start" >&2; cat '{tmp_path}/udevd.log' >&2; exit 1; }}
            sleep 0.1
        done
        '{sys.executable}' '{child}'
    """))
    proc = subprocess.run(["unshare", "--mount", "sh", script], capture_output=True, text=True, timeout=120)
    udevd_log = (tmp_path / "udevd.log").read_text() if (tmp_path / "udevd.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stderr}\n--- udevd ---\n{udevd_log}"
    out = json.loads(proc.stdout)
    assert out["source"] == "udev"
    # Coldplug through libudev found the PCI devices with their kernel modalias.
    cold = {r["devpath"]: r for r in out["coldplug"]}
    assert cold[good]["aliases"] == [good_alias] and cold[good]["source"] == "coldplug"
    # The live event is the one after rule processing.
    live = [r for r in out["requests"] if r["devpath"] == good]
    assert live and live[0] == dict(
        aliases=["initsplit:udev-rules-ran"], devpath=good, subsystem="pci", action="add", source="udev"
    ), out
    # Garbage that rules put into MODALIAS: logged and skipped, nothing requested.
    assert not [r for r in out["requests"] if r["devpath"] in (slashed, binary)], out["requests"]
    logged = "\n".join(out["log"])
    assert logged.count("'pci:../../evil'") == 2 and logged.count("(undecodable)") == 2, logged
