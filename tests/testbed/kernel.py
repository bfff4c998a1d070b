"""Obtain a real Debian kernel (vmlinuz + modules) for the tests, cached outside the repo.

Cache layout (under cache_dir()):
    debs/<package>_<version>_<arch>.deb    what `apt-get download` fetched (image, headers)
    kernel/CURRENT_ABI.json                kver linux-image-amd64 pointed to, + apt list mtime
    kernel/<kver>/root/                    `dpkg-deb -x` of linux-image-<kver>, depmod run
    kernel/<kver>/READY                    written last: extraction + depmod done
    kernel/<kver>/vmlinux                  ELF kernel decompressed from the bzImage
    kmodbuild/<kver>/<name>-<hash>/        out-of-tree module builds (kmodbuild.py)
    locks/                                 flock files (parallel pytest runs)
Delete any of it to force a refresh.

We use the distribution's own kernel rather than building one because initsplit must
work on exactly what Debian ships (signed modules, Debian's config, Debian's struct
module layout).
"""

from __future__ import annotations

import functools
import json
import lzma
import os
import re
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

from ._util import TestbedError, file_lock, run
from .apt import DebianRelease, apt_options, debian_release, release_of_kver

# The meta package always depends on the current ABI package (linux-image-6.1.0-NN-amd64).
# We must download only that one: a wildcard would fetch every ABI ever published.
META_PACKAGE = "linux-image-amd64"


