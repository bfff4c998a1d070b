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


def _import_graph() -> dict[str, set[str]]:
    """initsplit's modules -> the initsplit modules each imports, function-level
    imports included (which a plain import does not run, and so hides)."""
    import ast
    import importlib.util

    root = REPO / "daemon"
    files = {}
    for path in (root / "initsplit").rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_bytes())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = importlib.util.resolve_name("." * node.level + base, package)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    deps.add(sub if sub in files else base)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_import_cycles() -> None:
    """Data flows one way (ARCHITECTURE.md): no module of initsplit reaches itself
    through its imports, not even through an import inside a function."""
    graph = _import_graph()
    assert "initsplit.split.splitter" in graph and graph["initsplit.cli"]
    cycles = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        for dep in sorted(graph[name]):
            if dep in path:
                cycles.append(path[path.index(dep):] + (dep,))
            elif dep not in done:
                visit(dep, path + (dep,))
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, (name,))
    assert not cycles, cycles[:5]
