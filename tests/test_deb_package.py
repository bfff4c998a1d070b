"""The Debian package: built with dpkg-buildpackage (tools/build-deb), clean under
lintian, with the expected files, conffiles and maintainer scripts; the one .deb
installed with dpkg into an overlay of the test bed's Debian 12 root and of its
Debian 13 root (never the cached roots themselves), where udev's 80-drivers.rules
(/lib/udev/rules.d on 12, /usr/lib/udev/rules.d on 13) is diverted under both of
its names and initsplit's rule is in its place, initsplitd.service is enabled, the journal catalog is compiled
(systemd's dpkg trigger), the kernel hooks build and remove the pre-split cache,
dracut puts the package's module, rule and units into an initramfs, and a purge
leaves no initsplit file behind and udev's own 80-drivers.rules back. A stray file
at the name udev's rule is diverted to does not fail the installation.

The root's kernel tree is trimmed to a few modules in the overlay (then depmod):
the package's postinst and the kernel hook each split the whole tree, which for
the ~4,000 modules of Debian 12's 6.1 is about a minute each on two CPUs. Debian
13's modules are .ko.xz; their cache entries are NAME.ko.

On Debian 12 an upgrade from the first, Debian 12-only package (built from
OLD_LAYOUT_COMMIT) is installed over it; on both, a stand-in udev moving
80-drivers.rules to its other name (as the 12 -> 13 dist-upgrade moves it from /lib
to /usr/lib) leaves initsplit's rule in place and gets its file back on the purge. The
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

from initsplit.signing import is_signed
from tests.testbed import debian_kernel
from tests.testbed.install import install_depends
from tests.testbed.rootfs import CHROOT_ENV, chroot_mounts, chroot_run, debian_rootfs, remove_tree, unmount_all
from tests.testbed._util import run

REPO = Path(__file__).resolve().parent.parent
VERSION = re.search(r'^version = "(.*)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)  # type: ignore[union-attr]
DEB_NAME = f"initsplit_{VERSION}_all.deb"
CATALOG_IDS = re.findall(r"^-- ([0-9a-f]{32})", (REPO / "conf" / "initsplit.catalog").read_text(), re.M)

RELEASES = ("12", "13")
# The package's own copy of the rule, which the postinst links udev's name to.
RULE = "/usr/lib/initsplit/udev/80-drivers.rules"
UDEV_NAMES = ("lib/udev/rules.d/80-drivers.rules", "usr/lib/udev/rules.d/80-drivers.rules")
# Where the postinst diverts udev's file to, for each of its names.
DIVERT_TO = {UDEV_NAMES[0]: UDEV_NAMES[0] + ".udev", UDEV_NAMES[1]: UDEV_NAMES[1] + ".udev-usr"}
MODULE_RE = re.compile(r"\.ko(\.gz|\.xz|\.zst)?$")

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
        "/usr/lib/systemd/system/initsplitd.service",
        "/usr/lib/systemd/system/initsplitd-initrd.service",
        "/usr/lib/systemd/system/initsplitd-settle.service",
        RULE,
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
    # Not at any of udev's paths (the postinst diverts the one the installed udev
    # uses and links it to RULE), nor in /etc (lintian's udev-rule-in-etc).
    assert not [f for f in files if "/udev/rules.d/" in f], sorted(files)
    assert not [f for f in files if "__pycache__" in f]
    # Nothing in the aliased /lib (DEP17): dpkg on Debian 13, where no package owns
    # /lib/systemd/system, would try to remove such directories with the package.
    assert not [f for f in files if f == "/lib" or f.startswith("/lib/")], sorted(files)

    info = run(["dpkg-deb", "-I", deb], what="show the package's control data")
    assert re.search(r"^ Architecture: all$", info, re.M), info
    depends = re.search(r"^ Depends: (.*)$", info, re.M)
    assert depends, info
    for dep in ("python3", "python3-pyelftools", "python3-pyudev", "python3-systemd", "kmod", "udev", "systemd"):
        assert re.search(rf"(^|, ){re.escape(dep)}(,|$| )", depends.group(1)), depends.group(1)
    # One package for Debian 12 and 13: no upper bound on udev (nor on anything).
    assert "<<" not in depends.group(1), depends.group(1)
    assert re.search(r"^ (Suggests|Recommends): .*\bdracut\b", info, re.M), info

    control = tmp_path / "control"
    run(["dpkg-deb", "-e", deb, control], what="extract the control archive")
    assert sorted((control / "conffiles").read_text().split()) == [
        "/etc/initsplit/initsplitd.conf", "/etc/kernel/postinst.d/initsplit", "/etc/kernel/postrm.d/initsplit"]
    postinst = (control / "postinst").read_text()
    assert "deb-systemd-helper enable 'initsplitd.service'" in postinst, postinst
    # The initramfs units are enabled by the dracut module in the image only.
    assert "initsplitd-initrd.service" not in postinst and "initsplitd-settle.service" not in postinst
    assert "dpkg-divert --package initsplit" in postinst and RULE in postinst
    assert "dpkg-divert --package initsplit" in (control / "postrm").read_text()
    assert "activate-noawait update-initramfs" in (control / "triggers").read_text()


# The last commit whose package was Debian 12's only (udev (<< 253), its rule shipped at
# /lib/udev/rules.d/80-drivers.rules under a diversion the preinst made): an upgrade
# from it is checked on Debian 12.
OLD_LAYOUT_COMMIT = "25bc7533f32bbda25ec1f040442b656c105f57a2"


@pytest.fixture(scope="module")
def old_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require("dpkg-buildpackage", "dh", "fakeroot", "dpkg-deb", "git")
    have = subprocess.run(["git", "-C", REPO, "cat-file", "-e", f"{OLD_LAYOUT_COMMIT}^{{commit}}"],
                          capture_output=True)
    assert have.returncode == 0, f"commit {OLD_LAYOUT_COMMIT} (the Debian 12-only package) is not in this clone"
    src = tmp_path_factory.mktemp("old-src")
    archive = subprocess.run(["git", "-C", REPO, "archive", OLD_LAYOUT_COMMIT], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", src], input=archive.stdout, check=True)
    out = tmp_path_factory.mktemp("old-deb")
    printed = run([src / "tools" / "build-deb", out], what="build the Debian 12-only package", timeout=300)
    return Path(printed.strip())


# --- installed into (an overlay of) the test bed's Debian 12 and 13 roots --------------


@dataclass
class Root:
    path: Path
    release: str
    kver: str
    kept: list[str]  # relative paths of the modules left in the trimmed tree
    udev_name: str  # where the root's udev ships 80-drivers.rules, relative
    udev_md5: str  # of udev's own 80-drivers.rules

    def entries(self) -> set[str]:
        """The cache entries of the kept modules (NAME.ko, for a NAME.ko.xz too)."""
        return {MODULE_RE.sub(".ko", rel) for rel in self.kept}

    def read(self, path: str) -> str:
        """A file as the root sees it (the rule's symlink is absolute)."""
        return self.run(["cat", path], what=f"read {path}").stdout

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


@pytest.fixture(scope="module", params=RELEASES, ids=[f"debian{r}" for r in RELEASES])
def root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Root]:
    if os.geteuid() != 0:
        pytest.skip("installing the package into a Debian root needs root (overlay mount, chroot, dpkg)")
    release = request.param
    rootfs = debian_rootfs(debian_kernel(release=release))
    udev_md5 = {line.split()[1]: line.split()[0]
                for line in (rootfs.path / "var/lib/dpkg/info/udev.md5sums").read_text().splitlines()}
    names = [name for name in UDEV_NAMES if name in udev_md5]
    assert len(names) == 1, f"udev of Debian {release} ships 80-drivers.rules as {names}"
    assert names[0] == UDEV_NAMES[0 if release == "12" else 1], names
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
        for ko in sorted((tree / "kernel").rglob("*.ko*")):
            if not MODULE_RE.search(ko.name):
                continue
            if MODULE_RE.sub("", ko.name) in KEEP:
                kept.append(str(ko.relative_to(tree)))
            else:
                ko.unlink()
        assert len(kept) >= MIN_KEPT, f"only {kept} of {KEEP} are modules of {rootfs.kver}"
        with chroot_mounts(merged):
            chroot_run(merged, ["depmod", "-a", rootfs.kver], what="depmod the trimmed tree")
            install_depends(merged, env=DPKG_ENV)  # openssl, which the cached roots lack
            yield Root(merged, release, rootfs.kver, kept, names[0], udev_md5[names[0]])
    finally:
        unmount_all(merged)
        remove_tree(work)