def cache_dir() -> Path:
    """Root of the test bed's cache; INITSPLIT_CACHE overrides ~/.cache/initsplit."""
    env = os.environ.get("INITSPLIT_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "initsplit"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class DebianKernel:
    kver: str  # "6.1.0-56-amd64", "6.12.117+deb13-amd64" (uname -r of the guest)
    deb_version: str  # "6.1.192-2" (Debian package version)
    vmlinuz: Path
    modules_dir: Path  # <root>/lib/modules/<kver>, depmod already run
    root: Path  # the extracted package tree
    # The decompressed kernel ELF (no symbols: Debian strips it before compressing).
    # QEMU boots it directly through its PVH entry point, skipping the XZ decompressor,
    # which alone takes ~2.5 s of a ~5 s boot under TCG.
    vmlinux: Path

    @property
    def release(self) -> DebianRelease:
        """The Debian release that ships this kernel."""
        return release_of_kver(self.kver)

    @property
    def config(self) -> Path:
        return self.root / "boot" / f"config-{self.kver}"

    def module(self, name: str) -> Path:
        """Host path of the .ko for module `name` ("dummy", "nf-tables" or "nf_tables")."""
        return self.module_deps(name)[-1]

    def module_deps(self, name: str) -> list[Path]:
        """The .ko for `name` preceded by everything it needs, in insmod order."""
        deps = _modules_dep(self.modules_dir).get(_canonical(name))
        if deps is None and _canonical(name) in builtin_modules(self.modules_dir):
            return []  # built into this kernel (virtio_pci on 6.12): nothing to load
        if deps is None:
            raise TestbedError(f"module {name!r} is not in {self.modules_dir}/modules.dep")
        return [self.modules_dir / rel for rel in deps]


def _canonical(name: str) -> str:
    # The kernel treats '-' and '_' in module names as the same character.
    return name.replace("-", "_")


@functools.cache
def builtin_modules(modules_dir: Path) -> frozenset[str]:
    """The names modules.builtin lists (modules built into the kernel; none when
    the file is missing)."""
    try:
        lines = (modules_dir / "modules.builtin").read_text().split()
    except OSError:
        return frozenset()
    return frozenset(_canonical(Path(line).name.removesuffix(".ko")) for line in lines)


@functools.cache
def _modules_dep(modules_dir: Path) -> dict[str, list[str]]:
    """modules.dep parsed to {name: [dep paths in load order..., own path]}."""
    result: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        target, _, deps = line.partition(":")
        # Debian 13 ships its modules xz-compressed (name.ko.xz).
        name = _canonical(re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", Path(target).name))
        # modules.dep lists direct deps first and their deps after them, so modprobe
        # loads the list back to front; we do the same.
        result[name] = list(reversed(deps.split())) + [target]
    return result


def debian_kernel(kver: str | None = None, *, release: str | None = None) -> DebianKernel:
    """Return the cached Debian kernel, downloading and extracting it first if needed.

    kver None means: INITSPLIT_KVER if set (and of *release*, when one is named),
    else the ABI that *release*'s linux-image-amd64 currently depends on; release
    None means INITSPLIT_DEBIAN, else Debian 12 (tests/testbed/apt.py). Safe to
    call from several processes at once.
    """
    wanted = debian_release(release)
    if kver is None:
        env = os.environ.get("INITSPLIT_KVER")
        kver = env if env and release_of_kver(env) == wanted else _current_abi(wanted)
    return _debian_kernel(kver)


@functools.cache
def _debian_kernel(kver: str) -> DebianKernel:
    kdir = cache_dir() / "kernel" / kver
    ready = kdir / "READY"
    if not ready.exists() or not (kdir / "vmlinux").exists():
        with file_lock(cache_dir() / "locks" / f"kernel-{kver}.lock"):
            # Re-check under the lock: another process may have finished meanwhile.
            if not ready.exists():
                _prepare(kver, kdir)
            if not (kdir / "vmlinux").exists():
                _extract_vmlinux(kdir / "root" / "boot" / f"vmlinuz-{kver}", kdir / "vmlinux")
    return _from_marker(kver, kdir)


def _from_marker(kver: str, kdir: Path) -> DebianKernel:
    info = json.loads((kdir / "READY").read_text())
    root = kdir / "root"
    kernel = DebianKernel(
        kver=kver,
        deb_version=info["deb_version"],
        vmlinuz=root / "boot" / f"vmlinuz-{kver}",
        modules_dir=root / info["modules_rel"],
        root=root,
        vmlinux=kdir / "vmlinux",
    )
    for path in (kernel.vmlinuz, kernel.modules_dir / "modules.dep"):
        if not path.exists():
            raise TestbedError(
                f"kernel cache {kdir} is marked READY but {path} is missing; "
                f"delete {kdir} to re-extract"
            )
    return kernel


APT_LISTS = Path("/var/lib/apt/lists")


def _lists_dir(options: list[str]) -> Path:
    """apt's list directory under *options* (the host's, or a private one)."""
    for option in options:
        if option.startswith("-oDir::State::Lists="):
            return Path(option.partition("Lists=")[2])
    return APT_LISTS


def _current_abi(release: DebianRelease) -> str:
    """kver of the package *release*'s linux-image-amd64 depends on, e.g. '6.1.0-56-amd64'.

    apt-cache takes ~0.6 s here, so the answer is remembered together with the
    mtime of apt's list directory: only `apt-get update` can change it, and it
    replaces files in that directory when it does.
    """
    options = apt_options(release)
    lists = _lists_dir(options)
    memo = cache_dir() / "kernel" / f"CURRENT_ABI-{release.suite}.json"
    try:
        stamp = str(lists.stat().st_mtime_ns)
    except OSError:
        stamp = ""
    try:
        saved = json.loads(memo.read_text())
        if stamp and saved.get("apt_lists_mtime") == stamp:
            return str(saved["kver"])
    except (OSError, ValueError, KeyError):
        pass
    kver = _query_current_abi(options)
    try:
        stamp = str(lists.stat().st_mtime_ns)  # apt-get update may have run
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"kver": kver, "apt_lists_mtime": stamp}) + "\n")
        tmp.rename(memo)
    except OSError:
        pass  # only an optimisation
    return kver


def _query_current_abi(options: list[str]) -> str:
    out = _apt_depends(META_PACKAGE, options)
    if out is None:
        # Fresh container: apt has no package lists yet. Updating is the only way
        # to learn the ABI; only do it then, because it is slow and touches the network.
        with file_lock(cache_dir() / "locks" / "apt.lock"):
            run(["apt-get", *options, "update"], what="run apt-get update", timeout=600)
        out = _apt_depends(META_PACKAGE, options)
    if out is None:
        raise TestbedError(f"apt-cache knows no package {META_PACKAGE} even after apt-get update")
    match = re.search(r"Depends:\s*linux-image-(\S+)", out)
    if not match:
        raise TestbedError(
            f"cannot find the ABI package in `apt-cache depends {META_PACKAGE}`:\n{out}"
        )
    return match.group(1)


def _apt_depends(package: str, options: list[str]) -> str | None:
    try:
        out = run(["apt-cache", *options, "depends", package], what=f"query apt-cache for {package}")
    except TestbedError:
        return None
    return out if "Depends:" in out else None


def _arch() -> str:
    return run(["dpkg", "--print-architecture"], what="ask dpkg for the architecture").strip()


def _candidate_version(package: str, options: list[str]) -> str | None:
    try:
        out = run(
            ["apt-cache", *options, "show", "--no-all-versions", package],
            what=f"query apt-cache for {package}",
        )
    except TestbedError:
        return None
    match = re.search(r"^Version:\s*(\S+)", out, re.M)
    return match.group(1) if match else None


