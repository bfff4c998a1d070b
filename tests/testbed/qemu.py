"""Boot a Debian kernel in QEMU (TCG) with a busybox initramfs and run a shell script.

Two serial ports keep the streams apart:
  ttyS0  the kernel console (printk at console loglevel, /init's own messages);
  ttyS1  the caller's script output, framed by markers, then the full dmesg and
         /proc/sys/kernel/tainted, so tests never have to untangle kernel messages
         from their own output.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._util import TestbedError, tail
from .cpio import CpioArchive
from .kernel import DebianKernel

from initsplit.modfile import compression_of, read_module, uncompressed_path

BUSYBOX = Path("/bin/busybox")  # busybox-static: no shared libraries to copy
QEMU = "qemu-system-x86_64"

# Why the running test may not start a guest, or None. tests/conftest.py sets it
# for each test: a test (or a fixture it asks for) that boots must be marked vm,
# so that `pytest -m "not vm"` is exactly the suite without QEMU. Outside pytest
# (make demo, bench/) it stays None.
boot_refused: str | None = None

BEGIN = "@@ISPLIT-BEGIN@@"
# Guest programs print their findings as one line: RESULT_MARKER + JSON.
RESULT_MARKER = "@@RESULT@@"
# Not anchored at line start: the script's last line may lack a newline.
END_RE = re.compile(r"@@ISPLIT-END rc=(\d+)@@$", re.M)
DMESG_BEGIN = "@@ISPLIT-DMESG-BEGIN@@"
DMESG_END = "@@ISPLIT-DMESG-END@@"
TAINTED_RE = re.compile(r"^@@ISPLIT-TAINTED=(\d+)@@$", re.M)

# Kernel arguments every boot gets. No oops=panic: tests want to find oopses in dmesg
# and keep going. panic=-1 reboots at once on a panic and -no-reboot turns that into
# QEMU exiting, so a panicking guest does not sit there until the timeout.
# loglevel=5 puts only KERN_WARNING and worse on the console: a boot prints just ~7
# such lines (the full boot log costs ~0.35 s of serial output under TCG), yet WARN
# splats, oopses and their register dumps/call traces (KERN_DEFAULT = 4) all show, so
# the console of a hung or panicked guest still explains what happened. The complete
# log is in BootResult.dmesg when the script finishes.
# trace_clock=global is what the kernel picks anyway under TCG (unstable TSC); naming
# it avoids a 4-line "Unstable clock detected" warning on every boot.
BASE_APPEND = "console=ttyS0 panic=-1 loglevel=5 trace_clock=global rdinit=/init"

INIT_SCRIPT = f"""#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
out=/dev/ttyS1
[ -c $out ] || out=/dev/console
# The redirection is closed after each block; closing a tty waits until its output
# has drained, so nothing is lost when poweroff follows.
{{
  echo "{BEGIN}"
  sh /isplit/script.sh </dev/null 2>&1
  echo "@@ISPLIT-END rc=$?@@"
}} >$out 2>&1
{{
  echo "{DMESG_BEGIN}"
  dmesg
  echo "{DMESG_END}"
  echo "@@ISPLIT-TAINTED=$(cat /proc/sys/kernel/tainted)@@"
}} >$out 2>&1
sync
poweroff -f
# Only reached if poweroff failed; exiting PID 1 panics, and panic=-1 ends QEMU.
exit 1
"""


@dataclass
class BootResult:
    console: str  # everything the kernel console (ttyS0) printed
    ok: bool  # the guest script ran to its end marker
    script_output: str  # the script's stdout+stderr (between the markers)
    exit_status: int | None  # the script's exit status, None if it never finished
    dmesg: str  # full `dmesg` taken after the script, "" if not reached
    tainted: int | None  # /proc/sys/kernel/tainted after the script
    duration: float  # wall-clock seconds QEMU ran
    timed_out: bool
    qemu_log: str  # QEMU's own stdout/stderr

    def result_json(self, marker: str = RESULT_MARKER) -> Any | None:
        """The JSON a guest program printed on a line starting with *marker*, or None."""
        line = next((l for l in self.script_output.splitlines() if l.startswith(marker)), None)
        return None if line is None else json.loads(line[len(marker):])

    def report(self, lines: int = 60) -> str:
        """Human-readable failure context for assertion messages."""
        state = "timed out" if self.timed_out else ("ok" if self.ok else "did not finish")
        return (
            f"VM {state} after {self.duration:.1f}s, script exit status {self.exit_status}, "
            f"tainted={self.tainted}\n"
            f"--- script output (tail) ---\n{tail(self.script_output, lines)}\n"
            f"--- console (tail) ---\n{tail(self.console, lines)}\n"
            + (f"--- qemu ---\n{tail(self.qemu_log, 20)}\n" if self.qemu_log.strip() else "")
        )


@functools.cache
def _busybox_applets() -> tuple[str, ...]:
    """Applet paths like 'sbin/insmod', from the host's busybox-static."""
    if not BUSYBOX.exists():
        raise TestbedError(f"{BUSYBOX} is missing: install busybox-static")
    out = subprocess.run(
        [BUSYBOX, "--list-full"], capture_output=True, text=True, check=True
    ).stdout
    return tuple(line.strip() for line in out.splitlines() if line.strip())


