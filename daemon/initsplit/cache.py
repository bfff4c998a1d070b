"""The split cache: split modules laid out like the module tree, with a manifest per module.

For a module at RELPATH (relative to /lib/modules/KVER) the cache holds
RELPATH (the core module, same file name), DIR/NAME__init.ko (the init module)
and RELPATH.initsplit (JSON: the source's SHA-256 and size, the decision and its
reason). The manifest is written last, so an entry without one is incomplete and
ignored. The pre-split cache is built by `initsplit split` at image build time;
the daemon keeps the splits it makes on the fly in the same layout under /run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from .fsio import (OpenFile, Untrusted, atomic_write, make_dirs, open_checked, ownership_problem,
                   read_fd, sha256_fd)
from .modfile import CompressedModuleError, ModuleChangedError, ModuleDigest
from .modsig import SIGNATURE_TRAILER
from .modsig import signature_problem as file_signature_problem
from .split.policy import DEFAULT_OPTIONS

MANIFEST_SUFFIX = ".initsplit"
# 2: the init module reports a failed init biased (split/initresult.py) and C hides
# its exports until init succeeded. 3: the init wrapper carries the name of the
# original's init routine, so initcall_blacklist= applies (splitter._initcall_name).
# 4: decisions weigh the layouts (split/decide.py): "plain" entries, and the
# options they were made under. 5: Discard= classes: C without its BTF, and for
# a module loaded plain the rewritten original at RELPATH. 6: one anchor (I
# reaches C by offsets, checked against the kernel before I is loaded: reached),
# the kallsyms-data class and what it gives back. 7: the slab a two-stage load
# takes more than the plain one (twostage_slab_bytes). 8: who signed the modules
# (signer), for kernels that enforce module signatures, and 6.12 splits, I reaching
# C from one anchor per struct module_memory type (reached_from). Entries of an
# older format are not used, but for 7: its entries are 8's with signer "" (unsigned)
# and no reached_from, for modules of a build whose layout is 6.1's only: format 7's
# splitter refused every module of a struct module_memory kernel (6.12) as an
# "unsupported kernel", a verdict 8's splitter no longer makes, so such an entry is
# stale (_format_7_problem()).
FORMAT = 8
READ_FORMATS = (7, 8)

# What a manifest records of split.decide.Decision: its outcome, one of those
# the daemon can use ("invalid" and "error" get no entry). "plain": the module
# splits, but the options load it plain (the reason says why).
ManifestDecision = Literal["split", "plain", "nothing", "refused"]
DECISIONS: tuple[ManifestDecision, ...] = ("split", "plain", "nothing", "refused")


@dataclass(frozen=True, slots=True)
class Manifest:
    format: int
    source_sha256: str
    source_size: int
    decision: ManifestDecision
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
    # split.decide.SplitOptions.tag of the options the decision was made under.
    options: str = ""
    # The Discard= classes dropped ("btf"), from C or, for a plain load, from the
    # original rewritten at RELPATH (then core_size and core_sha256 describe it).
    discarded: str = ""
    # What the kernel would keep for the original's BTF (layout/btf.py): what
    # dropping it gives back.
    btf_bytes: int = 0
    # Core layout bytes of the data symbols' kallsyms in a plain load: what
    # Discard=kallsyms-data gives back.
    kallsyms_bytes: int = 0
    # For a split: "SECTION=OFFSET ..." for each section of C that I reaches, its
    # offset from C's struct module by the layout model (SplitModule.reached).
    reached: str = ""
    # For a split on 6.12 instead: "SECTION=ANCHOR=OFFSET ...", each section's offset
    # from its memory's anchor section (SplitModule.reached_from).
    reached_from: str = ""
    # For a split: the unreclaimable slab the two-stage load takes more than the
    # plain one (layout/twostage_slab.py), which the journal counts against it.
    twostage_slab_bytes: int = 0
    # Who signed the entry's modules (C, I, a rewritten original) when the cache was
    # built, "SUBJECT (sha256 FINGERPRINT)" of the certificate (signing.py), or ""
    # for unsigned ones. Only signed entries are loaded where the kernel enforces
    # module signatures (daemon/splits.py, with signature_problem() on the files).
    signer: str = ""


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_entry(root: Path, relpath: Path, *, source: bytes, decision: ManifestDecision, reason: str = "",
                name: str = "", init_name: str = "", core: bytes = b"", init: bytes = b"",
                plain_core_bytes: int = 0, init_layout_pages: int = 0,
                options: str = DEFAULT_OPTIONS.tag, discarded: str = "", btf_bytes: int = 0,
                kallsyms_bytes: int = 0, reached: tuple[tuple[str, int], ...] = (),
                reached_from: tuple[tuple[str, str, int], ...] = (),
                twostage_slab_bytes: int = 0, rewritten: bytes | None = None,
                signer: str = "") -> Manifest:
    """Write one cache entry (files first, manifest last), decided under *options*
    (split.policy.SplitOptions.tag). *rewritten*: for a module loaded plain, the
    original without the *discarded* classes, loaded instead of it. *signer*: who
    signed *core*, *init* and *rewritten* (they are given signed)."""
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
    elif rewritten is not None:
        core = rewritten
        atomic_write(core_path, core)
    # Nothing else is removed: a file at RELPATH that this manifest does not name
    # (with its hash) is never opened (read_entry).
    manifest = Manifest(FORMAT, digest(source), len(source), decision, reason, name, init_name,
                        init_file, len(core), len(init), digest(core) if core else "",
                        digest(init) if init else "", plain_core_bytes, init_layout_pages, options,
                        discarded, btf_bytes, kallsyms_bytes, render_reached(reached),
                        render_reached_from(reached_from), twostage_slab_bytes, signer)
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
class BadEntry:
    """An entry that exists but must not be used, and why ("cache entry X is a symlink")."""

    reason: str


@dataclass(frozen=True, slots=True)
class CacheHit:
    """A usable entry. For a split, core and init are open; for a plain load of a
    rewritten original, core is: the caller loads from them and closes."""

    manifest: Manifest
    core: OpenFile | None = None
    init: OpenFile | None = None

    def close(self) -> None:
        for f in (self.core, self.init):
            if f is not None:
                f.close()

    def __enter__(self) -> CacheHit:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


# A manifest is a few hundred bytes; anything this large is not one.
_MANIFEST_LIMIT = 1 << 16


def read_entry(root: Path, relpath: Path, *, source: bytes | ModuleDigest,
               options: str | None = None) -> CacheHit | BadEntry | None:
    """The entry for *relpath* if it exists, is complete, and was made from *source*
    (and, given *options*, under those options: split.decide.SplitOptions.tag).
    *source* is the module's bytes or their digest (modfile.ModuleDigest, which the
    daemon passes: it never holds a whole module to check an entry).

    None: there is no entry (no manifest), or it was made under other options,
    which the caller decides afresh. BadEntry: there is one, but it must not be used. Every file is opened once (fsio.open_checked) and checked, hashed and
    returned as that descriptor, so the bytes checked here are the bytes the kernel
    is given; nothing is opened again by path.

    The directories from *root* down to the entry must be real directories only
    root or the daemon can write; *root* itself and everything above it is the
    caller's to check (fsio.directory_problem), once per root rather than per entry.
    """
    problem = _entry_directory_problem(root, relpath)
    if problem:
        return BadEntry(f"cache entry directory {problem}")
    path = manifest_path(root, relpath)
    try:
        with open_checked(path) as f:
            raw = read_fd(f.fileno(), limit=_MANIFEST_LIMIT)
    except FileNotFoundError:
        return None
    except Untrusted as exc:
        return BadEntry(f"cache entry {exc}")
    except OSError as exc:
        return BadEntry(f"cache entry {path}: {exc.strerror}")
    try:
        manifest = parse_manifest(raw)
    except ValueError as exc:
        return BadEntry(f"cache entry {path} is corrupt: {exc}")
    problem = _manifest_problem(manifest, source)
    if problem:
        return BadEntry(f"cache entry {path} {problem}")
    # "nothing" and "refused" do not depend on the options.
    if options is not None and manifest.options != options and manifest.decision in ("split", "plain"):
        return None
    if manifest.decision != "split":
        if not manifest.core_sha256:
            return CacheHit(manifest)  # the original is loaded as it is
        return _open_files(manifest, ((root / relpath, manifest.core_size, manifest.core_sha256),))
    return _open_split(root / relpath, manifest)


def _entry_directory_problem(root: Path, relpath: Path) -> str | None:
    directory = root
    for part in relpath.parent.parts:
        directory = directory / part
        try:
            info = os.lstat(directory)
        except FileNotFoundError:
            return None  # no entry below: read_entry finds no manifest
        except OSError as exc:
            return f"{directory}: {exc.strerror}"
        if stat.S_ISLNK(info.st_mode):
            return f"{directory} is a symlink"  # `initsplit split` writes none
        if not stat.S_ISDIR(info.st_mode):
            return f"{directory} is not a directory"
        problem = ownership_problem(info)
        if problem:
            return f"{directory} {problem}"
    return None


def render_reached(reached: tuple[tuple[str, int], ...]) -> str:
    return " ".join(f"{name}={offset}" for name, offset in reached)


# What render_reached() and render_reached_from() write for an offset: str() of an
# int, so plain ASCII decimal with a "-" for the negative ones (6.1's sections
# before C's struct module), no "+", blanks, "_", leading zeros or other digits,
# all of which int() would take.
_OFFSET = re.compile(r"-?(?:0|[1-9][0-9]*)", re.ASCII)


def _offset(text: str, field: str, item: str) -> int:
    if not _OFFSET.fullmatch(text) or text == "-0":
        raise ValueError(f"{field}: bad offset {text!r} in {item!r} (not plain decimal)")
    return int(text)


def parse_reached(text: str) -> tuple[tuple[str, int], ...]:
    """Manifest.reached back as pairs; ValueError for anything else."""
    out = []
    for item in text.split(" ") if text else ():
        name, sep, offset = item.rpartition("=")
        if not sep or not name or "/" in name:
            raise ValueError(f"reached: bad item {item!r}")
        out.append((name, _offset(offset, "reached", item)))
    return tuple(out)


def render_reached_from(reached_from: tuple[tuple[str, str, int], ...]) -> str:
    for name, anchor, _ in reached_from:
        if "=" in name or "=" in anchor:
            raise ValueError(f"reached_from: a section name with '=' ({name!r}, {anchor!r})")
    return " ".join(f"{name}={anchor}={offset}" for name, anchor, offset in reached_from)


def parse_reached_from(text: str) -> tuple[tuple[str, str, int], ...]:
    """Manifest.reached_from back as triples; ValueError for anything else."""
    out = []
    for item in text.split(" ") if text else ():
        parts = item.split("=")
        if len(parts) != 3 or not all(parts[:2]) or any("/" in p for p in parts[:2]):
            raise ValueError(f"reached_from: bad item {item!r}")
        out.append((parts[0], parts[1], _offset(parts[2], "reached_from", item)))
    return tuple(out)


def parse_manifest(raw: bytes) -> Manifest:
    """The manifest in *raw*; ValueError says what is wrong with it."""
    try:
        fields = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise ValueError("not a JSON object")
    try:
        manifest = Manifest(**fields)
    except TypeError as exc:
        raise ValueError(str(exc).replace("Manifest.__init__() ", "")) from None
    for field in dataclasses.fields(Manifest):
        value = getattr(manifest, field.name)
        wanted = int if field.type == "int" else str
        if type(value) is not wanted:  # noqa: E721  (bool is an int, and no field is one)
            raise ValueError(f"{field.name} is {type(value).__name__}, not {wanted.__name__}")
    if manifest.decision not in DECISIONS:
        raise ValueError(f"unknown decision {manifest.decision!r}")
    parse_reached(manifest.reached)
    parse_reached_from(manifest.reached_from)
    if manifest.decision == "split" and not manifest.reached and not manifest.reached_from:
        raise ValueError("a split without the placement of C that I reaches")
    # One anchor (6.1) or one per memory (6.12): a splitter writes one of the two
    # (SplitModule.reached or .reached_from), and the loader would check only one.
    if manifest.reached and manifest.reached_from:
        raise ValueError("both reached and reached_from (a split has one anchor or one per memory)")
    return manifest


def _manifest_problem(manifest: Manifest, source: bytes | ModuleDigest) -> str | None:
    if manifest.format not in READ_FORMATS:
        return f"has format {manifest.format}, not {FORMAT}"
    if manifest.format < 8 and (manifest.signer or manifest.reached_from):
        return f"has format {manifest.format}, which records no signer and no reached_from"
    if isinstance(source, ModuleDigest):
        size, sha256 = source.size, source.sha256
    else:
        size, sha256 = len(source), digest(source)
    if manifest.source_size != size or manifest.source_sha256 != sha256:
        return "is stale: it was made from another version of the module"
    if manifest.format == 7:
        if isinstance(source, ModuleDigest):
            try:
                source = source.read()
            except (OSError, CompressedModuleError, ModuleChangedError) as exc:
                return f"cannot be checked: {exc}"
        problem = _format_7_problem(source)
        if problem:
            return problem
    if manifest.decision != "split":
        return None
    # The init module must be the file beside the core that this manifest's own
    # init module name gives, never another module's nor a path elsewhere.
    expected = f"{manifest.init_name}.ko"
    if not manifest.init_name.endswith("__init") or "/" in manifest.init_name \
            or manifest.init_file != expected:
        return f"names init module file {manifest.init_file!r} (expected {expected!r})"
    return None


def _format_7_problem(source: bytes) -> str | None:
    """None when a format 7 entry of the module in *source* says what format 8's
    would: the module's build is one split/tables.KERNEL_TABLES knows, keyed by its
    module_layout CRC as the splitter keys it, with 6.1's layout (no struct
    module_memory). Format 7's splitter refused every 6.12 module ("unsupported
    kernel"); its entries of such a build, or of one not known, are stale."""
    # Imported here, for format 7 entries only: the daemon's start stays without
    # the ELF package (tests/test_import_closure.py); discard.sections() reads the
    # section headers without pyelftools.
    from .elf import MalformedElf
    from .elf.discard import sections
    from .split.tables import kernel_tables, module_layout_crc

    stale = "has format 7, made by a splitter that refused every 6.12 module, and is stale"
    try:
        versions = next((s for s in sections(source) if s.name == "__versions"), None)
    except MalformedElf as exc:
        return f"{stale}: the module's build is not known ({exc})"
    crc = module_layout_crc(source[versions.offset:versions.offset + versions.size]) \
        if versions is not None else None
    kernel = kernel_tables(crc)
    if kernel is None:
        what = "no module_layout CRC" if crc is None else f"module_layout CRC {crc:#010x}"
        return f"{stale}: the module's build is not known ({what})"
    if kernel.has_module_memory:
        return f"{stale} for this kernel build ({kernel.kernel}, struct module_memory)"
    return None


