"""Full-system boots: the cached Debian root (rootfs.py) on a virtio disk, a dracut
initramfs built inside it, QEMU (TCG) to multi-user, and the guest's journal on the host.

build_disk() makes the image:
  1. an overlay mount puts a scratch layer over the cached root, so neither copying the
     ~650 MB tree nor touching the cache is needed (the cache stays pristine for others);
  2. the caller's prepare steps run on it (install.DebInstall: initsplit's package
     installed with dpkg -i in a chroot), then the caller's files and units and the
     report service are written into the overlay;
  3. dracut runs in a chroot of the overlay, with /proc, /sys, /dev, /dev/pts mounted;
  4. `mkfs.ext4 -d` packs the overlay into a fresh sparse ext4 image without mounting it
     (no loop devices needed).

boot_system() boots it. A service (isplit-report.service, ordered after
multi-user.target) writes the system state, the failed units, /proc/modules,
systemd-analyze, the caller's report commands and the journal to the *second* serial
port between markers, then powers off. Kernel console and report stay separate, so
tests never untangle the two.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._util import TestbedError, run, tail
from .kernel import builtin_modules
from .qemu import QEMU, qemu_argv, run_qemu
from .rootfs import CHROOT_ENV, RootFS, chroot_mounts, chroot_run, remove_tree, unmount_all

# Drivers the initramfs needs to mount root: the Debian kernel builds its whole storage
# stack as modules, so a machine whose root is ext4 on virtio boots only if these are in
# the initramfs. dracut adds their dependencies (jbd2, mbcache, crc16, crc32c, ...).
# Those the kernel has built in (virtio_pci on Debian 13's 6.12, modules.builtin) are
# left out: there is no file to add.
ROOT_DRIVERS: tuple[str, ...] = ("virtio_pci", "virtio_blk", "ext4")

# Kernel arguments every system boot gets (the caller's `append` comes after and wins
# where the kernel/systemd take the last value).
#   rw: dracut mounts the root read-write at once (its fsck of the root still runs
#     before the mount); the guest never needs a read-only phase.
#   panic=-1 + QEMU -no-reboot: a panicking guest ends QEMU at once instead of
#     sitting there until the timeout.
#   loglevel=5: only warnings and worse on the console (a full boot log costs ~0.35 s
#     of serial output under TCG); the journal has everything.
#   rd.shell=0 rd.emergency=poweroff: when the initramfs cannot find the root, dracut
#     would otherwise wait for a login on the console until the timeout.
#   trace_clock=global: what the kernel picks anyway under TCG; naming it silences
#     a warning.
BASE_APPEND = (
    "root=/dev/vda rw console=ttyS0 panic=-1 loglevel=5 trace_clock=global "
    "rd.shell=0 rd.emergency=poweroff"
)

# dracut modules a trimmed image leaves out: they handle storage and setups the test
# guest does not have (encrypted/DM/NVDIMM/virtiofs roots, resume from swap, a separate
# /usr) or only add files (terminfo, kernel-modules-extra). "qemu" would add virtio
# drivers by looking at the *build host's* virtualisation, which is not the guest's.
TRIM_OMIT: tuple[str, ...] = (
    "crypt", "dm", "nvdimm", "overlay-root", "lunmask", "resume", "virtiofs",
    "usrmount", "qemu", "kernel-modules-extra", "terminfo",
)

REPORT_UNIT = "isplit-report.service"
REPORT_SCRIPT = "/usr/local/sbin/isplit-report"
REPORT_DIR = "/etc/isplit-report.d"  # the caller's report commands, NN-name.sh
REPORT_DEVICE = "/dev/ttyS1"

REPORT_BEGIN = "@@ISPLIT-REPORT-BEGIN@@"
REPORT_END = "@@ISPLIT-REPORT-END@@"
SECTION_RE = re.compile(r"^@@ISPLIT-SECTION (\S+)@@\n", re.M)
SECTION_END_RE = re.compile(r"\n@@ISPLIT-SECTION-END (\S+) rc=(\d+)(?: t=([\d.]+))?@@$", re.M)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Default sections, in the order the script writes them. The caller's commands run
# after these and before the journal, so whatever they log is in the journal.
# (`systemd-analyze blame` is not among them: it takes ~6 s under TCG. Add it through
# report_commands when a test wants it.)
STANDARD_SECTIONS = ("state", "failed", "proc_modules", "analyze")

REPORT_SH = f"""#!/bin/sh
# Written by tests/testbed/system.py; run by {REPORT_UNIT} once the boot is done.
# Writes the boot's outcome to {REPORT_DEVICE} (the host reads it from a file) and
# powers the machine off.
out={REPORT_DEVICE}
# Our stdout is a tty: without these, systemctl/journalctl would start a pager (and
# wait for a key forever) and colour their output.
export SYSTEMD_PAGER=cat PAGER=cat SYSTEMD_COLORS=0 TERM=dumb LC_ALL=C.UTF-8
# raw: no "\\n" -> "\\r\\n" translation, so the host gets the bytes as written.
stty -F $out raw -echo 2>/dev/null

