"""Split a kernel module into a core module (C) and a temporary init module (I).

The method (verified on Debian 6.1.0-56-amd64, see README and the issue tracker):

* C is the original without its .init* sections. Its struct module keeps the
  original name, with ->init and ->exit left NULL, so it loads and runs nothing.
* C exports one "anchor" symbol, its own struct module (the start of
  .gnu.linkonce.this_module), in the INITSPLIT symbol namespace with a CRC, so
  the kernel's own linker (kernel/module/main.c, simplify_symbols) resolves it in
  I. I reaches every other part of C by an offset from the anchor: on 6.1 the
  whole core layout is one allocation (module_alloc() of core_layout.size) in
  which layout_sections() places each section deterministically, and the layout
  model (initsplit.layout) computes where, from C's own section headers. The
  validator recomputes every offset. Before it loads I, the daemon compares the
  offset of each section of C that I reaches (SplitModule.reached) with the
  address the kernel lists for it in /sys/module/NAME/sections, and loads plain
  where they differ; I's init wrapper also compares C's core_layout sizes with
  the model's, a coarser check for an I loaded by hand. No export of C can serve
  as the anchor: C's exports stay hidden until I's init has succeeded (see
  _emit_exports).
* On 6.4 and later (Debian 13's 6.12) C is no longer one allocation: each
  struct module_memory type (MOD_TEXT, MOD_DATA, MOD_RODATA, MOD_RO_AFTER_INIT)
  is its own execmem_alloc() (kernel/module/main.c module_memory_alloc()), and
  offsets compare only within one (layout/linux612.py core_placement()). So C
  exports one anchor per memory I reaches (_anchor_memories): the struct module
  for MOD_DATA, as on 6.1, and for each other memory the first section the
  layout puts in it; I reaches each section of C from the anchor of its memory
  (SplitModule.reached_from), and the wrapper compares each mem[type].size.
* I holds the .init* sections, the per-record table entries describing them, a
  struct module named NAME__init whose ->init is a synthesized wrapper (see
  codegen.py) and whose ->exit is a stub.

Everything the splitter cannot prove safe raises SplitRefused with a reason, so
callers can fall back to loading the original module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from ..elf import ElfObject, ObjectBuilder, Relocation, RelocationTable, Section, Symbol, read_elf
from ..elf.constants import (
    EM_X86_64,
    R_X86_64_64,
    R_X86_64_PC32,
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHF_MERGE,
    SHF_STRINGS,
    SHF_WRITE,
    SHN_ABS,
    SHN_COMMON,
    SHN_UNDEF,
    SHT_NOBITS,
    SHT_PROGBITS,
    SHT_RELA,
    SHT_STRTAB,
    SHT_SYMTAB,
    STB_GLOBAL,
    STB_LOCAL,
    STT_FUNC,
    STT_NOTYPE,
    STT_SECTION,
    X86_64_RELOC_WIDTH,
)
from ..layout import LayoutRules, ModuleLayout, linux612
from ..layout.linux61 import module_layout
from . import codegen
from .errors import NothingToSplit, SplitRefused
from .modinfo import first, parse_modinfo, render_modinfo
from .names import init_module_name
from .tables import (
    KCRCTAB_RECORD_SIZE,
    KSYMTAB_RECORD_SIZE,
    MODULE_NAME_LEN,
    MODVERSION_RECORD_SIZE,
    MODULE_LAYOUT_FIELDS,
    MODULE_MEMORY_FIELDS,
    TRACE_EVAL_MAP_SIZE,
    KernelTables,
    RecordTable,
    StructModuleLayout,
    StructModuleMemoryLayout,
    kernel_tables,
)

NAMESPACE = "INITSPLIT"
THIS_MODULE = ".gnu.linkonce.this_module"
RO_AFTER_INIT = ".data..ro_after_init"
# kernel/module/main.c marks exactly ".data..ro_after_init" read-only once the
# module is live; under any other name the section is ordinary writable data.
RO_AFTER_INIT_RENAMED = ".data.initsplit_ro_after_init"
EVAL_MAP = "_ftrace_eval_map"
EVAL_MAP_COPIES = ".data.initsplit_eval_maps"
WRAPPER_SECTION = ".init.text.initsplit"
STUB_SECTION = ".text"
KSYMTAB = "__ksymtab"
KCRCTAB = "__kcrctab"
KSYMTAB_GPL = "__ksymtab_gpl"
KCRCTAB_GPL = "__kcrctab_gpl"
KSYMTAB_STRINGS = "__ksymtab_strings"
# C's export tables hold the anchors only; the original's records follow each
# table directly in a section of this name, and the init wrapper publishes them
# (see _emit_exports). No ".init" prefix: module_init_layout_section()
# would move such a section to the init layout.
HIDDEN = {KSYMTAB: "__initsplit_ksymtab", KCRCTAB: "__initsplit_kcrctab",
          KSYMTAB_GPL: "__initsplit_ksymtab_gpl", KCRCTAB_GPL: "__initsplit_kcrctab_gpl"}
# (symbol table, CRC table) pairs; find_module_sections() in kernel/module/main.c
# reads exactly these names.
EXPORT_TABLES = ((KSYMTAB, KCRCTAB), (KSYMTAB_GPL, KCRCTAB_GPL))
PERCPU = ".data..percpu"
RETURN_THUNK = "__x86_return_thunk"
# The -mfentry call at a traced function's entry; arch/x86 MCOUNT_ADDR.
FENTRY = "__fentry__"
MCOUNT_LOC = "__mcount_loc"
# Sections the kernel reads from the file but never keeps (rewrite_section_headers).
NOT_LOADED = (".modinfo", "__versions")
# Sections of C that _emit_exports builds rather than copies.
_REBUILT_IN_C = {KSYMTAB, KCRCTAB, KSYMTAB_GPL, KCRCTAB_GPL}

_MODVERSION = struct.Struct(f"<Q{MODULE_NAME_LEN}s")


def _is_arm_mapping_symbol(name: str) -> bool:
    """kernel/module/kallsyms.c is_arm_mapping_symbol() (6.1)."""
    if name.startswith(".L"):
        return True
    return len(name) >= 2 and name[0] == "$" and name[1] in "axtd" and (len(name) == 2 or name[2] == ".")


# Anchor names start with a digit: no C identifier (so no exported name) can, and
# '0' sorts before 'A' and '_', so in strcmp order every anchor comes before every
# export. C's __ksymtab can then list the anchors alone and be followed by the
# original's sorted records, and the whole stays one sorted array for bsearch.
ANCHOR_LEAD = "0"


def anchor_prefix(name: str) -> str:
    # Anchor names must fit struct modversion_info.name (55 chars + NUL).
    prefix = f"{ANCHOR_LEAD}_initsplit_{name}_"
    if len(prefix) + 6 <= MODULE_NAME_LEN - 1:
        return prefix
    return f"{ANCHOR_LEAD}_initsplit_h{hashlib.sha1(name.encode()).hexdigest()[:16]}_"


def anchor_crc(anchor: str) -> int:
    return zlib.crc32(anchor.encode()) & 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class SplitModule:
    name: str
    init_name: str
    core: bytes
    init: bytes
    anchors: tuple[str, ...]
    moved_records: dict[str, int]
    # Each non-empty section of C that I reaches, with its offset from C's struct
    # module in the layout model: what the daemon compares with the addresses the
    # kernel lists in /sys/module/NAME/sections before it loads I (the kernel
    # follows some of I's pointers into C as soon as I is loaded, before I's own
    # checks run: jump_label_add_module() on a key in C, for one).
    reached: tuple[tuple[str, int], ...] = ()
    # C's layout by the model (what the splitter placed I's offsets by), so that
    # the decision need not read C again.
    core_layout: ModuleLayout | None = None
    # C as parsed for that layout (its sections weigh in the decision's slab model).
    core_object: ElfObject | None = None
    # On a kernel with struct module_memory (6.12), where offsets from the struct
    # module mean nothing outside MOD_DATA: each non-empty section of C that I
    # reaches as (C's name, C's section its memory's anchor marks, the offset from
    # that section), the anchor sections included; reached is then empty, so a
    # loader that checks offsets from the struct module only loads plain.
    reached_from: tuple[tuple[str, str, int], ...] = ()


@dataclass(slots=True)
class _TableSplit:
    table: RecordTable
    section: Section
    core: list[int] = field(default_factory=list)
    init: list[int] = field(default_factory=list)
    relocs: dict[int, list[Relocation]] = field(default_factory=dict)  # record -> relocs (offset in record)


def split_module(data: bytes, rules: LayoutRules = LayoutRules()) -> SplitModule:
    """Split the module in *data* for a kernel of *rules*.

    Raises NothingToSplit, SplitRefused or MalformedElf.
    """
    return split_object(read_elf(data), rules)


def split_object(obj: ElfObject, rules: LayoutRules = LayoutRules()) -> SplitModule:
    """split_module() for a module already read with read_elf() (it is not modified)."""
    return _split(obj, rules)


def layout_checks(core: ElfObject | ModuleLayout, rules: LayoutRules, module_layout_field: int
                  ) -> tuple[codegen.Check, ...]:
    """What I's wrapper compares in C's struct module before the original init
    runs: each core_layout size the kernel computes (layout_sections(),
    layout_symtab()) against the model's for C. Page-rounded sizes: a coarse
    check (a section placed otherwise within its group passes it); the daemon's
    check of each section's address before it loads I is the exact one."""
    placed = core if isinstance(core, ModuleLayout) else module_layout(core, rules)
    marks = placed.core_marks()
    f = MODULE_LAYOUT_FIELDS
    fields = (f.text_size, f.ro_size, f.ro_after_init_size, f.size)
    return tuple(codegen.Check(module_layout_field + off, value) for off, value in zip(fields, marks))


