"""split/tables.py's Linux 6.12 declarations against Debian 13's kernel and modules.

The splitter does not use them yet (a 6.12 module is refused as "unsupported
kernel" and loads plain); these tests hold them to the kernel they describe, so
the port builds on declarations that are known right:

* struct module's offsets (KNOWN_STRUCT_MODULE_MEMORY_LAYOUTS) and struct
  module_memory's (MODULE_MEMORY_FIELDS) are those of the kernel's own BTF, and
  the module_layout CRC of Debian 13's modules names that layout, whose ->init,
  ->exit and size agree with each module's own relocations;
* every per-record table (RECORD_TABLES_612) in a sample of the tree is whole
  records of the declared size, with a key relocation of the expected width at
  the key of every record, and the tables 6.12 dropped do not occur;
* ORC entries use the 3-bit type field of v6.4 on: ORC_TYPE_CALL_612 is by far
  the most frequent type, and no entry has a type beyond ORC_TYPE_REGS_PARTIAL.
"""

from __future__ import annotations

import dataclasses
import struct
from collections import Counter
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from initsplit.elf import ElfObject, read_elf
from initsplit.elf.constants import R_X86_64_64, R_X86_64_PC32, SHF_ALLOC
from initsplit.modfile import is_module_file, read_module
from initsplit.split.tables import (
    KNOWN_STRUCT_MODULE_MEMORY_LAYOUTS,
    MODULE_MEMORY_FIELDS,
    MODVERSION_RECORD_SIZE,
    ORC_TYPE_CALL_612,
    RECORD_TABLES,
    RECORD_TABLES_612,
)
from tests.testbed.btf import struct_layout
from tests.testbed.fixtures import kernel612  # noqa: F401  (pytest fixture)
from tests.testbed.kernel import DebianKernel

# Modules with many tables (ext4, kvm, xfs) and small ones; more come from SAMPLE_EVERY.
NAMED = ("dummy", "loop", "ext4", "xfs", "nf_tables", "wireguard", "kvm", "kvm_intel", "e1000e",
         "i915", "btrfs", "raid6_pq", "virtio_net", "bonding")
SAMPLE_EVERY = 12  # every 12th module of the sorted tree: ~350 of 4,230
ORC_TYPE_REGS_PARTIAL = 4  # arch/x86/include/asm/orc_types.h (6.12): the highest type
# Tables whose key is an unsigned long address (R_X86_64_64); every other key is an
# s32 offset from the record (R_X86_64_PC32).
ABSOLUTE_KEYS = ("__mcount_loc", "__patchable_function_entries")
ORC_ENTRY = struct.Struct("<hhH")  # struct orc_entry: sp_offset, bp_offset, the bit fields


def module_layout_crc(obj: ElfObject) -> int:
    versions = obj.section("__versions").data
    for at in range(0, len(versions), MODVERSION_RECORD_SIZE):
        if versions[at + 8:at + MODVERSION_RECORD_SIZE].split(b"\0", 1)[0] == b"module_layout":
            return struct.unpack_from("<Q", versions, at)[0]
    raise AssertionError("no module_layout in __versions")


@pytest.fixture(scope="module")
def sample(kernel612: DebianKernel) -> dict[str, ElfObject]:
    paths = sorted(p for p in kernel612.modules_dir.rglob("*") if is_module_file(p.name))
    assert len(paths) > 4000, f"{kernel612.kver}: only {len(paths)} modules"
    chosen: dict[Path, None] = dict.fromkeys(kernel612.module(n) for n in NAMED)
    chosen.update(dict.fromkeys(paths[::SAMPLE_EVERY]))
    return {path.name: read_elf(read_module(path)) for path in chosen}


def test_struct_module_matches_kernel_btf(kernel612: DebianKernel) -> None:  # noqa: F811
    with kernel612.vmlinux.open("rb") as f:
        btf = ELFFile(f).get_section_by_name(".BTF").data()
    crc = module_layout_crc(read_elf(read_module(kernel612.module("dummy"))))
    assert crc in KNOWN_STRUCT_MODULE_MEMORY_LAYOUTS, f"{kernel612.kver}: module_layout {crc:#x} unknown"
    known = KNOWN_STRUCT_MODULE_MEMORY_LAYOUTS[crc]
    size, members = struct_layout(btf, "module")
    assert known.size == size
    assert "core_layout" not in members and "mem" in members
    for field in dataclasses.fields(known):
        if field.name not in ("kernel", "size"):
            assert getattr(known, field.name) == members[field.name], field.name
    size, members = struct_layout(btf, "module_memory")
    assert size == MODULE_MEMORY_FIELDS.record_size
    assert members["base"] == MODULE_MEMORY_FIELDS.base and members["size"] == MODULE_MEMORY_FIELDS.size


def test_every_module_names_the_layout_its_relocations_agree_with(sample: dict[str, ElfObject]) -> None:
    for name, obj in sample.items():
        layout = KNOWN_STRUCT_MODULE_MEMORY_LAYOUTS.get(module_layout_crc(obj))
        assert layout is not None, name
        this_module = obj.section(".gnu.linkonce.this_module")
        assert this_module.size == layout.size, name
        fields = {obj.symbols[r.symbol].name: r.offset for r in obj.relocations_for(this_module)
                  if r.type == R_X86_64_64}
        if "init_module" in fields:
            assert fields["init_module"] == layout.init, name
        if "cleanup_module" in fields:
            assert fields["cleanup_module"] == layout.exit, name


def test_tables_are_whole_records_keyed_as_declared(sample: dict[str, ElfObject]) -> None:
    seen: Counter[str] = Counter()
    for name, obj in sample.items():
        for table in RECORD_TABLES_612:
            section = obj.section(table.section)
            if section is None or not section.flags & SHF_ALLOC:
                continue
            seen[table.section] += 1
            assert section.size % table.record_size == 0, (name, table.section, section.size)
            rt = obj.relocations_for(section)
            keys = {off // table.record_size: type_ for off, type_ in zip(rt.offsets, rt.types)
                    if off % table.record_size == table.key_offset}
            records = section.size // table.record_size
            assert len(keys) == records, (name, table.section, records, len(keys))
            want = R_X86_64_64 if table.section in ABSOLUTE_KEYS else R_X86_64_PC32
            assert set(keys.values()) == {want}, (name, table.section, Counter(keys.values()))
        for gone in {t.section for t in RECORD_TABLES} - {t.section for t in RECORD_TABLES_612}:
            assert obj.section(gone) is None, (name, gone)
    # The sample exercises the tables the port must handle, .call_sites and the
    # 14-byte .altinstructions among them.
    for section in (".altinstructions", ".call_sites", "__patchable_function_entries", ".orc_unwind_ip",
                    "__mcount_loc", ".return_sites", "__jump_table", "__bug_table", "__ex_table"):
        assert seen[section] > 0, (section, seen)


def test_orc_types_are_v64s(sample: dict[str, ElfObject]) -> None:
    types: Counter[int] = Counter()
    for obj in sample.values():
        orc = obj.section(".orc_unwind")
        if orc is None:
            continue
        for _sp, _bp, bits in ORC_ENTRY.iter_unpack(orc.data):
            types[(bits >> 8) & 7] += 1
    assert types and max(types) <= ORC_TYPE_REGS_PARTIAL, types
    assert types.most_common(1)[0][0] == ORC_TYPE_CALL_612, types