section() {{
    name=$1; shift
    echo "@@ISPLIT-SECTION $name@@"
    "$@" </dev/null 2>&1
    rc=$?
    # The extra newline lets the host find the end marker even when the output lacks a
    # final newline; the parser removes exactly one.
    echo
    # The guest's uptime at the end of each section shows where report time goes.
    echo "@@ISPLIT-SECTION-END $name rc=$rc t=$(cut -d' ' -f1 /proc/uptime)@@"
}}

{{
    echo "{REPORT_BEGIN}"
    # running/degraded once every start job is done; maintenance in emergency mode.
    section state timeout 300 systemctl is-system-running --wait
    section failed systemctl list-units --failed --no-legend --plain --full
    section proc_modules cat /proc/modules
    section analyze systemd-analyze time
    for f in {REPORT_DIR}/*.sh; do
        [ -e "$f" ] || continue
        n=${{f##*/}}; n=${{n%.sh}}; n=${{n#*-}}
        section "$n" sh "$f"
    done
    section journal journalctl -b --no-pager -o short-monotonic
    # JSON is ~10x the text; gzip+base64 keeps the serial transfer (a few us per byte
    # under TCG) short.
    section journal_json sh -c 'journalctl -b --no-pager -o json | gzip -1 | base64'
    echo "{REPORT_END}"
}} >$out 2>&1
# Closing the tty above waits until its output has drained; the sync is for the
# caller's services that wrote files.
sync
systemctl poweroff --no-block
"""

REPORT_SERVICE = f"""[Unit]
Description=initsplit test bed: report the boot on {REPORT_DEVICE}, then power off
# No default dependencies, so that the unit can also run in emergency mode (there
# sysinit.target is not started, and pulling it in would redo the failed boot).
DefaultDependencies=no
After=multi-user.target
Conflicts=shutdown.target
Before=shutdown.target

[Service]
# Not oneshot: a oneshot start job only finishes when the script exits, and the
# script's `systemctl is-system-running --wait` waits for all start jobs to finish.
Type=exec
ExecStart={REPORT_SCRIPT}