def build_initramfs(script: str, files: Mapping[str, Path | bytes] = {}) -> bytes:
    """An uncompressed newc initramfs: busybox, /init, the script and the caller's files.

    Uncompressed because the kernel unpacks it faster than it could gunzip it under
    TCG, and the archive is only a few MB.
    """
    cpio = CpioArchive()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "etc", "root"):
        cpio.mkdir(d)
    # The kernel opens /dev/console before running /init; without the node /init
    # would run with no stdout at all (devtmpfs is only mounted by /init itself).
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in _busybox_applets():
        if applet != "bin/busybox":
            cpio.symlink(applet, "/bin/busybox")
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    cpio.file("isplit/script.sh", script.encode(), 0o755)
    for guest_path, source in files.items():
        if guest_path.strip("/") in cpio:
            raise TestbedError(f"initramfs already has {guest_path}")
        if isinstance(source, bytes):
            cpio.file(guest_path, source)
        else:
            source = Path(source)
            mode = 0o755 if os.access(source, os.X_OK) else 0o644
            cpio.file(guest_path, source.read_bytes(), mode)
    return cpio.getvalue()


def module_files(kernel: DebianKernel, names: Iterable[str]) -> dict[str, Path | bytes]:
    """Files for `boot(files=...)` so that `modprobe NAME` works in the guest.

    Puts the named modules and their modules.dep dependencies at their real place
    under /lib/modules/<kver>/, with the text indexes busybox modprobe reads cut
    down to those modules: the full indexes are ~2.6 MB, and every MB of initramfs
    costs ~0.4 s of boot under TCG. Modules that are only requested at run time
    (softdeps, crypto algorithms: libcrc32c needs "crc32c_generic") must be named too.
    """
    result: dict[str, Path | bytes] = {}
    guest_dir = f"/lib/modules/{kernel.kver}"
    wanted: set[str] = set()  # paths relative to modules_dir
    for name in names:
        for ko in kernel.module_deps(name):
            rel = str(ko.relative_to(kernel.modules_dir))
            wanted.add(rel)
            result[f"{guest_dir}/{rel}"] = ko
    modnames = {Path(rel).name.removesuffix(".ko").replace("-", "_") for rel in wanted}

    def keep(index: str, want_line: Callable[[list[str]], bool]) -> None:
        source = kernel.modules_dir / index
        if source.exists():
            lines = [ln for ln in source.read_text().splitlines(keepends=True) if want_line(ln.split())]
            result[f"{guest_dir}/{index}"] = "".join(lines).encode()

    keep("modules.dep", lambda w: bool(w) and w[0].rstrip(":") in wanted)
    keep("modules.order", lambda w: bool(w) and w[0] in wanted)
    # "alias <pattern> <module>", including "alias symbol:<sym> <module>" in modules.symbols
    keep("modules.alias", lambda w: len(w) == 3 and w[2].replace("-", "_") in modnames)
    keep("modules.symbols", lambda w: len(w) == 3 and w[2].replace("-", "_") in modnames)
    keep("modules.softdep", lambda w: True)
    keep("modules.builtin", lambda w: True)
    return result