def memory_checks(placed: ModuleLayout, mem_field: int) -> tuple[codegen.Check, ...]:
    """layout_checks() for a kernel with struct module_memory (6.12): mem[type].size
    of each core memory type, as module_memory_alloc() (kernel/module/main.c)
    stores it back page-aligned, against the model's for C (linux612.py
    core_memory_sizes()); a type C has nothing in must read 0 (move_module()
    allocates nothing for it). mem[] is struct module_memory's array, indexed
    by enum mod_mem_type. Coarse like 6.1's: whole pages per memory."""
    f = MODULE_MEMORY_FIELDS
    return tuple(codegen.Check(mem_field + mem_type * f.record_size + f.size, size)
                 for mem_type, size in sorted(linux612.core_memory_sizes(placed).items()))


# ------------------------------------------------------------------ phases
#
# _split() runs these in order, each taking what it needs and returning its
# result: _examine() checks the original and records what the later phases read;
# _build_core() writes C; _place_core() lays C out as the kernel will, which gives
# the offset of each of C's sections from the anchor; _build_init() writes I with
# those offsets. C comes first because I's references into C depend on C's layout.

# A relocation to emit: (offset in its section, type, symbol handle in the output
# builder, addend). Every emitter collects a list of these for one section and
# hands it over with _add_relocs().
_OutReloc = tuple[int, int, int, int]
# Which symbol of the output each original symbol became (None: it has none there).
_SymbolMap = list[int | None]
# Where in C each trace_eval_map object of the original's init data is copied to:
# (symbol, addend) of its pointer in _ftrace_eval_map -> (its bytes, its relocations,
# offsets relative to the object).
_EvalCopies = dict[tuple[int, int], tuple[bytes, list[Relocation]]]


@dataclass(frozen=True, slots=True)
class _ModuleFields:
    """->init and ->exit of the original's struct module, as its relocations set them."""

    init_field: int
    exit_field: int  # -1 without a cleanup routine, until _examine() takes it from the layout
    init_symbol: Symbol
    exit_symbol: Symbol | None
    init_sym_index: int
    exit_sym_index: int
    name_offset: int  # of the module's name in struct module


@dataclass(frozen=True, slots=True)
class _Original:
    """The original module, checked: everything the building phases read of it."""

    obj: ElfObject
    name: str
    init_name: str
    modinfo: list[tuple[str, str]]
    init_secs: frozenset[int]  # indexes of the .init* sections the kernel allocates
    this_module: Section
    fields: _ModuleFields
    tables: dict[str, _TableSplit]
    versions: list[tuple[int, str]]
    exports: dict[str, int]  # export table -> records the original has in it
    kernel: KernelTables  # the per-kernel tables, by the module_layout CRC
    layout: StructModuleLayout | StructModuleMemoryLayout

    @property
    def sections(self) -> list[Section]:
        return self.obj.sections

    @property
    def symbols(self) -> list[Symbol]:
        return self.obj.symbols

    def is_init_symbol(self, index: int) -> bool:
        return self.symbols[index].shndx in self.init_secs


@dataclass(frozen=True, slots=True)
class _Anchor:
    """A symbol C exports before I's init has run: C's struct module (on 6.1 the
    only one), or the first section of one of C's memories (_anchor_memories)."""

    name: str
    section: int  # the original's index of the section it marks
    memory: str = ""  # its struct module_memory type, by group name (6.12)


@dataclass(frozen=True, slots=True)
class _Core:
    data: bytes
    index: dict[int, int]  # the original's section index -> C's


@dataclass(frozen=True, slots=True)
class _Placement:
    """C as the layout model places it (_place_core, _place_core_memories)."""

    anchor_delta: dict[int, int]  # the original's section index -> offset from its anchor in C
    anchor_of: dict[int, _Anchor]  # ... and that anchor (6.1: C's one)
    names: dict[int, str]  # the original's section index -> the section's name in C
    sizes: dict[int, int]  # ... and its size there
    checks: tuple[codegen.Check, ...]  # what I's wrapper compares in C's struct module
    layout: ModuleLayout
    core_object: ElfObject
    anchors: tuple[_Anchor, ...]  # C's, in __ksymtab order


@dataclass(frozen=True, slots=True)
class _Init:
    data: bytes
    reached: frozenset[int]  # the original's indexes of the sections of C that I refers to


class _Export(NamedTuple):
    """One record of an export table of C: its name, relocations (offsets within the
    record), CRC, and its record number in the original (None for an anchor)."""

    name: bytes
    relocs: tuple[_OutReloc, ...]
    crc: bytes
    record: int | None


def _split(obj: ElfObject, rules: LayoutRules) -> SplitModule:
    original = _examine(obj)
    memories = original.kernel.has_module_memory
    if memories:
        core, placement, init = _anchor_memories(original, rules)
    else:
        # One anchor, C's struct module: I's wrapper reaches it anyway.
        anchor = _Anchor(f"{anchor_prefix(original.name)}0", original.this_module.index)
        core = _build_core(original, (anchor,))
        placement = _place_core(original, core, rules, anchor)
        init = _build_init(original, placement)
    return SplitModule(
        name=original.name,
        init_name=original.init_name,
        core=core.data,
        init=init.data,
        anchors=tuple(a.name for a in placement.anchors),
        moved_records={t.section.name: len(t.init) for t in original.tables.values() if t.init},
        reached=() if memories else _reached_sections(placement, init.reached),
        core_layout=placement.layout,
        core_object=placement.core_object,
        reached_from=_reached_from(placement, init.reached) if memories else (),
    )


# ------------------------------------------------------------------ checks

