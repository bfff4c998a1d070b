"""Module files as a module tree holds them: NAME.ko, or compressed by Kbuild.

Kbuild compresses installed modules under CONFIG_MODULE_COMPRESS_{GZIP,XZ,ZSTD}
(scripts/Makefile.modinst): Debian 12's 6.1 ships NAME.ko, Debian 13's 6.12
ships NAME.ko.xz. initsplit splits and rewrites the ELF inside, so it reads a
compressed module decompressed; its cache and output trees hold the result
uncompressed under NAME.ko (uncompressed_path()). An original loaded as it is
goes to the kernel compressed when the kernel decompresses that format itself
(MODULE_INIT_COMPRESSED_FILE, 6.1+ kernel/module/decompress.c, which says which
format in /sys/module/compression), as kmod does; otherwise decompressed here.

Decompression reads untrusted files: a stream that does not decompress, or would
decompress to more than MAX_MODULE_BYTES, raises CompressedModuleError (the
caller then loads the original as it is, or reports the module failed).

Checking a cache entry needs only the module's SHA-256 and size (module_digest()),
which is computed while reading, a chunk at a time: the daemon never holds a whole
module for that. A .ko.xz read whole costs its compressed bytes, the decompressed
output (2.9 MB for 6.12's kvm.ko) and, while lzma joins its output blocks, that
again: measured in trixie's root with Python 3.13, five such modules (kvm, drm,
kvm-intel, ...) read whole on two threads raised the daemon's peak RSS by 7.2-7.4
MiB, digested as they are read by 2.6-2.8 MiB (bench/daemon_rss_host.py;
PERFORMANCE.md, "Daemon cost").
"""

from __future__ import annotations

import hashlib
import lzma
import zlib
from pathlib import Path

MODULE_SUFFIX = ".ko"
# Kbuild's suffixes (scripts/Makefile.modinst suffix-$(CONFIG_MODULE_COMPRESS_*))
# and the name /sys/module/compression gives each format (__stringify(MODULE_COMPRESSION)).
COMPRESSIONS: dict[str, str] = {".gz": "gzip", ".xz": "xz", ".zst": "zstd"}
# The biggest Debian module, amdgpu, is ~20 MB uncompressed; the kernel itself
# refuses module files above INT_MAX (kernel_read_file()).
MAX_MODULE_BYTES = 512 << 20
SYS_MODULE_COMPRESSION = Path("/sys/module/compression")


class CompressedModuleError(Exception):
    """A compressed module that cannot be decompressed here."""


def is_module_file(name: str) -> bool:
    """NAME.ko, or NAME.ko compressed with one of Kbuild's formats."""
    return module_suffix(name) is not None


def module_suffix(name: str) -> str | None:
    """".ko", ".ko.xz", ... as *name* ends, or None when it is no module file."""
    if name.endswith(MODULE_SUFFIX):
        return MODULE_SUFFIX
    for suffix in COMPRESSIONS:
        if name.endswith(MODULE_SUFFIX + suffix):
            return MODULE_SUFFIX + suffix
    return None


def canonical_name(name: str) -> str:
    """A module name as the kernel spells it. The kernel and modprobe treat "-" and
    "_" in module names as the same character (KBUILD_MODNAME; kmod's
    shared/util.c underscores()); store one spelling so "snd-hda-intel" and
    "snd_hda_intel" match."""
    return name.replace("-", "_")


def module_file_name(name: str) -> str:
    """The module name Kbuild gives the file *name* (its canonical_name())."""
    suffix = module_suffix(name)
    return canonical_name(name[:-len(suffix)] if suffix else name)


def compression_of(path: Path | str) -> str | None:
    """"xz", "zstd", "gzip" for a compressed module file, None for NAME.ko."""
    name = str(path)
    for suffix, kind in COMPRESSIONS.items():
        if name.endswith(MODULE_SUFFIX + suffix):
            return kind
    return None


def uncompressed_path(path: Path) -> Path:
    """*path* without its compression suffix (where the split of it is kept)."""
    kind = compression_of(path)
    if kind is None:
        return path
    suffix = next(s for s, k in COMPRESSIONS.items() if k == kind)
    return path.with_name(path.name[:-len(suffix)])


# What liblzma may allocate for one xz stream (its dictionary and state). Kbuild
# compresses modules with a 1 MiB dictionary (scripts/Makefile.modinst, cmd_xz:
# --lzma2=dict=1MiB); a stream whose header asks for more than this is refused
# (LZMAError) where it would otherwise have liblzma allocate what the header
# declares, up to 4 GiB: MemoryError on a small machine, which no caller expects.
XZ_MEMLIMIT = 64 << 20


def _xz_decompressor() -> lzma.LZMADecompressor:
    """The decompressor of one module's xz stream, for decompress() and module_digest()."""
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)


def decompress(data: bytes, kind: str, *, limit: int = MAX_MODULE_BYTES) -> bytes:
    """*data* decompressed from *kind*; CompressedModuleError if it cannot be."""
    try:
        if kind == "xz":
            decompressor = _xz_decompressor()
        elif kind == "gzip":
            decompressor = zlib.decompressobj(wbits=31)
        elif kind == "zstd":
            decompressor = _zstd_decompressor()
        else:
            raise CompressedModuleError(f"unknown compression {kind!r}")
        out = decompressor.decompress(data, limit + 1)
    except (lzma.LZMAError, zlib.error, EOFError) as exc:
        raise CompressedModuleError(f"{kind} data does not decompress: {exc}") from None
    if len(out) > limit:
        raise CompressedModuleError(f"decompresses to more than {limit} bytes")
    if not getattr(decompressor, "eof", True):
        raise CompressedModuleError(f"{kind} stream is truncated")
    return out


