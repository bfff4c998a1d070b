"""A whole Debian 12 system boots under UEFI Secure Boot with initsplit (issue 13):
OVMF with Microsoft's keys, shim, grub, Debian's signed 6.1 kernel, locked down,
with a machine owner key (MOK) made here and enrolled through MokList
(tests/testbed/secureboot.py), and the root on a virtio disk through a dracut
initramfs whose initsplitd loads the root's drivers.

The image is initsplit's package installed with dpkg -i (TwoStage=always, as the
other two-stage system boots), the MOK at DKMS's path (/var/lib/dkms/mok.key,
mok.pub: the key `initsplit split` and the dracut module sign with by default),
and the q35 board's AHCI controller's drivers (ahci, sd_mod) in the initramfs
beside the root's: the ESP the firmware booted from is a SATA disk, a device the
initramfs daemon must give its driver. After dracut, an archive appended to the
initramfs (the kernel unpacks it after dracut's and its files win) replaces two
cache entries with what a user's stale or foreign cache would hold: ahci's split
unsigned, sd_mod's signed with a key that is not enrolled. The kernel refuses
both, so the daemon must load the originals plain (Debian's signature) and the
SATA disk still gets its driver.

One image (24-78 s) and one boot (firmware to power-off 97-167 s under TCG on 2
shared cores): every test reads that boot or that image. Nothing is skipped: without QEMU, OVMF, shim,
grub or the cached root the fixtures raise TestbedError.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from initsplit import modsig, signing
from initsplit.cache import MANIFEST_SUFFIX
from initsplit.daemon.journal import (MESSAGE_ID_BATCH_UNLOADED, MESSAGE_ID_LOADED_PLAIN,
                                      MESSAGE_ID_LOADED_TWO_STAGE, MESSAGE_ID_SUMMARY, SYSLOG_IDENTIFIER)
from initsplit.daemon.splits import ENABLE_SIGNING
from initsplit.loader.kernel_state import parse_proc_modules
from initsplit.modsig import MODULE_SIG_STRING, MODULE_SIGNATURE
from initsplit.split.decide import decide
from initsplit.split.policy import SplitOptions
from tests.testbed import debian_kernel, dmesg_problems
from tests.testbed.cpio import CpioArchive, appended_initramfs, read_initramfs
from tests.testbed.given_back import check_given_back
from tests.testbed.install import DAEMON_REPORT, INITRD_UNIT, ROOT_UNIT, install_initsplit
from tests.testbed.rootfs import RootFS, debian_rootfs
from tests.testbed.secureboot import secureboot_system_boot
from tests.testbed.system import ROOT_DRIVERS, GuestFile, SystemBoot, SystemImage, build_disk

pytestmark = pytest.mark.vm

# What the root disk needs and the initramfs daemon loads (test_boot_integration's:
# virtio_pci comes from PID 1 itself, systemd's kmod_setup()).
ROOT_MODULES = ("virtio_blk", "ext4", "jbd2", "mbcache", "crc16")
# The SATA disk's drivers, whose cache entries the test replaces: the controller's
# with an unsigned split, the disk's with one signed by a key the kernel does not know.
UNSIGNED, OTHER_KEY = "ahci", "sd_mod"
SATA_DRIVERS = (UNSIGNED, OTHER_KEY)
MOK_KEY, MOK_CERT = "/var/lib/dkms/mok.key", "/var/lib/dkms/mok.pub"
TWO_STAGE_DROPIN = "[Daemon]\nTwoStage=always\n"
ALWAYS = SplitOptions(two_stage="always")
# EFI global variable GUID (UEFI spec 3.3): SecureBoot's value, after 4 attribute bytes.
SECURE_BOOT_VAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
# kernel/module/signing.c module_sig_check(): what the kernel says to the foreign key.
FOREIGN_KEY_REFUSAL = "Loading of module with unavailable key is rejected"
UNSIGNED_REFUSAL = "Loading of unsigned module is rejected"

REPORT = {
    **DAEMON_REPORT,
    "secure_boot": f"od -An -tu1 {SECURE_BOOT_VAR}",
    "lockdown": "cat /sys/kernel/security/lockdown",
    "keys": r"grep -E '\.machine|module signing key|not enrolled' /proc/keys",
    "tainted": "cat /proc/sys/kernel/tainted",
    # The SATA controller and disk each bound to their driver.
    "sata": "for d in /sys/bus/pci/drivers/ahci/0000:*; do echo \"ahci ${d##*/}\"; done; "
            "for b in /sys/block/sd*; do echo \"disk ${b##*/} $(basename $(readlink -f $b/device/driver))\"; done",
    "dmesg": "dmesg",
}


@dataclasses.dataclass(frozen=True)
class Keys:
    mok: signing.SigningKey  # enrolled, at DKMS's path in the image
    other: signing.SigningKey  # never enrolled


@pytest.fixture(scope="module")
def rootfs() -> RootFS:
    return debian_rootfs(debian_kernel(release="12"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    tmp = tmp_path_factory.mktemp("sbsys-keys")
    return Keys(signing.create_key(tmp / "mok"), signing.create_key(tmp / "other", subject="/CN=not enrolled"))


@pytest.fixture(scope="module")
def image(rootfs: RootFS, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemImage]:
    start = time.monotonic()
    image = build_disk(
        rootfs, out=tmp_path_factory.mktemp("sbsys"),
        prepare=[install_initsplit(conf_dropins={"50-two-stage.conf": TWO_STAGE_DROPIN})],
        extra_files={MOK_KEY: GuestFile(keys.mok.key.read_bytes(), 0o600),
                     MOK_CERT: GuestFile(keys.mok.cert.read_bytes(), 0o644)},
        drivers=(*ROOT_DRIVERS, *SATA_DRIVERS), report_commands=REPORT)
    print(f"\nSecure Boot image: {time.monotonic() - start:.0f} s, {image.timings}")
    yield image
    image.disk.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def initrd(image: SystemImage, keys: Keys) -> Path:
    """The dracut image with the SATA drivers' cache entries replaced (module docstring)."""
    files = read_initramfs(image.initrd)
    archive = CpioArchive()
    for name, key in ((UNSIGNED, None), (OTHER_KEY, keys.other)):
        for path, data in resigned_entry(files, image.kver, name, key).items():
            archive.file(path, data)
    out = image.initrd.with_name("initrd-sb.img")
    out.write_bytes(appended_initramfs(image.initrd.read_bytes(), archive))
    return out