[Install]
WantedBy=multi-user.target emergency.target rescue.target
"""


@dataclass(frozen=True)
class GuestFile:
    """A file for build_disk(extra_files=...) with an explicit mode (bytes default to
    0644 and host files keep theirs)."""

    data: bytes | Path
    mode: int = 0o644


ExtraFile = Path | bytes | GuestFile


@dataclass(frozen=True)
class SystemImage:
    disk: Path  # raw ext4 image, root of the guest (boot it with -snapshot to keep it)
    initrd: Path  # dracut image, copied out of the chroot (also in the disk's /boot)
    kernel: Path  # bzImage (/boot/vmlinuz-<kver>, same bytes as in the disk)
    vmlinux: Path  # the decompressed ELF, for faster PVH boots
    kver: str
    rootfs: RootFS
    dracut_log: Path  # dracut's stdout+stderr
    dracut_argv: tuple[str, ...]  # the command run in the chroot
    timings: dict[str, float] = field(default_factory=dict)  # seconds per build step


def build_disk(
    rootfs: RootFS,
    *,
    out: Path,
    prepare: Sequence[Callable[[Path], None]] = (),
    extra_files: Mapping[str, ExtraFile] = {},
    units: Mapping[str, str] = {},
    report_commands: Mapping[str, str] = {},
    dracut_args: Sequence[str] = (),
    drivers: Sequence[str] = ROOT_DRIVERS,
    generic: bool = False,
    size: str = "2G",
) -> SystemImage:
    """Make a bootable disk + initramfs from `rootfs` in the directory `out`.

    prepare: callables run in order with the image's root (the overlay's merged
        directory) before anything else is written into it, e.g.
        install.install_initsplit() (dpkg -i of initsplit's package in a chroot).
    extra_files: guest path -> host file (mode kept), directory (copied recursively),
        bytes (0644) or GuestFile. Written before dracut runs, so dracut modules and
        configuration (/etc/dracut.conf.d/...) given here take effect.
    units: unit file name -> text, installed in /etc/systemd/system and enabled
        (`systemctl enable`, i.e. per their [Install] section).
    report_commands: section name -> shell snippet the report service runs (with sh,
        in this order) after multi-user is reached; see SystemBoot.sections.
    dracut_args: appended to dracut's command line (after the profile's arguments).
    drivers: kernel modules the initramfs must contain (with their dependencies); those
        the kernel has built in (its modules.builtin) are left out.
    generic: False (default) makes a trimmed image: only `drivers` (--drivers), no
        dracut modules the guest cannot use (TRIM_OMIT), fast compression; ~3-15 s to
        build, ~14 MB. True makes what Debian's dracut makes by default without
        host-only mode: every storage/input/USB driver family (--add-drivers), gzip -9;
        ~55 s to build, ~39 MB. Both boot the same way: udev loads the drivers the
        hardware asks for.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in report_commands:
        if not NAME_RE.match(name) or name in STANDARD_SECTIONS + ("journal", "journal_json"):
            raise TestbedError(f"bad report section name {name!r}")
    timings: dict[str, float] = {}
    kver = rootfs.kver
    disk, initrd, dracut_log = out / "disk.img", out / "initrd.img", out / "dracut.log"
    for stale in (disk, initrd, dracut_log):
        stale.unlink(missing_ok=True)
    for stale_dir in out.glob("overlay-*"):
        remove_tree(stale_dir)  # a killed earlier build; unmounts before deleting

    t0 = time.monotonic()
    # The scratch layer goes next to the output: the same file system as the result,
    # and cleaned up with it if we die before the finally below.
    work = Path(tempfile.mkdtemp(prefix="overlay-", dir=out))
    merged = work / "merged"
    try:
        for sub in ("upper", "work", "merged"):
            (work / sub).mkdir()
        run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={rootfs.path},upperdir={work / 'upper'},workdir={work / 'work'}", merged],
            what="mount an overlay over the cached root",
        )
        for step in prepare:
            step(merged)
        timings["prepare"] = time.monotonic() - t0
        _write_files(merged, extra_files)
        _install_report(merged, report_commands)
        _install_units(merged, units)
        timings["files"] = time.monotonic() - t0

        t1 = time.monotonic()
        # (/lib is /usr/lib on a usrmerged root: one path serves both releases.)
        builtin = builtin_modules(merged / "lib" / "modules" / kver)
        drivers = [d for d in drivers if d.replace("-", "_") not in builtin]
        dracut_argv = _run_dracut(merged, kver, drivers, generic, dracut_args, dracut_log)
        shutil.copyfile(merged / "boot" / f"initrd.img-{kver}", initrd)
        timings["dracut"] = time.monotonic() - t1

        t2 = time.monotonic()
        run(
            # -d populates the file system from the tree without mounting it. Label and
            # size are fixed; the file is sparse, so 2G costs only what the tree uses.
            ["mkfs.ext4", "-F", "-q", "-L", "isplit-root", "-d", merged, disk, size],
            what=f"make the ext4 image {disk}",
            timeout=600,
        )
        timings["mkfs"] = time.monotonic() - t2
    finally:
        # unmount_all also catches chroot mounts a failed dracut step left behind.
        unmount_all(merged)
        remove_tree(work)
    timings["total"] = time.monotonic() - t0
    return SystemImage(
        disk=disk,
        initrd=initrd,
        kernel=rootfs.path / "boot" / f"vmlinuz-{kver}",
        vmlinux=rootfs.kernel.vmlinux,
        kver=kver,
        rootfs=rootfs,
        dracut_log=dracut_log,
        dracut_argv=tuple(dracut_argv),
        timings={k: round(v, 2) for k, v in timings.items()},
    )


