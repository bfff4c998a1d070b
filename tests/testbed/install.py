"""initsplit installed into a test bed image as a user installs it: the Debian package.

initsplit_deb() builds initsplit_VERSION_all.deb from this checkout once (tools/build-deb,
as `make deb`), cached under cache_dir()/deb/ by the content of the files build-deb
packs (tracked and untracked, not ignored: uncommitted edits make a new package).
DebInstall is build_disk()'s `prepare` step: in a chroot of the image's overlay of the
cached root, the conf drop-ins are written and `dpkg -i` installs the package, so its
maintainer scripts do what they do on a user's machine (udev's 80-drivers.rules
diverted and linked to /usr/lib/initsplit/udev/80-drivers.rules, initsplitd.service
enabled by deb-systemd-helper, bytecode compiled by the root's own python3, the
journal catalog updated by systemd's trigger); with purge=True `dpkg --purge`
removes it again. build_disk() then runs dracut, which finds the package's dracut
module, in the same overlay.

The postinst runs with INITSPLIT_NO_CACHE=1: building the real root's pre-split
cache of the whole tree (~4,000 modules on Debian 12) takes one to five minutes and
adds ~350 MB to every image, and the boot tests never relied on it (the dracut
module splits the initramfs's modules into the image; the real-root daemon splits
what is missing when it loads it). DebInstall(real_root_cache=True) leaves it out, so
the postinst runs the kernel hook as on a user's machine: the boot tests that check
the real-root daemon serves everything from that cache (real_root_cache_problems()). INITRD=No: dracut's update-initramfs trigger is
skipped, build_disk() runs dracut itself.
"""

from __future__ import annotations

import functools
import hashlib
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._util import TestbedError, file_lock, run, try_file_lock
from .apt import RELEASES
from .kernel import cache_dir, fetch_deb
from .rootfs import chroot_mounts, chroot_run

REPO = Path(__file__).resolve().parent.parent.parent

INITRD_UNIT = "initsplitd-initrd.service"
ROOT_UNIT = "initsplitd.service"
SETTLE_UNIT = "initsplitd-settle.service"
PACKAGE = "initsplit"
# Where the package ships its rule; the postinst links udev's own name to it.
RULE = "/usr/lib/initsplit/udev/80-drivers.rules"
DROPIN_DIR = "/etc/initsplit/initsplitd.conf.d"

# Every dpkg run in an image (see the module docstring).
DPKG_ENV = {"INITRD": "No", "INITSPLIT_NO_CACHE": "1"}

# The package's Depends that the test bed's cached roots (rootfs.PACKAGES) do not
# have: install_depends() puts them in from their own .deb (fetch_deb) before the
# package. Not added to PACKAGES: that would change the key of the roots every
# checkout on this machine shares, which would then be rebuilt back and forth.
EXTRA_DEPENDS = ("openssl",)  # signing.py runs openssl (Secure Boot, issue 13)


def _root_release(root: Path) -> str:
    """The Debian version ("12", "13") of the root, from its /etc/os-release."""
    for line in (root / "etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME":
            suite = value.strip().strip('"')
            for version, release in RELEASES.items():
                if release.suite == suite:
                    return version
            raise TestbedError(f"{root}: unknown Debian suite {suite!r}")
    raise TestbedError(f"{root}/etc/os-release names no VERSION_CODENAME")


def install_depends(root: Path, *, env: Mapping[str, str] = DPKG_ENV) -> None:
    """dpkg -i the EXTRA_DEPENDS the root lacks, of its own release (chroot mounts needed)."""
    missing = [name for name in EXTRA_DEPENDS if not (root / f"var/lib/dpkg/info/{name}.list").exists()]
    if not missing:
        return
    release = RELEASES[_root_release(root)]
    staged = []
    try:
        for name in missing:
            deb = fetch_deb(name, release)
            shutil.copyfile(deb, root / "var/tmp" / deb.name)
            staged.append(deb.name)
        chroot_run(root, ["dpkg", "-i", *(f"/var/tmp/{name}" for name in staged)], env=dict(env),
                   what=f"dpkg -i {' '.join(missing)} (initsplit's Depends) in the image's root")
    finally:
        for name in staged:
            (root / "var/tmp" / name).unlink(missing_ok=True)

# build_disk() report commands every boot of an installed initsplit needs: the state
# once both daemons are done, which the journal's given-back total is held against.
DAEMON_REPORT = {
    # The real-root daemon exits ExitAfterQuietSec= (30 s) after boot went quiet;
    # its summary is only in the journal after that. is-active turns false already
    # while the unit is "deactivating" (its process still exiting): wait for the
    # state the tests then read.
    "wait_daemon": (
        f"timeout 180 sh -c 'until [ \"$(systemctl show -P ActiveState {ROOT_UNIT})\" = inactive ]; "
        f"do sleep 1; done'; "
        f"systemctl show -p ActiveState,Result,ExecMainCode,ExecMainStatus {ROOT_UNIT}"
    ),
    # /proc/modules once both daemons are done (the standard section is read at
    # multi-user, while the real-root daemon may still be loading).
    "modules_after": "cat /proc/modules",
    # Which modules kept their BTF, once both daemons are done.
    "btf_after": "ls /sys/kernel/btf",
    "failed_status": "systemctl status --failed --no-pager --full --lines=30",
}


def _tree_files() -> list[str]:
    """The files tools/build-deb packs: git ls-files, tracked and untracked, not
    ignored; outside a checkout, the whole tree but dist/."""
    proc = subprocess.run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          capture_output=True)
    if proc.returncode == 0:
        names = set(proc.stdout.decode().split("\0"))
    else:
        names = {str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.relative_to(REPO).parts[0] not in ("dist", ".git")}
    return sorted(f for f in names if f and (REPO / f).is_file())


