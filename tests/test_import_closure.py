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
             "initsplit.layout.linux61", "initsplit.validate")
# Never in the daemon: the command line, its reports and plot, splitting whole
# trees (tree.py, with its summaries) and signing with a private key (signing.py).
NEVER = ("initsplit.cli", "initsplit.analyze", "initsplit.__main__", "initsplit.tree",
         "initsplit.signing")
# Where initsplitd starts: bin/initsplitd runs the first, the units the second.
DAEMON_ENTRY_POINTS = ("initsplit.daemon.main", "initsplit.daemon.__main__")


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
    files = _module_files()
    never = {files[name].relative_to(package) for name in NEVER}
    assert not ours & never, sorted(map(str, ours & never))
    # Exactly what the daemon can import, by its source (function-level and
    # importlib imports included): nothing it cannot reach, nothing it can missing.
    closure = {files[name].relative_to(package) for name in _daemon_closure()}
    assert ours == closure, sorted(map(str, ours ^ closure))
    stdlib = Path(subprocess.__file__).parent
    assert not [p for p in listed if p.is_relative_to(stdlib)
                and p.relative_to(stdlib).parts[0] in ("email", "http", "xml", "tkinter")]
    assert not [p for p in listed if p.is_relative_to(stdlib) and p.relative_to(stdlib).parts[:2]
                == ("urllib", "request.py")]


def _module_files() -> dict[str, Path]:
    """initsplit's module names -> their files."""
    root = REPO / "daemon"
    files = {}
    for path in (root / "initsplit").rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _import_graph() -> dict[str, set[str]]:
    """initsplit's modules -> the initsplit modules each imports, function-level
    imports included (which a plain import does not run, and so hides), and the
    lazy ones of PEP 562 __getattr__s: importlib.import_module(".name", __name__)."""
    import ast
    import importlib.util

    files = _module_files()
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
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and node.args):
                deps.update(_import_module_targets(node, package, name))
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def _import_module_targets(call: "ast.Call", package: str, module: str) -> set[str]:
    """What an importlib.import_module() call imports: a literal name, relative to
    __name__ (or __package__) when it starts with a dot, or any value of a dict
    literal (the _LAZY tables) when it is a subscript of one. Anything else fails:
    an import this test cannot see would be one the initramfs may lack."""
    import ast
    import importlib.util

    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        names = {arg.value}
    elif isinstance(arg, ast.Subscript) and isinstance(arg.value, ast.Name):
        names = set(_LAZY_TABLES[(module, arg.value.id)])
    else:
        raise AssertionError(f"{module}: importlib.import_module({ast.unparse(arg)}) is not a name this test can follow")
    anchor = package if len(call.args) > 1 else ""
    return {importlib.util.resolve_name(n, anchor) if n.startswith(".") else n for n in names}


def _lazy_tables() -> dict[tuple[str, str], tuple[str, ...]]:
    """(module, name) -> the values of each module-level dict literal of strings
    (elf/__init__.py's _LAZY: attribute -> submodule)."""
    import ast

    tables = {}
    for name, path in _module_files().items():
        for node in ast.parse(path.read_bytes()).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Dict)
                    and all(isinstance(v, ast.Constant) and isinstance(v.value, str)
                            for v in node.value.values)):
                tables[(name, node.targets[0].id)] = tuple(v.value for v in node.value.values)
    return tables


_LAZY_TABLES = _lazy_tables()


def _daemon_closure() -> set[str]:
    """Every initsplit module the daemon can import, from its entry points through
    the import graph (a module's packages are imported with it)."""
    graph = _import_graph()
    seen: set[str] = set()
    todo = list(DAEMON_ENTRY_POINTS)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:n]) for n in range(1, len(parts))]
        todo += sorted(graph[name])
    return seen


def test_daemon_reaches_no_cli_report_or_plot_code() -> None:
    """By the daemon's source, not only what it imports at start: no path of
    imports, however lazy, leads from initsplitd to the command line, its reports,
    the tree splitter or the signer; and it does reach the splitter it may need at
    boot (so the walk is not blind to lazy imports)."""
    closure = _daemon_closure()
    assert not closure & set(NEVER), sorted(closure & set(NEVER))
    lazy = {"initsplit.split.splitter", "initsplit.elf.reader", "initsplit.elf.writer",
            "initsplit.layout.models", "initsplit.layout.linux612", "initsplit.validate"}
    assert lazy <= closure, sorted(lazy - closure)


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


def test_exit_report_says_whether_the_daemon_split_on_the_fly() -> None:
    """report_splitter_use() (daemon/main.py, at exit) reads the proof from
    sys.modules: it names the modules SplitProvider imports at its first split on
    the fly and nowhere else (daemon/splits.py _split_now(), _rewritten())."""
    from initsplit.daemon import main

    splits = (REPO / "daemon/initsplit/daemon/splits.py").read_text()
    for name in main.ON_THE_FLY_MODULES:
        assert f"from ..{name.removeprefix('initsplit.')} import" in splits, name
    code = ("import json, sys\n"
            "from initsplit.daemon.journal import Reporter\n"
            "from initsplit.daemon.main import report_splitter_use\n"
            "seen = []\n"
            "reporter = Reporter(max_priority=7, sink=lambda e: seen.append(dict(e)))\n"
            "report_splitter_use(reporter)\n"
            "import initsplit.split.decide\n"
            "report_splitter_use(reporter)\n"
            "print(json.dumps(seen))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO / "daemon", check=True,
                         capture_output=True, text=True).stdout
    cached, on_the_fly = json.loads(out)
    assert cached["INITSPLIT_SPLIT_ON_THE_FLY"] == "no", cached
    assert on_the_fly["INITSPLIT_SPLIT_ON_THE_FLY"] == "yes", on_the_fly
    assert "initsplit.split.decide" in on_the_fly["MESSAGE"], on_the_fly


def test_launcher_keeps_openssl_out_as_the_initramfs_does() -> None:
    """bin/initsplitd blocks what python-closure.py leaves out of the initramfs
    (_hashlib: libcrypto, 3.6 MB of the real-root daemon's RSS), so the daemon
    hashes with the built-in SHA-256 on the real root too, and gets the same digest."""
    closure = (REPO / "dracut/90initsplit/python-closure.py").read_text()
    assert 'EXCLUDED = ("_hashlib",)' in closure
    code = ("import runpy, sys\n"
            "sys.argv = ['initsplitd', '--help']\n"
            "try:\n"
            f"    runpy.run_path({str(REPO / 'bin/initsplitd')!r}, run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "import hashlib\n"
            "print('initsplit.cache' in sys.modules, sys.modules.get('_hashlib', 'absent'),\n"
            "      hashlib.sha256.__module__, hashlib.sha256(b'abc').hexdigest())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO / "daemon", check=True,
                         capture_output=True, text=True).stdout.split()
    # The built-in module: _sha256 up to Python 3.11, _sha2 since 3.12 (OpenSSL's is _hashlib).
    assert out[-4:-1] == ["True", "None", {True: "_sha2", False: "_sha256"}[sys.version_info >= (3, 12)]], out
    assert out[-1] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", out