@pytest.fixture(scope="module")
def booted(image: SystemImage, initrd: Path, keys: Keys) -> SystemBoot:
    boot = secureboot_system_boot(image, initrd=initrd, mok_cert_der=keys.mok.cert.read_bytes(), timeout=480)
    # Kept beside the initrd and dracut.log for post-mortems: the whole report
    # (journal included) and the console.
    image.disk.with_name("report.log").write_text(boot.report_text)
    image.disk.with_name("console.log").write_text(boot.console)
    print(f"\nSecure Boot system boot: {boot.duration:.1f} s wall (firmware to power-off); "
          f"{boot.analyze.strip()}")
    return boot


# --- helpers --------------------------------------------------------------------------


def cache_entries(files: dict[str, bytes | str], kver: str) -> dict[str, tuple[str, dict]]:
    """Module name -> (the core module's path in the image, its manifest)."""
    prefix = f"usr/lib/initsplit/cache/{kver}/"
    found = {}
    for path, data in files.items():
        if path.startswith(prefix) and path.endswith(MANIFEST_SUFFIX) and isinstance(data, bytes):
            manifest = json.loads(data)
            core = path.removesuffix(MANIFEST_SUFFIX)
            found[Path(core).name.removesuffix(".ko").replace("-", "_")] = (core, manifest)
    return found


