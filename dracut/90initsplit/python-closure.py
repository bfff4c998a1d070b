"""List the files initsplitd needs from the Python installation, for the initramfs.

Run by module-setup.sh with the image's own interpreter, the way the daemon runs it
(``/usr/bin/python3 -I``), inside the root the image is built from. It imports the
daemon and everything the daemon can import later (function-level imports found in
its source, the on-the-fly split stack), loads the shared libraries the daemon opens
through ctypes, and prints one absolute path per line:

* every imported module's file: the .py (and, with --bytecode, its up-to-date
  __pycache__ .pyc), or the extension module (.so);
* the whole of the third-party packages the daemon uses (pyudev, systemd,
  elftools): they import parts of themselves lazily;
* the files Python needs to start: os.py (the landmark getpath looks for), the
  encodings it may need for the C/UTF-8 locale (an initramfs has no other locale);
* every shared object mapped into this process once all that is loaded, which
  includes the libraries behind ctypes (libkmod.so.2, libudev.so.1), the extension
  modules' own libraries (libsystemd.so.0, libffi) and libc. dracut resolves
  libraries only for executable files, and extension modules are 0644.

Not the whole standard library: only what is imported. _hashlib (OpenSSL, ~5 MB)
is kept out on purpose: hashlib then uses its built-in SHA-256, which is all the
split cache's manifests need.

Usage: python3 -I python-closure.py [--bytecode] [--libdir /usr/lib/initsplit/python]
Exit status 1 (with the reason on stderr) if something the daemon needs cannot be
imported; the dracut module then refuses to build a half-working image.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import sys
from pathlib import Path

# Modules left out of the image (see the docstring). Blocked before anything is
# imported, so the import graph below is the one the image will see.
EXCLUDED = ("_hashlib",)

# initsplit's command line and what only it uses: split, check, analyze and its
# plot, splitting whole trees in parallel with their summaries (tree), signing
# with a private key on the host (signing). The daemon never imports them
# (tests/test_import_closure.py), so neither they nor what only they import
# (analyze's xml.sax, which pulls in urllib, http and email) go into the image.
NOT_IN_IMAGE = ("initsplit.cli", "initsplit.analyze", "initsplit.__main__", "initsplit.tree",
                "initsplit.signing")

# What initsplitd imports, directly or on first use.
ENTRY_POINTS = (
    "initsplit.daemon.main",
    "initsplit.daemon.service",
    "initsplit.daemon.journal",
    "initsplit.daemon.notify",
    "initsplit.daemon.udev_source",
    "initsplit.kmod.resolver",
    # Splitting a module at boot when the pre-split cache lacks it (imported on
    # first use: initsplit.split and initsplit.layout import these lazily).
    "initsplit.split",
    "initsplit.split.decide",
    "initsplit.split.splitter",
    "initsplit.layout.linux61",
    "initsplit.layout.linux612",
    # Compressed modules (NAME.ko.xz on Debian 13): lzma, gzip/zlib and liblzma.
    "initsplit.modfile",
    "initsplit.validate",
    "initsplit.elf",
)

# Third-party packages installed whole: their lazy imports are not worth chasing.
PACKAGES = ("pyudev", "systemd", "elftools")

# Codecs Python may look up while starting in an initramfs. Only the C and C.UTF-8
# locales exist there, so the file system and stdio encodings are UTF-8 (PEP 538/540
# coerce C to UTF-8); ascii and latin_1 are what CPython falls back to.
ENCODINGS = ("encodings", "encodings.aliases", "encodings.utf_8", "encodings.ascii",
             "encodings.latin_1")


def lazy_imports(path: Path, package: str | None) -> set[str]:
    """Absolute names of every module imported anywhere in the file, including
    inside functions (which a plain import of the module does not run)."""
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (OSError, SyntaxError, ValueError):
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                if package is None:
                    continue
                try:
                    base = importlib.util.resolve_name("." * node.level + base, package)
                except ImportError:
                    continue
            if base:
                names.add(base)
                # "from pkg import sub" may name a submodule.
                names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def package_modules(root: Path, name: str) -> list[tuple[str, Path]]:
    """(module name, file) of every .py below the package directory root/name."""
    out = []
    for path in sorted((root / name).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append((".".join(parts), path))
    return out


def try_import(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # optional imports (PyQt adapters, Windows modules...) may fail
        return False
    except SystemExit:
        return False


def mapped_objects() -> set[str]:
    """Files of every shared object mapped into this process."""
    found = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(None, 5)
            if len(parts) == 6:
                path = parts[5].strip()
                if path.startswith("/") and ".so" in os.path.basename(path):
                    found.add(path)
    return found


def exercise() -> None:
    """Open what the daemon opens at run time, so the libraries get mapped."""
    from initsplit.kmod import _libkmod
    from systemd import daemon, journal  # noqa: F401  (libsystemd through the extensions)

    _libkmod.libkmod()
    _libkmod.libc()
    import pyudev

    pyudev.Context()  # loads libudev.so.1 (pyudev opens it with ctypes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--libdir", default="/usr/lib/initsplit/python",
                        help="where the initsplit package is installed")
    parser.add_argument("--bytecode", action="store_true",
                        help="also list each module's up-to-date __pycache__ file")
    args = parser.parse_args()

    for name in EXCLUDED + NOT_IN_IMAGE:
        sys.modules[name] = None  # type: ignore[assignment]  # "import x" now raises ImportError
    libdir = Path(args.libdir)
    sys.path.insert(0, str(libdir))

    problems = []
    for name in ENTRY_POINTS + ENCODINGS:
        try:
            importlib.import_module(name)
        except Exception as exc:
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
    try:
        exercise()
    except Exception as exc:
        problems.append(f"loading the daemon's libraries: {type(exc).__name__}: {exc}")
    if problems:
        for problem in problems:
            print(f"python-closure: cannot import {problem}", file=sys.stderr)
        return 1

    # Function-level imports (which importing a module does not run) of every module
    # of initsplit and of the packages above that is imported by now, repeated until
    # nothing new comes in. Optional imports that fail here would fail in the image
    # too, and are left out.
    roots = [libdir / "initsplit"]
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            roots += [Path(p) for p in spec.submodule_search_locations]
    # Every other module of initsplit's package, so that any the daemon reaches by
    # a path the chase below does not see is in the image with what it imports.
    mains = []  # run as scripts (python3 -m initsplit.daemon), never imported
    for modname, path in package_modules(libdir, "initsplit"):
        if modname in NOT_IN_IMAGE:
            continue
        if modname.endswith("__main__"):
            mains.append(str(path.resolve()))
        else:
            try_import(modname)
    scanned: set[str] = set()
    while True:
        todo = {name: module for name, module in list(sys.modules.items())
                if name not in scanned and module is not None
                and _below(getattr(module, "__file__", None), roots)}
        if not todo:
            break
        for name, module in todo.items():
            scanned.add(name)
            path = Path(module.__file__)
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]
            for wanted in sorted(lazy_imports(path, package)):
                if wanted not in sys.modules and not wanted.endswith("__main__"):
                    try_import(wanted)

    files: set[str] = set()

    def add_source(path: str) -> None:
        files.add(path)
        if args.bytecode and path.endswith(".py"):
            cached = importlib.util.cache_from_source(path)
            if _fresh(path, cached):
                files.add(cached)

    for name, module in list(sys.modules.items()):
        if name == "__main__":  # this script
            continue
        path = getattr(module, "__file__", None)
        if module is None or not path or not os.path.isabs(path):
            continue
        if os.path.exists(path):
            add_source(path)
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            for path in Path(location).rglob("*"):
                if path.is_file() and path.suffix in (".py", ".so") and "__pycache__" not in path.parts:
                    add_source(str(path))
    for path in mains:
        add_source(path)
    # getpath's landmark for the standard library's prefix.
    add_source(os.path.join(os.path.dirname(os.__file__), "os.py"))
    files |= mapped_objects()
    files.add(os.path.realpath(sys.executable))
    for path in sorted(files):
        print(path)
    return 0


def _below(path: str | None, roots: list[Path]) -> bool:
    if not path:
        return False
    return any(Path(path).is_relative_to(root) for root in roots)


def _fresh(source: str, cached: str) -> bool:
    """Does the .pyc match the source's mtime and size (timestamp-based pyc)?"""
    try:
        with open(cached, "rb") as fh:
            header = fh.read(16)
        st = os.stat(source)
    except OSError:
        return False
    if len(header) < 16 or header[:4] != importlib.util.MAGIC_NUMBER:
        return False
    flags = int.from_bytes(header[4:8], "little")
    if flags != 0:  # hash-based pyc: valid regardless of timestamps
        return True
    mtime = int.from_bytes(header[8:12], "little")
    size = int.from_bytes(header[12:16], "little")
    return mtime == (int(st.st_mtime) & 0xFFFFFFFF) and size == (st.st_size & 0xFFFFFFFF)


if __name__ == "__main__":
    sys.exit(main())
