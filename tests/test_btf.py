"""The BTF class: the kernel's retention model for module BTF (layout/btf.py) and the
rewriter that empties .BTF (elf/discard.py), on real Debian 6.1 modules and on
synthetic ELF files. What the kernel really keeps is test_btf_vm's to confirm."""

from __future__ import annotations

from pathlib import Path

import pytest

from initsplit.elf import MalformedElf, ObjectBuilder, read_elf
from initsplit.elf.constants import SHF_ALLOC, SHT_PROGBITS, STB_LOCAL, STT_OBJECT
from initsplit.elf.discard import MODULE_SIG_STRING, sections, signature_length, without_sections
from initsplit.layout.btf import btf_kept_bytes, btf_type_count, kmalloc_bytes, types_capacity
from tests.testbed.kernel import debian_kernel

AF_KEY = "kernel/net/key/af_key.ko"
EXT4 = "kernel/fs/ext4/ext4.ko"


@pytest.fixture(scope="module")
def modules() -> Path:
    return debian_kernel().modules_dir


def btf_of(data: bytes) -> bytes:
    btf = next(s for s in sections(data) if s.name == ".BTF")
    return data[btf.offset:btf.offset + btf.size]


# ------------------------------------------------------------------ the model

def test_allocator_rounding() -> None:
    assert [kmalloc_bytes(n) for n in (0, 1, 8, 9, 65, 96, 97, 129, 193, 4097, 8192)] == \
        [0, 8, 8, 16, 96, 96, 128, 192, 256, 8192, 8192]
    # Above 8 KiB: whole pages of the next power-of-two order.
    assert [kmalloc_bytes(n) for n in (8193, 12288, 16385, 142155)] == [16384, 16384, 32768, 262144]


def test_types_array_growth() -> None:
    # btf_add_type(): 0, 16, 32, 48, 64, 80, 100, 125, 156, ...
    assert [types_capacity(n) for n in (0, 1, 16, 17, 64, 65, 81, 101, 126)] == \
        [0, 16, 16, 32, 64, 80, 100, 125, 156]


def test_kept_bytes_of_real_modules(modules: Path) -> None:
    af_key = btf_of((modules / AF_KEY).read_bytes())
    assert (len(af_key), btf_type_count(af_key)) == (8769, 176)
    # 16384 (copy) + 2048 (195 pointers) + 256 + 64 + 64 + 128 + 8 ("af_key\0").
    assert btf_kept_bytes(af_key, "af_key") == 18952
    assert btf_kept_bytes(af_key, "af_key", kernel="6.12") == 18952 + 32 + 8
    ext4 = btf_of((modules / EXT4).read_bytes())
    assert btf_kept_bytes(ext4, "ext4") == 262144 + 32768 + 512 + 8


def test_no_or_unparsable_btf_keeps_nothing() -> None:
    assert btf_kept_bytes(b"", "x") == 0
    assert btf_kept_bytes(b"\xeb\x9f\x01\x00" + bytes(20), "x") == 0  # big-endian magic
    assert btf_kept_bytes(b"\x9f\xeb\x01\x00\x18" + bytes(3) + b"\x00\x00\x00\x00\xff" + bytes(11),
                          "x") == 0  # a type section beyond the end
    with pytest.raises(ValueError):
        btf_type_count(b"\x9f\xeb")


# ------------------------------------------------------------------ the rewriter

