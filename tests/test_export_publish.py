"""C exports only its anchors until I's init has run, on real Debian modules.

The kernel's view is replayed independently of the validator: layout_sections()
places C's sections, find_module_sections() takes the export arrays and counts
from the section headers, and find_exported_symbol_in_section() bsearches the
first num_syms records; the wrapper's stores then give the counts after init.
"""

from __future__ import annotations

import bisect
import struct

import pytest

from initsplit.elf import ElfObject, read_elf
from initsplit.elf.constants import SHF_ALLOC, SHF_EXECINSTR, SHF_WRITE
from initsplit.split import split_module
from initsplit.split.splitter import HIDDEN, anchor_prefix
from initsplit.split.tables import KNOWN_STRUCT_MODULE_LAYOUTS
from initsplit.validate import ValidationError, validate_split
from tests.elfmut import RawElf, put
from tests.testbed import DebianKernel
from tests.testbed.fixtures import kernel  # noqa: F401  (pytest fixture)

LAYOUT = next(iter(KNOWN_STRUCT_MODULE_LAYOUTS.values()))
SHF_RO_AFTER_INIT = 0x00200000  # include/uapi/linux/elf.h
# kernel/module/main.c layout_sections(), masks[] (ARCH_SHF_SMALL is 0 on x86).
MASKS = ((SHF_EXECINSTR | SHF_ALLOC, 0), (SHF_ALLOC, SHF_WRITE), (SHF_RO_AFTER_INIT | SHF_ALLOC, 0),
         (SHF_WRITE | SHF_ALLOC, 0), (SHF_ALLOC, 0))
# watchdog has both export tables, fat only GPL ones, jbd2 only plain ones, dummy none.
MODULES = ("watchdog", "fat", "jbd2", "mbcache", "dummy")


def core_offsets(obj: ElfObject) -> dict[str, tuple[int, int]]:
    """Section name -> (flags class, offset) as layout_sections() places C's core sections."""
    flags = {s.index: s.flags for s in obj.sections}
    for s in obj.sections:
        if s.name in (".modinfo", "__versions", ".data..percpu"):
            flags[s.index] &= ~SHF_ALLOC  # rewrite_section_headers(), layout_and_allocate()
        if s.name in (".data..ro_after_init", "__jump_table"):
            flags[s.index] |= SHF_RO_AFTER_INIT
    # sizep is &mod->data_layout.size past the text class, but without
    # CONFIG_ARCH_WANTS_MODULES_DATA_IN_VMALLOC (x86) kernel/module/internal.h
    # defines data_layout as core_layout: one running size. The page rounding
    # between classes (strict_align) does not matter inside one class.
    placed: dict[str, tuple[int, int]] = {}
    size = 0
    for m, (required, forbidden) in enumerate(MASKS):
        for s in obj.sections[1:]:
            f = flags[s.index]
            if (f & required) != required or f & forbidden or s.name in placed or s.name.startswith(".init"):
                continue
            align = s.addralign or 1
            offset = (size + align - 1) // align * align  # module_get_offset()
            size = offset + s.size
            placed[s.name] = (m, offset)
    return placed