def _examine(obj: ElfObject) -> _Original:
    """Check that the splitter can split *obj*, and what its phases need of it.

    The checks run in this order so that a module failing several is refused
    for the first (the reasons are in tree summaries and manifests)."""
    if obj.machine != EM_X86_64:
        raise SplitRefused("unsupported architecture")
    modinfo, name = _check_modinfo(obj)
    init_secs = _init_sections(obj, name)
    this_module = obj.section(THIS_MODULE)
    if this_module is None or this_module.type != SHT_PROGBITS:
        raise SplitRefused("no struct module")
    fields = _find_module_fields(obj, this_module, init_secs, name)
    _check_symbols(obj)
    versions = _parse_versions(obj)
    kernel = _kernel_tables(versions)
    tables = _split_tables(obj, init_secs, kernel)
    layout = _struct_module_layout(kernel, this_module, fields)
    exports = {table: _export_count(obj, table, crcs) for table, crcs in EXPORT_TABLES}
    if fields.exit_field < 0:
        # No cleanup routine: I's exit stub still needs ->exit, known from the layout only.
        if layout is None:
            raise SplitRefused("struct module layout unknown (no cleanup routine to locate ->exit)")
        fields = dataclasses.replace(fields, exit_field=layout.exit)
    if any(exports.values()) and layout is None:
        raise SplitRefused("struct module layout unknown (needed to publish exports after init)")
    if layout is None:
        raise SplitRefused("struct module layout unknown (needed to check C's layout)")
    return _Original(obj=obj, name=name, init_name=init_module_name(name), modinfo=modinfo,
                     init_secs=init_secs, this_module=this_module, fields=fields, tables=tables,
                     versions=versions, exports=exports, kernel=kernel, layout=layout)


def _check_modinfo(obj: ElfObject) -> tuple[list[tuple[str, str]], str]:
    """(.modinfo's entries, the module's name), for a module of a kernel we know."""
    modinfo_sec = obj.section(".modinfo")
    if modinfo_sec is None:
        raise SplitRefused("no .modinfo")
    modinfo = parse_modinfo(modinfo_sec.data)
    name = first(modinfo, "name")
    vermagic = first(modinfo, "vermagic") or ""
    if not name or len(name) >= MODULE_NAME_LEN or not name.replace("_", "a").isalnum():
        raise SplitRefused("bad module name", repr(name))
    # Which kernel builds are known is the module_layout CRC's to say (tables.py,
    # _kernel_tables()), not the version's: struct module changes within a stable
    # series. A kernel without CONFIG_MODULE_UNLOAD could never delete I.
    if "mod_unload" not in vermagic:
        # (Kbuild's vermagic ends in a space: VERMAGIC_STRING's MODULE_ARCH_VERMAGIC "".)
        raise SplitRefused("unsupported kernel", vermagic.strip() or "no vermagic")
    return modinfo, name


def _init_sections(obj: ElfObject, name: str) -> frozenset[int]:
    init_secs = frozenset(
        s.index for s in obj.sections if s.flags & SHF_ALLOC and s.name.startswith(".init"))
    if not init_secs:
        raise NothingToSplit(name)
    for index in init_secs:
        if obj.sections[index].type not in (SHT_PROGBITS, SHT_NOBITS):
            raise SplitRefused("unexpected init section type", obj.sections[index].name)
    return init_secs


def _find_module_fields(obj: ElfObject, this_module: Section, init_secs: frozenset[int],
                        name: str) -> _ModuleFields:
    """Find ->init and ->exit in struct module from the original's own relocations."""
    init_field = exit_field = -1
    init_symbol: Symbol | None = None
    exit_symbol: Symbol | None = None
    init_sym_index = exit_sym_index = -1
    for rel in obj.relocations_for(this_module):
        sym = obj.symbols[rel.symbol]
        if rel.type != R_X86_64_64 or rel.addend != 0:
            continue
        if sym.name == "init_module":
            init_field, init_symbol, init_sym_index = rel.offset, sym, rel.symbol
        elif sym.name == "cleanup_module":
            exit_field, exit_symbol, exit_sym_index = rel.offset, sym, rel.symbol
    if init_symbol is None:
        raise SplitRefused("init sections without an init routine")
    if not init_symbol.in_section:
        raise SplitRefused("init routine is not defined in the module")
    if exit_symbol is not None and not exit_symbol.in_section:
        raise SplitRefused("cleanup routine is not defined in the module")
    if exit_symbol is not None and exit_symbol.shndx in init_secs:
        raise SplitRefused("cleanup routine lives in an init section")
    size = this_module.size
    for off in (init_field, exit_field):
        if off >= 0 and off + 8 > size:
            raise SplitRefused("struct module field outside struct module")
    name_offset = this_module.data.find(name.encode() + b"\0")
    if name_offset < 0 or name_offset + MODULE_NAME_LEN > size:
        raise SplitRefused("module name not found in struct module")
    return _ModuleFields(init_field, exit_field, init_symbol, exit_symbol, init_sym_index,
                         exit_sym_index, name_offset)


def _kernel_tables(versions: list[tuple[int, str]]) -> KernelTables:
    """The tables of the kernel build the module was built against, by its
    module_layout CRC (tables.py); a build we do not know is refused."""
    crc = next((c for c, n in versions if n == "module_layout"), None)
    kernel = kernel_tables(crc)
    if kernel is None:
        raise SplitRefused("struct module layout unknown (kernel build not known)",
                           "no module_layout" if crc is None else f"module_layout {crc:#010x}")
    return kernel


def _struct_module_layout(kernel: KernelTables, this_module: Section, fields: _ModuleFields
                          ) -> StructModuleLayout | StructModuleMemoryLayout | None:
    """struct module's layout for *kernel*, or None when the module's own
    relocations disagree with it."""
    layout = kernel.struct_module
    if (layout.size != this_module.size or layout.init != fields.init_field
            or fields.exit_field not in (-1, layout.exit)):
        return None
    return layout


def _export_count(obj: ElfObject, table: str, crcs: str) -> int:
    syms, crc = obj.section(table), obj.section(crcs)
    if syms is None and crc is None:
        return 0
    if syms is None or crc is None:
        raise SplitRefused("exports without CRCs")
    if syms.size % KSYMTAB_RECORD_SIZE or crc.size * 3 != syms.size:
        raise SplitRefused("export tables do not match")
    return syms.size // KSYMTAB_RECORD_SIZE


def _check_symbols(obj: ElfObject) -> None:
    for sym in obj.symbols:
        if sym.shndx == SHN_COMMON:
            raise SplitRefused("common symbol", sym.name)


def _split_tables(obj: ElfObject, init_secs: frozenset[int],
                  kernel: KernelTables) -> dict[str, _TableSplit]:
    """Each per-record table of the original, its records sorted into C's and I's
    by the section its key relocation points into."""
    splits: dict[str, _TableSplit] = {}
    symbols = obj.symbols
    for section in obj.sections:
        table = kernel.by_section.get(section.name)
        if table is None or not section.flags & SHF_ALLOC:
            continue
        if section.type != SHT_PROGBITS or section.size % table.record_size:
            raise SplitRefused("table size is not a multiple of its record size", section.name)
        count = section.size // table.record_size
        split = _TableSplit(table, section)
        key_side: dict[int, bool] = {}
        size, key = table.record_size, table.key_offset
        relocs = split.relocs
        rt = obj.relocations_for(section)
        for offset, type_, symbol, addend in zip(rt.offsets, rt.types, rt.symbols, rt.addends):
            record, inner = divmod(offset, size)
            if record >= count or inner + X86_64_RELOC_WIDTH.get(type_, 8) > size:
                raise SplitRefused("relocation straddles table records", section.name)
            rel = Relocation(inner, type_, symbol, addend)
            if record in relocs:
                relocs[record].append(rel)
            else:
                relocs[record] = [rel]
            if inner == key:
                key_side[record] = symbols[symbol].shndx in init_secs
        for record in range(count):
            (split.init if key_side.get(record, False) else split.core).append(record)
        for record in split.core:
            for rel in split.relocs.get(record, ()):
                if symbols[rel.symbol].shndx in init_secs:
                    raise SplitRefused(f"{section.name} record of core code points into init")
        if table.parallel:
            parallel = obj.section(table.parallel)
            if parallel is None or parallel.size != count * table.parallel_record_size:
                raise SplitRefused("parallel table does not match", table.parallel)
            if len(obj.relocations_for(parallel)):
                raise SplitRefused("parallel table has relocations", table.parallel)
        splits[section.name] = split
    return splits


