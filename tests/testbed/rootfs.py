"""A cached Debian root filesystem with the test kernel installed: bookworm for
Debian 12's 6.1, trixie for Debian 13's 6.12 (the kernel's own release, so the
daemon runs on that release's Python and python3-* packages).

system.py turns it into bootable disk images; this module only builds and caches the
tree. It is made once with debootstrap (~1-2 min cold) and reused by every test run.

Cache layout (under cache_dir()):
    rootfs/<kver>/root/        the root tree (root-owned, with device nodes: keep as root)
    rootfs/<kver>/READY        JSON marker written last; its "key" names the inputs
    debootstrap-debs/          debootstrap's package cache (--cache-dir), so a rebuild
                               after an input change does not download again
    locks/rootfs-<kver>.lock

The tree is rebuilt when the key changes: the kernel package, the suite, the package
list, or this file's source (the configuration steps live here, so any edit of them
must invalidate old trees; a cosmetic edit costs one rebuild, which is the cheap side
of that trade). Delete rootfs/ to force a rebuild.

Everything here needs root (debootstrap, chroot, mount); that is how the project's
test machines run.

The lock covers building and checking the tree, not its use: system.py only reads it
(as an overlay's lower layer), and the tree is replaced only when its inputs change,
which does not happen while a test run is using it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ._util import TestbedError, file_lock, run
from .kernel import DebianKernel, cache_dir, debian_kernel, fetch_deb

SUITE = "bookworm"  # the host's release: where the mirror is read from (debian_mirror())

# What a boot to multi-user plus the daemon's later tests need, nothing more: minbase
# already brings the Essential set (coreutils, util-linux, gzip, ...). debootstrap
# installs no Recommends, so anything the boot relies on must be listed here.
PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",  # /sbin/init -> systemd
    "udev",
    "dbus",  # systemd-logind needs a bus; without it the system boots "degraded"
    "kmod",
    "dracut",  # pulls dracut-core (bookworm split the package in two)
    "linux-base",  # a dependency of the kernel package installed below
    "e2fsprogs",  # fsck.ext4 for the root (dracut copies it into the initramfs)
    "zstd",  # dracut's compressor when a caller asks for --zstd
    "procps",  # free/ps/pgrep, for the memory tests
    "iproute2",
    "python3",
    "python3-pyudev",
    "python3-pyelftools",
    "python3-systemd",
)

HOSTNAME = "isplit-test"

MIRROR_ENV = "INITSPLIT_DEBIAN_MIRROR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class RootFS:
    kver: str
    path: Path  # the root tree; treat as read-only (system.py overlays it)
    kernel: DebianKernel  # the same package as the one installed in `path`
    packages: tuple[str, ...]
    key: str  # hash of the inputs, also recorded in READY
    mirror: str  # where debootstrap fetched from (informational)
    build_seconds: float  # cold build time of the cached tree
    size_bytes: int  # apparent size of the tree when it was built


def debian_rootfs(kernel: DebianKernel | None = None) -> RootFS:
    """The cached root of `kernel`'s Debian release (default: debian_kernel()),
    built if missing or stale. Safe to call from several processes at once."""
    if kernel is None:
        kernel = debian_kernel()
    return _debian_rootfs(kernel)


@functools.cache
def _debian_rootfs(kernel: DebianKernel) -> RootFS:
    _require_root()
    deb = fetch_deb(f"linux-image-{kernel.kver}", kernel.release)
    key = _input_key(deb, kernel.release.suite)
    rdir = cache_dir() / "rootfs" / kernel.kver
    marker = rdir / "READY"
    with file_lock(cache_dir() / "locks" / f"rootfs-{kernel.kver}.lock"):
        info = _read_marker(marker)
        if info is None or info.get("key") != key or not (rdir / "root").is_dir():
            info = _build(kernel, deb, key, rdir)
    return RootFS(
        kver=kernel.kver,
        path=rdir / "root",
        kernel=kernel,
        packages=tuple(info["packages"]),
        key=key,
        mirror=info["mirror"],
        build_seconds=float(info["build_seconds"]),
        size_bytes=int(info["size_bytes"]),
    )


def _require_root() -> None:
    if os.geteuid() != 0:
        raise TestbedError("the Debian root filesystem needs root (debootstrap, chroot, mount)")


def _input_key(kernel_deb: Path, suite: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([suite, sorted(PACKAGES), kernel_deb.name]).encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def _read_marker(marker: Path) -> dict | None:
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


# --- the Debian mirror -------------------------------------------------------------


def debian_mirror() -> str:
    """The archive URI apt on this host uses for SUITE's main component.

    Read from apt's own configuration rather than hard-coded, so a machine pointed at
    a local mirror or proxy keeps using it; INITSPLIT_DEBIAN_MIRROR overrides.
    """
    env = os.environ.get(MIRROR_ENV)
    if env:
        return env
    for uri, suites, components in _apt_sources():
        if SUITE in suites and "main" in components:
            return uri
    return DEFAULT_MIRROR


def _apt_sources() -> Iterator[tuple[str, list[str], list[str]]]:
    """(uri, suites, components) of every enabled binary source, in apt's file order."""
    etc = Path("/etc/apt")
    files = [etc / "sources.list"] + sorted((etc / "sources.list.d").glob("*.list"))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            # "deb [arch=amd64 signed-by=...] URI SUITE COMPONENT..."
            line = re.sub(r"\[[^]]*\]", " ", line)
            words = line.split()
            if len(words) >= 4 and words[0] == "deb":
                yield words[1], [words[2]], words[3:]
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        try:
            text = path.read_text()
        except OSError:
            continue
        # deb822: stanzas separated by blank lines, "Field: value" (continuations indented).
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            last = None
            for line in stanza.splitlines():
                if line.startswith("#"):
                    continue
                if line[:1].isspace() and last:
                    fields[last] += " " + line.strip()
                elif ":" in line:
                    last, _, value = line.partition(":")
                    last = last.strip().lower()
                    fields[last] = value.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            if fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                yield uri, fields.get("suites", "").split(), fields.get("components", "").split()