def _manifests(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)).removesuffix(".initsplit") for p in cache.rglob("*.initsplit")}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_stray_file_at_the_divert_to_name(deb: Path, root: Root) -> None:
    """A file at the name udev's rule is diverted to, no diversion registered (an
    interrupted purge, a copy put there by hand), does not fail the installation,
    though dpkg-divert --rename refuses to overwrite any file: one with udev's bytes
    is removed, any other kept as NAME.dpkg-old, and udev's own file is diverted
    as always. Runs before test_install_hooks_and_purge, on the root as debootstrap
    made it (that test swaps udev for a stand-in)."""
    r = root.path
    env = {**DPKG_ENV, "INITSPLIT_NO_CACHE": "1"}
    to = r / DIVERT_TO[root.udev_name]
    kept = to.with_name(to.name + ".dpkg-old")
    stray = "# not udev's 80-drivers.rules\n"
    _check_udev_rule_back(root)
    try:
        to.write_text(stray)
        shutil.copyfile(deb, r / "tmp" / deb.name)
        installed = root.run(["dpkg", "-i", f"/tmp/{deb.name}"], what="dpkg -i over a stray file", env=env)
        assert f"kept as /{DIVERT_TO[root.udev_name]}.dpkg-old" in installed.stderr, installed.stderr
        assert kept.read_text() == stray
        _check_rule_in_place(root)
        root.run(["dpkg", "--purge", "initsplit"], what="purge", env=env)
        kept.unlink()
        _check_udev_rule_back(root)

        # A stray with udev's bytes: removed, nothing kept, nothing said.
        shutil.copyfile(r / root.udev_name, to)
        installed = root.run(["dpkg", "-i", f"/tmp/{deb.name}"], what="dpkg -i over a copy", env=env)
        assert "in the way" not in installed.stderr, installed.stderr
        assert not kept.exists()
        _check_rule_in_place(root)
        root.run(["dpkg", "--purge", "initsplit"], what="purge", env=env)
        _check_udev_rule_back(root)
    finally:
        (r / "tmp" / deb.name).unlink(missing_ok=True)
        kept.unlink(missing_ok=True)