def qemu_argv(*, kernel: Path, initrd: Path, append: str, smp: int, memory_mb: int,
              serial: tuple[Path, Path]) -> list[str]:
    """The QEMU command line every test-bed boot starts from (callers add devices).

    *append* is the whole kernel command line. The kernel console goes to serial[0]
    (ttyS0), the guest's report to serial[1].
    """
    return [
        QEMU,
        "-nodefaults", "-no-user-config", "-display", "none",
        # KVM hangs on these machines after the BIOS; TCG is slower but reliable.
        # -cpu max -smp 2 boots noticeably faster than the defaults.
        "-accel", "tcg", "-cpu", "max", "-smp", str(smp), "-m", str(memory_mb),
        # q35 boots ~0.8 s faster than the default i440fx machine here.
        "-machine", "q35",
        "-no-reboot",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", append,
        "-serial", f"file:{serial[0]}",
        "-serial", f"file:{serial[1]}",
        "-nic", "none",
    ]


def boot(
    kernel: DebianKernel,
    *,
    script: str,
    files: Mapping[str, Path | bytes] = {},
    append: str = "",
    timeout: float = 120,
    memory_mb: int = 512,
    smp: int = 2,
    pvh: bool = True,
    qemu_args: Iterable[str] = (),
    host_root: bool | Path = False,
    shares: Mapping[str, Path] = {},
) -> BootResult:
    """Boot `kernel`, run `script` with /bin/sh as the only job, power off.

    `files` maps guest paths ("/m/dummy.ko") to host files (or bytes). Never raises
    for guest-side problems: a hang, panic or failed script shows in the result
    (ok=False, console, report()). Raises TestbedError only if QEMU cannot start.

    pvh=True boots the decompressed vmlinux through its PVH entry (~2 s per boot
    instead of ~5 s). The kernel then runs without KASLR, since randomisation is
    done by the bzImage decompressor; pvh=False boots the real bzImage path.

    `qemu_args` adds devices ("-device", "e1000", ...). host_root=True exports the
    host's root directory read-only over virtio-9p, host_root=PATH exports that
    directory instead (e.g. the cached debootstrap root); a script that starts with
    HOST_ROOT_SETUP (see host_root_files()) then runs its programs, such as Debian's
    python3, through `hostrun CMD...` in a chroot of it. `shares` maps directories
    inside that root (e.g. "/mnt/initsplit", which must exist there) to host
    directories exported read-only beside it, such as this checkout.
    """
    if shares:
        files = {**files, "/isplit/shares": "".join(
            f"share{n} {guest}\n" for n, guest in enumerate(shares)).encode()}
    if shutil.which(QEMU) is None:
        raise TestbedError(f"{QEMU} not found: install qemu-system-x86")
    with tempfile.TemporaryDirectory(prefix="initsplit-vm-") as tmp_s:
        tmp = Path(tmp_s)
        initrd = tmp / "initrd.cpio"
        initrd.write_bytes(build_initramfs(script, files))
        console_log, out_log = tmp / "console.log", tmp / "out.log"
        argv = qemu_argv(kernel=kernel.vmlinux if pvh else kernel.vmlinuz, initrd=initrd,
                         append=f"{BASE_APPEND} {append}".strip(), smp=smp, memory_mb=memory_mb,
                         serial=(console_log, out_log))
        if host_root:
            root_dir = "/" if host_root is True else str(host_root)
            argv += ["-virtfs", f"local,path={root_dir},mount_tag=hostroot,security_model=none,"
                     "readonly=on,multidevs=remap"]
        for n, host_dir in enumerate(shares.values()):
            argv += ["-virtfs", f"local,path={host_dir},mount_tag=share{n},security_model=none,"
                     "readonly=on,multidevs=remap"]
        argv += list(qemu_args)
        return run_guest(argv, console_log=console_log, out_log=out_log, log=tmp / "qemu.log",
                         timeout=timeout)


def run_guest(argv: list[str], *, console_log: Path, out_log: Path, log: Path,
              timeout: float) -> BootResult:
    """Run a guest whose two serial ports go to *console_log* and *out_log* (the
    test bed's init writes its sections to the second) and read what it said."""
    run = run_qemu(argv, log=log, timeout=timeout)
    console = _read_serial(console_log)
    output = _read_serial(out_log)
    run.check(argv, produced=bool(output or console))
    return _parse(console, output, run.duration, run.timed_out, run.log)


@dataclass(frozen=True)
class QemuRun:
    returncode: int
    duration: float  # wall-clock seconds
    timed_out: bool  # killed at the timeout
    log: str  # QEMU's own stdout/stderr

    def check(self, argv: list[str], *, produced: bool) -> None:
        """Raise if QEMU itself failed: it exited non-zero before the guest wrote anything."""
        if not self.timed_out and self.returncode != 0 and not produced:
            raise TestbedError(f"{QEMU} failed (exit {self.returncode}):\n{self.log}\n{shlex.join(argv)}")


