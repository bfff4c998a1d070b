"""The splitter on Debian 13's Linux 6.12: one anchor per memory of C that I reaches.

On 6.12 each struct module_memory type of C is its own allocation
(layout/linux612.py), so I reaches C's sections from one anchor per memory. These
tests hold a split of real 6.12 modules to the layout model, read independently
of the splitter's own bookkeeping:

* C's __ksymtab lists the anchors alone, sorted, each marking the start of a
  section of C in the memory its name says (C's struct module for MOD_DATA);
* every relocation of the original's init code into C is, in I, against the
  anchor of the target's memory, with the addend that lands on the same byte by
  the model's offsets within that memory;
* I's wrapper compares mem[type].size of every core memory with the model's,
  each field where struct module_memory puts it;
* I imports exactly the anchors, each with its CRC in I's __versions;
* the tables 6.12 adds go where the issue's measurements say: records of init
  code of .call_sites and __patchable_function_entries move to I, .orc_header
  stays in C whole.
"""

from __future__ import annotations

import json
import struct

import pytest

from initsplit.cache import FORMAT, parse_manifest, parse_reached_from, render_reached_from
from initsplit.elf import ElfObject, read_elf
from initsplit.elf.constants import R_X86_64_PC32, SHN_UNDEF
from initsplit.layout import linux612
from initsplit.layout.rules import LayoutRules
from initsplit.modfile import read_module
from initsplit.split import SplitModule, split_module
from initsplit.split.errors import SplitRefused
from initsplit.split.splitter import (KCRCTAB, KSYMTAB, KSYMTAB_STRINGS, RO_AFTER_INIT, RO_AFTER_INIT_RENAMED,
                                      WRAPPER_SECTION, anchor_crc)
from initsplit.split.tables import (KNOWN_STRUCT_MODULE_MEMORY_LAYOUTS, MODULE_MEMORY_FIELDS,
                                    MODVERSION_RECORD_SIZE)
from tests.testbed.fixtures import kernel612, rules612  # noqa: F401  (pytest fixtures)
from tests.testbed.kernel import DebianKernel

# Small (dummy), a block driver (loop), exports (mbcache, jbd2), many references
# into C and a read-only-after-init memory (ext4).
MODULES = ("dummy", "loop", "mbcache", "jbd2", "ext4")
LAYOUT = next(iter(KNOWN_STRUCT_MODULE_MEMORY_LAYOUTS.values()))
SUFFIX_MEMORY = {"0": "data", "1": "text", "2": "rodata", "3": "ro_after_init"}
CMPL_RIP = bytes.fromhex("813d")  # cmpl $imm32,disp32(%rip)


@pytest.fixture(scope="module")
def originals(kernel612: DebianKernel) -> dict[str, bytes]:  # noqa: F811
    return {name: read_module(kernel612.module(name)) for name in MODULES}


def split(originals: dict[str, bytes], rules: LayoutRules, name: str) -> SplitModule:
    return split_module(originals[name], rules)


