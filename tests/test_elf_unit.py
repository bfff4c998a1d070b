"""Unit tests of the ELF model and the synthesized pieces, on small synthetic objects."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from initsplit.elf import MalformedElf, ObjectBuilder, read_elf
from initsplit.elf.constants import (
    R_X86_64_64,
    R_X86_64_PC32,
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHF_WRITE,
    SHN_UNDEF,
    SHT_NOBITS,
    SHT_PROGBITS,
    STB_GLOBAL,
    STB_LOCAL,
    STT_FUNC,
    STT_SECTION,
)
from initsplit.split import codegen, init_module_name, initresult
from initsplit.split.initresult import INIT_FAILED_BIAS
from initsplit.split.splitter import anchor_prefix
from initsplit.split.tables import MODULE_NAME_LEN, ORC_TYPE_CALL, ORC_TYPE_CALL_612


def small_object() -> bytes:
    b = ObjectBuilder()
    text = b.add_section(".text", type=SHT_PROGBITS, flags=SHF_ALLOC | SHF_EXECINSTR,
                         data=b"\x90" * 16, addralign=16)
    data = b.add_section(".data", type=SHT_PROGBITS, flags=SHF_ALLOC | SHF_WRITE, data=bytes(16),
                         addralign=8)
    b.add_section(".bss", type=SHT_NOBITS, flags=SHF_ALLOC | SHF_WRITE, size=64, addralign=32)
    glob = b.add_symbol("ext", bind=STB_GLOBAL, type=0, shndx=SHN_UNDEF)
    sec = b.add_symbol("", bind=STB_LOCAL, type=STT_SECTION, shndx=text)
    fn = b.add_symbol("fn", value=4, size=8, bind=STB_LOCAL, type=STT_FUNC, shndx=text)
    b.add_relocation(data, 0, R_X86_64_64, fn, 0)
    b.add_relocation(data, 8, R_X86_64_64, glob, -8)
    b.add_relocation(text, 1, R_X86_64_PC32, sec, -4)
    return b.build()


def test_writer_round_trip_through_our_reader_and_pyelftools(tmp_path: Path) -> None:
    blob = small_object()
    obj = read_elf(blob)
    names = [s.name for s in obj.sections]
    assert names[:4] == ["", ".text", ".data", ".bss"]
    assert obj.section(".bss").size == 64 and obj.section(".bss").type == SHT_NOBITS
    symbols = obj.symbols
    # Locals first, the undefined global last; sh_info names the first global.
    assert [s.name for s in symbols] == ["", "", "fn", "ext"]
    rel = list(obj.relocations_for(obj.section(".data")))
    assert [(r.offset, r.type, symbols[r.symbol].name, r.addend) for r in rel] == [
        (0, R_X86_64_64, "fn", 0), (8, R_X86_64_64, "ext", -8)]
    # An independent reader agrees.
    path = tmp_path / "x.o"
    path.write_bytes(blob)
    with path.open("rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        assert symtab["sh_info"] == 3
        rela = elf.get_section_by_name(".rela.data")
        assert [r["r_addend"] for r in rela.iter_relocations()] == [0, -8]


def test_binutils_accepts_the_output(tmp_path: Path) -> None:
    path = tmp_path / "x.o"
    path.write_bytes(small_object())
    out = subprocess.run(["readelf", "-W", "-S", "-r", "-s", str(path)], capture_output=True,
                         text=True, check=True)
    assert "Warning" not in out.stderr and "Error" not in out.stderr
    assert "R_X86_64_PC32" in out.stdout


@pytest.mark.parametrize("blob", [b"", b"\x7fELF", b"\x7fELF" + bytes(60), b"MZ" + bytes(100)])
def test_reader_rejects_non_elf(blob: bytes) -> None:
    with pytest.raises(MalformedElf):
        read_elf(blob)


def test_init_module_names_fit_and_are_deterministic() -> None:
    assert init_module_name("dummy") == "dummy__init"
    long = "x" * 55
    name = init_module_name(long)
    assert len(name) <= MODULE_NAME_LEN - 1 and name.endswith("__init")
    assert name == init_module_name(long)
    assert init_module_name("x" * 54 + "y") != name
    assert len(anchor_prefix(long)) + 6 <= MODULE_NAME_LEN - 1


def _mnemonics(code: bytes, tmp_path: Path) -> list[str]:
    raw = tmp_path / "w.bin"
    raw.write_bytes(code)
    asm = subprocess.run(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", str(raw)],
                         capture_output=True, text=True, check=True).stdout
    return [line.split("\t")[2].split()[0] for line in asm.splitlines()
            if line.count("\t") >= 2 and ":" in line.split("\t")[0]]


def _jump_target(code: bytes, at: int) -> int:
    return at + 2 + code[at + 1]


def test_wrapper_code_disassembles_as_intended(tmp_path: Path) -> None:
    publish = (codegen.Publish(224, 31), codegen.Publish(276, 7))
    routine = codegen.init_wrapper(slot_addend=848, rethunk=True, orc_type=ORC_TYPE_CALL, publish=publish)
    code = routine.code
    assert _mnemonics(code, tmp_path) == [
        "endbr64", "sub", "call", "test", "jns", "cmp", "jl", "sub", "jmp",
        "lea", "mov", "movl", "movl", "add", "jmp"]
    # Every relocation patches a zeroed 4-byte field (apply_relocate_add refuses non-zero).
    for r in routine.relocs:
        assert code[r.offset:r.offset + 4] == bytes(4)
    add = code.index(bytes.fromhex("4883c408"))
    assert [e.offset for e in routine.orc] == [0, 8, add + 4, add + 9]
    assert routine.return_sites == [add + 4]
    # Success (jns) skips the biasing and lands on the arming store; both failure
    # exits (jl for a value already out of the errno range, jmp after biasing)
    # skip every store.
    ok = code.index(bytes.fromhex("488d15"))
    assert _jump_target(code, code.index(b"\x79")) == ok
    assert _jump_target(code, code.index(b"\x7c")) == add
    assert _jump_target(code, code.index(b"\xeb")) == add
    assert code[code.index(b"\x3d") + 1:][:4] == (-4095).to_bytes(4, "little", signed=True)
    assert code[code.index(b"\x2d") + 1:][:4] == INIT_FAILED_BIAS.to_bytes(4, "little")
    # The publish stores: imm32 = the count, the PC32 displacement reaches the field
    # (the CPU adds the end of the instruction, 4 bytes past the displacement).
    stores = [r for r in routine.relocs if r.target == "core_module"]
    assert [r.addend for r in stores] == [848 - 4, 224 - 8, 276 - 8]
    for r, p in zip(stores[1:], publish):
        assert code[r.offset - 2:r.offset] == b"\xc7\x05"
        assert int.from_bytes(code[r.offset + 4:r.offset + 8], "little") == p.count


def test_wrapper_without_exports_only_arms(tmp_path: Path) -> None:
    routine = codegen.init_wrapper(slot_addend=312, rethunk=False, orc_type=ORC_TYPE_CALL)
    assert "movl" not in _mnemonics(routine.code, tmp_path)
    assert routine.code.endswith(bytes.fromhex("4883c408c3cc")) and not routine.return_sites


@pytest.mark.parametrize("init_result,expected", [
    (0, None), (5, None), (-19, 19), (-1, 1), (-4095, 4095), (-4096, 4096), (-(2**31), 2**31)])
def test_init_result_round_trip(init_result: int, expected: int | None) -> None:
    """What the wrapper returns for an init result, and what the daemon reads back."""
    returned = initresult.encode(init_result)
    assert -(2**31) <= returned < 2**31  # still a C int
    if init_result < 0:
        assert returned < -4095  # never a kernel error: the binding will not raise
    assert initresult.init_failure_errno(returned if init_result < 0 else 0) == expected


@pytest.mark.parametrize("orc_type", [ORC_TYPE_CALL, ORC_TYPE_CALL_612])
def test_orc_entries_carry_the_kernels_call_type(orc_type: int) -> None:
    """Every entry but the last is of the kernel's call type (6.12's 3-bit field
    holds 2); the terminator is all zero on both, as objtool writes it."""
    for routine in (codegen.init_wrapper(slot_addend=1200, rethunk=True, orc_type=orc_type),
                    codegen.exit_stub(rethunk=True, orc_type=orc_type)):
        packed = [e.pack() for e in routine.orc]
        assert [int.from_bytes(p[4:6], "little") >> 8 for p in packed[:-1]] == [orc_type] * (len(packed) - 1)
        assert packed[-1] == bytes(6)


def test_exit_stub_without_rethunk_is_ret() -> None:
    stub = codegen.exit_stub(rethunk=False, orc_type=ORC_TYPE_CALL)
    assert stub.code.endswith(b"\xc3\xcc") and not stub.relocs and not stub.return_sites