def resigned_entry(files: dict[str, bytes | str], kver: str, name: str,
                   key: signing.SigningKey | None) -> dict[str, bytes]:
    """*name*'s split from dracut's cache, C and I unsigned (key None) or signed with
    *key*, with the manifest's sizes and hashes of the new bytes and its signer
    (cache.Manifest.signer: "" unsigned): an entry as `initsplit split` writes it
    without a key or with that one."""
    core_path, manifest = cache_entries(files, kver)[name]
    assert manifest["decision"] == "split", (name, manifest)
    manifest = {**manifest, "signer": "" if key is None else signing.certificate_identity(key.cert)}
    init_path = str(Path(core_path).with_name(manifest["init_file"]))
    out: dict[str, bytes] = {}
    for path, field in ((core_path, "core"), (init_path, "init")):
        data = files[path]
        assert isinstance(data, bytes)
        body = signing.strip_signature(data)
        new = body if key is None else signing.sign_module(body, key)
        out[path] = new
        manifest = {**manifest, f"{field}_size": len(new), f"{field}_sha256": hashlib.sha256(new).hexdigest()}
    out[core_path + MANIFEST_SUFFIX] = json.dumps(manifest).encode()
    return out


def daemon_entries(boot: SystemBoot, unit: str, message_id: str | None = None) -> list[dict]:
    return [e for e in boot.journal_json
            if e.get("SYSLOG_IDENTIFIER") == SYSLOG_IDENTIFIER and e.get("_SYSTEMD_UNIT") == unit
            and (message_id is None or e.get("MESSAGE_ID") == message_id)]


def loads(boot: SystemBoot, unit: str) -> dict[str, dict]:
    return {e["INITSPLIT_MODULE"]: e for e in daemon_entries(boot, unit)
            if e.get("MESSAGE_ID") in (MESSAGE_ID_LOADED_TWO_STAGE, MESSAGE_ID_LOADED_PLAIN)}


def kernel_messages(boot: SystemBoot) -> list[dict]:
    return [e for e in boot.journal_json if e.get("_TRANSPORT") == "kernel" and isinstance(e.get("MESSAGE"), str)]


def at(entry: dict) -> int:
    return int(entry.get("_SOURCE_MONOTONIC_TIMESTAMP", entry["__MONOTONIC_TIMESTAMP"]))


def switch_root(boot: SystemBoot) -> int:
    switch = [e for e in boot.journal_json if e.get("MESSAGE") == "Switching root."]
    assert switch, "no 'Switching root.' in the journal\n" + boot.report()
    return at(switch[0])


def verifies(data: bytes, cert: Path, tmp: Path) -> bool:
    """*data*'s appended signature verifies with *cert* (openssl cms, as test_signing)."""
    body = signing.strip_signature(data)
    end = len(data) - len(MODULE_SIG_STRING)
    sig_len = MODULE_SIGNATURE.unpack_from(data, end - MODULE_SIGNATURE.size)[-1]
    (tmp / "body").write_bytes(body)
    (tmp / "sig").write_bytes(data[len(body):len(body) + sig_len])
    run = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(tmp / "sig"),
                          "-content", str(tmp / "body"), "-certfile", str(cert), "-noverify",
                          "-out", "/dev/null"], capture_output=True, text=True)
    return run.returncode == 0 and "Verification successful" in run.stderr


def reached_multi_user(boot: SystemBoot) -> None:
    assert not boot.timed_out and boot.complete, boot.report()
    failed = boot.sections.get("failed_status")
    assert boot.state == "running", (f"system is {boot.state}; failed units {boot.failed_units}\n"
                                     f"{failed.output if failed else ''}\n{boot.report()}")


# --- the image ------------------------------------------------------------------------


def loadable_files(files: dict[str, bytes | str], kver: str) -> dict[str, str]:
    """Every file of the image's cache that the daemon could hand the kernel, each
    path -> the manifest's SHA-256 of it: C and I of a split, the rewritten original
    (Discard= classes dropped) of any other decision that names one (core_sha256;
    daemon/splits.py loads it instead of the original). A manifest naming a file
    the image lacks fails here."""
    named: dict[str, str] = {}
    for core_path, manifest in cache_entries(files, kver).values():
        if manifest["decision"] == "split":
            named[core_path] = manifest["core_sha256"]
            named[str(Path(core_path).with_name(manifest["init_file"]))] = manifest["init_sha256"]
        elif manifest["core_sha256"]:
            named[core_path] = manifest["core_sha256"]
    missing = sorted(path for path in named if not isinstance(files.get(path), bytes))
    assert not missing, f"cache manifests name files the image lacks: {missing}"
    return named


