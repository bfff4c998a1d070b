"""Compressed module files (initsplit/modfile.py): read, split and loaded as the kernel
and kmod take them, with real modules of both Debian kernels.

Debian 13's 6.12 ships every module as NAME.ko.xz. The daemon splits and rewrites
the ELF inside, keeps its entries under NAME.ko, and hands an original it loads as
it is to the kernel compressed where the kernel decompresses that format.
"""

from __future__ import annotations

import gzip
import lzma
import os
from pathlib import Path

import pytest

from initsplit import modfile
from initsplit.daemon.splits import NotSplit, SplitProvider
from initsplit.loader import syscalls
from initsplit.modfile import (CompressedModuleError, compression_of, decompress, is_module_file,
                               kernel_decompresses, module_file_name, read_module, uncompressed_path)
from initsplit.split.decide import decide
from initsplit.split.policy import SplitOptions
from initsplit.tree import find_modules, split_tree
from tests.testbed.kernel import debian_kernel
from tests.trusted_dir import trusted_tmp  # noqa: F401  (pytest fixture)

DUMMY = Path("kernel/drivers/net/dummy.ko")


@pytest.fixture(scope="module")
def dummy_61() -> bytes:
    return (debian_kernel(release="12").modules_dir / DUMMY).read_bytes()


@pytest.fixture(scope="module")
def dummy_612_xz() -> Path:
    path = debian_kernel(release="13").modules_dir / "kernel/drivers/net/dummy.ko.xz"
    assert path.is_file(), f"Debian 13's kernel has no {path}"
    return path


def test_names_and_suffixes() -> None:
    assert [is_module_file(n) for n in ("a.ko", "a.ko.xz", "a.ko.zst", "a.ko.gz", "a.xz", "a.kobj")] \
        == [True, True, True, True, False, False]
    assert module_file_name("nf-tables.ko.xz") == module_file_name("nf_tables.ko") == "nf_tables"
    assert compression_of("a.ko.zst") == "zstd" and compression_of("a.ko") is None
    assert uncompressed_path(Path("k/ext4.ko.xz")) == Path("k/ext4.ko")
    assert uncompressed_path(Path("k/ext4.ko")) == Path("k/ext4.ko")


