"""The split cache: split modules laid out like the module tree, with a manifest per module.

For a module at RELPATH (relative to /lib/modules/KVER) the cache holds
RELPATH (the core module, same file name), DIR/NAME__init.ko (the init module)
and RELPATH.initsplit (JSON: the source's SHA-256 and size, the decision and its
reason). The manifest is written last, so an entry without one is incomplete and
ignored. The pre-split cache is built by `initsplit split` at image build time;
the daemon keeps the splits it makes on the fly in the same layout under /run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from .fsio import atomic_write, make_dirs

MANIFEST_SUFFIX = ".initsplit"
FORMAT = 1

Decision = Literal["split", "nothing", "refused"]


@dataclass(frozen=True, slots=True)
class Manifest:
    format: int
    source_sha256: str
    source_size: int
    decision: Decision
    reason: str = ""
    name: str = ""
    init_name: str = ""
    init_file: str = ""
    core_size: int = 0
    init_size: int = 0
    core_sha256: str = ""
    init_sha256: str = ""
    # From the section headers with the kernel's page rounding (initsplit.analyze):
    # the original's core layout if loaded plain, and the init module's init layout,
    # which the kernel frees right after the init routine ran.
    plain_core_bytes: int = 0
    init_layout_pages: int = 0


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_entry(root: Path, relpath: Path, *, source: bytes, decision: Decision, reason: str = "",
                name: str = "", init_name: str = "", core: bytes = b"", init: bytes = b"",
                plain_core_bytes: int = 0, init_layout_pages: int = 0) -> Manifest:
    """Write one cache entry (files first, manifest last)."""
    core_path = root / relpath
    manifest_path(root, relpath).unlink(missing_ok=True)
    # Never group- or world-writable, whatever the umask: the daemon refuses
    # entries below such a directory.
    make_dirs(core_path.parent)
    init_file = ""
    if decision == "split":
        init_file = f"{init_name}.ko"
        atomic_write(core_path, core)
        atomic_write(core_path.with_name(init_file), init)
    manifest = Manifest(FORMAT, digest(source), len(source), decision, reason, name, init_name,
                        init_file, len(core), len(init), digest(core) if core else "",
                        digest(init) if init else "", plain_core_bytes, init_layout_pages)
    atomic_write(manifest_path(root, relpath), json.dumps(asdict(manifest), sort_keys=True).encode())
    return manifest


def manifest_path(root: Path, relpath: Path) -> Path:
    core_path = root / relpath
    return core_path.with_name(core_path.name + MANIFEST_SUFFIX)


def remove_entry(root: Path, relpath: Path, init_name: str) -> None:
    """Remove an entry: manifest first, so a half-removed entry is never used."""
    manifest_path(root, relpath).unlink(missing_ok=True)
    (root / relpath).unlink(missing_ok=True)
    (root / relpath).with_name(f"{init_name}.ko").unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class CacheHit:
    manifest: Manifest
    core: Path
    init: Path | None


def read_entry(root: Path, relpath: Path, *, source: bytes) -> CacheHit | None:
    """The entry for *relpath* if it exists, is complete, and was made from *source*."""
    core_path = root / relpath
    try:
        raw = json.loads(manifest_path(root, relpath).read_bytes())
        manifest = Manifest(**raw)
    except (OSError, ValueError, TypeError):
        return None
    if manifest.format != FORMAT or manifest.source_size != len(source):
        return None
    if manifest.source_sha256 != digest(source):
        return None
    if manifest.decision != "split":
        return CacheHit(manifest, core_path, None)
    init_path = core_path.with_name(manifest.init_file)
    if "/" in manifest.init_file or not manifest.init_file.endswith("__init.ko"):
        return None
    # The loader hands these paths to the kernel: make sure they are what was written.
    try:
        if digest(core_path.read_bytes()) != manifest.core_sha256 or \
                digest(init_path.read_bytes()) != manifest.init_sha256:
            return None
    except OSError:
        return None
    return CacheHit(manifest, core_path, init_path)
