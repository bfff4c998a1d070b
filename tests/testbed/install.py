"""initsplit installed into a test bed image the way a package would install it.

`make install DESTDIR=...` puts the daemon, the CLI, both units, the configuration,
the journal catalog, the udev rules, the dracut module and its dracut.conf.d snippet
into a staging tree; the real-root unit is enabled there as `systemctl enable`
would (a symlink in /etc/systemd/system/sysinit.target.wants). build_disk() then
overlays the tree on the cached root, so dracut in the image finds the module.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from collections.abc import Mapping
from pathlib import Path

from ._util import TestbedError, run, tail
from .rootfs import CHROOT_ENV, RootFS

REPO = Path(__file__).resolve().parent.parent.parent

INITRD_UNIT = "initsplitd-initrd.service"
ROOT_UNIT = "initsplitd.service"
SETTLE_UNIT = "initsplitd-settle.service"

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

# The real-root unit's [Install] section: WantedBy=sysinit.target.
ENABLE_LINKS = {
    "etc/systemd/system/sysinit.target.wants/initsplitd.service":
        "/usr/lib/systemd/system/initsplitd.service",
}


def install_initsplit(destdir: Path, *, enable: bool = True,
                      conf_dropins: Mapping[str, str] = {},
                      rootfs: RootFS | None = None) -> dict[str, Path]:
    """`make install DESTDIR=destdir` from this checkout; returns build_disk's
    extra_files for the tree (top-level directories, copied with their symlinks).

    enable: also enable initsplitd.service on the real root.
    conf_dropins: name -> text, written as /etc/initsplit/initsplitd.conf.d/NAME
        (they end up in the initramfs too, as the daemon's configuration there).
    rootfs: the root the tree is for; its python3 compiles the bytecode (None:
        the host's /usr/bin/python3, which is Debian 12's, the bookworm root's).
    """
    destdir = Path(destdir)
    if destdir.exists():
        shutil.rmtree(destdir)
    destdir.mkdir(parents=True)
    run(["make", "-s", "-C", REPO, "install", f"DESTDIR={destdir}"],
        what="install initsplit into a staging tree", timeout=300)
    for name, text in conf_dropins.items():
        (destdir / "etc/initsplit/initsplitd.conf.d" / name).write_text(text)
    if enable:
        for link, target in ENABLE_LINKS.items():
            path = destdir / link
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(target)
    # Bytecode, as Debian's py3compile makes it when a package is installed: without
    # it the daemon compiles its ~40 modules at every boot of a -snapshot disk.
    # It has to be the image's interpreter's (3.11 on bookworm, 3.13 on trixie:
    # another magic number and __pycache__ tag).
    if rootfs is None or rootfs.kernel.release.python == _host_python():
        run(["/usr/bin/python3", "-m", "compileall", "-q", "-s", destdir, "-p", "/",
             destdir / "usr/lib/initsplit/python"], what="compile initsplit's bytecode")
    else:
        _compile_in_root(rootfs.path, destdir, destdir / "usr/lib/initsplit/python")
    tops = sorted(p for p in destdir.iterdir() if p.is_dir())
    if not any((destdir / "usr/lib/dracut/modules.d/90initsplit").glob("module-setup.sh")):
        raise TestbedError(f"make install left no dracut module in {destdir}")
    return {f"/{p.name}": p for p in tops}



def _host_python() -> str:
    out = run(["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
              what="ask the host's python3 for its version")
    return out.strip()


# Run by the root's python3 in a chroot: reads a tar of sources (named by their guest
# path, with their mtime) on stdin, writes a tar of their timestamp-based .pyc files
# (named as cache_from_source names them) on stdout. Nothing is written in the root.
_COMPILE_SCRIPT = """
import importlib._bootstrap_external as ext, importlib.util, io, sys, tarfile
src = tarfile.open(fileobj=io.BytesIO(sys.stdin.buffer.read()), mode="r:")
out = io.BytesIO()
dst = tarfile.open(fileobj=out, mode="w:")
for member in src.getmembers():
    data = src.extractfile(member).read()
    path = "/" + member.name
    code = compile(data, path, "exec", dont_inherit=True)
    pyc = bytes(ext._code_to_timestamp_pyc(code, int(member.mtime), len(data)))
    info = tarfile.TarInfo(importlib.util.cache_from_source(path).lstrip("/"))
    info.size, info.mtime, info.mode = len(pyc), member.mtime, 0o644
    dst.addfile(info, io.BytesIO(pyc))
dst.close()
sys.stdout.buffer.write(out.getvalue())
"""


def _compile_in_root(root: Path, destdir: Path, tree: Path) -> None:
    """compileall with the interpreter of *root* (a chroot; -I -B: it neither reads
    the environment nor writes bytecode of its own), for the sources under *tree*
    as they will be installed at their path below *destdir*."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tar:
        for path in sorted(tree.rglob("*.py")):
            tar.add(path, arcname=str(path.relative_to(destdir)), recursive=False)
    proc = subprocess.run(["chroot", root, "/usr/bin/python3", "-I", "-B", "-c", _COMPILE_SCRIPT],
                          input=buf.getvalue(), capture_output=True, env=CHROOT_ENV, timeout=300)
    if proc.returncode != 0:
        raise TestbedError(f"compile initsplit's bytecode with {root}/usr/bin/python3 failed "
                           f"(exit {proc.returncode}):\n{tail(proc.stderr.decode(errors='replace'))}")
    with tarfile.open(fileobj=io.BytesIO(proc.stdout), mode="r:") as tar:
        for member in tar.getmembers():
            dest = destdir / member.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(member).read())