def _tree_key() -> str:
    h = hashlib.sha256()
    for rel in _tree_files():
        path = REPO / rel
        h.update(rel.encode() + b"\0" + oct(path.stat().st_mode & 0o111).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:20]


@functools.cache
def initsplit_deb() -> Path:
    """initsplit_VERSION_all.deb of this checkout as it is now, built once (~20 s)
    and cached under cache_dir()/deb/KEY/ (KEY: the content of the packed files).
    Needs debhelper, dpkg-dev and fakeroot (tools/install-deps)."""
    missing = [t for t in ("dpkg-buildpackage", "dh", "fakeroot") if shutil.which(t) is None]
    if missing:
        raise TestbedError(f"building the Debian package needs {', '.join(missing)} (tools/install-deps)")
    key = _tree_key()
    version = re.search(r'^version = "(.*)"$', (REPO / "pyproject.toml").read_text(), re.M)
    if not version:
        raise TestbedError("no version in pyproject.toml")
    out = cache_dir() / "deb" / key
    deb = out / f"{PACKAGE}_{version.group(1)}_all.deb"
    with file_lock(_deb_lock(key)):
        if not deb.is_file():
            out.mkdir(parents=True, exist_ok=True)
            printed = run([REPO / "tools" / "build-deb", out], what="build the Debian package (make deb)",
                          timeout=600)
            if Path(printed.strip()) != deb or not deb.is_file():
                raise TestbedError(f"tools/build-deb printed {printed.strip()!r}, expected {deb}")
        out.touch()  # used now: the pruning below goes by this time
    prune_debs(cache_dir() / "deb", keep=key)
    return deb


# Every edit of the tree makes a new package (~200 kB): builds older than this many
# newest ones are removed, unless younger than DEB_MIN_AGE (other worktrees and
# pytest sessions use their own KEY at the same time).
DEB_KEEP = 8
DEB_MIN_AGE = 24 * 3600.0


def _deb_lock(key: str) -> Path:
    return cache_dir() / "locks" / f"deb-{key}.lock"


def prune_debs(root: Path, *, keep: str, newest: int = DEB_KEEP, min_age: float = DEB_MIN_AGE,
               now: float | None = None) -> list[str]:
    """Remove the old package builds under root (cache_dir()/deb/KEY/): all but
    `keep` and the `newest` most recently used, and none used within `min_age`
    seconds. A KEY whose lock another process holds (it is building or checking
    that package) is left alone. The KEYs removed."""
    now = time.time() if now is None else now
    builds = []
    for path in root.iterdir() if root.is_dir() else ():
        try:
            if path.is_dir() and not path.is_symlink():
                builds.append((path.stat().st_mtime, path))
        except OSError:
            continue  # removed by another process meanwhile
    builds.sort(reverse=True)
    removed = []
    for mtime, path in builds[newest:]:
        if path.name == keep or now - mtime < min_age:
            continue
        with try_file_lock(_deb_lock(path.name)) as locked:
            if locked:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
    return removed