def anchor_sections(core: ElfObject) -> dict[str, int]:
    """Anchor name -> the section of C its __ksymtab record's value points at
    (offset 0 of it), read from C's relocations."""
    ksymtab, strings = core.section(KSYMTAB), core.section(KSYMTAB_STRINGS)
    fields: dict[int, dict[int, tuple[int, int]]] = {}
    for rel in core.relocations_for(ksymtab):
        assert rel.type == R_X86_64_PC32
        fields.setdefault(rel.offset // 12, {})[rel.offset % 12] = (rel.symbol, rel.addend)
    out = {}
    for record in range(ksymtab.size // 12):
        value, name = fields[record][0], fields[record][4]
        assert core.symbols[name[0]].shndx == strings.index
        start = core.symbols[name[0]].value + name[1]
        anchor = strings.data[start:strings.data.index(b"\0", start)].decode()
        sym = core.symbols[value[0]]
        assert sym.is_section and value[1] == 0, anchor
        out[anchor] = sym.shndx
    assert list(out) == sorted(out) and len(out) == ksymtab.size // 12
    return out


@pytest.mark.parametrize("name", MODULES)
def test_anchors_mark_their_memories(originals: dict[str, bytes], rules612: LayoutRules,  # noqa: F811
                                     name: str) -> None:
    s = split(originals, rules612, name)
    core = read_elf(s.core)
    where = linux612.core_placement(core, rules612)
    anchors = anchor_sections(core)
    assert tuple(anchors) == s.anchors
    memories = set()
    for anchor, section in anchors.items():
        memory = SUFFIX_MEMORY[anchor[-1]]
        assert where[section][0] == memory, (anchor, core.sections[section].name)
        assert core.sections[section].size, anchor
        memories.add(memory)
    assert core.sections[anchors[s.anchors[0]]].name == ".gnu.linkonce.this_module"
    # Each anchor's CRC, as I's __versions has it for I's import of it.
    crcs = core.section(KCRCTAB).data
    assert [struct.unpack_from("<I", crcs, 4 * n)[0] for n in range(len(anchors))] == \
        [anchor_crc(a) for a in anchors]
    init = read_elf(s.init)
    versions = init.section("__versions").data
    version_of = {raw[8:].split(b"\0", 1)[0].decode(): struct.unpack_from("<Q", raw)[0]
                  for raw in (versions[i:i + MODVERSION_RECORD_SIZE]
                              for i in range(0, len(versions), MODVERSION_RECORD_SIZE))}
    imported = {sym.name for sym in init.symbols[1:] if sym.shndx == SHN_UNDEF and sym.name.startswith("0_")}
    assert imported == set(anchors)
    for anchor in anchors:
        assert version_of[anchor] == anchor_crc(anchor), anchor
    # Memories are anchored only where I reaches them, and the struct module always.
    assert "data" in memories and "text" in memories
    # The old one-allocation offsets are not offered to a loader that would use them.
    assert s.reached == ()
    names = {sec.name for sec in core.sections}
    for section, anchor_section, offset in s.reached_from:
        assert section in names and anchor_section in names


@pytest.mark.parametrize("name", MODULES)
def test_init_code_reaches_the_same_bytes(originals: dict[str, bytes], rules612: LayoutRules,  # noqa: F811
                                          name: str) -> None:
    s = split(originals, rules612, name)
    orig, core, init = read_elf(originals[name]), read_elf(s.core), read_elf(s.init)
    where = linux612.core_placement(core, rules612)
    anchors = {a: (where[sec][0], where[sec][1]) for a, sec in anchor_sections(core).items()}
    c_by_name = {sec.name: sec.index for sec in core.sections if sec.index in where}
    c_by_name[RO_AFTER_INIT] = c_by_name.get(RO_AFTER_INIT_RENAMED, -1)  # renamed in C
    checked = 0
    for text in (sec for sec in orig.sections if sec.name.startswith(".init.text")):
        mine = init.section(text.name)
        got = {r.offset: r for r in init.relocations_for(mine)}
        for rel in orig.relocations_for(text):
            target = orig.symbols[rel.symbol]
            if not target.in_section or orig.sections[target.shndx].name not in c_by_name:
                continue  # undefined, or in init (I's own)
            memory, offset = where[c_by_name[orig.sections[target.shndx].name]]
            out = got[rel.offset]
            anchor = init.symbols[out.symbol].name
            assert anchor in anchors, (name, rel.offset, anchor)
            anchor_memory, anchor_at = anchors[anchor]
            assert anchor_memory == memory, (name, orig.sections[target.shndx].name, anchor)
            assert out.type == rel.type
            assert anchor_at + out.addend == offset + target.value + rel.addend, (name, rel.offset)
            checked += 1
    assert checked, name


@pytest.mark.parametrize("name", MODULES)
def test_wrapper_checks_every_core_memory_size(originals: dict[str, bytes],  # noqa: F811
                                               rules612: LayoutRules, name: str) -> None:
    s = split(originals, rules612, name)
    core, init = read_elf(s.core), read_elf(s.init)
    sizes = linux612.core_memory_sizes(linux612.module_layout(core, rules612))
    assert sizes[linux612.MOD_TEXT] and sizes[linux612.MOD_DATA] and sizes[linux612.MOD_RODATA]
    wrapper = init.section(WRAPPER_SECTION)
    module_anchor = s.anchors[0]
    compared = {}
    for rel in init.relocations_for(wrapper):
        if init.symbols[rel.symbol].name != module_anchor or wrapper.data[rel.offset - 2:rel.offset] != CMPL_RIP:
            continue
        # disp32 is from the end of the instruction: 4 immediate bytes past the field.
        field = rel.addend + 8
        compared[field] = struct.unpack_from("<I", wrapper.data, rel.offset + 4)[0]
    f = MODULE_MEMORY_FIELDS
    assert (f.record_size, f.size) == (72, 8)  # BTF of Debian 13's vmlinux: tests/test_tables612.py
    assert compared == {LAYOUT.mem + t * f.record_size + f.size: size for t, size in sizes.items()}


def test_612_tables_go_where_their_keys_are(originals: dict[str, bytes],  # noqa: F811
                                            rules612: LayoutRules) -> None:
    for name in MODULES:
        s = split(originals, rules612, name)
        orig, core, init = read_elf(originals[name]), read_elf(s.core), read_elf(s.init)
        assert orig.section(".parainstructions") is None
        header = orig.section(".orc_header")
        assert header is not None and core.section(".orc_header").data == header.data, name
        assert init.section(".orc_header") is None
        for table in (".call_sites", "__patchable_function_entries"):
            size = 4 if table == ".call_sites" else 8
            if orig.section(table) is None:
                continue
            moved = s.moved_records.get(table, 0)
            kept = core.section(table).size // size
            assert kept + moved == orig.section(table).size // size, (name, table)
            if moved:
                assert init.section(table).size == moved * size
    # dummy's init code has both.
    dummy = split(originals, rules612, "dummy").moved_records
    assert dummy.get(".call_sites") and dummy.get("__patchable_function_entries"), dummy


def test_the_module_layout_crc_decides(originals: dict[str, bytes], rules612: LayoutRules) -> None:  # noqa: F811
    """No version prefix keeps 6.12 out any more; a build whose module_layout CRC
    is not known is refused, and so is a kernel that cannot unload (no mod_unload)."""
    data = originals["dummy"]
    crc = next(iter(KNOWN_STRUCT_MODULE_MEMORY_LAYOUTS))
    name = b"module_layout".ljust(MODVERSION_RECORD_SIZE - 8, b"\0")
    entry = struct.pack("<Q", crc) + name
    assert data.count(entry) == 1
    with pytest.raises(SplitRefused) as refused:
        split_module(data.replace(entry, struct.pack("<Q", crc ^ 1) + name), rules612)
    assert refused.value.reason == "struct module layout unknown (kernel build not known)"
    assert data.count(b" mod_unload ") == 1
    with pytest.raises(SplitRefused) as refused:
        split_module(data.replace(b" mod_unload ", b" mod_unlXad "), rules612)
    assert refused.value.reason == "unsupported kernel" and refused.value.detail.startswith("6.12.")


def test_the_cache_keeps_reached_from(originals: dict[str, bytes], rules612: LayoutRules) -> None:  # noqa: F811
    """A 6.12 split's manifest carries reached_from (cache format 8) and gives it
    back as the loader checks it; a split with no placement at all is no entry."""
    s = split(originals, rules612, "loop")
    text = render_reached_from(s.reached_from)
    assert parse_reached_from(text) == s.reached_from
    fields = dict(format=FORMAT, source_sha256="0" * 64, source_size=1, decision="split",
                  name="loop", init_name="loop__init", init_file="loop__init.ko", reached_from=text)
    assert parse_manifest(json.dumps(fields).encode()).reached_from == text
    with pytest.raises(ValueError, match="without the placement"):
        parse_manifest(json.dumps({**fields, "reached_from": ""}).encode())
    for bad in (".text=0", ".text=.text=x", "a/b=.text=0", "=.text=0"):
        with pytest.raises(ValueError):
            parse_reached_from(bad)