def export_names(core: ElfObject, table: str) -> list[str]:
    """Names of the records from mod->syms (or gpl_syms) on, as far as C's records go."""
    strings = core.section("__ksymtab_strings")
    names = []
    for name in (table, HIDDEN[table]):
        section = core.section(name)
        if section is None:
            continue
        per_record = {}
        for rel in core.relocations_for(section):
            if rel.offset % 12 == 4:
                sym = core.symbols[rel.symbol]
                assert sym.shndx == strings.index
                per_record[rel.offset // 12] = sym.value + rel.addend
        for record in range(section.size // 12):
            start = per_record[record]
            names.append(strings.data[start:strings.data.index(b"\0", start)].decode())
    return names


def published_counts(init: ElfObject) -> dict[int, int]:
    """struct module field offset -> count, from the wrapper's movl stores."""
    wrapper = init.section(".init.text.initsplit")
    counts = {}
    for rel in init.relocations_for(wrapper):
        if wrapper.data[rel.offset - 2:rel.offset] == b"\xc7\x05":
            counts[rel.addend + 8] = struct.unpack_from("<I", wrapper.data, rel.offset + 4)[0]
    return counts


def found(names: list[str], count: int, name: str) -> bool:
    """find_exported_symbol_in_section(): bsearch by strcmp over the first *count* records."""
    visible = [n.encode() for n in names[:count]]
    at = bisect.bisect_left(visible, name.encode())
    return at < len(visible) and visible[at] == name.encode()


@pytest.fixture(scope="module")
def splits(kernel: DebianKernel) -> dict[str, tuple[bytes, ElfObject, ElfObject, ElfObject]]:  # noqa: F811
    out = {}
    for name in MODULES:
        original = kernel.module(name).read_bytes()
        result = split_module(original)
        out[name] = (original, read_elf(original), read_elf(result.core), read_elf(result.init))
    return out


@pytest.mark.parametrize("name", MODULES)
def test_only_anchors_resolve_before_init_and_everything_after(splits, name: str) -> None:
    original_bytes, original, core, init = splits[name]
    offsets = core_offsets(core)
    counts = published_counts(init)
    anchors = anchor_prefix(name)
    for table, crcs, field in (("__ksymtab", "__kcrctab", LAYOUT.num_syms),
                               ("__ksymtab_gpl", "__kcrctab_gpl", LAYOUT.num_gpl_syms)):
        wanted = sorted(export_names(original, table)) if original.section(table) else []
        if not wanted:
            assert field not in counts and core.section(HIDDEN[table]) is None
            continue
        # The hidden records start where the visible ones end, for symbols and CRCs.
        for visible, hidden in ((table, HIDDEN[table]), (crcs, HIDDEN[crcs])):
            klass, start = offsets[visible]
            assert offsets[hidden] == (klass, start + core.section(visible).size), (visible, hidden)
        names = export_names(core, table)
        at_load = core.section(table).size // 12  # find_module_sections(): num_syms
        assert all(n.startswith(anchors) for n in names[:at_load])
        assert names[at_load:] == wanted
        assert names == sorted(names, key=str.encode)  # one sorted array for bsearch
        assert counts[field] == len(names)
        for export in wanted:
            assert not found(names, at_load, export), export
            assert found(names, counts[field], export), export


def _patched_count(init: bytes, delta: int) -> bytes:
    obj = RawElf(init)
    wrapper = obj.section(".init.text.initsplit")
    code = init[wrapper.offset:wrapper.offset + wrapper.size]
    at = code.index(b"\xc7\x05")
    count = struct.unpack_from("<I", code, at + 6)[0]
    return put(init, wrapper.offset + at + 6, "<I", count + delta)


@pytest.mark.parametrize("delta", [-1, 1])
def test_validator_rejects_a_wrong_published_count(kernel: DebianKernel, delta: int) -> None:  # noqa: F811
    original = kernel.module("jbd2").read_bytes()
    result = split_module(original)
    validate_split(original, result.core, result.init)
    with pytest.raises(ValidationError, match="init wrapper"):
        validate_split(original, result.core, _patched_count(result.init, delta))


def _section_header_field(data: bytes, name: str, field_at: int, value: int) -> bytes:
    section = RawElf(data).section(name)
    return put(data, section.at + field_at, "<Q", value)


@pytest.mark.parametrize("change", ["hidden align 8", "visible size", "visible writable"])
def test_validator_rejects_a_hidden_table_not_behind_its_visible_one(kernel: DebianKernel,  # noqa: F811
                                                                    change: str) -> None:
    original = kernel.module("watchdog").read_bytes()
    result = split_module(original)
    core = result.core
    if change == "hidden align 8":
        core = _section_header_field(core, HIDDEN["__ksymtab_gpl"], 48, 8)  # sh_addralign
    elif change == "visible size":
        core = _section_header_field(core, "__kcrctab_gpl", 32, 4)  # sh_size: one CRC visible
    else:
        section = RawElf(core).section("__ksymtab")
        core = _section_header_field(core, "__ksymtab", 8, section.flags | SHF_WRITE)  # sh_flags
    with pytest.raises(ValidationError):
        validate_split(original, core, result.init)