@dataclass(frozen=True)
class DebInstall:
    """build_disk(prepare=...) step: the package installed with dpkg -i in a chroot of
    the image's root (the overlay of the cached root), as a user installs it.

    conf_dropins: name -> text, written as /etc/initsplit/initsplitd.conf.d/NAME before
        the installation (the administrator's files: dpkg leaves them alone; they end
        up in the initramfs too, as the daemon's configuration there).
    purge: remove the package again with dpkg --purge (what is left is the system
        udev loads the modules of alone).
    deb: the package (default: initsplit_deb()).
    real_root_cache: let the postinst build the real root's pre-split cache, as on a
        user's machine: it runs the kernel hook (/etc/kernel/postinst.d/initsplit)
        for the installed kernel, which splits the whole tree (one to five minutes,
        ~350 MB more in the image on Debian 12).
    """

    conf_dropins: Mapping[str, str] = field(default_factory=dict)
    purge: bool = False
    deb: Path | None = None
    real_root_cache: bool = False

    def __call__(self, root: Path) -> None:
        deb = self.deb or initsplit_deb()
        for name, text in self.conf_dropins.items():
            if "/" in name or name.startswith("."):
                raise TestbedError(f"bad drop-in name {name!r}")
            path = root / DROPIN_DIR.lstrip("/") / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        staged = root / "var/tmp" / deb.name
        shutil.copyfile(deb, staged)
        try:
            with chroot_mounts(root):
                install_depends(root)
                env = dict(DPKG_ENV)
                if self.real_root_cache:
                    del env["INITSPLIT_NO_CACHE"]
                chroot_run(root, ["dpkg", "-i", f"/var/tmp/{deb.name}"], env=env,
                           what=f"dpkg -i {deb.name} in the image's root",
                           timeout=1500 if self.real_root_cache else 600)
                if self.purge:
                    chroot_run(root, ["dpkg", "--purge", PACKAGE], env=DPKG_ENV,
                               what="dpkg --purge initsplit in the image's root")
        finally:
            staged.unlink(missing_ok=True)
        if not self.purge and not (root / "usr/lib/dracut/modules.d/90initsplit/module-setup.sh").is_file():
            raise TestbedError(f"dpkg -i {deb.name} left no dracut module in the image")
        if self.real_root_cache and not self.purge:
            _check_real_root_cache(root)


# Issue 12's goal for the real-root daemon served by the pre-split cache: below
# 30 MB. Debian 12's daemon measured 23.9 and 24.1 MB (bench/real_root_rss.py,
# PERFORMANCE.md) since the cache check digests each module as it reads it, with
# boot-to-boot noise of about +-1.5 MB: the goal itself is the bound, with ~6 MB to
# spare (28.6 and 28.7 MB before that change, when a 32 MB guard stood here).
REAL_ROOT_PEAK_RSS_BYTES = 30_000_000


def split_on_the_fly_problems(entries: Sequence[Mapping[str, object]]) -> list[str]:
    """What is wrong with a real-root daemon's journal entries (its unit's) when the
    kernel hook built the pre-split cache: it must have said once, at exit, that it
    split nothing on the fly (daemon/main.py report_splitter_use())."""
    said = [e for e in entries if "INITSPLIT_SPLIT_ON_THE_FLY" in e]
    if [e["INITSPLIT_SPLIT_ON_THE_FLY"] for e in said] != ["no"]:
        return [f"split on the fly: {[e.get('MESSAGE') for e in said]}"]
    return []


def peak_rss_bytes(entries: Sequence[Mapping[str, object]]) -> int:
    """The daemon's peak RSS from its one exit entry (service.py: getrusage's
    ru_maxrss, KiB on Linux)."""
    peaks = [int(str(e["INITSPLIT_PEAK_RSS_KIB"])) for e in entries if "INITSPLIT_PEAK_RSS_KIB" in e]
    if len(peaks) != 1:
        raise AssertionError(f"{len(peaks)} exit entries with a peak RSS, not 1")
    return peaks[0] * 1024


def _check_real_root_cache(root: Path) -> None:
    """The hook never fails the installation (it only says so on stderr): an image
    asked to have the cache must have one for each installed kernel."""
    kvers = [d.name for d in (root / "lib/modules").iterdir() if (d / "modules.dep").is_file()]
    for kver in kvers:
        cache = root / "usr/lib/initsplit/cache" / kver
        if not cache.is_dir() or next(cache.rglob("*.initsplit"), None) is None:
            raise TestbedError(f"the kernel hook built no pre-split cache {cache} for {kver}")
    if not kvers:
        raise TestbedError(f"no kernel in {root}/lib/modules")


def install_initsplit(*, conf_dropins: Mapping[str, str] = {}, purge: bool = False,
                      real_root_cache: bool = False) -> DebInstall:
    """The prepare step of build_disk() that installs this checkout's package."""
    return DebInstall(conf_dropins=dict(conf_dropins), purge=purge, real_root_cache=real_root_cache)