def signature_problem(hit: CacheHit) -> str | None:
    """None when every module of *hit* (C and I, or the rewritten original) is signed,
    by the manifest and by the files' own appended signatures; else why not.

    Read from the hit's open descriptors, whose bytes read_entry() hashed: these
    are the bytes the kernel is given. A hit without files (the original is loaded
    as it is, the distribution's signature intact) has nothing to be signed.
    """
    files = [f for f in (hit.core, hit.init) if f is not None]
    if files and not hit.manifest.signer:
        return "the cache entry is not signed"
    for f in files:
        size = os.fstat(f.fileno()).st_size
        tail = os.pread(f.fileno(), SIGNATURE_TRAILER, max(0, size - SIGNATURE_TRAILER))
        problem = file_signature_problem(tail, size)
        if problem:
            return f"{f.label}: {problem}"
    return None


def _open_split(core_path: Path, manifest: Manifest) -> CacheHit | BadEntry:
    return _open_files(manifest, (
        (core_path, manifest.core_size, manifest.core_sha256),
        (core_path.with_name(manifest.init_file), manifest.init_size, manifest.init_sha256)))


def _open_files(manifest: Manifest, wanted: tuple[tuple[Path, int, str], ...]) -> CacheHit | BadEntry:
    """The entry's files opened and checked against the manifest: (core[, init])."""
    with ExitStack() as opened:  # closes what was opened unless the hit is returned
        files: list[OpenFile] = []
        for path, size, sha256 in wanted:
            try:
                f = opened.enter_context(open_checked(path))
                if sha256_fd(f.fileno()) != (sha256, size):
                    return BadEntry(f"cache entry {path} does not match its manifest "
                                    "(changed since it was split)")
            except Untrusted as exc:
                return BadEntry(f"cache entry {exc}")
            except OSError as exc:
                return BadEntry(f"cache entry {path}: {exc.strerror}")
            files.append(f)
        opened.pop_all()
        return CacheHit(manifest, *files)