def _zstd_decompressor():  # noqa: ANN202 (a module of Python 3.14, if present)
    # Python gained zstd in 3.14 (compression.zstd); Debian 12's 3.11 and 13's 3.13
    # have none. Such a module is loaded by the kernel's own decompressor instead.
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        raise CompressedModuleError("this Python cannot decompress zstd") from None
    return zstd.ZstdDecompressor()


def python_decompresses(kind: str) -> bool:
    """Whether decompress() can read *kind* with this Python."""
    if kind in ("xz", "gzip"):
        return True
    if kind != "zstd":
        return False
    try:
        _zstd_decompressor()
    except CompressedModuleError:
        return False
    return True


def loadable_here(path: Path) -> bool:
    """Whether initsplitd can hand the original at *path* to the kernel itself: not
    compressed, or compressed in a format the kernel or this Python decompresses.
    (A .ko.zst on a kernel without zstd decompression, under Python 3.11 or 3.13,
    is not: modprobe loads it, through libkmod's own decompressor.)"""
    kind = compression_of(path)
    return kind is None or kernel_decompresses(kind) or python_decompresses(kind)


def kernel_decompresses(kind: str, *, sysfs: Path = SYS_MODULE_COMPRESSION) -> bool:
    """Whether finit_module(MODULE_INIT_COMPRESSED_FILE) takes *kind* on this kernel.

    CONFIG_MODULE_DECOMPRESS builds one format, the one the tree is compressed
    with, and kernel/module/decompress.c names it in /sys/module/compression.
    """
    try:
        return sysfs.read_text().strip() == kind
    except OSError:
        return False


# What module_digest() reads and decompresses at a time.
DIGEST_CHUNK = 1 << 16


def module_digest(path: Path, *, limit: int = MAX_MODULE_BYTES) -> tuple[str, int]:
    """SHA-256 (hex) and size of the bytes read_module(path) returns, without holding
    them: an uncompressed module is hashed as it is read, an xz one as it is
    decompressed, DIGEST_CHUNK bytes in and out at a time (gzip and zstd, which no
    Debian kernel uses, are read whole as read_module() reads them). The same
    errors in the same cases as read_module(): OSError when the file cannot be
    read, CompressedModuleError when it does not decompress, is truncated or
    decompresses to more than *limit* bytes (data after the end of the xz stream is
    ignored, as decompress() ignores it)."""
    kind = compression_of(path)
    if kind not in (None, "xz"):
        data = read_module(path, limit=limit)
        return hashlib.sha256(data).hexdigest(), len(data)
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        if kind is None:
            while chunk := f.read(DIGEST_CHUNK):
                h.update(chunk)
                size += len(chunk)
            return h.hexdigest(), size
        decompressor = _xz_decompressor()
        try:
            while not decompressor.eof:
                if decompressor.needs_input:
                    chunk = f.read(DIGEST_CHUNK)
                    if not chunk:
                        break  # truncated
                else:
                    chunk = b""  # more output from the input it holds
                # limit + 1 bytes at most in all, as decompress() asks for.
                out = decompressor.decompress(chunk, min(DIGEST_CHUNK, limit + 1 - size))
                h.update(out)
                size += len(out)
                if size > limit:
                    raise CompressedModuleError(f"decompresses to more than {limit} bytes")
        except (lzma.LZMAError, EOFError) as exc:
            raise CompressedModuleError(f"{kind} data does not decompress: {exc}") from None
    # What follows the end of the stream is not read, as decompress() ignores it.
    if not decompressor.eof:
        raise CompressedModuleError(f"{kind} stream is truncated")
    return h.hexdigest(), size


class ModuleChangedError(Exception):
    """A module file whose bytes are no longer the ones ModuleDigest hashed."""


class ModuleDigest:
    """The SHA-256 and size of the module file at *path* (module_digest()), all a
    pre-split cache entry is checked against; read() gives the bytes themselves to
    the rare caller that needs them (a split made now, a format 7 entry's check)."""

    __slots__ = ("path", "sha256", "size", "limit")

    def __init__(self, path: Path, *, limit: int = MAX_MODULE_BYTES) -> None:
        self.path, self.limit = path, limit
        self.sha256, self.size = module_digest(path, limit=limit)

    def read(self) -> bytes:
        """read_module(path) again, if it still gives the bytes digested: else
        ModuleChangedError (OSError, CompressedModuleError as read_module())."""
        data = read_module(self.path, limit=self.limit)
        if len(data) != self.size or hashlib.sha256(data).hexdigest() != self.sha256:
            raise ModuleChangedError(f"{self.path.name} changed while it was read")
        return data


def read_module(path: Path, *, limit: int = MAX_MODULE_BYTES) -> bytes:
    """The ELF bytes of the module file at *path*, decompressed if it is compressed.

    OSError when it cannot be read, CompressedModuleError when it cannot be
    decompressed.
    """
    data = path.read_bytes()
    kind = compression_of(path)
    return data if kind is None else decompress(data, kind, limit=limit)
