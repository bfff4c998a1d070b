"""The Debian package: built with dpkg-buildpackage (tools/build-deb), clean under
lintian, with the expected files, conffiles and maintainer scripts; installed with
dpkg into an overlay of the test bed's Debian 12 root (never the cached root
itself), where initsplitd.service is enabled, the journal catalog is compiled
(systemd's dpkg trigger), the kernel hooks build and remove the pre-split cache,
dracut puts the package's module, rule and units into an initramfs, and a purge
leaves no initsplit file behind and udev's own 80-drivers.rules back.

The root's kernel tree is trimmed to a few modules in the overlay (then depmod):
the package's postinst and the kernel hook each split the whole tree, which for
the ~4,000 modules of Debian 12's 6.1 is about a minute each on two CPUs. The
hook is the same for any tree; a whole-tree run is a matter of time, not of
behaviour.

Needs root (overlay mount, chroot, dpkg) and debhelper, dpkg-dev, fakeroot and
lintian (tools/install-deps); without them the tests skip, which fails under CI.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.testbed import debian_kernel
from tests.testbed.rootfs import CHROOT_ENV, chroot_mounts, chroot_run, debian_rootfs, remove_tree, unmount_all
from tests.testbed._util import run

REPO = Path(__file__).resolve().parent.parent
VERSION = re.search(r'^version = "(.*)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)  # type: ignore[union-attr]
DEB_NAME = f"initsplit_{VERSION}_all.deb"
CATALOG_IDS = re.findall(r"^-- ([0-9a-f]{32})", (REPO / "conf" / "initsplit.catalog").read_text(), re.M)

# The modules kept in the trimmed tree (those the kernel has as modules); at least
# MIN_KEPT must be there. Small ones, a few with dependencies between them.
KEEP = ("dummy", "virtio_net", "net_failover", "failover", "e1000", "mii", "8139cp",
        "crc7", "crc-itu-t", "ac97_bus", "nlmon", "veth")
MIN_KEPT = 6

# Every dpkg run: no initramfs build through the update-initramfs trigger (dracut's
# hook honours INITRD=No, as the test bed's kernel installation does).
DPKG_ENV = {"INITRD": "No"}


def _require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (tools/install-deps installs them)")


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require("dpkg-buildpackage", "dh", "fakeroot", "dpkg-deb", "git")
    out = tmp_path_factory.mktemp("deb")
    printed = run([REPO / "tools" / "build-deb", out], what="build the Debian package", timeout=300)
    path = out / DEB_NAME
    assert printed.strip() == str(path)
    assert path.is_file()
    return path


def test_lintian_reports_no_errors(deb: Path) -> None:
    _require("lintian")
    proc = subprocess.run(["lintian", "--info", deb], capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("E:")]
    assert not errors, f"lintian reported errors:\n{proc.stdout}{proc.stderr}"
    # lintian exits 1 for errors only; anything else is lintian failing to run.
    assert proc.returncode in (0, 2), f"lintian exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"


def test_package_contents(deb: Path, tmp_path: Path) -> None:
    files = set()
    for line in run(["dpkg-deb", "-c", deb], what="list the package").splitlines():
        name = line.split(None, 5)[5].removeprefix(".")
        files.add(name.rstrip("/"))
    for wanted in (
        "/usr/bin/initsplit",
        "/usr/lib/initsplit/initsplitd",
        "/usr/lib/initsplit/initsplitd-settle",
        "/usr/lib/initsplit/initsplitd-handback",
        "/usr/lib/initsplit/python/initsplit/__init__.py",
        "/usr/lib/initsplit/python/initsplit/daemon/main.py",
        "/lib/systemd/system/initsplitd.service",
        "/lib/systemd/system/initsplitd-initrd.service",
        "/lib/systemd/system/initsplitd-settle.service",
        "/lib/udev/rules.d/80-drivers.rules",
        "/usr/lib/systemd/catalog/initsplit.catalog",
        "/usr/lib/dracut/modules.d/90initsplit/module-setup.sh",
        "/usr/lib/dracut/modules.d/90initsplit/python-closure.py",
        "/usr/lib/dracut/dracut.conf.d/90-initsplit.conf",
        "/etc/initsplit/initsplitd.conf",
        "/etc/kernel/postinst.d/initsplit",
        "/etc/kernel/postrm.d/initsplit",
        "/usr/share/doc/initsplit/copyright",
    ):
        assert wanted in files, f"{wanted} is not in the package"
    # lintian's udev-rule-in-etc: the rule is udev's path under a diversion instead.
    assert "/etc/udev/rules.d/80-drivers.rules" not in files
    assert not [f for f in files if "__pycache__" in f]

    info = run(["dpkg-deb", "-I", deb], what="show the package's control data")
    assert re.search(r"^ Architecture: all$", info, re.M), info
    depends = re.search(r"^ Depends: (.*)$", info, re.M)
    assert depends, info
    for dep in ("python3", "python3-pyelftools", "python3-pyudev", "python3-systemd", "kmod", "udev", "systemd"):
        assert re.search(rf"(^|, ){re.escape(dep)}(,|$| )", depends.group(1)), depends.group(1)
    assert re.search(r"^ (Suggests|Recommends): .*\bdracut\b", info, re.M), info

    control = tmp_path / "control"
    run(["dpkg-deb", "-e", deb, control], what="extract the control archive")
    assert sorted((control / "conffiles").read_text().split()) == [
        "/etc/initsplit/initsplitd.conf", "/etc/kernel/postinst.d/initsplit", "/etc/kernel/postrm.d/initsplit"]
    postinst = (control / "postinst").read_text()
    assert "deb-systemd-helper enable 'initsplitd.service'" in postinst, postinst
    # The initramfs units are enabled by the dracut module in the image only.
    assert "initsplitd-initrd.service" not in postinst and "initsplitd-settle.service" not in postinst
    preinst = (control / "preinst").read_text()
    assert "dpkg-divert --package initsplit" in preinst and "/lib/udev/rules.d/80-drivers.rules" in preinst
    assert "activate-noawait update-initramfs" in (control / "triggers").read_text()


# --- installed into (an overlay of) the test bed's Debian 12 root ----------------------


@dataclass
class Root:
    path: Path
    kver: str
    kept: list[str]  # relative paths of the modules left in the trimmed tree

    def run(self, argv: list[str], *, what: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """chroot, returning stdout and stderr; fails the test with both on a non-zero exit."""
        proc = subprocess.run(["chroot", self.path, *argv], capture_output=True, text=True,
                              errors="replace", timeout=timeout, stdin=subprocess.DEVNULL,
                              env={**CHROOT_ENV, **(env or {})})
        assert proc.returncode == 0, (f"{what}: `{' '.join(argv)}` exited {proc.returncode}\n"
                                      f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
        return proc

    def cache(self) -> Path:
        return self.path / "usr/lib/initsplit/cache" / self.kver


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Root]:
    if os.geteuid() != 0:
        pytest.skip("installing the package into a Debian root needs root (overlay mount, chroot, dpkg)")
    rootfs = debian_rootfs(debian_kernel(release="12"))
    work = Path(tempfile.mkdtemp(prefix="deb-root-", dir=tmp_path_factory.mktemp("debroot")))
    merged = work / "merged"
    try:
        for sub in ("upper", "work", "merged"):
            (work / sub).mkdir()
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={rootfs.path},upperdir={work / 'upper'},workdir={work / 'work'}", merged],
            what="mount an overlay over the cached root")
        tree = merged / "lib/modules" / rootfs.kver
        kept = []
        for ko in sorted((tree / "kernel").rglob("*.ko")):
            if ko.name.removesuffix(".ko") in KEEP:
                kept.append(str(ko.relative_to(tree)))
            else:
                ko.unlink()
        assert len(kept) >= MIN_KEPT, f"only {kept} of {KEEP} are modules of {rootfs.kver}"
        with chroot_mounts(merged):
            chroot_run(merged, ["depmod", "-a", rootfs.kver], what="depmod the trimmed tree")
            yield Root(merged, rootfs.kver, kept)
    finally:
        unmount_all(merged)
        remove_tree(work)


def _manifests(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)).removesuffix(".initsplit") for p in cache.rglob("*.initsplit")}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_install_hooks_and_purge(deb: Path, root: Root) -> None:
    r = root.path
    udev_rule = r / "lib/udev/rules.d/80-drivers.rules"
    udev_md5 = {line.split()[1]: line.split()[0]
                for line in (r / "var/lib/dpkg/info/udev.md5sums").read_text().splitlines()}
    assert _md5(udev_rule) == udev_md5["lib/udev/rules.d/80-drivers.rules"], "the root's udev rule is not udev's"
    database = r / "var/lib/systemd/catalog/database"
    catalog_before = database.stat().st_mtime if database.exists() else 0.0
    before = {str(p) for p in _initsplit_paths(r)}

    # 1. Install: the postinst builds the cache of the root's (trimmed) kernel.
    shutil.copyfile(deb, r / "tmp" / deb.name)
    installed = root.run(["dpkg", "-i", f"/tmp/{deb.name}"], what="dpkg -i the package", env=DPKG_ENV)
    (r / "tmp" / deb.name).unlink()
    log = installed.stdout + installed.stderr
    assert "Processing triggers for systemd" in log, log

    enabled = root.run(["systemctl", "is-enabled", "initsplitd.service"], what="is initsplitd enabled").stdout
    assert enabled.strip() == "enabled"
    assert (r / "etc/systemd/system/sysinit.target.wants/initsplitd.service").is_symlink()
    for unit in ("initsplitd-initrd.service", "initsplitd-settle.service"):
        state = subprocess.run(["chroot", r, "systemctl", "is-enabled", unit], capture_output=True,
                               text=True, env=CHROOT_ENV).stdout.strip()
        assert state == "disabled", f"{unit} is {state} on the real root"

    # The catalog: systemd's trigger ran journalctl --update-catalog.
    assert database.stat().st_mtime > catalog_before
    listed = root.run(["journalctl", "--list-catalog", *CATALOG_IDS], what="list initsplit's catalog").stdout
    for message_id in CATALOG_IDS:
        assert message_id in listed, f"{message_id} is not in the compiled catalog:\n{listed}"

    # initsplit's rule is where udev's was; udev's is kept under the diversion.
    assert "initsplit" in udev_rule.read_text()
    assert _md5(r / "lib/udev/rules.d/80-drivers.rules.udev") == udev_md5["lib/udev/rules.d/80-drivers.rules"]
    assert not (r / "etc/udev/rules.d/80-drivers.rules").exists()

    assert _manifests(root.cache()) == set(root.kept), log
    _check_daemon_reads_cache(root)

    # 2. The kernel hooks: postrm.d removes the cache, postinst.d builds it again.
    root.run(["/etc/kernel/postrm.d/initsplit", root.kver, f"/boot/vmlinuz-{root.kver}"], what="postrm.d hook")
    assert not root.cache().exists()
    hook = root.run(["/etc/kernel/postinst.d/initsplit", root.kver, f"/boot/vmlinuz-{root.kver}"],
                    what="postinst.d hook")
    assert _manifests(root.cache()) == set(root.kept), hook.stderr
    _check_daemon_reads_cache(root)
    for rel in root.kept:
        entry = root.cache() / rel
        assert entry.with_name(entry.name + ".initsplit").stat().st_mode & 0o022 == 0
    assert not [p.name for p in root.cache().parent.iterdir() if p.name.startswith(".")], "leftovers"
    # Run as the kernel's postinst runs it for another operation than configure: nothing.
    root.run(["/etc/kernel/postinst.d/initsplit", root.kver], env={"DEB_MAINT_PARAMS": "'abort-configure'"},
             what="postinst.d hook, not configure")
    assert _manifests(root.cache()) == set(root.kept)

    # A kernel whose tree cannot be split never fails the kernel's installation.
    (r / "lib/modules/0.0.0-empty/kernel").mkdir(parents=True)
    failed = root.run(["/etc/kernel/postinst.d/initsplit", "0.0.0-empty"], what="postinst.d hook, empty tree")
    assert "no new pre-split cache for 0.0.0-empty" in failed.stderr, failed.stderr
    assert not (root.cache().parent / "0.0.0-empty").exists()
    missing = root.run(["/etc/kernel/postinst.d/initsplit", "0.0.0-missing"], what="postinst.d hook, no tree")
    assert "no /lib/modules/0.0.0-missing" in missing.stderr
    shutil.rmtree(r / "lib/modules/0.0.0-empty")

    # 3. dracut with the package's module: the image gets initsplit's rule (from
    # the diverted path, inst_rules) and its units enabled. --no-kernel: the
    # kernel modules and their split are the test bed's boot tests' business.
    image = "/tmp/initrd-deb-test.img"
    root.run(["dracut", "--force", "--no-hostonly", "--no-kernel", image, root.kver],
             what="dracut with the package installed", timeout=600)
    listing = root.run(["lsinitrd", image], what="list the initramfs").stdout
    for wanted in ("etc/systemd/system/sysinit.target.wants/initsplitd-initrd.service",
                   "etc/systemd/system/initrd-root-fs.target.wants/initsplitd-settle.service",
                   "usr/lib/initsplit/initsplitd", "etc/initsplit/initsplitd.conf",
                   "usr/lib/systemd/catalog/initsplit.catalog"):
        assert wanted in listing, f"{wanted} is not in the initramfs:\n{listing}"
    rule = root.run(["lsinitrd", "-f", "usr/lib/udev/rules.d/80-drivers.rules", image],
                    what="the initramfs's 80-drivers.rules").stdout
    assert "initsplit" in rule and "/run/initsplit/active" in rule, rule
    (r / image.lstrip("/")).unlink()

    # 4. Installed again over itself (preinst/prerm "upgrade"): one diversion, the
    # cache built again.
    shutil.copyfile(deb, r / "tmp" / deb.name)
    root.run(["dpkg", "-i", f"/tmp/{deb.name}"], what="dpkg -i the package again", env=DPKG_ENV)
    (r / "tmp" / deb.name).unlink()
    diversions = root.run(["dpkg-divert", "--list"], what="list diversions").stdout
    assert diversions.count("by initsplit") == 1, diversions
    assert "initsplit" in udev_rule.read_text()
    assert _manifests(root.cache()) == set(root.kept)

    # 5. Removed, not purged: the conffiles stay, the kernel hook left behind does
    # nothing, udev's rule is back already.
    removed = root.run(["dpkg", "--remove", "initsplit"], what="dpkg --remove initsplit", env=DPKG_ENV)
    assert "not empty" not in removed.stderr + removed.stdout, removed.stderr + removed.stdout
    assert not (r / "usr/lib/initsplit").exists(), sorted(str(p) for p in (r / "usr/lib/initsplit").rglob("*"))
    assert (r / "etc/kernel/postinst.d/initsplit").exists() and (r / "etc/initsplit/initsplitd.conf").exists()
    assert _md5(udev_rule) == udev_md5["lib/udev/rules.d/80-drivers.rules"]
    orphan = root.run(["/etc/kernel/postinst.d/initsplit", root.kver], what="the hook without initsplit")
    assert not orphan.stderr and not root.cache().exists(), orphan.stderr

    # 6. Purge: no initsplit file is left, and udev's own rule applies again.
    purged = root.run(["dpkg", "--purge", "initsplit"], what="dpkg --purge initsplit", env=DPKG_ENV)
    assert "not empty" not in purged.stderr + purged.stdout, purged.stderr + purged.stdout
    left = sorted(str(p) for p in _initsplit_paths(r) if str(p) not in before)
    assert not left, f"left after the purge: {left}"
    assert not (r / "etc/systemd/system/sysinit.target.wants/initsplitd.service").exists()
    assert not (r / "lib/udev/rules.d/80-drivers.rules.udev").exists()
    assert _md5(udev_rule) == udev_md5["lib/udev/rules.d/80-drivers.rules"]
    assert not (r / "etc/udev/rules.d/80-drivers.rules").exists()
    diversions = root.run(["dpkg-divert", "--list"], what="list diversions").stdout
    assert "initsplit" not in diversions, diversions


# Run with the installed package in the root: each kept module's entry is one the
# daemon would use (a trusted directory, made from these bytes under the options the
# daemon's configuration gives), not one it would ignore and split again.
DAEMON_READS_CACHE = r"""
import sys
from pathlib import Path
sys.path.insert(0, "/usr/lib/initsplit/python")
from initsplit.cache import CacheHit, read_entry
from initsplit.daemon.config import load_config
from initsplit.daemon.splits import SplitProvider
from initsplit.layout.rules import rules_for_tree
from initsplit.modfile import read_module
kver, rels = sys.argv[1], sys.argv[2:]
config, errors = load_config()
assert not errors, errors
tree = Path("/lib/modules") / kver
provider = SplitProvider(modules_dir=tree, cache_dir=config.cache_dir / kver, runtime_dir=Path("/nonexistent"),
                         report=print, options=config.split_options(rules_for_tree(tree)))
problem = provider._directory_problem(provider.cache_dir, "cache")
assert problem is None, problem
for rel in rels:
    hit = read_entry(provider.cache_dir, Path(rel), source=read_module(tree / rel), options=provider.options.tag)
    assert isinstance(hit, CacheHit), (rel, hit)
    print(rel, hit.manifest.decision)
    hit.close()
"""


def _check_daemon_reads_cache(root: Root) -> None:
    out = root.run(["python3", "-I", "-c", DAEMON_READS_CACHE, root.kver, *root.kept],
                   what="read the cache as the daemon does").stdout
    assert len(out.splitlines()) == len(root.kept), out


def _initsplit_paths(root: Path) -> Iterator[Path]:
    """Every path in the root whose name mentions initsplit, outside the API file systems."""
    for top in sorted(root.iterdir()):
        if top.name in ("proc", "sys", "dev", "run", "tmp"):
            continue
        if "initsplit" in top.name:
            yield top
        if top.is_dir() and not top.is_symlink():
            for dirpath, dirnames, filenames in os.walk(top):
                for name in dirnames + filenames:
                    if "initsplit" in name:
                        yield Path(dirpath) / name