def fetch_deb(package: str, release: DebianRelease | None = None) -> Path:
    """Path of `package`'s .deb in the cache, downloaded with apt-get if not there yet.

    Used for the kernel image and also by kmodbuild for the headers packages, so all
    downloads share one directory and one lock. *release* None: the host's apt.
    """
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    options = apt_options(release) if release is not None else []
    version = _candidate_version(package, options)
    # Package files name the epoch "1%3a" instead of "1:".
    pattern = f"{package}_{version.replace(':', '%3a')}_*.deb" if version else f"{package}_*.deb"
    with file_lock(cache_dir() / "locks" / "apt.lock"):
        found = sorted(debs.glob(pattern))
        if not found:
            spec = f"{package}={version}" if version else package
            # As root into a root-owned directory apt prints a harmless warning about
            # not being able to drop privileges to _apt; it still downloads.
            run(["apt-get", *options, "download", spec], what=f"download {spec}", cwd=debs,
                timeout=1800)
            found = sorted(debs.glob(pattern))
        if not found:
            raise TestbedError(f"apt-get download {package} left no {pattern} in {debs}")
    return found[-1]


def _prepare(kver: str, kdir: Path) -> None:
    deb = fetch_deb(f"linux-image-{kver}", release_of_kver(kver))
    deb_version = run(["dpkg-deb", "-f", deb, "Version"], what=f"read the version of {deb}").strip()

    # Extract next to the final place and rename at the end, so an interrupted run never
    # leaves a half-extracted tree that looks usable.
    kdir.mkdir(parents=True, exist_ok=True)
    tmp = kdir / f"root.tmp-{os.getpid()}"
    root = kdir / "root"
    for stale in [root, *kdir.glob("root.tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    run(["dpkg-deb", "-x", deb, tmp], what=f"extract {deb}", timeout=600)

    # bookworm packages ship /lib/modules; later releases (usrmerge) ship /usr/lib/modules.
    for rel in (f"lib/modules/{kver}", f"usr/lib/modules/{kver}"):
        if (tmp / rel).is_dir():
            modules_rel = rel
            break
    else:
        raise TestbedError(f"{deb} contains no lib/modules/{kver}")
    if not (tmp / "boot" / f"vmlinuz-{kver}").exists():
        raise TestbedError(f"{deb} contains no boot/vmlinuz-{kver}")

    # The package ships no modules.dep (the postinst generates it); modprobe, the
    # dependency lookups above and initsplit itself all need it.
    base = tmp if modules_rel.startswith("lib/") else tmp / "usr"
    run(["depmod", "-b", base, kver], what=f"run depmod for {kver}", timeout=600)

    tmp.rename(root)
    marker = {"deb_version": deb_version, "deb": deb.name, "modules_rel": modules_rel}
    (kdir / "READY.tmp").write_text(json.dumps(marker, indent=1) + "\n")
    (kdir / "READY.tmp").rename(kdir / "READY")


def _extract_vmlinux(vmlinuz: Path, dest: Path) -> None:
    """Decompress the ELF kernel embedded in a bzImage (what scripts/extract-vmlinux does).

    The payload is found by its compression magic; the same bytes may occur by chance
    in the setup code before it, so every candidate is tried until one yields an ELF.
    """
    data = vmlinuz.read_bytes()
    candidates = []
    for magic, kind in ((b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b\x08", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd")):
        pos = data.find(magic)
        while pos >= 0:
            candidates.append((pos, kind))
            pos = data.find(magic, pos + 1)
    for pos, kind in sorted(candidates):
        elf = _decompress(kind, data[pos:])
        if elf.startswith(b"\x7fELF"):
            tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
            tmp.write_bytes(elf)
            tmp.rename(dest)
            return
    raise TestbedError(f"found no xz/gzip/zstd-compressed ELF kernel in {vmlinuz}")


def _decompress(kind: str, payload: bytes) -> bytes:
    """Decompress one stream, ignoring whatever follows it; b"" if it is not valid."""
    try:
        if kind == "xz":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        if kind == "gzip":
            return zlib.decompressobj(wbits=31).decompress(payload)
        # Python 3.11 has no zstd module; the zstd CLI is a test-bed dependency anyway.
        proc = subprocess.run(["zstd", "-dcq"], input=payload, capture_output=True)
        return proc.stdout
    except (lzma.LZMAError, zlib.error, OSError):
        return b""