def _parse_versions(obj: ElfObject) -> list[tuple[int, str]]:
    section = obj.section("__versions")
    if section is None:
        raise SplitRefused("no __versions (module built without modversions)")
    if section.size % MODVERSION_RECORD_SIZE:
        raise SplitRefused("__versions size is not a multiple of its record size")
    versions: list[tuple[int, str]] = []
    for crc, raw in _MODVERSION.iter_unpack(section.data):
        versions.append((crc, raw.split(b"\0", 1)[0].decode("utf-8", "replace")))
    return versions


# ------------------------------------------------------------ core module

class _ExportStrings(NamedTuple):
    """Offsets in C's __ksymtab_strings of the names _build_core appends."""

    namespace: int
    anchors: tuple[int, ...]  # one per anchor, in its order


def _add_relocs(builder: ObjectBuilder, out: int, relocs: Sequence[_OutReloc]) -> None:
    """Give the builder *relocs* for its section *out*, in order. A section copied
    from the original with relocations gets its .rela section even when none is
    left (as it always has); the callers for sections of our own call this only
    with relocations to add."""
    builder.add_relocations(out, [r[0] for r in relocs], [r[1] for r in relocs],
                            [r[2] for r in relocs], [r[3] for r in relocs])


def _build_core(original: _Original, anchors: tuple[_Anchor, ...]) -> _Core:
    """C: the original without its init sections and the records describing them,
    its export tables rebuilt around the anchor (see _emit_exports)."""
    obj = original.obj
    builder = ObjectBuilder(machine=EM_X86_64, flags=obj.flags)
    strings = obj.section(KSYMTAB_STRINGS)
    eval_copies = _eval_map_copies(original)
    # The namespace and the anchors' names go at the end of __ksymtab_strings.
    base = strings.size if strings is not None else 0
    extra = NAMESPACE.encode() + b"\0"
    at: list[int] = []
    for anchor in anchors:
        at.append(base + len(extra))
        extra += anchor.name.encode() + b"\0"
    names = _ExportStrings(namespace=base, anchors=tuple(at))

    c_index = _copy_core_sections(builder, original, extra)
    c_symbol = _copy_core_symbols(builder, original, c_index)
    eval_sec = None
    if eval_copies:
        eval_sec = builder.add_section(EVAL_MAP_COPIES, type=SHT_PROGBITS,
                                       flags=SHF_ALLOC | SHF_WRITE, addralign=8,
                                       data=b"".join(c[0] for c in eval_copies.values()))
    for orig, out in c_index.items():
        table = obj.relocations.get(orig)
        if table is None:
            continue
        split = original.tables.get(original.sections[orig].name)
        if split is not None:
            _emit_core_table(builder, out, split, c_symbol)
        else:
            # Non-allocated targets (.modinfo, __versions...) keep their relocations
            # too: the kernel ignores them (apply_relocations skips such targets).
            _emit_core_relocs(builder, original, out, original.sections[orig], table, c_symbol,
                              eval_copies, eval_sec)
    if eval_sec is not None:
        _emit_eval_map_copies(builder, original, eval_sec, eval_copies, c_symbol)

    if strings is None:
        strings_out = builder.add_section(KSYMTAB_STRINGS, type=SHT_PROGBITS,
                                          flags=SHF_ALLOC | SHF_MERGE | SHF_STRINGS,
                                          data=extra, addralign=1, entsize=1)
    else:
        strings_out = c_index[strings.index]
    _emit_exports(builder, original, anchors, c_index, c_symbol, builder.section_symbol(strings_out),
                  names)
    return _Core(builder.build(), c_index)


def _copy_core_sections(builder: ObjectBuilder, original: _Original, extra: bytes
                        ) -> dict[int, int]:
    """Add C's sections; return the original's section index -> C's. *extra* is
    appended to __ksymtab_strings."""
    obj = original.obj
    skip_types = (SHT_SYMTAB, SHT_STRTAB, SHT_RELA)
    c_index: dict[int, int] = {}
    for section in original.sections:
        if section.index == 0 or section.index in original.init_secs or section.type in skip_types:
            continue
        if not section.flags & SHF_ALLOC and section.index in obj.relocations:
            # Debug info and the like: the kernel never applies these relocations
            # (apply_relocations skips non-allocated targets) and some of them
            # would point at the init sections C no longer has.
            continue
        name, data = section.name, section.data
        if name == RO_AFTER_INIT:
            name = RO_AFTER_INIT_RENAMED
        split = original.tables.get(name)
        if split is not None:
            size = split.table.record_size
            data = b"".join(data[r * size:(r + 1) * size] for r in split.core)
        elif name in original.kernel.parallel:
            owner = original.tables.get(original.kernel.parallel[name].section)
            if owner is None:
                raise SplitRefused("parallel table without its index table", name)
            psize = owner.table.parallel_record_size
            data = b"".join(data[r * psize:(r + 1) * psize] for r in owner.core)
        elif name in _REBUILT_IN_C:
            continue
        elif name == KSYMTAB_STRINGS:
            data = data + extra
        c_index[section.index] = builder.add_section(
            name, type=section.type, flags=section.flags, data=data,
            size=len(data) if section.type != SHT_NOBITS else section.size,
            addralign=section.addralign, entsize=section.entsize)
    return c_index


def _copy_core_symbols(builder: ObjectBuilder, original: _Original, c_index: dict[int, int]
                       ) -> _SymbolMap:
    """Add C's symbols, everything not defined in an init section; return the map."""
    c_symbol: _SymbolMap = [0] * len(original.symbols)
    for index, sym in enumerate(original.symbols):
        if index == 0:
            continue
        if sym.shndx in original.init_secs:
            c_symbol[index] = None
            continue
        shndx = sym.shndx
        if sym.in_section:
            if shndx not in c_index:
                c_symbol[index] = None  # e.g. a section symbol of a rebuilt table
                continue
            shndx = c_index[shndx]
        c_symbol[index] = builder.add_symbol(
            sym.name, value=sym.value, size=sym.size, bind=sym.bind, type=sym.type,
            other=sym.other, shndx=shndx)
    return c_symbol


def _emit_core_relocs(builder: ObjectBuilder, original: _Original, out: int, section: Section,
                      table: RelocationTable, c_symbol: _SymbolMap, eval_copies: _EvalCopies,
                      eval_sec: int | None) -> None:
    """The relocations of *section* (C's *out*), all but struct module's ->init and
    ->exit (C runs nothing); _ftrace_eval_map's pointers into init data go to the copies."""
    name = section.name
    is_module = section.index == original.this_module.index
    is_eval = name == EVAL_MAP
    fields = original.fields
    drop = {fields.init_field, fields.exit_field} if is_module else set()
    # Where each copy sits in EVAL_MAP_COPIES: the copies in order, one
    # struct trace_eval_map each (_emit_eval_map_copies lays them out so).
    copy_at = {key: n * TRACE_EVAL_MAP_SIZE for n, key in enumerate(eval_copies)} if is_eval else {}
    relocs: list[_OutReloc] = []
    for offset, type_, symbol, addend in zip(table.offsets, table.types, table.symbols,
                                              table.addends):
        if offset in drop:
            continue
        handle = c_symbol[symbol]
        if handle is None:
            if eval_sec is not None and (symbol, addend) in copy_at:
                handle = builder.section_symbol(eval_sec)
                addend = copy_at[(symbol, addend)]
            elif original.is_init_symbol(symbol):
                target = original.sections[original.symbols[symbol].shndx].name
                raise SplitRefused(f"{name} points into init", f"{target}")
            else:
                raise SplitRefused("relocation against a dropped symbol", name)
        if type_ not in X86_64_RELOC_WIDTH and section.flags & SHF_ALLOC:
            raise SplitRefused("unsupported relocation type", f"{type_} in {name}")
        relocs.append((offset, type_, handle, addend))
    _add_relocs(builder, out, relocs)


