"""Where the daemon gets a module's split from: the pre-split cache, or a split made now.

Whatever the source, the pair handed to the loader holds open descriptors of the
very bytes that were checked: a cache entry's files as opened and hashed by
cache.read_entry, or, for a split made now, the validated bytes themselves in
sealed memory files. The loader never opens a split module by path.

The daemon loads unsigned kernel code from the cache and runtime directories, so
it trusts them only as far as nobody but root (or the daemon's own user) could
have written them: the directory and every directory above it (fsio.directory_problem),
the entry's directories and its files (cache.read_entry). Anything else costs a
plain load of the original with the reason; a directory's reason is also logged
once, since it concerns every module.

On a kernel that enforces module signatures (``signed_only``: Secure Boot's
lockdown, module.sig_enforce=1) a split made now, or kept in the runtime
directory, is unsigned and would be refused: only pre-split cache entries whose
modules are signed (cache.signature_problem()) are used, and every other module is
loaded plain as its original, which its distribution signed. Nothing is split at
boot there. Whether the kernel trusts the signer only finit_module() can tell; a
refused C falls back to a plain load (loader/twostage.py). How to get a signed
cache is said once (ENABLE_SIGNING).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache import (MANIFEST_SUFFIX, BadEntry, CacheHit, Manifest, parse_manifest, parse_reached,
                     parse_reached_from, read_entry, signature_problem, write_entry)
from ..fsio import OpenFile, Untrusted, directory_problem, is_leftover_temp, open_checked, read_fd, sealed_memfd
from ..loader.twostage import SplitPair
from ..modfile import (CompressedModuleError, ModuleChangedError, ModuleDigest, is_module_file, module_file_name,
                       uncompressed_path)
from ..split.names import init_module_name
from ..split.policy import DEFAULT_OPTIONS, SplitOptions

log = logging.getLogger(__name__)

# Said once where the kernel enforces signatures and the cache has no signed entry
# for a module (README "Secure Boot").
ENABLE_SIGNING = (
    "to load modules two-stage here, sign the pre-split cache with a key the kernel "
    "trusts: make one with 'initsplit key create' (or use DKMS's /var/lib/dkms/mok.key), "
    "enroll its certificate with 'mokutil --import /var/lib/initsplit/mok.pub' (or "
    "/var/lib/dkms/mok.pub) and confirm at the next boot, name it in [Signing] of "
    "/etc/initsplit/initsplitd.conf if it is elsewhere (SignKey=, SignCert=), then "
    "rebuild the cache and the initramfs ('/etc/kernel/postinst.d/initsplit $(uname -r)', "
    "'dracut --force')")


@dataclass(frozen=True, slots=True)
class NotSplit:
    """Load the module plain, for this reason: the original, or *rewritten*."""

    reason: str
    # The original without the Discard= classes (open, from the cache or a sealed
    # memfd), loaded instead of it; whoever holds it closes it.
    rewritten: OpenFile | None = None
    # What the kernel would keep for the original's BTF, and the core layout
    # bytes of its data symbols' kallsyms: given back by *rewritten*.
    btf_bytes: int = 0
    kallsyms_bytes: int = 0

    def close(self) -> None:
        if self.rewritten is not None:
            self.rewritten.close()


class SplitProvider:
    """Finds or makes the split of a module, refusing anything outside the module tree."""

    def __init__(self, *, modules_dir: Path, cache_dir: Path, runtime_dir: Path,
                 report: Callable[[str], None] | None = None,
                 options: SplitOptions = DEFAULT_OPTIONS, signed_only: bool = False) -> None:
        self.modules_dir = modules_dir.resolve()
        self.cache_dir = cache_dir
        self.runtime_dir = runtime_dir
        # Which splits are loaded two-stage; an entry decided under other options
        # is decided again here (split/decide.py).
        self.options = options
        # The kernel loads signed modules only: signed cache entries or the original.
        self.signed_only = signed_only
        # Where a directory's problem is said once (the daemon's stderr goes to the journal).
        self._report = report or log.warning
        self._reported: set[str] = set()
        self._lock = threading.Lock()  # get() runs on the worker threads

    def remove_leftover_temps(self) -> int:
        """Remove the temp files a daemon killed while keeping a split left in the
        runtime directory (fsio.atomic_write names them); returns how many.

        /run is memory: a daemon restarted after every kill must not leave a dead
        split's bytes behind each time. Only in a trusted runtime directory, and
        without following symlinks; run before any load, when nothing writes there.
        """
        if not self.runtime_dir.is_dir() or self._directory_problem(self.runtime_dir, "runtime"):
            return 0
        removed = 0
        for parent, _, files in os.walk(self.runtime_dir):
            for name in files:
                if is_leftover_temp(name):
                    try:
                        os.unlink(os.path.join(parent, name))
                        removed += 1
                    except OSError:
                        pass
        return removed

    def release_runtime_splits(self) -> int:
        """Remove the splits and decisions made at boot from the runtime directory;
        the bytes of memory freed (the file system's pages, st_blocks).

        They are kept there for a daemon that systemd restarts after a failure
        (its recovery and coldplug need them again), but /run is memory: after a
        clean exit nobody does, and each split would cost its module's size again
        until the machine reboots, each decision a page of tmpfs and an inode (a
        module loaded plain has a manifest only; 60 of them, the whole boot of a
        6.1 machine with the defaults, would keep about 300 kB). A later daemon
        decides again. Manifest first, as remove_entry() does, so a
        half-removed entry is never used; symlinks are not followed, nothing outside
        the entry's own directory is touched, and never the pre-split cache.
        """
        if not self.runtime_dir.is_dir() or self._directory_problem(self.runtime_dir, "runtime"):
            return 0
        try:
            runtime, cache = self.runtime_dir.resolve(), self.cache_dir.resolve()
        except OSError:
            return 0
        if runtime == cache or cache in runtime.parents or runtime in cache.parents:
            return 0
        freed = 0
        for parent, _, files in os.walk(runtime):
            for name in files:
                if name.endswith(MANIFEST_SUFFIX):
                    freed += self._release_entry(Path(parent) / name)
        return freed

    @staticmethod
    def _release_entry(manifest: Path) -> int:
        try:
            with open_checked(manifest) as f:
                entry = parse_manifest(read_fd(f.fileno(), limit=1 << 16))
        except (OSError, Untrusted, ValueError):
            return 0
        core = manifest.with_name(manifest.name.removesuffix(MANIFEST_SUFFIX))
        init_file = entry.init_file or f"{init_module_name(module_file_name(core.name))}.ko"
        if "/" in init_file or not init_file.endswith("__init.ko"):
            return 0
        freed = 0
        for path in (manifest, core, core.with_name(init_file)):
            try:
                # What tmpfs holds for it: whole pages, not st_size.
                size = path.lstat().st_blocks * 512
                path.unlink()
            except OSError:
                continue
            freed += size
        return freed

    def get(self, module_path: Path) -> SplitPair | NotSplit:
        """The split of *module_path*; a SplitPair must be closed (load_two_stage does)."""
        try:
            real = module_path.resolve(strict=True)
            relpath = real.relative_to(self.modules_dir)
        except (OSError, ValueError):
            return NotSplit(f"{module_path} is outside the kernel's module tree")
        if not is_module_file(real.name):
            return NotSplit(f"{real.name} is not a module file")
        try:
            # A compressed original is split decompressed, and its entries are
            # kept under NAME.ko (initsplit/modfile.py). Its digest, computed as it
            # is read: a cache entry is checked against that, and only a split made
            # now reads the module whole (modfile.ModuleDigest).
            source = ModuleDigest(real)
        except (OSError, CompressedModuleError) as exc:
            return _cannot_read(real, exc)
        relpath = uncompressed_path(relpath)
        # Kbuild names a module after its file, "-" read as "_" (KBUILD_MODNAME).
        module_name = module_file_name(real.name)
        roots = [(self.cache_dir, "cache"), (self.runtime_dir, "runtime")]
        if self.signed_only:
            # The runtime directory holds splits made at boot: unsigned.
            roots = roots[:1]
            if not self.cache_dir.is_dir():
                return self._unsigned(f"no pre-split cache {self.cache_dir}")
        for root, kind in roots:
            # Checked at every use, not once: a directory can change while we run.
            problem = self._directory_problem(root, kind)
            if problem:
                return NotSplit(problem)
            found = read_entry(root, relpath, source=source, options=self.options.tag)
            if isinstance(found, BadEntry):
                return NotSplit(found.reason)
            if found is not None and self.signed_only:
                unsigned = signature_problem(found)
                if unsigned is not None:
                    found.close()
                    return self._unsigned(unsigned)
            if found is not None:
                if not self.options.accepts(found.manifest.discarded, found.manifest.name or module_name):
                    found.close()
                    lacking = [c for c in found.manifest.discarded.split(",")
                               if c and not self.options.drops(c, found.manifest.name or module_name)]
                    if lacking == ["btf"]:
                        return NotSplit(f"keeps its BTF; the {kind} entry lacks it "
                                        "(KeepBTF= or initsplit.btf=keep)")
                    return NotSplit(f"the {kind} entry lacks what the options keep "
                                    f"({', '.join(lacking)})")
                if found.init is None:
                    reason = found.manifest.reason or found.manifest.decision
                    if found.core is None and found.manifest.discarded and not self.signed_only:
                        # A runtime entry: the rewritten original is made again
                        # (no copy is kept in /run, which is memory).
                        return self._rewritten(reason, relpath, source, found.manifest)
                    if found.core is None:
                        return NotSplit(reason)
                    return NotSplit(reason, rewritten=found.core, btf_bytes=found.manifest.btf_bytes,
                                    kallsyms_bytes=found.manifest.kallsyms_bytes)
                return _pair(found)
        if self.signed_only:
            return NotSplit("signatures enforced: no pre-split cache entry (for these options), "
                            "and a split made now would be unsigned")
        return self._split_now(relpath, source)

    def _unsigned(self, problem: str) -> NotSplit:
        """The plain load where the kernel enforces signatures and the cache has no
        signed entry; how to get one is said once."""
        with self._lock:
            first = ENABLE_SIGNING not in self._reported
            self._reported.add(ENABLE_SIGNING)
        if first:
            self._report(f"the kernel enforces module signatures and the pre-split cache "
                         f"{self.cache_dir} is not signed ({problem}): modules are loaded plain; "
                         f"{ENABLE_SIGNING}")
        return NotSplit(f"signatures enforced: {problem}")

    def _rewritten(self, reason: str, relpath: Path, digest: ModuleDigest, manifest: Manifest) -> NotSplit:
        """The original without the manifest's discarded classes, made now (no pyelftools)."""
        from ..elf import MalformedElf
        from ..split.discarding import without_classes

        source = _read_source(digest)
        if isinstance(source, NotSplit):
            return source
        try:
            rewritten = without_classes(source, [c for c in manifest.discarded.split(",") if c])
        except MalformedElf:
            return NotSplit(reason)  # the original, as it is
        return self._hold(reason, relpath, rewritten, manifest.btf_bytes, manifest.kallsyms_bytes)

    @staticmethod
    def _hold(reason: str, relpath: Path, rewritten: bytes, btf_bytes: int,
              kallsyms_bytes: int) -> NotSplit:
        try:
            held = sealed_memfd(relpath.name, rewritten)
        except OSError:
            return NotSplit(reason)  # the original, as it is
        return NotSplit(reason, rewritten=held, btf_bytes=btf_bytes, kallsyms_bytes=kallsyms_bytes)

    def _directory_problem(self, root: Path, kind: str) -> str | None:
        problem = directory_problem(root) or self._overlap(root)
        if problem is None:
            return None
        message = f"{kind} directory {root} is not trusted for kernel code: {problem}"
        with self._lock:
            first = message not in self._reported
            self._reported.add(message)
        if first:
            self._report(f"{message}; modules are loaded plain instead")
        return message

    def _overlap(self, root: Path) -> str | None:
        """A cache or runtime directory inside the module tree (or around it) would
        have the daemon write over the originals it falls back to."""
        try:
            real = root.resolve()
        except OSError:
            return None
        if real == self.modules_dir or self.modules_dir in real.parents or real in self.modules_dir.parents:
            return f"it overlaps the kernel's module tree {self.modules_dir}"
        return None

    def _split_now(self, relpath: Path, digest: ModuleDigest) -> SplitPair | NotSplit:
        # Imported here: pyelftools costs most of a second in a slow VM, and with a
        # pre-split cache the daemon never needs it.
        from ..elf import MalformedElf
        from ..split.decide import decide, layout_figures, manifest_reason

        source = _read_source(digest)
        if isinstance(source, NotSplit):
            return source
        options = self.options
        try:
            decision = decide(source, options)
        except MalformedElf as exc:
            return NotSplit(f"cannot split: {exc}")
        except Exception as exc:  # a splitter bug must cost a plain load, not the boot
            log.exception("splitting %s failed", relpath)
            return NotSplit(f"splitter error: {type(exc).__name__}: {exc}")
        if decision.outcome in ("nothing", "refused", "plain"):
            why = manifest_reason(decision)
            # The decision only: the rewritten original is made again from the
            # module when it is needed, rather than kept in /run.
            self._keep(relpath, source=source, decision=decision.outcome, reason=why,
                       discarded=",".join(decision.discarded), btf_bytes=decision.btf_bytes,
                       kallsyms_bytes=decision.kallsyms_bytes)
            if decision.rewritten is None:
                return NotSplit(why)
            return self._hold(why, relpath, decision.rewritten, decision.btf_bytes,
                              decision.kallsyms_bytes)
        if decision.outcome != "split" or decision.split is None:
            return NotSplit(f"split failed validation: {decision.reason}")
        result = decision.split
        figures = layout_figures(decision, options.rules)
        self._keep(relpath, source=source, decision="split", name=result.name,
                   init_name=result.init_name, core=result.core, init=result.init,
                   discarded=",".join(decision.discarded), btf_bytes=decision.btf_bytes,
                   kallsyms_bytes=decision.kallsyms_bytes, reached=result.reached,
                   reached_from=result.reached_from, **figures)
        # Loaded from the bytes the validator checked, not from the copy just written.
        try:
            with ExitStack() as opened:
                core = opened.enter_context(sealed_memfd(f"{result.name}.ko", result.core))
                init = opened.enter_context(sealed_memfd(f"{result.init_name}.ko", result.init))
                opened.pop_all()
        except OSError as exc:
            return NotSplit(f"cannot hold the split in memory: {exc.strerror}")
        return SplitPair(result.name, result.init_name, core, init,
                         init_pages=figures["init_layout_pages"] or None,
                         plain_core_bytes=figures["plain_core_bytes"] or None,
                         btf_bytes=decision.btf_bytes, kallsyms_bytes=decision.kallsyms_bytes,
                         reached=result.reached, reached_from=result.reached_from,
                         twostage_slab_bytes=decision.twostage_slab_bytes)

    def _keep(self, relpath: Path, **entry: Any) -> None:
        """Write a decision to the runtime directory for the next daemon (after switch-root)."""
        try:
            write_entry(self.runtime_dir, relpath, options=self.options.tag, **entry)
        except OSError as exc:
            log.warning("cannot keep the split of %s in %s: %s", relpath, self.runtime_dir,
                        exc.strerror)


def _pair(hit: CacheHit) -> SplitPair:
    manifest = hit.manifest
    assert hit.core is not None and hit.init is not None
    return SplitPair(manifest.name, manifest.init_name, hit.core, hit.init,
                     init_pages=manifest.init_layout_pages or None,
                     plain_core_bytes=manifest.plain_core_bytes or None,
                     btf_bytes=manifest.btf_bytes, kallsyms_bytes=manifest.kallsyms_bytes,
                     reached=parse_reached(manifest.reached),
                     reached_from=parse_reached_from(manifest.reached_from),
                     twostage_slab_bytes=manifest.twostage_slab_bytes)


def _read_source(digest: ModuleDigest) -> bytes | NotSplit:
    """The module's bytes, for a split or rewrite made now: those whose digest the
    cache lookup checked, or NotSplit (the original is loaded as it is)."""
    try:
        return digest.read()
    except (OSError, CompressedModuleError, ModuleChangedError) as exc:
        return _cannot_read(digest.path, exc)


def _cannot_read(path: Path, exc: Exception) -> NotSplit:
    """Why the module file at *path* is loaded as it is: it cannot be read (OSError,
    named by its path), does not decompress or changed while it was read (by name)."""
    if isinstance(exc, OSError):
        return NotSplit(f"cannot read {path}: {exc.strerror}")
    return NotSplit(f"cannot read {path.name}: {exc}")