def test_install_hooks_and_purge(deb: Path, old_deb: Path, root: Root) -> None:
    r = root.path
    _check_udev_rule_back(root)
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
    _check_rule_in_place(root)

    assert _manifests(root.cache()) == root.entries(), log
    _check_daemon_reads_cache(root)

    # 2. The kernel hooks: postrm.d removes the cache, postinst.d builds it again.
    root.run(["/etc/kernel/postrm.d/initsplit", root.kver, f"/boot/vmlinuz-{root.kver}"], what="postrm.d hook")
    assert not root.cache().exists()
    hook = root.run(["/etc/kernel/postinst.d/initsplit", root.kver, f"/boot/vmlinuz-{root.kver}"],
                    what="postinst.d hook")
    assert _manifests(root.cache()) == root.entries(), hook.stderr
    _check_daemon_reads_cache(root)
    for rel in root.entries():
        entry = root.cache() / rel
        assert entry.with_name(entry.name + ".initsplit").stat().st_mode & 0o022 == 0
    assert not [p.name for p in root.cache().parent.iterdir() if p.name.startswith(".")], "leftovers"
    # Run as the kernel's postinst runs it for another operation than configure: nothing.
    root.run(["/etc/kernel/postinst.d/initsplit", root.kver], env={"DEB_MAINT_PARAMS": "'abort-configure'"},
             what="postinst.d hook, not configure")
    assert _manifests(root.cache()) == root.entries()

    # Signing (Secure Boot): with a key in [Signing] the hook signs every module it
    # writes. The key is put under /etc/initsplit on purpose, the worst place for
    # the dracut step below: dracut must still not copy it into the image.
    key_dir = "/etc/initsplit/test-mok"
    root.run(["initsplit", "key", "create", key_dir], what="initsplit key create")
    dropin = r / "etc/initsplit/initsplitd.conf.d/50-signing.conf"
    dropin.parent.mkdir(exist_ok=True)
    dropin.write_text(f"[Signing]\nSign=yes\nSignKey={key_dir}/mok.key\nSignCert={key_dir}/mok.pub\n")
    signed = root.run(["/etc/kernel/postinst.d/initsplit", root.kver], what="postinst.d hook, signing")
    assert f"signing with {key_dir}/mok.key" in signed.stderr, signed.stderr
    assert _manifests(root.cache()) == root.entries(), signed.stderr
    cached = sorted(root.cache().rglob("*.ko"))
    assert cached and all(is_signed(p.read_bytes()) for p in cached), signed.stderr
    _check_hook_keeps_cache_when_key_cannot_sign(root, key_dir, dropin)

    # A kernel whose tree cannot be split never fails the kernel's installation.
    (r / "lib/modules/0.0.0-empty/kernel").mkdir(parents=True)
    failed = root.run(["/etc/kernel/postinst.d/initsplit", "0.0.0-empty"], what="postinst.d hook, empty tree")
    assert "no new pre-split cache for 0.0.0-empty" in failed.stderr, failed.stderr
    assert not (root.cache().parent / "0.0.0-empty").exists()
    missing = root.run(["/etc/kernel/postinst.d/initsplit", "0.0.0-missing"], what="postinst.d hook, no tree")
    assert "no /lib/modules/0.0.0-missing" in missing.stderr
    shutil.rmtree(r / "lib/modules/0.0.0-empty")

    # A package shipping 80-drivers.rules under udev's other name (as the 12 -> 13
    # upgrade's udev does, /usr/lib for /lib) gets it diverted: initsplit's rule stays.
    other = next(name for name in UDEV_NAMES if name != root.udev_name)
    fake = _fake_package(r, "initsplit-test-rules", "1", {other: "# another 80-drivers.rules\n"})
    root.run(["dpkg", "-i", fake], what="dpkg -i a package with the other name", env=DPKG_ENV)
    assert (r / DIVERT_TO[other]).read_text() == "# another 80-drivers.rules\n"
    _check_rule_in_place(root)
    root.run(["dpkg", "--purge", "initsplit-test-rules"], what="purge that package", env=DPKG_ENV)
    assert not (r / DIVERT_TO[other]).exists()
    _check_rule_in_place(root)

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
    # dracut copies udev's name as it is, a symlink to RULE, and RULE with it.
    linked = re.search(r" usr/lib/udev/rules\.d/80-drivers\.rules -> (\S+)$", listing, re.M)
    assert linked and linked.group(1).endswith(RULE.removeprefix("/usr/lib/")), listing
    rule = root.run(["lsinitrd", "-f", RULE.lstrip("/"), image], what="the initramfs's 80-drivers.rules").stdout
    assert "initsplit" in rule and "/run/initsplit/active" in rule, rule
    # The signing drop-in is in the image (only paths); the key is not, under any
    # name: no file of the unpacked image holds its bytes.
    assert "etc/initsplit/initsplitd.conf.d/50-signing.conf" in listing, listing
    assert "mok.key" not in listing and "test-mok" not in listing, listing
    unpacked = "/tmp/initrd-deb-test.unpacked"
    root.run(["sh", "-c", f"mkdir {unpacked} && cd {unpacked} && lsinitrd --unpack {image}"],
             what="unpack the initramfs")
    secret = (r / key_dir.lstrip("/") / "mok.key").read_bytes()
    files = [p for p in (r / unpacked.lstrip("/")).rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(files) > 100, files
    assert not [p for p in files if secret in p.read_bytes()]
    shutil.rmtree(r / unpacked.lstrip("/"))
    (r / image.lstrip("/")).unlink()
    dropin.unlink()
    shutil.rmtree(r / key_dir.lstrip("/"))

    # 4. Installed again over itself (preinst/prerm "upgrade"): one diversion, the
    # cache built again.
    shutil.copyfile(deb, r / "tmp" / deb.name)
    root.run(["dpkg", "-i", f"/tmp/{deb.name}"], what="dpkg -i the package again", env=DPKG_ENV)
    (r / "tmp" / deb.name).unlink()
    _check_rule_in_place(root)
    assert _manifests(root.cache()) == root.entries()

    # 5. Removed, not purged: the conffiles stay, the kernel hook left behind does
    # nothing, udev's rule is back already.
    removed = root.run(["dpkg", "--remove", "initsplit"], what="dpkg --remove initsplit", env=DPKG_ENV)
    assert "not empty" not in removed.stderr + removed.stdout, removed.stderr + removed.stdout
    assert not (r / "usr/lib/initsplit").exists(), sorted(str(p) for p in (r / "usr/lib/initsplit").rglob("*"))
    assert (r / "etc/kernel/postinst.d/initsplit").exists() and (r / "etc/initsplit/initsplitd.conf").exists()
    _check_udev_rule_back(root)
    orphan = root.run(["/etc/kernel/postinst.d/initsplit", root.kver], what="the hook without initsplit")
    assert not orphan.stderr and not root.cache().exists(), orphan.stderr

    # 6. Purge: no initsplit file is left, and udev's own rule applies again.
    purged = root.run(["dpkg", "--purge", "initsplit"], what="dpkg --purge initsplit", env=DPKG_ENV)
    assert "not empty" not in purged.stderr + purged.stdout, purged.stderr + purged.stdout
    left = sorted(str(p) for p in _initsplit_paths(r) if str(p) not in before)
    assert not left, f"left after the purge: {left}"
    assert not (r / "etc/systemd/system/sysinit.target.wants/initsplitd.service").exists()
    _check_udev_rule_back(root)

    # 7. Debian 12: an upgrade from the Debian 12-only package, which shipped the rule
    # at /lib/udev/rules.d and its units in /lib/systemd/system (the same files as
    # the new package's /usr/lib names on the merged /usr: none may be lost).
    env = {**DPKG_ENV, "INITSPLIT_NO_CACHE": "1"}
    if root.release == "12":
        shutil.copyfile(old_deb, r / "tmp" / old_deb.name)
        root.run(["dpkg", "-i", f"/tmp/{old_deb.name}"], what="dpkg -i the Debian 12-only package", env=env)
        (r / "tmp" / old_deb.name).unlink()
        assert "/run/initsplit/active" in (r / UDEV_NAMES[0]).read_text()
        assert _md5(r / DIVERT_TO[UDEV_NAMES[0]]) == root.udev_md5
        _install(root, deb, env=env, what="dpkg -i over the Debian 12-only package")
        _check_rule_in_place(root)
        for unit in ("initsplitd.service", "initsplitd-initrd.service", "initsplitd-settle.service"):
            assert (r / "usr/lib/systemd/system" / unit).is_file(), f"{unit} lost in the upgrade"
        state = root.run(["systemctl", "is-enabled", "initsplitd.service"], what="is initsplitd enabled").stdout
        assert state.strip() == "enabled"
        root.run(["dpkg", "--purge", "initsplit"], what="purge after the upgrade", env=env)
        _check_udev_rule_back(root)

    # 8. A udev upgrade that moves 80-drivers.rules to its other name (Debian 12 to
    # 13: /lib to /usr/lib), here a stand-in udev with that file only: it lands under
    # the other name's diversion, the old one's goes, initsplit's rule stays; the
    # removal brings back the new udev's file.
    _install(root, deb, env=env, what="dpkg -i before the udev move")
    _check_rule_in_place(root)
    moved = "# the moved udev's 80-drivers.rules\n"
    fake = _fake_package(r, "udev", "999", {other: moved})
    root.run(["dpkg", "-i", fake], what="dpkg -i a udev with the other name", env=env)
    assert (r / DIVERT_TO[other]).read_text() == moved
    assert not (r / DIVERT_TO[root.udev_name]).exists(), "the old udev's rule was left under its diversion"
    assert os.readlink(r / other) == RULE
    assert "/run/initsplit/active" in root.read(f"/{other}")
    root.run(["dpkg", "--purge", "initsplit"], what="purge after the udev move", env=env)
    assert (r / other).is_file() and not (r / other).is_symlink()
    assert (r / other).read_text() == moved
    left = sorted(str(p.relative_to(r)) for name in UDEV_NAMES for p in (r / name).parent.glob("80-drivers.rules?*"))
    assert not left, left
    assert "initsplit" not in root.run(["dpkg-divert", "--list"], what="list diversions").stdout


def _install(root: Root, deb: Path, *, env: dict[str, str], what: str) -> None:
    shutil.copyfile(deb, root.path / "tmp" / deb.name)
    root.run(["dpkg", "-i", f"/tmp/{deb.name}"], what=what, env=env)
    (root.path / "tmp" / deb.name).unlink()


def _check_rule_in_place(root: Root) -> None:
    """udev's name for 80-drivers.rules is a symlink to initsplit's rule, both of
    udev's names are diverted (udev's own file kept under its divert-to name), and
    what udev reads under either name is initsplit's rule."""
    r = root.path
    assert os.readlink(r / root.udev_name) == RULE, f"/{root.udev_name} is not initsplit's link"
    ours = root.read(RULE)
    assert "/run/initsplit/active" in ours, ours
    for name in UDEV_NAMES:  # one file on the merged /usr both releases have
        assert root.read(f"/{name}") == ours, f"/{name} is not initsplit's rule"
        truename = root.run(["dpkg-divert", "--truename", f"/{name}"], what="dpkg-divert --truename").stdout
        assert truename.strip() == f"/{DIVERT_TO[name]}", truename
    assert _md5(r / DIVERT_TO[root.udev_name]) == root.udev_md5, "udev's own rule is not kept under its diversion"
    if root.release != "12":  # udevadm verify is systemd 254's
        verified = root.run(["udevadm", "verify", "--resolve-names=never", "--no-style", f"/{root.udev_name}"],
                            what="udevadm verify initsplit's rule at udev's name")
        assert "Success: 1" in verified.stdout + verified.stderr, verified.stdout + verified.stderr
    diversions = root.run(["dpkg-divert", "--list"], what="list diversions").stdout
    assert diversions.count("by initsplit") == 2, diversions
    assert not (r / "etc/udev/rules.d/80-drivers.rules").exists()


def _check_udev_rule_back(root: Root) -> None:
    """udev's own 80-drivers.rules at its name, nothing diverted, no leftovers."""
    r = root.path
    path = r / root.udev_name
    assert path.is_file() and not path.is_symlink(), f"/{root.udev_name} is not a file"
    assert _md5(path) == root.udev_md5, "the root's 80-drivers.rules is not udev's"
    left = sorted(str(p.relative_to(r)) for name in UDEV_NAMES for p in (r / name).parent.glob("80-drivers.rules?*"))
    assert not left, left
    assert not (r / "etc/udev/rules.d/80-drivers.rules").exists()
    diversions = root.run(["dpkg-divert", "--list"], what="list diversions").stdout
    assert "initsplit" not in diversions, diversions


def _check_hook_keeps_cache_when_key_cannot_sign(root: Root, key_dir: str, dropin: Path) -> None:
    """A [Signing] key that cannot sign makes the split exit 2 before the first module;
    the hook then keeps the signed cache it has (a new one would be empty or unsigned),
    says why, and exits 0. A mismatched pair, a corrupt certificate, an openssl that
    fails (a fake one first on PATH), and a key others can read."""
    r = root.path
    before = {p: p.read_bytes() for p in root.cache().rglob("*") if p.is_file()}
    root.run(["initsplit", "key", "create", "/etc/initsplit/other-mok"], what="initsplit key create (other)")
    (r / "etc/initsplit/corrupt.pub").write_bytes(b"not a certificate\n")
    fake = r / "tmp/fake-bin/openssl"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/bin/sh\nif [ "$1 $2" = "cms -sign" ]; then echo "fake openssl: no" >&2; exit 1; fi\n'
                    'exec /usr/bin/openssl "$@"\n')
    fake.chmod(0o755)
    good = f"[Signing]\nSign=yes\nSignKey={key_dir}/mok.key\nSignCert={key_dir}/mok.pub\n"
    cases = [
        ("mismatched pair", f"[Signing]\nSign=yes\nSignKey=/etc/initsplit/other-mok/mok.key\n"
                            f"SignCert={key_dir}/mok.pub\n", {}, "private key does not match certificate"),
        # openssl 3.0 (Debian 12) and 3.5 (Debian 13) word the reason differently.
        ("corrupt certificate", f"[Signing]\nSign=yes\nSignKey={key_dir}/mok.key\n"
                                "SignCert=/etc/initsplit/corrupt.pub\n", {}, "openssl cms -sign failed"),
        ("failing openssl", good, {"PATH": f"/tmp/fake-bin:{CHROOT_ENV['PATH']}"}, "fake openssl: no"),
    ]
    for name, config, env, message in cases:
        dropin.write_text(config)
        hook = root.run(["/etc/kernel/postinst.d/initsplit", root.kver], env=env, what=f"postinst.d hook, {name}")
        assert message in hook.stderr, (name, hook.stderr)
        assert f"(exit 2, above): no new pre-split cache for {root.kver}, the previous one stays" in hook.stderr, \
            (name, hook.stderr)
        assert "initsplit: initsplit:" not in hook.stderr, (name, hook.stderr)
        assert {p: p.read_bytes() for p in root.cache().rglob("*") if p.is_file()} == before, name
        assert not [p.name for p in root.cache().parent.iterdir() if p.name.startswith(".")], name
    dropin.write_text(good)
    key = r / key_dir.lstrip("/") / "mok.key"
    key.chmod(0o644)
    hook = root.run(["/etc/kernel/postinst.d/initsplit", root.kver], what="postinst.d hook, key readable by all")
    assert "lets others read it" in hook.stderr and "the previous one stays" in hook.stderr, hook.stderr
    assert {p: p.read_bytes() for p in root.cache().rglob("*") if p.is_file()} == before
    key.chmod(0o600)
    shutil.rmtree(r / "etc/initsplit/other-mok")
    (r / "etc/initsplit/corrupt.pub").unlink()
    shutil.rmtree(fake.parent)