def _emit_core_table(builder: ObjectBuilder, out: int, split: _TableSplit, c_symbol: _SymbolMap
                     ) -> None:
    """The relocations of C's records of a per-record table, renumbered."""
    size = split.table.record_size
    relocs: list[_OutReloc] = []
    for new, record in enumerate(split.core):
        for rel in split.relocs.get(record, ()):
            handle = c_symbol[rel.symbol]
            if handle is None:
                raise SplitRefused(f"{split.section.name} record of core code points into init")
            relocs.append((new * size + rel.offset, rel.type, handle, rel.addend))
    _add_relocs(builder, out, relocs)


def _eval_map_copies(original: _Original) -> _EvalCopies:
    """Copy the struct trace_eval_map objects _ftrace_eval_map points to out of init data.

    The kernel reads them when C goes live (trace_module_add_evals), long
    before I exists, so they must live in C for the module's trace formats
    to show numeric values.
    """
    obj = original.obj
    section = obj.section(EVAL_MAP)
    copies: _EvalCopies = {}
    if section is None:
        return copies
    for rel in obj.relocations_for(section):
        sym = original.symbols[rel.symbol]
        if sym.shndx not in original.init_secs:
            continue
        if rel.type != R_X86_64_64:
            raise SplitRefused("unexpected relocation in _ftrace_eval_map")
        source = original.sections[sym.shndx]
        start = sym.value + rel.addend
        if start < 0 or start + TRACE_EVAL_MAP_SIZE > source.size or source.type == SHT_NOBITS:
            raise SplitRefused("trace eval map outside its section")
        inner = [r._replace(offset=r.offset - start) for r in obj.relocations_for(source)
                 if start <= r.offset < start + TRACE_EVAL_MAP_SIZE]
        copies[(rel.symbol, rel.addend)] = (source.data[start:start + TRACE_EVAL_MAP_SIZE], inner)
    return copies


def _emit_eval_map_copies(builder: ObjectBuilder, original: _Original, eval_sec: int,
                          eval_copies: _EvalCopies, c_symbol: _SymbolMap) -> None:
    """The relocations inside the copied trace_eval_map objects (their strings)."""
    out: list[_OutReloc] = []
    offset = 0
    for blob, relocs in eval_copies.values():
        for rel in relocs:
            mapped = c_symbol[rel.symbol]
            if mapped is None:
                raise SplitRefused("trace eval map points into init", original.symbols[rel.symbol].name)
            out.append((offset + rel.offset, rel.type, mapped, rel.addend))
        offset += len(blob)
    if out:
        _add_relocs(builder, eval_sec, out)


def _emit_exports(builder: ObjectBuilder, original: _Original, anchor_symbols: tuple[_Anchor, ...],
                  c_index: dict[int, int], c_symbol: _SymbolMap, strings_sym: int,
                  names: _ExportStrings) -> None:
    """Rebuild C's export tables: the anchors visible, the original's exports hidden.

    find_module_sections() (kernel/module/main.c) sets mod->syms to the start
    of __ksymtab and mod->num_syms to its size / 12, mod->crcs to __kcrctab, and
    the same for __ksymtab_gpl / __kcrctab_gpl. find_symbol() bsearches
    syms[0..num_syms) by name (find_exported_symbol_in_section) and takes the
    CRC at the same index in crcs. So:

    * __ksymtab holds only the anchors (one on 6.1); __kcrctab their CRCs. The
      kernel counts only them, and nobody but I can link against C.
    * the original's records follow, sorted, in __initsplit_ksymtab (and
      __initsplit_kcrctab), which layout_sections() places right behind:
      sections of one flags class go in section-header order, each at the
      previous end aligned to sh_addralign (module_get_offset), and both
      are SHF_ALLOC, 4-aligned, and whole 4-byte records, with nothing between.
    * __ksymtab_gpl and __kcrctab_gpl are empty, but still placed, so
      gpl_syms/gpl_crcs point at the hidden GPL records behind them.

    The anchor sorts before every export name (ANCHOR_LEAD), so the anchor followed
    by the hidden records is one sorted array, and the wrapper publishes it
    by storing the full counts into num_syms / num_gpl_syms after init.
    """
    strings = original.obj.section(KSYMTAB_STRINGS)
    anchors: list[_Export] = []
    for anchor, name_at in zip(anchor_symbols, names.anchors):
        target = c_index.get(anchor.section)
        if target is None:
            raise SplitRefused("anchor section missing from core", original.sections[anchor.section].name)
        relocs = (
            (0, R_X86_64_PC32, builder.section_symbol(target), 0),
            (4, R_X86_64_PC32, strings_sym, name_at),
            (8, R_X86_64_PC32, strings_sym, names.namespace),
        )
        anchors.append(_Export(anchor.name.encode(), relocs, struct.pack("<I", anchor_crc(anchor.name)),
                               None))
    for table, crcs in EXPORT_TABLES:
        exports = _original_exports(original, table, crcs, strings, c_symbol)
        if exports and min(e.name for e in exports) <= anchors[-1].name:
            raise SplitRefused("an export name sorts before the anchors")
        visible = anchors if table == KSYMTAB else ()
        if not visible and not exports and table != KSYMTAB:
            continue
        _emit_export_table(builder, original, table, crcs, visible, exports)