def test_xz_and_gzip_decompress_and_bad_streams_are_refused(dummy_61: bytes) -> None:
    assert decompress(lzma.compress(dummy_61, format=lzma.FORMAT_XZ), "xz") == dummy_61
    assert decompress(gzip.compress(dummy_61), "gzip") == dummy_61
    packed = lzma.compress(dummy_61, format=lzma.FORMAT_XZ)
    with pytest.raises(CompressedModuleError, match="truncated"):
        decompress(packed[:len(packed) // 2], "xz")
    with pytest.raises(CompressedModuleError, match="does not decompress"):
        decompress(b"not xz at all", "xz")
    # A bomb: stops at the limit instead of filling memory.
    with pytest.raises(CompressedModuleError, match="more than"):
        decompress(lzma.compress(bytes(1 << 20), format=lzma.FORMAT_XZ), "xz", limit=1 << 16)
    with pytest.raises(CompressedModuleError, match="unknown"):
        decompress(b"", "lz4")


def test_kernel_decompresses_reads_sys_module_compression(tmp_path: Path) -> None:
    sysfs = tmp_path / "compression"
    assert not kernel_decompresses("xz", sysfs=sysfs)  # no CONFIG_MODULE_DECOMPRESS
    sysfs.write_text("xz\n")
    assert kernel_decompresses("xz", sysfs=sysfs) and not kernel_decompresses("zstd", sysfs=sysfs)


@pytest.mark.parametrize("kernel_can", [True, False])
def test_a_compressed_original_goes_to_the_kernel_as_kmod_hands_it(
        dummy_612_xz: Path, monkeypatch: pytest.MonkeyPatch, kernel_can: bool) -> None:
    seen: list[tuple[bytes, int]] = []

    def fake_finit(fd: int, params: str = "", *, flags: int = 0) -> int:
        size = os.fstat(fd).st_size
        seen.append((os.pread(fd, size, 0), flags))
        return 0

    monkeypatch.setattr(syscalls, "finit_module", fake_finit)
    monkeypatch.setattr(syscalls, "kernel_decompresses", lambda kind: kernel_can)
    syscalls.finit_module_path(dummy_612_xz)
    data, flags = seen[0]
    if kernel_can:
        assert flags == syscalls.MODULE_INIT_COMPRESSED_FILE and data == dummy_612_xz.read_bytes()
    else:
        assert flags == 0 and data == read_module(dummy_612_xz) and data.startswith(b"\x7fELF")


def test_an_undecompressable_original_is_enoexec_not_a_crash(
        trusted_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    bad = trusted_tmp / "bad.ko.xz"
    bad.write_bytes(b"\xfd7zXZ\x00garbage")
    monkeypatch.setattr(syscalls, "kernel_decompresses", lambda kind: False)
    with pytest.raises(OSError) as caught:
        syscalls.finit_module_path(bad)
    assert caught.value.errno == 8  # ENOEXEC, as the kernel says of a file it cannot read


def test_a_612_module_is_read_decompressed_and_loses_its_btf(dummy_612_xz: Path) -> None:
    data = read_module(dummy_612_xz)
    decision = decide(data)
    # dummy splits on 6.12 too, but its C would take the 3 pages the original does
    # (TwoStage=when-not-worse weighs that): plain, and the BTF goes all the same.
    assert decision.outcome == "plain" and "TwoStage=" in decision.reason, decision
    assert decision.split is not None and decision.split.reached_from
    assert decision.discarded == ("btf",) and decision.btf_bytes > 0 and decision.rewritten


def test_the_daemon_splits_a_compressed_module_and_keeps_it_under_ko(
        trusted_tmp: Path, dummy_61: bytes, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    modules, cache, run = trusted_tmp / "modules", trusted_tmp / "cache", trusted_tmp / "run"
    (modules / DUMMY.parent).mkdir(parents=True)
    packed = modules / DUMMY.with_name("dummy.ko.xz")
    packed.write_bytes(lzma.compress(dummy_61, format=lzma.FORMAT_XZ))
    options = SplitOptions(two_stage="always")
    provider = SplitProvider(modules_dir=modules, cache_dir=cache, runtime_dir=run, options=options)
    got = provider.get(packed)
    try:
        assert not isinstance(got, NotSplit), got
        assert (run / DUMMY).is_file() and not (run / DUMMY.with_name("dummy.ko.xz")).exists()
    finally:
        got.close()
    # And `initsplit split` of such a tree writes what the daemon finds.
    assert [job.relative for job in find_modules([modules])] == [DUMMY]
    results = split_tree([modules], cache, workers=1, options=options)
    assert [r.outcome for r in results] == ["split"]

    def whole(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the module was read whole to check a cache entry")

    # The entry is checked against the module's digest, computed as it is read.
    monkeypatch.setattr(modfile, "read_module", whole)
    again = SplitProvider(modules_dir=modules, cache_dir=cache, runtime_dir=trusted_tmp / "run2",
                          options=options).get(packed)
    try:
        assert not isinstance(again, NotSplit), again
        assert not (trusted_tmp / "run2" / DUMMY).exists()  # the cache entry answered
    finally:
        again.close()


def test_a_bad_compressed_module_costs_a_plain_load_with_the_reason(trusted_tmp: Path) -> None:  # noqa: F811
    modules = trusted_tmp / "modules"
    modules.mkdir()
    bad = modules / "bad.ko.xz"
    bad.write_bytes(b"\xfd7zXZ\x00garbage")
    got = SplitProvider(modules_dir=modules, cache_dir=trusted_tmp / "c", runtime_dir=trusted_tmp / "r").get(bad)
    assert isinstance(got, NotSplit) and "cannot read bad.ko.xz" in got.reason and got.rewritten is None
    assert modfile.MODULE_SUFFIX == ".ko"


# --- the digest a cache entry is checked against (modfile.module_digest) --------------

def _xz(data: bytes) -> bytes:
    # As Kbuild compresses modules (scripts/Makefile.modinst): a 1 MiB dictionary, CRC32.
    return lzma.compress(data, check=lzma.CHECK_CRC32,
                         filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 20}])


def _outcome(fn, *args, **kwargs) -> object:  # noqa: ANN001
    try:
        return fn(*args, **kwargs)
    except CompressedModuleError:
        return CompressedModuleError


def test_module_digest_is_read_modules_in_every_case(tmp_path: Path, dummy_61: bytes) -> None:
    """module_digest(path) is (SHA-256, size) of read_module(path), and raises where it
    raises: a module read as it is and decompressed, chunk boundaries and the size
    limit exactly, trailing data, truncated, corrupt, empty and gzip streams."""
    import hashlib

    chunk = modfile.DIGEST_CHUNK
    big = os.urandom(chunk) * 3 + dummy_61 + bytes(5 * chunk + 1)
    cases = {
        "plain.ko": dummy_61, "empty.ko": b"", "exact.ko": bytes(2 * chunk),
        "dummy.ko.xz": _xz(dummy_61), "big.ko.xz": _xz(big), "exact.ko.xz": _xz(bytes(2 * chunk)),
        "empty.ko.xz": _xz(b""), "trailing.ko.xz": _xz(dummy_61) + b"\0junk",
        "truncated.ko.xz": _xz(big)[:-40], "cut.ko.xz": _xz(big)[:len(_xz(big)) // 2],
        "corrupt.ko.xz": _xz(dummy_61)[:200] + b"\xff" * 64 + _xz(dummy_61)[264:],
        "notxz.ko.xz": b"not xz at all", "nothing.ko.xz": b"",
        "dummy.ko.gz": gzip.compress(dummy_61), "bad.ko.gz": b"\x1f\x8b junk",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    refused = 0
    for name in cases:
        path = tmp_path / name
        for limit in (modfile.MAX_MODULE_BYTES, len(big), len(big) - 1, 2 * chunk, 2 * chunk - 1, chunk + 7):
            whole = _outcome(read_module, path, limit=limit)
            expected = whole if whole is CompressedModuleError else (hashlib.sha256(whole).hexdigest(), len(whole))
            assert _outcome(modfile.module_digest, path, limit=limit) == expected, (name, limit)
            refused += expected is CompressedModuleError
    assert refused > 10  # the refusals were exercised, not only the good streams
    with pytest.raises(FileNotFoundError):
        modfile.module_digest(tmp_path / "missing.ko.xz")


def test_module_digest_never_holds_the_module(tmp_path: Path) -> None:
    """What the daemon pays per module checked against the cache: a chunk and the xz
    dictionary, not the module (read whole, decompressed lzma output is held twice
    while its blocks are joined). tracemalloc sees the bytes objects and liblzma's
    buffers (PyMem_RawMalloc)."""
    import tracemalloc

    data = os.urandom(1 << 20) * 6  # 6 MiB, compresses to ~1 MiB with a 1 MiB dictionary
    path = tmp_path / "large.ko.xz"
    path.write_bytes(_xz(data))
    compressed = path.stat().st_size
    peaks = {}
    for what, fn in (("digest", modfile.module_digest), ("whole", read_module)):
        tracemalloc.start()
        try:
            result = fn(path)
            del result
            peaks[what] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peaks["whole"] > len(data), peaks  # what the check read before
    # The dictionary (1 MiB), liblzma's state and a chunk or two in and out; not
    # even the compressed file (~1 MiB here).
    assert compressed > 1 << 20
    # A literal bound, not one that grows with DIGEST_CHUNK (a 1 MiB chunk must fail).
    assert peaks["digest"] < (1 << 20) + (512 << 10), peaks


def test_module_digest_read_gives_the_bytes_digested_or_refuses(tmp_path: Path, dummy_61: bytes) -> None:
    path = tmp_path / "dummy.ko.xz"
    path.write_bytes(_xz(dummy_61))
    digest = modfile.ModuleDigest(path)
    assert (digest.size, digest.read()) == (len(dummy_61), dummy_61)
    path.write_bytes(_xz(dummy_61[:-1] + b"X"))  # replaced after the check
    with pytest.raises(modfile.ModuleChangedError):
        digest.read()


def _xz_with_dictionary_property(data: bytes, prop: int) -> bytes:
    """*data* as xz whose LZMA2 filter property declares the dictionary size *prop*
    stands for (xz-file-format.txt 5.3.1: 40 is 4 GiB - 1), the block header's
    CRC32 made right again: a stream liblzma would allocate that dictionary for."""
    import struct
    import zlib

    stream = bytearray(_xz(data))
    start = 12  # after the stream header
    size = (stream[start] + 1) * 4
    header = stream[start:start + size]
    i = 2
    for flag in (0x40, 0x80):  # compressed size, uncompressed size: varints
        if header[1] & flag:
            while header[i] & 0x80:
                i += 1
            i += 1
    assert header[i:i + 2] == b"\x21\x01", header.hex()  # LZMA2, one byte of properties
    header[i + 2] = prop
    header[-4:] = struct.pack("<I", zlib.crc32(bytes(header[:-4])))
    stream[start:start + size] = header
    return bytes(stream)


def test_an_xz_stream_asking_for_a_huge_dictionary_is_refused_not_allocated(
        tmp_path: Path, dummy_61: bytes) -> None:
    """A hostile .ko.xz cannot make the daemon allocate what its header declares
    (MemoryError on a small machine, which no caller handles): both readers refuse
    it as a stream that does not decompress, within modfile.XZ_MEMLIMIT."""
    huge = tmp_path / "huge.ko.xz"
    huge.write_bytes(_xz_with_dictionary_property(dummy_61, 40))
    for read in (read_module, modfile.module_digest):
        with pytest.raises(CompressedModuleError, match="does not decompress"):
            read(huge)
    # The same stream with Kbuild's 1 MiB dictionary (property 16) reads as before.
    fine = tmp_path / "fine.ko.xz"
    fine.write_bytes(_xz_with_dictionary_property(dummy_61, 16))
    assert read_module(fine) == dummy_61
    assert modfile.module_digest(fine)[1] == len(dummy_61)


def test_a_module_changed_after_its_digest_is_split_from_no_other_bytes(
        trusted_tmp: Path, dummy_61: bytes, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The daemon splits at boot only the bytes whose digest it checked the cache
    against: a module whose bytes no longer match (replaced between the digest and
    the whole read) is loaded as it is, with the reason."""
    modules = trusted_tmp / "modules"
    (modules / DUMMY.parent).mkdir(parents=True)
    path = modules / DUMMY.with_name("dummy.ko.xz")
    path.write_bytes(_xz(dummy_61))
    real = modfile.module_digest

    def digest_then_replaced(p: Path, **kwargs: object) -> tuple[str, int]:
        got = real(p, **kwargs)
        p.write_bytes(_xz(dummy_61[:-1] + b"X"))  # after the digest, before the split
        return got

    monkeypatch.setattr(modfile, "module_digest", digest_then_replaced)
    got = SplitProvider(modules_dir=modules, cache_dir=trusted_tmp / "c", runtime_dir=trusted_tmp / "r",
                        options=SplitOptions(two_stage="always")).get(path)
    assert isinstance(got, NotSplit), got
    assert "changed while it was read" in got.reason, got.reason
    assert not (trusted_tmp / "r" / DUMMY).exists()
