"""A Secure Boot test bed from Debian 12 packages: OVMF with Microsoft's keys, shim,
grub and Debian's signed kernel, booting the test bed's busybox initramfs
(secureboot_boot()) or a whole system of system.build_disk()'s, its dracut
initramfs and its root on the virtio disk (secureboot_system_boot()), with a
machine owner key (MOK) made by the tests and enrolled without MokManager.

    ovmf                   OVMF_CODE_4M.secboot.fd (SMM), OVMF_VARS_4M.ms.fd (MS keys, SB on)
    shim-signed            shimx64.efi.signed as EFI/BOOT/BOOTX64.EFI
    grub-efi-amd64-signed  grubx64.efi.signed beside it; grub.cfg in EFI/debian/ (the
                           signed grub's prefix) and EFI/BOOT/
    dosfstools, mtools     the FAT ESP image (mkfs.vfat, mcopy)
    linux-image-6.1.0-57   its vmlinuz is signed by Debian (shim trusts Debian's CA)

The ESP (kernel and initramfs on it, grub.cfg naming them) is a SATA disk of the q35
board's own AHCI controller, which OVMF boots from; the guest's virtio disks are the
caller's, so a system's root is /dev/vda as in the boots without Secure Boot.

The MOK is enrolled by appending a MokList variable to a copy of the vars store
(append_variable(), the authenticated variable format of edk2's
MdeModulePkg/Include/Guid/VariableFormat.h): shim copies MokList into MokListRT and
the kernel loads MokListRT's certificates into .machine, which
.secondary_trusted_keys links, so modules signed with the MOK load under lockdown.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ._util import TestbedError
from .kernel import DebianKernel
from .qemu import BASE_APPEND, QEMU, BootResult, build_initramfs, run_guest
from .system import BASE_APPEND as SYSTEM_APPEND
from .system import SystemBoot, SystemImage, root_drive, run_system_guest

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
SHIM = Path("/usr/lib/shim/shimx64.efi.signed")
GRUB = Path("/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed")
PACKAGES = "ovmf shim-signed grub-efi-amd64-signed dosfstools mtools"

# shim's vendor GUID (shim's SHIM_LOCK_GUID), under which MokList lives.
SHIM_LOCK_GUID = uuid.UUID("605dab50-e046-4300-abb6-3dd810dd8b23")
# UEFI spec, EFI_CERT_X509_GUID: an EFI_SIGNATURE_LIST of DER certificates.
EFI_CERT_X509_GUID = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
# edk2 MdePkg/Include/Guid/ImageAuthentication.h... and VariableFormat.h:
# gEfiAuthenticatedVariableGuid, the signature of a store of authenticated variables.
EFI_AUTHENTICATED_VARIABLE_GUID = uuid.UUID("aaf32c78-947b-439a-a180-2e144ec37792")
# MdePkg/Include/Pi/PiFirmwareVolume.h: EFI_SYSTEM_NV_DATA_FV_GUID's volume signature.
FVH_SIGNATURE = b"_FVH"

EFI_VARIABLE_NON_VOLATILE = 0x1
EFI_VARIABLE_BOOTSERVICE_ACCESS = 0x2

# VariableFormat.h
VARIABLE_DATA = 0x55AA  # StartId of every variable header
VAR_ADDED = 0x3F  # State of a live variable
VARIABLE_STORE_FORMATTED = 0x5A
VARIABLE_STORE_HEALTHY = 0xFE
HEADER_ALIGNMENT = 4  # variables start 4-aligned (HEADER_ALIGN)
# VARIABLE_STORE_HEADER: Signature (GUID), Size, Format, State, Reserved, Reserved1
_STORE_HEADER = struct.Struct("<16sIBBHI")
# AUTHENTICATED_VARIABLE_HEADER: StartId, State, Reserved, Attributes, MonotonicCount,
# TimeStamp (EFI_TIME, 16 bytes), PubKeyIndex, NameSize, DataSize, VendorGuid
_AUTH_VARIABLE = struct.Struct("<HBBIQ16sIII16s")
# PiFirmwareVolume.h EFI_FIRMWARE_VOLUME_HEADER up to HeaderLength: ZeroVector,
# FileSystemGuid, FvLength, Signature, Attributes, HeaderLength
_FV_HEADER = struct.Struct("<16s16sQ4sIH")


@dataclass(frozen=True)
class Variable:
    name: str
    vendor: uuid.UUID
    attributes: int
    data: bytes
    state: int


def _store(image: bytes) -> tuple[int, int]:
    """(offset, size) of the variable store inside the OVMF vars image."""
    _zero, _fs, _length, signature, _attributes, header_length = _FV_HEADER.unpack_from(image, 0)
    if signature != FVH_SIGNATURE:
        raise TestbedError("not an OVMF vars image: no _FVH firmware volume header")
    guid, size, fmt, state, _r, _r1 = _STORE_HEADER.unpack_from(image, header_length)
    if uuid.UUID(bytes_le=guid) != EFI_AUTHENTICATED_VARIABLE_GUID:
        raise TestbedError("the vars store does not hold authenticated variables")
    if (fmt, state) != (VARIABLE_STORE_FORMATTED, VARIABLE_STORE_HEALTHY):
        raise TestbedError(f"vars store not formatted and healthy ({fmt:#x}, {state:#x})")
    return header_length, size


def _walk(image: bytes) -> tuple[list[Variable], int]:
    """The variables of the store (every state) and the offset of its free space."""
    base, size = _store(image)
    offset, end = base + _STORE_HEADER.size, base + size
    found: list[Variable] = []
    while offset + _AUTH_VARIABLE.size <= end:
        (start, state, _r, attributes, _count, _time, _pk, name_size, data_size,
         vendor) = _AUTH_VARIABLE.unpack_from(image, offset)
        if start != VARIABLE_DATA:
            break
        name_at = offset + _AUTH_VARIABLE.size
        data_at = name_at + name_size  # GET_PAD_SIZE() is 0 off IPF
        name = image[name_at:data_at].decode("utf-16-le").rstrip("\0")
        found.append(Variable(name, uuid.UUID(bytes_le=vendor), attributes,
                              image[data_at:data_at + data_size], state))
        offset = _align(data_at + data_size)
    return found, offset


def _align(offset: int) -> int:
    return (offset + HEADER_ALIGNMENT - 1) & ~(HEADER_ALIGNMENT - 1)


def variables(image: bytes) -> list[Variable]:
    """The live variables (State VAR_ADDED) of an OVMF vars image."""
    return [v for v in _walk(image)[0] if v.state == VAR_ADDED]


def append_variable(image: bytes, name: str, vendor: uuid.UUID, attributes: int, data: bytes) -> bytes:
    """*image* with a new non-authenticated variable written into the store's free space.

    Refuses a name that is live already (two live copies would be ambiguous).
    """
    if any(v.name == name and v.vendor == vendor for v in variables(image)):
        raise TestbedError(f"variable {name} exists already in the vars store")
    base, size = _store(image)
    _found, free = _walk(image)
    encoded = (name + "\0").encode("utf-16-le")
    header = _AUTH_VARIABLE.pack(VARIABLE_DATA, VAR_ADDED, 0, attributes, 0, bytes(16), 0,
                                 len(encoded), len(data), vendor.bytes_le)
    record = header + encoded + data
    if _align(free + len(record)) > base + size:
        raise TestbedError("the vars store has no room for the variable")
    if image[free:free + len(record)] != b"\xff" * len(record):
        raise TestbedError("the vars store's free space is not erased")
    return image[:free] + record + image[free + len(record):]


def signature_list_x509(cert_der: bytes, owner: uuid.UUID = SHIM_LOCK_GUID) -> bytes:
    """UEFI EFI_SIGNATURE_LIST of type X.509 holding one DER certificate."""
    signature = owner.bytes_le + cert_der  # EFI_SIGNATURE_DATA
    return (EFI_CERT_X509_GUID.bytes_le
            + struct.pack("<III", 28 + len(signature), 0, len(signature)) + signature)


def vars_with_mok(cert_der: bytes, template: Path = OVMF_VARS) -> bytes:
    """A copy of OVMF's vars store with MokList holding *cert_der*, NV + BS only:
    shim deletes a MokList that the OS could see at runtime."""
    _require(template)
    return append_variable(template.read_bytes(), "MokList", SHIM_LOCK_GUID,
                           EFI_VARIABLE_NON_VOLATILE | EFI_VARIABLE_BOOTSERVICE_ACCESS,
                           signature_list_x509(cert_der))


def _require(*paths: Path) -> None:
    for path in paths:
        if not path.exists():
            raise TestbedError(f"{path} is missing: install {PACKAGES} (tools/install-deps)")


ESP_START = 2048  # sectors of 512 bytes
# The ESP's room for FAT, grub.cfg and the partition table beyond the files it holds.
ESP_SLACK_MB = 16


def _write_mbr(image: Path, *, start: int, sectors: int) -> None:
    """A DOS partition table with one EFI system partition (type 0xEF), LBA only."""
    entry = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", 0xEF, b"\xfe\xff\xff", start, sectors)
    with image.open("r+b") as f:
        f.seek(446)
        f.write(entry + bytes(48) + b"\x55\xaa")


def make_esp(image: Path, *, vmlinuz: Path, initrd: Path, append: str) -> None:
    """A FAT ESP: shim as the removable-media boot loader, grub beside it, and the
    kernel and initramfs grub loads (shim verifies the kernel, grub hands it over
    with the command line *append*). Sized for what it holds."""
    _require(SHIM, GRUB)
    for tool in ("mkfs.vfat", "mcopy", "mmd"):
        if shutil.which(tool) is None:
            raise TestbedError(f"{tool} not found: install {PACKAGES} (tools/install-deps)")
    payload = sum(path.stat().st_size for path in (SHIM, GRUB, vmlinuz, initrd))
    # FAT32 wants at least 65,525 clusters: 33 MB with mkfs.vfat's 512-byte ones.
    size_mb = max(64, -(-payload // (1024 * 1024)) + ESP_SLACK_MB)
    with image.open("wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    env = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}

    def run(*argv: str) -> None:
        subprocess.run([*argv], check=True, capture_output=True, env=env)

    # One EFI system partition from sector 2048, FAT in it; grub's root is the
    # device shim and grub came from, the prefix /EFI/debian.
    _write_mbr(image, start=ESP_START, sectors=size_mb * 2048 - ESP_START)
    run("mkfs.vfat", "-F", "32", "--offset", str(ESP_START), str(image), str((size_mb - 1) * 1024))
    grub_cfg = image.with_name("grub.cfg")
    grub_cfg.write_text("set timeout=0\n"
                        f"linux /vmlinuz {append}\ninitrd /initrd\nboot\n")
    fat = f"{image}@@{ESP_START * 512}"
    run("mmd", "-i", fat, "::/EFI", "::/EFI/BOOT", "::/EFI/debian")
    for source, target in ((SHIM, "::/EFI/BOOT/BOOTX64.EFI"), (GRUB, "::/EFI/BOOT/grubx64.efi"),
                           (grub_cfg, "::/EFI/BOOT/grub.cfg"), (grub_cfg, "::/EFI/debian/grub.cfg"),
                           (vmlinuz, "::/vmlinuz"), (initrd, "::/initrd")):
        run("mcopy", "-i", fat, str(source), target)


def secureboot_argv(*, tmp: Path, vmlinuz: Path, initrd: Path, append: str, mok_cert_der: bytes,
                    smp: int, memory_mb: int, serial: tuple[Path, Path]) -> list[str]:
    """The QEMU command line of a Secure Boot guest, written into *tmp*: OVMF with
    *mok_cert_der* in MokList, and an ESP with shim, grub, *vmlinuz* and *initrd*
    on the q35 board's own AHCI controller (SATA), so that the guest's virtio disks
    are the caller's (a system's root stays /dev/vda). Callers add their devices."""
    _require(OVMF_CODE, OVMF_VARS)
    if shutil.which(QEMU) is None:
        raise TestbedError(f"{QEMU} not found: install qemu-system-x86")
    esp = tmp / "esp.img"
    make_esp(esp, vmlinuz=vmlinuz, initrd=initrd, append=append)
    vars_fd = tmp / "vars.fd"
    vars_fd.write_bytes(vars_with_mok(mok_cert_der))
    return [
        QEMU, "-nodefaults", "-no-user-config", "-display", "none",
        "-accel", "tcg", "-cpu", "max", "-smp", str(smp), "-m", str(memory_mb),
        # Secure Boot needs SMM, and the flash writable only from SMM.
        "-machine", "q35,smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_fd}",
        "-drive", f"if=none,format=raw,id=esp,file={esp}",
        "-device", "ide-hd,drive=esp,bus=ide.0,bootindex=0",
        "-no-reboot",
        "-serial", f"file:{serial[0]}", "-serial", f"file:{serial[1]}",
        "-nic", "none",
    ]


def secureboot_boot(kernel: DebianKernel, *, script: str, mok_cert_der: bytes,
                    files: Mapping[str, Path | bytes] = {}, append: str = "",
                    timeout: float = 180, memory_mb: int = 1024, smp: int = 2) -> BootResult:
    """boot() through OVMF, shim and grub with Secure Boot on and *mok_cert_der* enrolled."""
    with tempfile.TemporaryDirectory(prefix="initsplit-sb-") as tmp_s:
        tmp = Path(tmp_s)
        initrd = tmp / "initrd.cpio"
        initrd.write_bytes(build_initramfs(script, files))
        console_log, out_log = tmp / "console.log", tmp / "out.log"
        argv = secureboot_argv(tmp=tmp, vmlinuz=kernel.vmlinuz, initrd=initrd,
                               append=f"{BASE_APPEND} {append}".strip(), mok_cert_der=mok_cert_der,
                               smp=smp, memory_mb=memory_mb, serial=(console_log, out_log))
        return run_guest(argv, console_log=console_log, out_log=out_log, log=tmp / "qemu.log",
                         timeout=timeout)


def secureboot_system_boot(image: SystemImage, *, mok_cert_der: bytes, initrd: Path | None = None,
                           append: str = "", timeout: float = 420, memory_mb: int = 1024,
                           smp: int = 2) -> SystemBoot:
    """boot_system() through OVMF, shim and grub with Secure Boot on and
    *mok_cert_der* enrolled: the image's signed bzImage (shim checks it against
    Debian's CA) and its dracut initramfs (or *initrd*) from the ESP, the root on
    the virtio disk (/dev/vda, a throw-away snapshot), the report on ttyS1."""
    with tempfile.TemporaryDirectory(prefix="initsplit-sbsys-") as tmp_s:
        tmp = Path(tmp_s)
        console_log, report_log = tmp / "console.log", tmp / "report.log"
        argv = secureboot_argv(tmp=tmp, vmlinuz=image.kernel, initrd=initrd or image.initrd,
                               append=f"{SYSTEM_APPEND} {append}".strip(), mok_cert_der=mok_cert_der,
                               smp=smp, memory_mb=memory_mb, serial=(console_log, report_log))
        argv += ["-drive", root_drive(image)]
        return run_system_guest(argv, console_log=console_log, report_log=report_log, tmp=tmp,
                                timeout=timeout)
