"""initsplit installed into a test bed image the way a package would install it.

`make install DESTDIR=...` puts the daemon, the CLI, both units, the configuration,
the journal catalog, the udev rules, the dracut module and its dracut.conf.d snippet
into a staging tree; the real-root unit is enabled there as `systemctl enable`
would (a symlink in /etc/systemd/system/sysinit.target.wants). build_disk() then
overlays the tree on the cached root, so dracut in the image finds the module.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

from ._util import TestbedError, run

REPO = Path(__file__).resolve().parent.parent.parent

# The real-root unit's [Install] section: WantedBy=sysinit.target.
ENABLE_LINKS = {
    "etc/systemd/system/sysinit.target.wants/initsplitd.service":
        "/usr/lib/systemd/system/initsplitd.service",
}


def install_initsplit(destdir: Path, *, enable: bool = True,
                      conf_dropins: Mapping[str, str] = {}) -> dict[str, Path]:
    """`make install DESTDIR=destdir` from this checkout; returns build_disk's
    extra_files for the tree (top-level directories, copied with their symlinks).

    enable: also enable initsplitd.service on the real root.
    conf_dropins: name -> text, written as /etc/initsplit/initsplitd.conf.d/NAME
        (they end up in the initramfs too, as the daemon's configuration there).
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
    # Debian's /usr/bin/python3 is the image's interpreter too (same 3.11 magic).
    run(["/usr/bin/python3", "-m", "compileall", "-q", "-s", destdir, "-p", "/",
         destdir / "usr/lib/initsplit/python"], what="compile initsplit's bytecode")
    tops = sorted(p for p in destdir.iterdir() if p.is_dir())
    if not any((destdir / "usr/lib/dracut/modules.d/90initsplit").glob("module-setup.sh")):
        raise TestbedError(f"make install left no dracut module in {destdir}")
    return {f"/{p.name}": p for p in tops}