def test_rewritten_module_is_the_original_without_btf(modules: Path) -> None:
    original = (modules / AF_KEY).read_bytes()
    signature = signature_length(original)
    assert signature > 0 and original.endswith(MODULE_SIG_STRING)  # Debian signs its modules
    rewritten = without_sections(original, {".BTF", ".BTF.base"})
    # The BTF's bytes go but for what keeps the later sections aligned.
    cut = len(original) - signature - len(rewritten)
    assert len(btf_of(original)) - 64 < cut <= len(btf_of(original)), cut
    assert signature_length(rewritten) == 0
    for old, new in zip(sections(original), sections(rewritten)):
        if old.name != ".BTF":
            assert (new.offset - old.offset) % 8 == 0, old.name
    before, after = read_elf(original), read_elf(rewritten)
    assert [s.name for s in before.sections] == [s.name for s in after.sections]
    for old, new in zip(before.sections, after.sections):
        if old.name == ".BTF":
            assert new.size == 0 and new.data == b""
            continue
        assert (new.type, new.flags, new.size, new.link, new.info, new.addralign) == \
            (old.type, old.flags, old.size, old.link, old.info, old.addralign), old.name
        assert new.data == old.data, old.name
    assert after.symbols == before.symbols
    assert {k: list(v) for k, v in after.relocations.items()} == \
        {k: list(v) for k, v in before.relocations.items()}
    # Nothing left to drop: the same bytes come back.
    assert without_sections(rewritten, {".BTF"}) == rewritten


def _synthetic(*, btf_flags: int = 0, relocated: bool = False) -> bytes:
    b = ObjectBuilder()
    data = b.add_section(".data", type=SHT_PROGBITS, flags=SHF_ALLOC, data=b"D" * 16, addralign=8)
    btf = b.add_section(".BTF", type=SHT_PROGBITS, flags=btf_flags, data=b"B" * 40)
    b.add_section(".modinfo", type=SHT_PROGBITS, flags=SHF_ALLOC, data=b"name=x\0")
    symbol = b.add_symbol("d", bind=STB_LOCAL, type=STT_OBJECT, shndx=data)
    if relocated:
        b.add_relocation(btf, 0, 1, symbol, 0)
    return b.build()


def test_synthetic_module_loses_only_the_btf_bytes() -> None:
    original = _synthetic()
    signed = original + b"S" * 100 + bytes([0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 100]) + MODULE_SIG_STRING
    rewritten = without_sections(signed, {".BTF"})
    assert len(rewritten) == len(original) - 40  # a multiple of 8: all of it goes
    obj = read_elf(rewritten)
    assert obj.section(".BTF").size == 0 and obj.section(".data").data == b"D" * 16
    assert obj.section(".modinfo").data == b"name=x\0"


def test_hostile_files_raise_malformed_elf_only(modules: Path) -> None:
    # A signature length that reaches back over the section headers, a dropped
    # section that overlaps them, truncations: MalformedElf, never struct.error.
    original = (modules / "kernel/lib/crc7.ko").read_bytes()
    body = original[:len(original) - signature_length(original)]
    e_shoff = int.from_bytes(body[0x28:0x30], "little")
    hostile = [
        body + (len(body) - 40).to_bytes(4, "big").rjust(12, b"\0") + MODULE_SIG_STRING,
        body[:e_shoff + 100],
        body[:0x28] + (len(body) - 8).to_bytes(8, "little") + body[0x30:],
    ]
    btf = next(s for s in sections(body) if s.name == ".BTF")
    overlapping = bytearray(body)  # .BTF claims the section header table's bytes too
    at = e_shoff + btf.index * 64
    overlapping[at + 32:at + 40] = (len(body) - btf.offset).to_bytes(8, "little")
    hostile.append(bytes(overlapping))
    for data in hostile:
        with pytest.raises(MalformedElf):
            without_sections(data, {".BTF"})


def test_what_cannot_be_dropped_is_refused() -> None:
    with pytest.raises(MalformedElf, match="SHF_ALLOC"):
        without_sections(_synthetic(btf_flags=SHF_ALLOC), {".BTF"})
    with pytest.raises(MalformedElf, match="relocations"):
        without_sections(_synthetic(relocated=True), {".BTF"})
    with pytest.raises(MalformedElf):
        without_sections(b"\x7fELF" + bytes(60), {".BTF"})
    with pytest.raises(MalformedElf, match="signature"):
        signature_length(b"\x7fELF" + bytes(3) + MODULE_SIG_STRING)
