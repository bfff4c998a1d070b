"""What initsplitd imports at start is what the initramfs must carry and what every
boot pays for: the daemon, not the command line, reports, plots or the splitter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Imported only when the daemon splits a module at boot (no pre-split cache
# entry): the splitter, the ELF model and pyelftools under it, the layout model,
# the validator.
ON_DEMAND = ("elftools", "initsplit.split.splitter", "initsplit.split.decide", "initsplit.elf",
             "initsplit.layout.linux61", "initsplit.validate", "initsplit.tree")
# Never in the daemon: the command line and its reports.
NEVER = ("initsplit.cli", "initsplit.analyze", "initsplit.__main__")


def daemon_modules() -> set[str]:
    code = ("import sys, json, initsplit.daemon.main, initsplit.daemon.udev_source, "
            "initsplit.kmod.resolver; print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO / "daemon", check=True,
                         capture_output=True, text=True).stdout
    return set(json.loads(out))


def test_daemon_start_imports_neither_splitter_nor_cli() -> None:
    loaded = daemon_modules()
    assert "initsplit.daemon.service" in loaded  # the check imports what it means to
    unexpected = sorted(m for m in loaded if m in ON_DEMAND + NEVER
                        or any(m.startswith(p + ".") for p in ON_DEMAND + NEVER))
    assert not unexpected, unexpected


def test_splitter_names_still_import_on_demand() -> None:
    from initsplit.split import SplitModule, split_module  # PEP 562 __getattr__
    from initsplit.layout import module_layout

    assert callable(split_module) and SplitModule.__name__ == "SplitModule"
    assert module_layout.__module__ == "initsplit.layout.models"


def test_initramfs_carries_the_daemon_not_the_cli() -> None:
    """dracut/90initsplit/python-closure.py, as module-setup.sh runs it, lists what the
    image gets: every module of the package but the command line and its reports,
    and of the standard library only what those import (not the urllib.request,
    http and email that analyze's SVG escaping would pull in)."""
    package = REPO / "daemon"
    out = subprocess.run([sys.executable, "-I", str(REPO / "dracut/90initsplit/python-closure.py"),
                          "--libdir", str(package)], check=True, capture_output=True, text=True).stdout
    listed = {Path(line) for line in out.splitlines()}
    ours = {p.relative_to(package) for p in listed if p.is_relative_to(package)}
    everything = {p.relative_to(package) for p in (package / "initsplit").rglob("*.py")}
    never = {Path("initsplit/cli.py"), Path("initsplit/analyze.py"), Path("initsplit/__main__.py")}
    assert never <= everything
    assert ours == everything - never, sorted(map(str, ours ^ (everything - never)))
    stdlib = Path(subprocess.__file__).parent
    assert not [p for p in listed if p.is_relative_to(stdlib)
                and p.relative_to(stdlib).parts[0] in ("email", "http", "xml", "tkinter")]
    assert not [p for p in listed if p.is_relative_to(stdlib) and p.relative_to(stdlib).parts[:2]
                == ("urllib", "request.py")]