def test_cache_signed_with_the_mok(image: SystemImage, keys: Keys, tmp_path: Path) -> None:
    """dracut's initsplit module signed every module of the initramfs's cache with
    the MOK (DKMS's key in the image): every C and I, and every rewritten original
    (a module loaded plain without its BTF), each file's own trailer as the daemon
    reads it (modsig.signature_problem()) and its signature verified with the MOK's
    certificate by openssl; every manifest names the MOK as its signer and the bytes
    of its files. Nothing else in the cache is a module: any ELF file there that no
    manifest names counts as loadable and is held to the same rule."""
    files = read_initramfs(image.initrd)
    entries = cache_entries(files, image.kver)
    for name in (*ROOT_MODULES, *SATA_DRIVERS):
        assert name in entries, f"no cache entry for {name}: {sorted(entries)}"
    split = {name: entry for name, entry in entries.items() if entry[1]["decision"] == "split"}
    assert {"virtio_blk", "ext4", "jbd2", "mbcache", *SATA_DRIVERS} <= set(split), sorted(split)
    rewritten = sorted(name for name, (_, m) in entries.items() if m["decision"] != "split" and m["core_sha256"])
    # With the default Discard=btf every entry has a file to load, so the check
    # below covers rewritten originals, not only splits.
    assert rewritten, {name: m["decision"] for name, (_, m) in entries.items()}
    assert all(m["discarded"] for name, (_, m) in entries.items() if name in rewritten), entries
    signer = signing.certificate_identity(keys.mok.cert)
    assert {name: m["signer"] for name, (_, m) in entries.items() if m["signer"] != signer} == {}, signer
    named = loadable_files(files, image.kver)
    prefix = f"usr/lib/initsplit/cache/{image.kver}/"
    stray = {path for path, data in files.items() if path.startswith(prefix) and isinstance(data, bytes)
             and data.startswith(b"\x7fELF") and path not in named}
    problems = []
    for path in sorted({*named, *stray}):
        data = files[path]
        assert isinstance(data, bytes)
        if path in named and hashlib.sha256(data).hexdigest() != named[path]:
            problems.append(f"{path}: not the bytes its manifest names")
        trailer = modsig.signature_problem(data[-modsig.SIGNATURE_TRAILER:], len(data))
        if trailer is not None:
            problems.append(f"{path}: {trailer}")
        elif not verifies(data, keys.mok.cert, tmp_path):
            problems.append(f"{path}: its signature does not verify with the MOK")
    assert not problems, "cache modules not signed with the MOK:\n" + "\n".join(problems)
    print(f"\nSigned with the MOK: {len(named) + len(stray)} cache files, C and I of {len(split)} splits, "
          f"{len(rewritten)} rewritten originals, {len(stray)} files no manifest names")


def test_private_key_not_in_the_initramfs(image: SystemImage, initrd: Path, keys: Keys) -> None:
    """Neither the key's file nor its bytes (DER, or a line of its PEM) are in the
    image dracut made nor in the one the boot used; its certificate may be."""
    pem_lines = [line for line in keys.mok.key.read_text().splitlines() if line and not line.startswith("-----")]
    der = base64.b64decode("".join(pem_lines))
    for path in (image.initrd, initrd):
        files = read_initramfs(path)
        assert not [n for n in files if n.endswith((".key", ".pem")) or "/dkms/" in n], \
            sorted(n for n in files if "key" in n or "dkms" in n)
        for name, data in files.items():
            if isinstance(data, bytes):
                assert der not in data and pem_lines[1].encode() not in data, f"the private key is in {name}"


# --- the boot ---------------------------------------------------------------------------