def _original_exports(original: _Original, table: str, crcs: str, strings: Section | None,
                      c_symbol: _SymbolMap) -> list[_Export]:
    """The original's records of *table*, sorted by name."""
    obj = original.obj
    ksymtab, kcrctab = obj.section(table), obj.section(crcs)
    if ksymtab is None:
        return []
    assert kcrctab is not None  # _export_count() refused a table without its CRCs
    per_record: dict[int, list[Relocation]] = {}
    for rel in obj.relocations_for(ksymtab):
        per_record.setdefault(rel.offset // KSYMTAB_RECORD_SIZE, []).append(rel)
    entries: list[_Export] = []
    for record in range(ksymtab.size // KSYMTAB_RECORD_SIZE):
        rels = per_record.get(record, [])
        name_rel = [r for r in rels if r.offset % KSYMTAB_RECORD_SIZE == 4]
        if len(name_rel) != 1 or len(rels) != 3:
            raise SplitRefused("unexpected export record layout")
        sym = original.symbols[name_rel[0].symbol]
        if strings is None or sym.shndx != strings.index:
            raise SplitRefused("export name outside __ksymtab_strings")
        start = sym.value + name_rel[0].addend
        end = strings.data.find(b"\0", start)
        if start < 0 or end < 0:
            raise SplitRefused("bad export name")
        relocs: list[_OutReloc] = []
        for rel in rels:
            handle = c_symbol[rel.symbol]
            if handle is None:
                raise SplitRefused("export points into init")
            relocs.append((rel.offset % KSYMTAB_RECORD_SIZE, rel.type, handle, rel.addend))
        crc = kcrctab.data[record * 4:record * 4 + 4]
        entries.append(_Export(strings.data[start:end], tuple(relocs), crc, record))
    entries.sort(key=lambda e: e.name)
    return entries


def _export_record_bytes(name: str, entries: Sequence[_Export]) -> bytes:
    if name in (KCRCTAB, KCRCTAB_GPL, HIDDEN[KCRCTAB], HIDDEN[KCRCTAB_GPL]):
        return b"".join(e.crc for e in entries)  # the CRCs themselves
    return bytes(KSYMTAB_RECORD_SIZE * len(entries))  # struct kernel_symbol: relocations only


def _emit_export_table(builder: ObjectBuilder, original: _Original, table: str, crcs: str,
                       visible: Sequence[_Export], hidden: Sequence[_Export]) -> None:
    """Emit TABLE, its hidden successor, CRCS and its hidden successor, in that order."""
    source = original.obj.section(table)
    flags = source.flags if source is not None else SHF_ALLOC
    out: dict[str, int] = {}
    # Each hidden section directly after its visible one in section-header order:
    # that is what places it directly behind in memory (see _emit_exports).
    for name in (table, HIDDEN[table], crcs, HIDDEN[crcs]):
        entries = hidden if name in HIDDEN.values() else visible
        if name in HIDDEN.values() and not entries:
            continue
        out[name] = builder.add_section(name, type=SHT_PROGBITS, flags=flags,
                                        data=_export_record_bytes(name, entries), addralign=4)
    for section_name, entries in ((table, visible), (HIDDEN[table], hidden)):
        relocs = [(n * KSYMTAB_RECORD_SIZE + inner, type_, handle, addend)
                  for n, export in enumerate(entries) for inner, type_, handle, addend in export.relocs]
        if relocs:
            _add_relocs(builder, out[section_name], relocs)
    # The original's __ksymtab_NAME and __crc_NAME symbols (kallsyms shows them)
    # follow their records to the new places, so C's symbol table stays the
    # original's.
    new_position = {e.record: n for n, e in enumerate(hidden)}
    for name, size in ((table, KSYMTAB_RECORD_SIZE), (crcs, KCRCTAB_RECORD_SIZE)):
        original_table = original.obj.section(name)
        if original_table is None:
            continue
        for sym in original.symbols:
            if sym.shndx != original_table.index or sym.type == STT_SECTION:
                continue
            record, inner = divmod(sym.value, size)
            if record not in new_position:
                raise SplitRefused("export table symbol outside its records", sym.name)
            builder.add_symbol(sym.name, value=new_position[record] * size + inner,
                               size=sym.size, bind=sym.bind, type=sym.type, other=sym.other,
                               shndx=out[HIDDEN[name]])


# ------------------------------------------------------------ C's placement

def _place_core(original: _Original, core: _Core, rules: LayoutRules, anchor: _Anchor) -> _Placement:
    """Where the kernel will put each of C's sections, relative to the anchor."""
    obj = read_elf(core.data)
    placed = module_layout(obj, rules)
    anchor_at = placed.core_offsets.get(core.index[original.this_module.index])
    if anchor_at is None:
        raise SplitRefused("C's struct module is not in its core layout")
    assert isinstance(original.layout, StructModuleLayout)
    delta = {orig: placed.core_offsets[out] - anchor_at
             for orig, out in core.index.items() if out in placed.core_offsets}
    return _Placement(
        anchor_delta=delta,
        anchor_of=dict.fromkeys(delta, anchor),
        names={orig: obj.sections[out].name for orig, out in core.index.items()},
        sizes={orig: obj.sections[out].size for orig, out in core.index.items()},
        checks=layout_checks(placed, rules, original.layout.core_layout),
        layout=placed,
        core_object=obj,
        anchors=(anchor,),
    )


# The last character of each memory's anchor name: C's struct module (MOD_DATA)
# keeps 6.1's "0"; __ksymtab lists the anchors in this order, which is strcmp's.
_MEMORY_ANCHOR_SUFFIX = {"data": "0", "text": "1", "rodata": "2", "ro_after_init": "3"}


def _anchor_memories(original: _Original, rules: LayoutRules) -> tuple[_Core, _Placement, _Init]:
    """C, its placement and I on a kernel with struct module_memory (6.12): one
    anchor per memory of C that I reaches.

    Which memories I reaches is known once I is built, and I is built from C's
    placement, so a trial C anchors every memory that has a section of the
    original in it, a trial I built on it tells which anchors are used, and C
    and I are built again with those alone. The anchors mark the same sections
    in both Cs: fewer anchors change only the export tables' sizes, which
    decides no section's memory or order (layout_sections() walks the masks,
    then the section headers, in order)."""
    prefix = anchor_prefix(original.name)
    module = _Anchor(f"{prefix}{_MEMORY_ANCHOR_SUFFIX['data']}", original.this_module.index, "data")
    trial_core = _build_core(original, (module,))
    trial_obj = read_elf(trial_core.data)
    every = (module, *_first_in_memories(trial_core, trial_obj, rules, prefix))
    trial = _place_core_memories(original, trial_core, trial_obj, rules, every)
    used = {trial.anchor_of[s].memory for s in _build_init(original, trial).reached}
    anchors = tuple(a for a in every if a.memory in used)
    core = _build_core(original, anchors)
    placement = _place_core_memories(original, core, read_elf(core.data), rules, anchors)
    return core, placement, _build_init(original, placement)


def _first_in_memories(core: _Core, obj: ElfObject, rules: LayoutRules, prefix: str
                       ) -> list[_Anchor]:
    """An anchor for each memory of C but MOD_DATA (C's struct module anchors
    that): the first non-empty section of the original that the layout puts
    there. Non-empty, because /sys/module/NAME/sections lists no empty section
    (kernel/module/sysfs.c add_sect_attrs(), sect_empty()) and the loader reads
    the anchor section's address there."""
    where = linux612.core_placement(obj, rules)
    original_of = {out: orig for orig, out in core.index.items()}
    first: dict[str, tuple[int, int]] = {}
    for out, (memory, offset) in where.items():
        if out in original_of and obj.sections[out].size and memory != "data":
            first[memory] = min(first.get(memory, (offset, out)), (offset, out))
    return [_Anchor(f"{prefix}{suffix}", original_of[first[memory][1]], memory)
            for memory, suffix in _MEMORY_ANCHOR_SUFFIX.items() if memory in first]


def _place_core_memories(original: _Original, core: _Core, obj: ElfObject, rules: LayoutRules,
                         anchors: tuple[_Anchor, ...]) -> _Placement:
    """Where the kernel will put each of C's sections: in which memory, at which
    offset from that memory's anchor (layout/linux612.py core_placement()). A
    section of a memory without an anchor has no offset (I cannot reach it).
    *obj* is C, read."""
    placed, where = linux612.layout_and_placement(obj, rules)
    by_memory: dict[str, tuple[_Anchor, int]] = {}
    for anchor in anchors:
        got = where.get(core.index.get(anchor.section, -1))
        if got is None or got[0] != anchor.memory:
            raise SplitRefused("an anchor is not in its memory of C", anchor.name)
        by_memory[anchor.memory] = (anchor, got[1])
    delta: dict[int, int] = {}
    anchor_of: dict[int, _Anchor] = {}
    for orig, out in core.index.items():
        memory, offset = where.get(out, ("", 0))
        if memory in by_memory:
            anchor_of[orig], at = by_memory[memory]
            delta[orig] = offset - at
    assert isinstance(original.layout, StructModuleMemoryLayout)
    return _Placement(
        anchor_delta=delta,
        anchor_of=anchor_of,
        names={orig: obj.sections[out].name for orig, out in core.index.items()},
        sizes={orig: obj.sections[out].size for orig, out in core.index.items()},
        checks=memory_checks(placed, original.layout.mem),
        layout=placed,
        core_object=obj,
        anchors=anchors,
    )


def _reached_sections(placement: _Placement, reached: frozenset[int]) -> tuple[tuple[str, int], ...]:
    """(C's name, offset from the anchor) of each non-empty section I reaches;
    sysfs lists no empty section (sect_empty()), and none holds a byte."""
    return tuple(sorted((placement.names[s], placement.anchor_delta[s]) for s in reached
                        if placement.sizes[s]))


def _reached_from(placement: _Placement, reached: frozenset[int]) -> tuple[tuple[str, str, int], ...]:
    """SplitModule.reached_from: (C's name, its anchor's section, the offset from
    it) of each non-empty section I reaches, and of every anchor's section."""
    sections = reached | {a.section for a in placement.anchors}
    return tuple(sorted((placement.names[s], placement.names[placement.anchor_of[s].section],
                         placement.anchor_delta[s]) for s in sections if placement.sizes[s]))


# ------------------------------------------------------------ init module

class _InitSymbols:
    """I's symbol for each original symbol I refers to, made as _build_init needs
    them. The state lives for one _build_init: its builder, the handles made so
    far, and which sections of C I reaches (returned in _Init.reached)."""

    def __init__(self, builder: ObjectBuilder, original: _Original, placement: _Placement,
                 defined: dict[int, int]) -> None:
        self.builder = builder
        self.original = original
        self.anchor_of = placement.anchor_of
        self.anchor_delta = placement.anchor_delta
        self.symbols = defined  # the original's index -> I's handle
        self.undefined: dict[str, int] = {}
        self.reached = {original.this_module.index}

    def undefined_symbol(self, name: str) -> int:
        handle = self.undefined.get(name)
        if handle is None:
            handle = self.undefined[name] = self.builder.add_symbol(
                name, bind=STB_GLOBAL, type=STT_NOTYPE, shndx=SHN_UNDEF)
        return handle

    def anchor(self, core_section: int) -> tuple[int, int]:
        """(I's undefined symbol naming the anchor of *core_section*, the offset of
        the section from it in C's core layout, or in its memory on 6.12)."""
        delta = self.anchor_delta.get(core_section)
        if delta is None:
            raise SplitRefused("init refers to a part of C outside its core layout",
                               self.original.sections[core_section].name)
        self.reached.add(core_section)
        return self.undefined_symbol(self.anchor_of[core_section].name), delta

    def target(self, index: int) -> tuple[int, int]:
        """Map an original symbol to (I symbol handle, addend correction)."""
        handle = self.symbols.get(index)
        if handle is not None:
            return handle, 0
        sym = self.original.symbols[index]
        if sym.shndx == SHN_UNDEF:
            if not sym.name:
                raise SplitRefused("relocation against a nameless undefined symbol")
            return self.undefined_symbol(sym.name), 0
        if sym.shndx == SHN_ABS:
            handle = self.builder.add_symbol(sym.name, value=sym.value, bind=STB_LOCAL,
                                             type=sym.type, shndx=SHN_ABS)
            self.symbols[index] = handle
            return handle, 0
        if not sym.in_section:
            raise SplitRefused("symbol in an unsupported special section", sym.name)
        section = self.original.sections[sym.shndx]
        if not section.flags & SHF_ALLOC:
            raise SplitRefused("init refers to a section the kernel does not load", section.name)
        if section.name == PERCPU:
            raise SplitRefused("init refers to per-cpu data")
        if section.name in NOT_LOADED:
            raise SplitRefused("init refers to a section the kernel does not load", section.name)
        handle, delta = self.anchor(sym.shndx)
        return handle, sym.value + delta


def _build_init(original: _Original, placement: _Placement) -> _Init:
    """I: the init sections, the table records describing them, the wrapper and
    exit stub, and a struct module of its own; its references into C are offsets
    from the anchors, by C's placement."""
    builder = ObjectBuilder(machine=EM_X86_64, flags=original.obj.flags)
    i_index = _copy_init_sections(builder, original)
    symbols = _InitSymbols(builder, original, placement,
                           _copy_init_symbols(builder, original, i_index))
    for orig, out in i_index.items():
        table = original.obj.relocations.get(orig)
        if table is not None:
            _emit_init_relocs(builder, symbols, out, table, original.sections[orig].name)
    routines = _emit_routines(builder, original, symbols, placement)
    _emit_init_tables(builder, original, symbols, routines)
    _emit_init_module_info(builder, original, placement.anchors, routines)
    return _Init(builder.build(), frozenset(symbols.reached))


def _copy_init_sections(builder: ObjectBuilder, original: _Original) -> dict[int, int]:
    """Add the init sections, byte for byte; return the original's index -> I's."""
    i_index: dict[int, int] = {}
    for section in original.sections:
        if section.index in original.init_secs:
            i_index[section.index] = builder.add_section(
                section.name, type=section.type, flags=section.flags, data=section.data,
                size=section.size, addralign=section.addralign, entsize=section.entsize)
    return i_index


def _copy_init_symbols(builder: ObjectBuilder, original: _Original, i_index: dict[int, int]
                       ) -> dict[int, int]:
    """Symbols defined in init sections keep their names (kallsyms during init)."""
    i_symbol: dict[int, int] = {}
    for index, sym in enumerate(original.symbols):
        if index and sym.shndx in original.init_secs:
            i_symbol[index] = builder.add_symbol(
                sym.name, value=sym.value, size=sym.size, bind=sym.bind, type=sym.type,
                other=sym.other, shndx=i_index[sym.shndx])
    return i_symbol


def _emit_init_relocs(builder: ObjectBuilder, symbols: _InitSymbols, out: int,
                      table: RelocationTable, where: str) -> None:
    relocs: list[_OutReloc] = []
    target = symbols.target
    for offset, type_, symbol, addend in zip(table.offsets, table.types, table.symbols,
                                              table.addends):
        if type_ not in X86_64_RELOC_WIDTH:
            raise SplitRefused("unsupported relocation type", f"{type_} in {where}")
        handle, extra = target(symbol)
        relocs.append((offset, type_, handle, addend + extra))
    _add_relocs(builder, out, relocs)


class _Routines(NamedTuple):
    """The wrapper and exit stub in I: code, sections and symbols."""

    wrapper: codegen.Routine
    stub: codegen.Routine
    wrapper_sec: int
    stub_sec: int
    wrapper_sym: int
    stub_sym: int


def _emit_routines(builder: ObjectBuilder, original: _Original, symbols: _InitSymbols,
                   placement: _Placement) -> _Routines:
    """The synthesized code: the wrapper (init text) and the exit stub (core text)."""
    fields = original.fields
    rethunk = any(n == RETURN_THUNK for _, n in original.versions)
    arm_exit = fields.exit_symbol is not None
    slot = fields.exit_field if arm_exit else fields.init_field
    orc_type = original.kernel.orc_type_call
    wrapper = codegen.init_wrapper(slot_addend=slot, rethunk=rethunk, orc_type=orc_type,
                                   publish=_publish(original, placement.anchors),
                                   checks=placement.checks)
    # A traced stub only when I has ftrace records: they all describe init code,
    # and the stub's keeps I's ftrace page from emptying (codegen.py).
    mcount = original.tables.get(MCOUNT_LOC)
    traced = mcount is not None and bool(mcount.init)
    stub = codegen.exit_stub(rethunk=rethunk, orc_type=orc_type, traced=traced)
    wrapper_sec = builder.add_section(WRAPPER_SECTION, type=SHT_PROGBITS,
                                      flags=SHF_ALLOC | SHF_EXECINSTR, data=wrapper.code,
                                      addralign=16)
    stub_sec = builder.add_section(STUB_SECTION, type=SHT_PROGBITS,
                                   flags=SHF_ALLOC | SHF_EXECINSTR, data=stub.code, addralign=16)
    wrapper_sym = builder.add_symbol(_initcall_name(original), size=len(wrapper.code),
                                     bind=STB_LOCAL, type=STT_FUNC, shndx=wrapper_sec)
    stub_sym = builder.add_symbol("initsplit_exit", size=len(stub.code), bind=STB_LOCAL,
                                  type=STT_FUNC, shndx=stub_sec)
    this_module_anchor, _ = symbols.anchor(original.this_module.index)
    roles: dict[str, tuple[int, int]] = {
        "init": symbols.target(fields.init_sym_index),
        "return_thunk": (symbols.undefined_symbol(RETURN_THUNK), 0) if rethunk else (0, 0),
        "fentry": (symbols.undefined_symbol(FENTRY), 0) if traced else (0, 0),
        "core_module": (this_module_anchor, 0),
        "arm_value": (symbols.target(fields.exit_sym_index)
                      if arm_exit else (this_module_anchor, 0)),
    }
    for routine, sec in ((wrapper, wrapper_sec), (stub, stub_sec)):
        relocs = [(r.offset, r.type, roles[r.target][0], r.addend + roles[r.target][1])
                  for r in routine.relocs]
        if relocs:
            _add_relocs(builder, sec, relocs)
    return _Routines(wrapper, stub, wrapper_sec, stub_sec, wrapper_sym, stub_sym)


def _emit_init_tables(builder: ObjectBuilder, original: _Original, symbols: _InitSymbols,
                      routines: _Routines) -> None:
    """The per-record tables of I: the records describing init code, plus ours."""
    wrapper, stub = routines.wrapper, routines.stub
    wrapper_sec, stub_sec = routines.wrapper_sec, routines.stub_sec
    # The records of the synthesized code: (section, ORC entry) and (section,
    # offset of a jmp to the return thunk), the wrapper's first.
    orc = tuple((wrapper_sec, e) for e in wrapper.orc) + tuple((stub_sec, e) for e in stub.orc)
    sites = tuple((wrapper_sec, o) for o in wrapper.return_sites) + \
        tuple((stub_sec, o) for o in stub.return_sites)
    fentry = tuple((stub_sec, o) for o in stub.fentry_sites)
    for split in original.tables.values():
        extra_orc = orc if split.section.name == ".orc_unwind_ip" else ()
        extra_sites = sites if split.section.name == ".return_sites" else ()
        if split.section.name == MCOUNT_LOC:
            extra_sites = fentry
        if not split.init and not extra_orc and not extra_sites:
            continue
        _emit_init_table(builder, original, symbols, split, extra_orc, extra_sites)
    if wrapper.return_sites and ".return_sites" not in original.tables:
        sec = builder.add_section(".return_sites", type=SHT_PROGBITS, flags=SHF_ALLOC,
                                  data=bytes(4 * len(sites)), addralign=1)
        _add_relocs(builder, sec, [(4 * n, R_X86_64_PC32, builder.section_symbol(target_sec), off)
                                   for n, (target_sec, off) in enumerate(sites)])
    if ".orc_unwind_ip" not in original.tables:
        raise SplitRefused("no ORC unwind tables")


def _emit_init_table(builder: ObjectBuilder, original: _Original, symbols: _InitSymbols,
                     split: _TableSplit, extra_orc: tuple[tuple[int, codegen.OrcEntry], ...],
                     extra_sites: tuple[tuple[int, int], ...]) -> None:
    """I's records of one table (and of its parallel table): the original's records
    of init code, then one per (section, entry) of *extra_orc* or (section, offset)
    of *extra_sites*, describing the synthesized code."""
    table, section = split.table, split.section
    size = table.record_size
    data = bytearray()
    relocs: list[_OutReloc] = []
    for new, record in enumerate(split.init):
        data += section.data[record * size:(record + 1) * size]
        for rel in split.relocs.get(record, ()):
            handle, extra = symbols.target(rel.symbol)
            relocs.append((new * size + rel.offset, rel.type, handle, rel.addend + extra))
    count = len(split.init)
    parallel = b""
    par = original.obj.section(table.parallel) if table.parallel else None
    if par is not None:
        psize = table.parallel_record_size
        parallel = b"".join(par.data[r * psize:(r + 1) * psize] for r in split.init)
    for n, (target_sec, entry) in enumerate(extra_orc):
        data += bytes(size)
        relocs.append(((count + n) * size, R_X86_64_PC32, builder.section_symbol(target_sec),
                       entry.offset))
        parallel += entry.pack()
    # .return_sites holds s32 offsets (PC32), __mcount_loc absolute addresses.
    site_type = R_X86_64_64 if section.name == MCOUNT_LOC else R_X86_64_PC32
    for n, (target_sec, off) in enumerate(extra_sites):
        data += bytes(size)
        relocs.append(((count + n) * size, site_type, builder.section_symbol(target_sec), off))
    out = builder.add_section(section.name, type=section.type, flags=section.flags,
                              data=bytes(data), addralign=section.addralign,
                              entsize=section.entsize)
    if relocs:
        _add_relocs(builder, out, relocs)
    if par is not None:
        builder.add_section(par.name, type=par.type, flags=par.flags, data=parallel,
                            addralign=par.addralign, entsize=par.entsize)


def _emit_init_module_info(builder: ObjectBuilder, original: _Original, anchors: tuple[_Anchor, ...],
                           routines: _Routines) -> None:
    """struct module, .modinfo and __versions of I."""
    this_module, fields = original.this_module, original.fields
    mod = bytearray(this_module.data)
    mod[fields.name_offset:fields.name_offset + MODULE_NAME_LEN] = \
        original.init_name.encode().ljust(MODULE_NAME_LEN, b"\0")
    mod_sec = builder.add_section(THIS_MODULE, type=SHT_PROGBITS, flags=this_module.flags,
                                  data=bytes(mod), addralign=this_module.addralign)
    _add_relocs(builder, mod_sec, [(fields.init_field, R_X86_64_64, routines.wrapper_sym, 0),
                                   (fields.exit_field, R_X86_64_64, routines.stub_sym, 0)])
    builder.add_symbol("__this_module", bind=STB_GLOBAL, type=1, shndx=mod_sec,
                       size=this_module.size)

    builder.add_section(".modinfo", type=SHT_PROGBITS, flags=SHF_ALLOC,
                        data=render_modinfo(_init_modinfo(original)), addralign=1)
    versions = bytearray()
    for crc, vname in original.versions:
        versions += _MODVERSION.pack(crc, vname.encode())
    for anchor in anchors:
        versions += _MODVERSION.pack(anchor_crc(anchor.name), anchor.name.encode())
    builder.add_section("__versions", type=SHT_PROGBITS, flags=SHF_ALLOC, data=bytes(versions),
                        addralign=32)
    builder.add_section(".note.GNU-stack", type=SHT_PROGBITS, flags=0, data=b"")


def _publish(original: _Original, anchors: tuple[_Anchor, ...]) -> tuple[codegen.Publish, ...]:
    """The wrapper's stores: the full count of each export table that has hidden records."""
    stores: list[codegen.Publish] = []
    if original.exports[KSYMTAB]:
        # The anchors and then the hidden records (see _emit_exports).
        stores.append(codegen.Publish(original.layout.num_syms, len(anchors) + original.exports[KSYMTAB]))
    if original.exports[KSYMTAB_GPL]:
        stores.append(codegen.Publish(original.layout.num_gpl_syms, original.exports[KSYMTAB_GPL]))
    return tuple(stores)


def _initcall_name(original: _Original) -> str:
    """The name the kernel knows the original's init routine by, for I's wrapper.

    initcall_blacklist=NAME (init/main.c initcall_blacklisted(), called by
    do_one_initcall() for a module's ->init too) compares NAME with the kallsyms
    name of ->init's address: for a module, find_kallsyms_symbol()
    (kernel/module/kallsyms.c) takes the first symbol in symbol-table order at
    that address, skipping unnamed and ARM mapping symbols, which is the local
    function module_init() named (its global alias init_module comes later).
    I's ->init is the wrapper, in a section of its own: named so, the kernel
    refuses I (EPERM) before the wrapper runs the original init, just as it
    refuses the original, and the loader falls back to the plain load that the
    kernel then refuses too. Named anything else, the blacklist would be bypassed.
    """
    init = original.fields.init_symbol
    for sym in original.symbols[1:]:
        if (sym.shndx == init.shndx and sym.value == init.value and sym.name
                and not sym.is_section and not _is_arm_mapping_symbol(sym.name)):
            return sym.name
    return init.name


def _init_modinfo(original: _Original) -> list[tuple[str, str]]:
    keep = {"license", "vermagic", "retpoline", "intree", "staging", "import_ns"}
    out: list[tuple[str, str]] = []
    depends = ""
    for key, value in original.modinfo:
        if key == "name":
            out.append(("name", original.init_name))
        elif key == "depends":
            depends = value
        elif key in keep:
            out.append((key, value))
    out.append(("import_ns", NAMESPACE))
    out.append(("depends", ",".join(filter(None, [depends, original.name]))))
    out.append(("description", f"initsplit: init part of {original.name}"))
    return out