def _guest(root: Path, guest_path: str) -> Path:
    rel = Path(guest_path.lstrip("/"))
    if not rel.parts or ".." in rel.parts:
        raise TestbedError(f"bad guest path {guest_path!r}")
    return root / rel


def _write_files(root: Path, files: Mapping[str, ExtraFile]) -> None:
    for guest_path, source in files.items():
        dest = _guest(root, guest_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Never write through a symlink of the root tree: an absolute one would point
        # at the host's file (parent directories are trusted: they are Debian's).
        if dest.is_symlink():
            dest.unlink()
        mode = None
        if isinstance(source, GuestFile):
            source, mode = source.data, source.mode
        if isinstance(source, bytes):
            dest.write_bytes(source)
            os.chmod(dest, 0o644 if mode is None else mode)
        elif Path(source).is_dir():
            shutil.copytree(source, dest, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(source, dest)
            if mode is not None:
                os.chmod(dest, mode)


def _install_report(root: Path, commands: Mapping[str, str]) -> None:
    script = _guest(root, REPORT_SCRIPT)
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(REPORT_SH)
    script.chmod(0o755)
    rdir = _guest(root, REPORT_DIR)
    rdir.mkdir(parents=True, exist_ok=True)
    for i, (name, text) in enumerate(commands.items()):
        (rdir / f"{i:02d}-{name}.sh").write_text(text if text.endswith("\n") else text + "\n")
    (root / "etc" / "systemd" / "system" / REPORT_UNIT).write_text(REPORT_SERVICE)


def _install_units(root: Path, units: Mapping[str, str]) -> None:
    unit_dir = root / "etc" / "systemd" / "system"
    for name, text in units.items():
        if not NAME_RE.match(name):
            raise TestbedError(f"bad unit name {name!r}")
        (unit_dir / name).write_text(text)
    # systemctl enable works offline in a chroot (it only makes symlinks); the guest's
    # own systemctl so that its idea of the unit search path is the one that applies.
    to_enable = [REPORT_UNIT] + [n for n, t in units.items() if re.search(r"^\[Install\]", t, re.M)]
    chroot_run(root, ["systemctl", "enable", *to_enable], what=f"enable {', '.join(to_enable)}")


def _run_dracut(root: Path, kver: str, drivers: Sequence[str], generic: bool,
                args: Sequence[str], log: Path) -> list[str]:
    argv = [
        "dracut",
        # Host-only mode looks at the running system (/proc/modules, the root device),
        # which in a chroot is the build host: list what the guest needs instead.
        "--no-hostonly",
        "--force",
        "--kver", kver,
    ]
    if generic:
        argv += ["--add-drivers", " ".join(drivers)]
    else:
        argv += [
            # --drivers replaces dracut's generic driver families (hundreds of modules,
            # ~100 MB unpacked) with exactly these and their dependencies.
            "--drivers", " ".join(drivers),
            "--omit", " ".join(TRIM_OMIT),
            # gzip -9 (the default) takes ~15 s of a ~17 s build; gzip -1 ~1 s, and
            # the kernel unpacks either in about the same time.
            "--compress", "gzip -1 -n",
        ]
    argv += [*args, f"/boot/initrd.img-{kver}"]
    with chroot_mounts(root):
        proc = subprocess.run(
            ["chroot", root, *argv],
            env={**CHROOT_ENV, "TERM": "dumb", "TMPDIR": "/var/tmp"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=900,
        )
    log.write_text(proc.stdout)
    if proc.returncode != 0:
        raise TestbedError(
            f"dracut failed (exit {proc.returncode}) in the chroot:\n{tail(proc.stdout)}"
        )
    image = root / "boot" / f"initrd.img-{kver}"
    # dracut can exit 0 and still write a useless image (missing mounts, broken file
    # lists): check the image for what must be there rather than trusting the status.
    listing = run(["chroot", root, "lsinitrd", f"/boot/initrd.img-{kver}"],
                  what="list the new initramfs")
    missing = [d for d in drivers if not re.search(rf"/{re.escape(d)}\.ko(\.\w+)?$", listing, re.M)]
    for required in ("usr/lib/systemd/systemd", "init"):
        if not re.search(rf" {re.escape(required)}( ->|$)", listing, re.M):
            missing.append(required)
    if missing or not image.exists():
        raise TestbedError(
            f"dracut exited 0 but {image.name} lacks {missing}; dracut output:\n"
            f"{tail(proc.stdout)}"
        )
    return argv


# --- booting ------------------------------------------------------------------------


@dataclass
class Section:
    output: str
    rc: int | None  # None: the section never finished
    uptime: float | None = None  # guest /proc/uptime when the section finished


@dataclass
class SystemBoot:
    console: str  # kernel console + systemd status lines (ttyS0)
    report_text: str  # raw report from ttyS1
    sections: dict[str, Section]  # "state", "failed", ..., caller's, "journal", ...
    complete: bool  # the report ran to its end marker
    duration: float  # wall-clock seconds QEMU ran
    timed_out: bool
    qemu_log: str
    argv: list[str]

    @property
    def state(self) -> str:
        """`systemctl is-system-running --wait`: running, degraded, maintenance...;
        "" if the report never ran."""
        sec = self.sections.get("state")
        return sec.output.strip().splitlines()[-1] if sec and sec.output.strip() else ""

    @property
    def reached_multi_user(self) -> bool:
        return self.state in ("running", "degraded")

    @property
    def failed_units(self) -> list[str]:
        sec = self.sections.get("failed")
        if not sec:
            return []
        return [line.split()[0] for line in sec.output.splitlines() if line.strip()]

    @property
    def journal(self) -> str:
        return self._text("journal")

    @property
    def proc_modules(self) -> str:
        return self._text("proc_modules")

    @property
    def analyze(self) -> str:
        return self._text("analyze")

    @property
    def modules(self) -> set[str]:
        """Names of the loaded modules (first column of /proc/modules)."""
        return {line.split()[0] for line in self.proc_modules.splitlines() if line.strip()}

    @property
    def journal_json(self) -> list[dict]:
        """`journalctl -b -o json` entries; [] if not collected."""
        sec = self.sections.get("journal_json")
        if not sec or sec.rc is None or not sec.output.strip():
            return []
        raw = gzip.decompress(base64.b64decode("".join(sec.output.split())))
        return [json.loads(line) for line in raw.decode(errors="replace").splitlines() if line]

    def _text(self, name: str) -> str:
        sec = self.sections.get(name)
        return sec.output if sec else ""

    def report(self, lines: int = 80) -> str:
        """Human-readable failure context for assertion messages."""
        status = "timed out" if self.timed_out else ("report complete" if self.complete else "no complete report")
        parts = [
            f"VM {status} after {self.duration:.1f}s; system state {self.state or '(none)'}; "
            f"failed units: {', '.join(self.failed_units) or 'none'}",
        ]
        if self.analyze:
            parts.append(self.analyze.strip())
        for name, sec in self.sections.items():
            if name in ("state", "failed", "analyze", "journal", "journal_json", "proc_modules"):
                continue
            parts.append(f"--- section {name} (rc={sec.rc}) ---\n{tail(sec.output, lines)}")
        if self.journal:
            parts.append(f"--- journal (tail) ---\n{tail(self.journal, lines)}")
        parts.append(f"--- console (tail) ---\n{tail(self.console, lines)}")
        if self.qemu_log.strip():
            parts.append(f"--- qemu ---\n{tail(self.qemu_log, 20)}")
        return "\n".join(parts) + "\n"


def boot_system(
    image: SystemImage,
    *,
    append: str = "",
    timeout: float = 300,
    memory_mb: int = 1024,
    smp: int = 2,
    snapshot: bool = True,
    pvh: bool = True,
) -> SystemBoot:
    """Boot `image` to multi-user, collect the report, return when QEMU exits.

    snapshot=True keeps the disk pristine (writes go to a temporary overlay QEMU
    deletes), so one image serves any number of boots. pvh=True boots the decompressed
    vmlinux through its PVH entry point, skipping ~2.5 s of in-guest XZ decompression
    (and KASLR with it); pvh=False boots the bzImage as a boot loader would.

    Never raises for guest-side problems (hang, panic, failed units, emergency mode):
    they show in the result and in report(). Raises TestbedError only if QEMU cannot
    start.
    """
    if shutil.which(QEMU) is None:
        raise TestbedError(f"{QEMU} not found: install qemu-system-x86")
    drive = root_drive(image, snapshot=snapshot)
    with tempfile.TemporaryDirectory(prefix="initsplit-sys-") as tmp_s:
        tmp = Path(tmp_s)
        console_log, report_log = tmp / "console.log", tmp / "report.log"
        argv = qemu_argv(kernel=image.vmlinux if pvh else image.kernel, initrd=image.initrd,
                         append=f"{BASE_APPEND} {append}".strip(), smp=smp, memory_mb=memory_mb,
                         serial=(console_log, report_log)) + ["-drive", drive]
        return run_system_guest(argv, console_log=console_log, report_log=report_log, tmp=tmp,
                                timeout=timeout)


def root_drive(image: SystemImage, *, snapshot: bool = True) -> str:
    """The -drive value of the image's root disk (virtio: /dev/vda in the guest)."""
    drive = f"file={image.disk},if=virtio,format=raw"
    if snapshot:
        # Flushes to the throw-away overlay are pointless: cache=unsafe skips them.
        drive += ",snapshot=on,cache=unsafe"
    return drive


def run_system_guest(argv: list[str], *, console_log: Path, report_log: Path, tmp: Path,
                     timeout: float) -> SystemBoot:
    """Run a full-system guest (the ports: console on *console_log*, the report
    service's sections on *report_log*) and read its report; boot_system() and
    secureboot.secureboot_system_boot() alike. *tmp* holds QEMU's snapshot overlay."""
    # QEMU puts the snapshot overlay in $TMPDIR; keep it in our directory.
    env = {**os.environ, "TMPDIR": str(tmp)}
    run = run_qemu(argv, log=tmp / "qemu.log", timeout=timeout, env=env)
    console = _read_serial(console_log, strip_ansi=True)
    report_text = _read_serial(report_log)
    run.check(argv, produced=bool(console or report_text))
    sections, complete = parse_report(report_text)
    return SystemBoot(
        console=console,
        report_text=report_text,
        sections=sections,
        complete=complete,
        duration=run.duration,
        timed_out=run.timed_out,
        qemu_log=run.log,
        argv=argv,
    )


ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _read_serial(path: Path, *, strip_ansi: bool = False) -> str:
    if not path.exists():
        return ""
    # The report port is set raw, but the console (and the report, should stty fail)
    # turns "\n" into "\r\n".
    text = path.read_bytes().decode(errors="replace").replace("\r\n", "\n")
    # systemd colours its status lines on the console; assertion messages read better
    # without the escape sequences.
    return ANSI_RE.sub("", text) if strip_ansi else text


def parse_report(text: str) -> tuple[dict[str, Section], bool]:
    """Split the ttyS1 report into sections; a section cut off by a hang or the timeout
    keeps what arrived, with rc None."""
    begin = text.find(REPORT_BEGIN + "\n")
    if begin < 0:
        return {}, False
    body = text[begin + len(REPORT_BEGIN) + 1:]
    sections: dict[str, Section] = {}
    pos = 0
    while True:
        m = SECTION_RE.search(body, pos)
        if not m:
            break
        name = m.group(1)
        # The script writes an extra newline before the end marker, so even an empty
        # output leaves the marker's leading "\n" after the start marker's newline.
        end = SECTION_END_RE.search(body, m.end())
        if end is None:
            sections[name] = Section(body[m.end():], None)
            break
        rc = int(end.group(2)) if end.group(1) == name else None
        uptime = float(end.group(3)) if end.group(3) else None
        sections[name] = Section(body[m.end():end.start()], rc, uptime)
        pos = end.end()
    return sections, REPORT_END in body