def test_secure_boot_on_and_locked_down(booted: SystemBoot) -> None:
    reached_multi_user(booted)
    # The firmware's SecureBoot variable: 4 attribute bytes, then 1.
    assert booted.sections["secure_boot"].output.split()[-1:] == ["1"], booted.sections["secure_boot"].output
    assert "[integrity]" in booted.sections["lockdown"].output, booted.sections["lockdown"].output
    said = [e["MESSAGE"] for e in kernel_messages(booted)]
    assert any("Secure boot enabled" in m for m in said), booted.report()
    assert any("Kernel is locked down from EFI Secure Boot" in m for m in said), booted.report()
    # shim passed MokList on as MokListRT; the kernel put the MOK into .machine.
    assert any("Loaded X.509 cert 'initsplit module signing key" in m for m in said), \
        [m for m in said if "X.509" in m]
    keys = booted.sections["keys"].output
    assert "initsplit module signing key" in keys and "not enrolled" not in keys, keys


def test_root_drivers_two_stage_from_the_signed_cache(booted: SystemBoot, rootfs: RootFS) -> None:
    """The root's disk driver and file system with what it needs: loaded by the
    initramfs daemon before switch-root, two-stage wherever they split."""
    got = loads(booted, INITRD_UNIT)
    switch = switch_root(booted)
    two_stage = []
    for module in ROOT_MODULES:
        assert module in got, f"{module} not loaded by {INITRD_UNIT}: {sorted(got)}\n{booted.report()}"
        entry = got[module]
        path = next((rootfs.path / "lib/modules" / rootfs.kver / "kernel").rglob(f"{module}.ko"))
        if decide(path.read_bytes(), ALWAYS).outcome == "split":
            assert entry["INITSPLIT_MODE"] == "two-stage", entry
            assert entry["INITSPLIT_INIT_MODULE"] == f"{module}__init", entry
            two_stage.append(module)
        else:
            assert entry["INITSPLIT_MODE"] == "plain", entry
        assert at(entry) < switch, entry
    assert {"virtio_blk", "ext4", "jbd2", "mbcache"} <= set(two_stage), two_stage
    assert "EXT4-fs (vda): mounted filesystem" in "\n".join(e["MESSAGE"] for e in kernel_messages(booted))
    # Every init module was given back; no core module is left without its init.
    after = parse_proc_modules(booted.sections["modules_after"].output)
    assert not [m for m in after if m.endswith("__init")], booted.sections["modules_after"].output
    for module in two_stage:
        assert int(got[module]["INITSPLIT_CORE_BYTES"]) == after[module], (got[module], after.get(module))


def test_batches_and_summary_of_the_initramfs_daemon(booted: SystemBoot) -> None:
    two_stage = {e["INITSPLIT_INIT_MODULE"] for e in daemon_entries(booted, INITRD_UNIT, MESSAGE_ID_LOADED_TWO_STAGE)}
    batches = daemon_entries(booted, INITRD_UNIT, MESSAGE_ID_BATCH_UNLOADED)
    assert two_stage and batches, booted.report()
    deleted = [m for b in batches for m in b["INITSPLIT_BATCH_MODULES"].split()]
    assert sorted(deleted) == sorted(two_stage), (deleted, two_stage)
    assert all(b["INITSPLIT_BATCH_FAILED_COUNT"] == "0" for b in batches), batches
    summaries = daemon_entries(booted, INITRD_UNIT, MESSAGE_ID_SUMMARY)
    assert len(summaries) == 1 and int(summaries[0]["INITSPLIT_TOTAL_TWO_STAGE"]) == len(two_stage), summaries