def _fake_package(root: Path, name: str, version: str, files: dict[str, str]) -> str:
    """Build a package shipping *files* (relative path: text) into the root's /tmp;
    its path there."""
    build = root / "tmp" / f"{name}-build"
    (build / "DEBIAN").mkdir(parents=True)
    (build / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: test <test@invalid>\n"
        f"Description: initsplit's test of its udev rule diversions\n")
    for rel, text in files.items():
        (build / rel).parent.mkdir(parents=True, exist_ok=True)
        (build / rel).write_text(text)
    deb = root / "tmp" / f"{name}_{version}_all.deb"
    run(["dpkg-deb", "--root-owner-group", "--build", build, deb], what=f"build {name}")
    shutil.rmtree(build)
    return f"/tmp/{deb.name}"


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
from initsplit.modfile import read_module, uncompressed_path
kver, rels = sys.argv[1], sys.argv[2:]
config, errors = load_config()
assert not errors, errors
tree = Path("/lib/modules") / kver
provider = SplitProvider(modules_dir=tree, cache_dir=config.cache_dir / kver, runtime_dir=Path("/nonexistent"),
                         report=print, options=config.split_options(rules_for_tree(tree)))
problem = provider._directory_problem(provider.cache_dir, "cache")
assert problem is None, problem
for rel in rels:
    hit = read_entry(provider.cache_dir, uncompressed_path(Path(rel)), source=read_module(tree / rel),
                     options=provider.options.tag)
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