# --- chroot helpers (also used by system.py) ------------------------------------------


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below `path`, deepest first (from /proc/self/mountinfo)."""
    base = os.path.realpath(path)
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Field 5 is the mount point, with space, tab, newline and backslash
        # written as octal escapes (\040 ...).
        mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if mnt == base or mnt.startswith(base.rstrip("/") + "/"):
            found.append(Path(mnt))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount_all(path: Path) -> None:
    """Unmount everything at or below `path`; lazily if a plain umount fails (a
    straggling process keeps it busy) so the tree is at least detached from the host."""
    for mnt in mounts_under(path):
        try:
            run(["umount", mnt], what=f"unmount {mnt}", timeout=60)
        except TestbedError:
            run(["umount", "-l", mnt], what=f"lazily unmount {mnt}", timeout=60)
    left = mounts_under(path)
    if left:
        raise TestbedError(f"still mounted after unmounting: {', '.join(map(str, left))}")


def remove_tree(path: Path) -> None:
    """rm -rf that refuses to run while anything is mounted below `path`.

    A chroot has the host's /dev bind-mounted into it: deleting the tree with that
    mount still active would delete the host's device nodes.
    """
    if not path.exists() and not path.is_symlink():
        return
    unmount_all(path)
    shutil.rmtree(path)


@contextmanager
def chroot_mounts(root: Path) -> Iterator[None]:
    """/proc, /sys, /dev and /dev/pts mounted inside `root` for the duration.

    dracut in a chroot without them exits 0 but writes a broken image (its process
    substitutions need /dev/fd, its module lookups need /proc and /sys); dpkg's
    maintainer scripts also expect them. Unmounted in `finally`, innermost first.
    """
    try:
        for sub in ("proc", "sys", "dev", "dev/pts"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        run(["mount", "-t", "proc", "proc", root / "proc"], what="mount /proc in the chroot")
        run(["mount", "-t", "sysfs", "sysfs", root / "sys"], what="mount /sys in the chroot")
        run(["mount", "--bind", "/dev", root / "dev"], what="bind /dev into the chroot")
        run(["mount", "--bind", "/dev/pts", root / "dev" / "pts"], what="bind /dev/pts into the chroot")
        yield
    finally:
        unmount_all(root / "dev")
        unmount_all(root / "sys")
        unmount_all(root / "proc")


# Environment for commands run inside the chroot: the host's PATH may name directories
# the chroot lacks (/usr/local/... builds), and locale variables for locales that are
# not installed make perl/dpkg complain on every call.
CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "LANG": "C.UTF-8",
    "LANGUAGE": "",
    "DEBIAN_FRONTEND": "noninteractive",
    "HOME": "/root",
}


def chroot_run(root: Path, argv: list[str], *, what: str, env: dict[str, str] | None = None,
               timeout: float = 600) -> str:
    return run(["chroot", root, *argv], what=what, env={**CHROOT_ENV, **(env or {})},
               timeout=timeout)


# --- building the tree ----------------------------------------------------------------


def _build(kernel: DebianKernel, deb: Path, key: str, rdir: Path) -> dict:
    if shutil.which("debootstrap") is None:
        raise TestbedError("debootstrap is not installed: apt-get install debootstrap")
    start = time.monotonic()
    rdir.mkdir(parents=True, exist_ok=True)
    # Remove the old marker first: a crash below must not leave a READY that points at
    # a half-replaced tree.
    (rdir / "READY").unlink(missing_ok=True)
    for stale in [rdir / "root", *rdir.glob("root.tmp-*")]:
        remove_tree(stale)
    tmp = rdir / f"root.tmp-{os.getpid()}"
    mirror = debian_mirror()
    suite = kernel.release.suite
    # One package cache per suite: the same package name and version may differ in builds.
    debs = cache_dir() / "debootstrap-debs" / suite
    debs.mkdir(parents=True, exist_ok=True)
    try:
        run(
            [
                "debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                f"--cache-dir={debs}", suite, tmp, mirror,
            ],
            what=f"debootstrap {suite} from {mirror}",
            env=CHROOT_ENV,
            timeout=1800,
        )
        _install_kernel(tmp, kernel, deb)
        _configure(tmp)
        size = int(run(["du", "-sb", tmp], what="measure the root tree").split()[0])
        tmp.rename(rdir / "root")
    except BaseException:
        # Also on KeyboardInterrupt: never leave mounts behind in the cache.
        try:
            remove_tree(tmp)
        except Exception:
            pass
        raise
    info = {
        "key": key,
        "kver": kernel.kver,
        "kernel_deb": deb.name,
        "suite": suite,
        "packages": list(PACKAGES),
        "mirror": mirror,
        "build_seconds": round(time.monotonic() - start, 1),
        "size_bytes": size,
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (rdir / "READY.tmp").write_text(json.dumps(info, indent=1) + "\n")
    (rdir / "READY.tmp").rename(rdir / "READY")
    return info


def _install_kernel(root: Path, kernel: DebianKernel, deb: Path) -> None:
    """dpkg -i the very package the rest of the test bed extracted, so modules, vmlinuz
    and System.map in the guest are byte-identical to what tests look at on the host.

    INITRD=No keeps the kernel's postinst hooks (dracut's among them) from building an
    initramfs here: images are built per test disk by system.py, with explicit drivers.
    """
    target = root / "tmp" / deb.name
    shutil.copyfile(deb, target)
    try:
        with chroot_mounts(root):
            chroot_run(root, ["dpkg", "-i", f"/tmp/{deb.name}"], env={"INITRD": "No"},
                       what=f"install {deb.name} in the root")
    finally:
        target.unlink(missing_ok=True)
    modules = root / "lib" / "modules" / kernel.kver
    if not (modules / "modules.dep").exists():
        raise TestbedError(f"installing {deb.name} left no {modules}/modules.dep")
    if not (root / "boot" / f"vmlinuz-{kernel.kver}").exists():
        raise TestbedError(f"installing {deb.name} left no /boot/vmlinuz-{kernel.kver}")
    leftovers = sorted(p.name for p in (root / "boot").glob("initrd*"))
    if leftovers:
        raise TestbedError(f"the kernel's postinst built an initramfs despite INITRD=No: {leftovers}")


def _configure(root: Path) -> None:
    etc = root / "etc"
    (etc / "hostname").write_text(f"{HOSTNAME}\n")
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost\n")
    # system.py makes the disk with mkfs.ext4 and QEMU presents it as the first virtio
    # disk; errors=remount-ro is what the Debian installer writes.
    (etc / "fstab").write_text("/dev/vda\t/\text4\terrors=remount-ro\t0\t1\n")
    # A fixed machine ID: with an empty /etc/machine-id every boot of a -snapshot disk
    # would be a "first boot" (ConditionFirstBoot units run, a new ID each time, so
    # journals of different boots could not be told apart from reruns).
    (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
    # Empty root password: lets a human log in on the console when debugging a guest.
    chroot_run(root, ["passwd", "-d", "root"], what="clear the root password")
    # The journal only needs to live for one boot (the report service copies it out).
    # Volatile storage skips journald's flush to disk, and writes to a -snapshot disk
    # would be thrown away anyway.
    dropin = etc / "systemd" / "journald.conf.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "isplit.conf").write_text("[Journal]\nStorage=volatile\n")
    # debootstrap keeps the downloaded .debs and apt's lists in the target; the guest
    # never runs apt, so they only make every disk image ~60 MB bigger and slower to make.
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (root / sub).glob("*"):
            if p.is_file():
                p.unlink()