def test_given_back_positive_and_what_the_kernel_shows(booted: SystemBoot) -> None:
    """Both daemons' summaries add up to their modules' entries, the kernel shows the
    core sizes and the missing BTF (tests/testbed/given_back.py), and the total is
    positive."""
    assert booted.sections["wait_daemon"].rc == 0, booted.report()
    result = check_given_back(booted.journal_json, proc_modules=booted.sections["modules_after"].output,
                              btf_listing=booted.sections["btf_after"].output, daemons=2)
    assert not result.problems, "\n".join(result.problems)
    assert result.total > 0, result
    two_stage = [e["INITSPLIT_MODULE"] for e in daemon_entries(booted, INITRD_UNIT, MESSAGE_ID_LOADED_TWO_STAGE)]
    assert set(two_stage) <= set(result.core_confirmed), (two_stage, result.core_confirmed)
    print(f"\nSecure Boot: given back for good {result.total} bytes (BTF {result.btf}) over "
          f"{len(result.core_confirmed)} modules, {len(two_stage)} two-stage, as the kernel shows")


def test_foreign_and_unsigned_splits_fall_back_to_plain(booted: SystemBoot) -> None:
    """ahci's cache split is unsigned, sd_mod's signed with a key the kernel does not
    know: the initramfs daemon loads both plain (Debian's signed originals), and the
    SATA controller and its disk (the ESP) still get their drivers."""
    got = loads(booted, INITRD_UNIT)
    switch = switch_root(booted)
    for module in SATA_DRIVERS:
        assert module in got, f"{module} not loaded by {INITRD_UNIT}: {sorted(got)}\n{booted.report()}"
        assert got[module]["INITSPLIT_MODE"] == "plain", got[module]
        assert at(got[module]) < switch, got[module]
    # The unsigned entry is not even tried: the daemon sees it is not signed.
    assert got[UNSIGNED]["INITSPLIT_REASON"] == "signatures enforced: the cache entry is not signed", got[UNSIGNED]
    # The foreign one looks signed; the kernel refuses its core module, and the
    # loader falls back to the original.
    said = [e["MESSAGE"] for e in kernel_messages(booted)]
    assert any(FOREIGN_KEY_REFUSAL in m for m in said), booted.report()
    assert not any(UNSIGNED_REFUSAL in m for m in said), [m for m in said if "rejected" in m]
    # (EKEYREJECTED: module_sig_check() turns ENOKEY into it where signatures are enforced.)
    assert got[OTHER_KEY]["INITSPLIT_REASON"] == "core module refused: Key was rejected by service", got[OTHER_KEY]
    sata = booted.sections["sata"].output.splitlines()
    assert any(line.startswith("ahci 0000:") for line in sata), sata
    assert "disk sda sd" in sata, sata


def test_signed_only_said_once_per_daemon(booted: SystemBoot) -> None:
    """Each daemon says once that the kernel enforces signatures and what it loads
    two-stage then, and once how to get a signed cache: the initramfs daemon for
    ahci's unsigned entry, the real-root one, which has no pre-split cache (the
    package's postinst built none, INITSPLIT_NO_CACHE), for its first module; that
    one loads every module plain, as its original."""
    for unit in (INITRD_UNIT, ROOT_UNIT):
        said = [e["MESSAGE"] for e in daemon_entries(booted, unit)]
        mode = [m for m in said if "only modules whose signed split is in the pre-split cache" in m]
        assert len(mode) == 1 and "kernel lockdown is active (integrity)" in mode[0], (unit, mode)
        hint = [m for m in said if ENABLE_SIGNING in m]
        assert len(hint) == 1, (unit, hint)
    root = loads(booted, ROOT_UNIT)
    assert root, booted.report()
    assert all(e["INITSPLIT_MODE"] == "plain" for e in root.values()), \
        sorted(n for n, e in root.items() if e["INITSPLIT_MODE"] != "plain")
    assert all(e["INITSPLIT_REASON"].startswith("signatures enforced: ") for e in root.values()), \
        {n: e["INITSPLIT_REASON"] for n, e in root.items()}


def test_taint_zero_and_kernel_log_clean(booted: SystemBoot) -> None:
    tainted = int(booted.sections["tainted"].output.strip())
    assert tainted == 0, booted.sections["tainted"].output
    problems = dmesg_problems(booted.sections["dmesg"].output, tainted=tainted,
                              allow=(FOREIGN_KEY_REFUSAL, UNSIGNED_REFUSAL))
    assert not problems, "\n".join(problems)
