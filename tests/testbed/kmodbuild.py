"""Build out-of-tree test modules against Debian's headers for the test kernel.

The headers packages are full of absolute symlinks (/usr/src/linux-headers-<kver>/scripts
-> /usr/lib/linux-kbuild-6.1/scripts, lib/modules/<kver>/build, ...), so extracting them
somewhere private does not work; they are installed on the system with apt instead.
The tests run as root (CI: a fresh Debian 12 container), so that is acceptable.

Built modules are cached under cache_dir()/kmodbuild/<kver>/<name>-<hash>/, keyed by
the sources, the kernel package version and the compiler, so an unchanged module is
never rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from ._util import TestbedError, file_lock, run
from .kernel import DebianKernel, cache_dir, debian_kernel, fetch_deb


# tests/kmods/<name>/: the repository's own test modules.
KMODS_DIR = Path(__file__).resolve().parents[1] / "kmods"


def headers_dir(kver: str) -> Path:
    return Path("/usr/src") / f"linux-headers-{kver}"


def ensure_headers(kver: str) -> Path:
    """Install linux-headers-<kver> if missing; return /usr/src/linux-headers-<kver>."""
    hdir = headers_dir(kver)
    if not (hdir / "Makefile").exists():
        with file_lock(cache_dir() / "locks" / "headers.lock"):
            if not (hdir / "Makefile").exists():
                _install_headers(kver)
        if not (hdir / "Makefile").exists():
            raise TestbedError(f"installed linux-headers-{kver} but {hdir}/Makefile is missing")
    _check_compiler(hdir)
    return hdir


def _install_headers(kver: str) -> None:
    # Fetch the three kernel-specific debs through the shared deb cache (they are
    # reused from there and survive the archive dropping an old ABI), then let apt
    # install them as local files and resolve the generic dependencies (gcc-12,
    # linux-compiler-gcc-12-x86) from the archive.
    debs = [fetch_deb(f"linux-headers-{kver}")]
    depends = run(["dpkg-deb", "-f", debs[0], "Depends"], what=f"read the dependencies of {debs[0]}")
    for dep in re.findall(r"(linux-(?:headers|kbuild)-[^\s,(|]+)", depends):
        debs.append(fetch_deb(dep))
    run(
        ["apt-get", "install", "-y", "--no-install-recommends",
         "-o", "DPkg::Lock::Timeout=600", *[str(d) for d in debs]],
        what=f"install linux-headers-{kver}",
        env={"DEBIAN_FRONTEND": "noninteractive"},
        timeout=1800,
    )


def _kconfig(hdir: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (hdir / "include" / "config" / "auto.conf").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("CONFIG_"):
            values[key] = value.strip('"')
    return values


@functools.cache
def _check_compiler(hdir: Path) -> str:
    """Make sure the compiler Kbuild will call matches the one the kernel was built with.

    Debian's headers set CC=gcc-12 and switch off Kbuild's own version check
    (DEBIAN_KERNEL_NO_CC_VERSION_CHECK), so a mismatch would go unnoticed until a
    module misbehaved. Returns the compiler's version line (part of the build cache key).
    """
    config = _kconfig(hdir)
    built_with = config.get("CONFIG_CC_VERSION_TEXT", "")
    cc = built_with.split(" ", 1)[0] or "gcc"
    if not shutil.which(cc):
        raise TestbedError(f"kernel was built with {built_with!r} but {cc} is not installed")
    ours = run([cc, "--version"], what=f"run {cc} --version").splitlines()[0]
    dumped = run([cc, "-dumpfullversion"], what=f"run {cc} -dumpfullversion").strip()
    major, minor, patch = (int(x) for x in (dumped.split(".") + ["0", "0"])[:3])
    want = int(config.get("CONFIG_GCC_VERSION", "0"))
    # Same major version is what matters for the module ABI (struct layouts, builtins,
    # -fpatchable-function-entry etc.); Debian point updates of gcc-12 are fine.
    if want // 10000 != major:
        raise TestbedError(
            f"compiler mismatch: kernel built with {built_with!r} (GCC_VERSION={want}), "
            f"but {cc} is {ours!r} ({major}.{minor}.{patch})"
        )
    return ours


def _source_hash(src_dir: Path, salt: str) -> str:
    h = hashlib.sha256(salt.encode())
    for path in sorted(p for p in src_dir.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(src_dir)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_module(
    src_dir: Path,
    out_dir: Path,
    *,
    kernel: DebianKernel | None = None,
    strip_debug: bool = False,
) -> list[Path]:
    """Build the out-of-tree module(s) in src_dir; copy the .ko files to out_dir.

    src_dir is never written to (the build runs in a copy in the cache), so the
    repository stays clean. Returns the .ko paths in out_dir, sorted by name.

    The Debian kernel config has DEBUG_INFO, so a plain `make modules` leaves
    .debug_* sections (with relocations into .init.text) in the .ko, as any
    user-built module has. strip_debug=True does what `INSTALL_MOD_STRIP=1` does
    for Debian's own modules (`strip --strip-debug`), which ship without them.
    """
    src_dir = Path(src_dir).resolve()
    if not (src_dir / "Makefile").exists() and not (src_dir / "Kbuild").exists():
        raise TestbedError(f"{src_dir} has no Makefile/Kbuild: not a module source directory")
    kernel = kernel or debian_kernel()
    hdir = ensure_headers(kernel.kver)
    compiler = _check_compiler(hdir)

    key = _source_hash(src_dir, f"{kernel.kver}\0{kernel.deb_version}\0{compiler}")
    bdir = cache_dir() / "kmodbuild" / kernel.kver / f"{src_dir.name}-{key}"
    done = bdir / "DONE"
    with file_lock(cache_dir() / "locks" / f"kmodbuild-{src_dir.name}-{key}.lock"):
        if not done.exists():
            shutil.rmtree(bdir, ignore_errors=True)
            work = bdir / "src"
            shutil.copytree(src_dir, work, symlinks=True)
            run(
                ["make", "-C", hdir, f"M={work}", f"-j{os.cpu_count() or 1}", "modules"],
                what=f"build module {src_dir.name} against {hdir}",
                # English compiler messages in failure reports. (ARCH and CC need no
                # care: Debian's .kernelvariables sets them with override/assignment.)
                env={"LC_ALL": "C"},
                timeout=900,
            )
            kos = sorted(str(p.relative_to(work)) for p in work.rglob("*.ko"))
            if not kos:
                raise TestbedError(f"building {src_dir.name} produced no .ko in {work}")
            done.write_text(json.dumps(kos) + "\n")
        kos = json.loads(done.read_text())

        out_dir.mkdir(parents=True, exist_ok=True)
        result = []
        for rel in kos:
            dest = out_dir / Path(rel).name
            shutil.copy2(bdir / "src" / rel, dest)
            if strip_debug:
                run(["strip", "--strip-debug", dest], what=f"strip debug info from {dest}")
            result.append(dest)
    return result


def build_test_modules(
    out_dir: Path,
    names: list[str] | None = None,
    *,
    kernel: DebianKernel | None = None,
    strip_debug: bool = False,
) -> dict[str, Path]:
    """Build tests/kmods/<name> for each name (default: all); return {name: .ko path}."""
    if names is None:
        names = sorted(d.name for d in KMODS_DIR.iterdir() if (d / "Makefile").exists())
    result: dict[str, Path] = {}
    for name in names:
        for ko in build_module(KMODS_DIR / name, out_dir, kernel=kernel, strip_debug=strip_debug):
            result[ko.name.removesuffix(".ko")] = ko
    return result