def run_qemu(argv: list[str], *, log: Path, timeout: float,
             env: Mapping[str, str] | None = None) -> QemuRun:
    """Run QEMU until it exits, or kill it at *timeout*; its own output goes to *log*.
    Every test-bed guest starts here (run_guest(), system.py)."""
    if boot_refused is not None:
        raise TestbedError(boot_refused)
    start = time.monotonic()
    with open(log, "wb") as qlog:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog,
                                    stderr=subprocess.STDOUT, env=env)
        except OSError as e:
            raise TestbedError(f"cannot start {QEMU}: {e}") from e
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
    return QemuRun(proc.returncode, time.monotonic() - start, timed_out,
                   log.read_text(errors="replace"))


def _read_serial(path: Path) -> str:
    if not path.exists():
        return ""
    # The guest tty turns "\n" into "\r\n" (ONLCR).
    return path.read_bytes().decode(errors="replace").replace("\r\n", "\n").replace("\r", "")


def _parse(console: str, output: str, duration: float, timed_out: bool, qemu_log: str) -> BootResult:
    begin = output.find(BEGIN + "\n")
    end = END_RE.search(output, begin + 1 if begin >= 0 else 0)
    if begin < 0:
        script_output = ""
    elif end is None:
        script_output = output[begin + len(BEGIN) + 1:]
    else:
        script_output = output[begin + len(BEGIN) + 1:end.start()]
    dmesg = ""
    d0 = output.find(DMESG_BEGIN + "\n")
    d1 = output.find(DMESG_END, d0 + 1)
    if d0 >= 0 and d1 >= 0:
        dmesg = output[d0 + len(DMESG_BEGIN) + 1:d1]
    tainted = TAINTED_RE.search(output)
    return BootResult(
        console=console,
        ok=end is not None,
        script_output=script_output,
        exit_status=int(end.group(1)) if end else None,
        dmesg=dmesg,
        tainted=int(tainted.group(1)) if tainted else None,
        duration=duration,
        timed_out=timed_out,
        qemu_log=qemu_log,
    )


# Modules that give the guest the host's root over virtio-9p, in insmod order.
HOST_ROOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p")

HOST_ROOT_SETUP = r"""
for ko in $(cat /isplit/host-root-modules); do insmod $ko || echo "host root: insmod $ko failed"; done
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose hostroot /host || echo "host root: mount failed"
[ -f /isplit/shares ] && while read tag guest; do
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose $tag /host$guest || echo "share $tag: mount failed"
done < /isplit/shares
for d in proc sys dev; do mount --bind /$d /host/$d; done
# The host's /tmp stays visible (a checkout or test files may live there); the
# guest's scratch space is a tmpfs on /run, and TMPDIR points programs at it.
# mode=755 as systemd mounts /run (a bare tmpfs is 1777, where initsplitd rightly
# refuses to keep kernel code).
mount -t tmpfs -o mode=755 tmpfs /host/run
mkdir -p /host/run/tmp
hostrun() { TMPDIR=/run/tmp chroot /host "$@"; }
"""


def host_root_files(kernel: DebianKernel) -> dict[str, Path | bytes]:
    """Files boot(host_root=True) scripts need: the 9p modules and their insmod order."""
    files: dict[str, Path | bytes] = {}
    order: list[str] = []
    for name in HOST_ROOT_MODULES:
        for ko in kernel.module_deps(name):
            # Debian 13's modules are NAME.ko.xz; busybox's insmod gets them
            # decompressed, as NAME.ko.
            guest = f"/isplit/hostmods/{uncompressed_path(ko).name}"
            if guest not in files:
                files[guest] = read_module(ko) if compression_of(ko) else ko
                order.append(guest)
    files["/isplit/host-root-modules"] = ("\n".join(order) + "\n").encode()
    return files


def script_section(result: BootResult, name: str) -> str:
    """The part of the script output from a line "== NAME" to the next "== " line.

    Guest scripts print such headers so that each test can look at its own steps.
    """
    text = result.script_output
    start = text.find(f"== {name}\n")
    if start < 0:
        raise AssertionError(f"no section {name!r} in the script output\n{result.report()}")
    end = text.find("\n== ", start + 1)
    return text[start:end if end >= 0 else None]
