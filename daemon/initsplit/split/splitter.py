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
* I holds the .init* sections, the per-record table entries describing them, a
  struct module named NAME__init whose ->init is a synthesized wrapper (see
  codegen.py) and whose ->exit is a stub.

Everything the splitter cannot prove safe raises SplitRefused with a reason, so
callers can fall back to loading the original module.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field

from ..elf import ElfObject, MalformedElf, ObjectBuilder, Relocation, Section, Symbol, read_elf
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
from ..layout import LayoutRules, ModuleLayout
from ..layout.linux61 import module_layout
from . import codegen
from .errors import NothingToSplit, SplitRefused
from .modinfo import first, parse_modinfo, render_modinfo
from .names import INIT_SUFFIX, init_module_name
from .tables import (
    KCRCTAB_RECORD_SIZE,
    KSYMTAB_RECORD_SIZE,
    MODULE_NAME_LEN,
    MODVERSION_RECORD_SIZE,
    PARALLEL_SECTIONS,
    TABLES_BY_SECTION,
    KNOWN_STRUCT_MODULE_LAYOUTS,
    MODULE_LAYOUT_FIELDS,
    TRACE_EVAL_MAP_SIZE,
    RecordTable,
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
# (see _Splitter._emit_exports). No ".init" prefix: module_init_layout_section()
# would move such a section to the init layout.
HIDDEN = {KSYMTAB: "__initsplit_ksymtab", KCRCTAB: "__initsplit_kcrctab",
          KSYMTAB_GPL: "__initsplit_ksymtab_gpl", KCRCTAB_GPL: "__initsplit_kcrctab_gpl"}
# (symbol table, CRC table) pairs; find_module_sections() in kernel/module/main.c
# reads exactly these names.
EXPORT_TABLES = ((KSYMTAB, KCRCTAB), (KSYMTAB_GPL, KCRCTAB_GPL))
PERCPU = ".data..percpu"
RETURN_THUNK = "__x86_return_thunk"
# Sections the kernel reads from the file but never keeps (rewrite_section_headers).
NOT_LOADED = (".modinfo", "__versions")
# Sections of I that we build ourselves rather than copy.
_REBUILT_IN_C = {KSYMTAB, KCRCTAB, KSYMTAB_GPL, KCRCTAB_GPL}

# The layouts in tables.py and the struct module handling are those of 6.1 on x86-64.
SUPPORTED_VERMAGIC_PREFIX = "6.1."

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
    return _Splitter(obj, rules).run()


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


class _Splitter:
    def __init__(self, obj: ElfObject, rules: LayoutRules) -> None:
        self.obj = obj
        self.rules = rules
        self.sections = obj.sections
        self.symbols = obj.symbols

    # ------------------------------------------------------------------ checks
    def run(self) -> SplitModule:
        obj = self.obj
        if obj.machine != EM_X86_64:
            raise SplitRefused("unsupported architecture")
        modinfo_sec = obj.section(".modinfo")
        if modinfo_sec is None:
            raise SplitRefused("no .modinfo")
        self.modinfo = parse_modinfo(modinfo_sec.data)
        name = first(self.modinfo, "name")
        vermagic = first(self.modinfo, "vermagic") or ""
        if not name or len(name) >= MODULE_NAME_LEN or not name.replace("_", "a").isalnum():
            raise SplitRefused("bad module name", repr(name))
        if not vermagic.startswith(SUPPORTED_VERMAGIC_PREFIX) or "mod_unload" not in vermagic:
            # (Kbuild's vermagic ends in a space: VERMAGIC_STRING's MODULE_ARCH_VERMAGIC "".)
            raise SplitRefused("unsupported kernel", vermagic.strip() or "no vermagic")
        self.name = name
        self.init_name = init_module_name(name)

        self.init_secs = {
            s.index for s in self.sections if s.flags & SHF_ALLOC and s.name.startswith(".init")
        }
        if not self.init_secs:
            raise NothingToSplit(name)
        for index in self.init_secs:
            if self.sections[index].type not in (SHT_PROGBITS, SHT_NOBITS):
                raise SplitRefused("unexpected init section type", self.sections[index].name)

        this_module = obj.section(THIS_MODULE)
        if this_module is None or this_module.type != SHT_PROGBITS:
            raise SplitRefused("no struct module")
        self.this_module = this_module
        self._find_module_fields()
        self._check_symbols()
        self.tables = self._split_tables()
        self.versions = self._parse_versions()
        self._complete_module_fields()

        if self.layout is None:
            raise SplitRefused("struct module layout unknown (needed to check C's layout)")
        # One anchor, C's struct module: I's wrapper reaches it anyway.
        self.anchor_names = [f"{anchor_prefix(self.name)}0"]
        self._anchor_sections = [self.this_module.index]
        # C first: I's offsets into C come from C's layout.
        core_bytes = self._build_core()
        self._place_core(core_bytes)
        init_bytes = self._build_init()
        return SplitModule(
            name=name,
            init_name=self.init_name,
            core=core_bytes,
            init=init_bytes,
            anchors=tuple(self.anchor_names),
            moved_records={t.section.name: len(t.init) for t in self.tables.values() if t.init},
            reached=self._reached_sections(),
            core_layout=self._core_layout,
            core_object=self._core_object,
        )

    def _find_module_fields(self) -> None:
        """Find ->init and ->exit in struct module from the original's own relocations."""
        self.init_field = self.exit_field = -1
        self.init_symbol: Symbol | None = None
        self.exit_symbol: Symbol | None = None
        self.init_sym_index = self.exit_sym_index = -1
        for rel in self.obj.relocations_for(self.this_module):
            sym = self.symbols[rel.symbol]
            if rel.type != R_X86_64_64 or rel.addend != 0:
                continue
            if sym.name == "init_module":
                self.init_field, self.init_symbol, self.init_sym_index = rel.offset, sym, rel.symbol
            elif sym.name == "cleanup_module":
                self.exit_field, self.exit_symbol, self.exit_sym_index = rel.offset, sym, rel.symbol
        if self.init_symbol is None:
            raise SplitRefused("init sections without an init routine")
        if not self.init_symbol.in_section:
            raise SplitRefused("init routine is not defined in the module")
        if self.exit_symbol is not None and not self.exit_symbol.in_section:
            raise SplitRefused("cleanup routine is not defined in the module")
        if self.exit_symbol is not None and self.exit_symbol.shndx in self.init_secs:
            raise SplitRefused("cleanup routine lives in an init section")
        size = self.this_module.size
        for off in (self.init_field, self.exit_field):
            if off >= 0 and off + 8 > size:
                raise SplitRefused("struct module field outside struct module")
        self.name_offset = self.this_module.data.find(self.name.encode() + b"\0")
        if self.name_offset < 0 or self.name_offset + MODULE_NAME_LEN > size:
            raise SplitRefused("module name not found in struct module")

    def _complete_module_fields(self) -> None:
        """Find ->exit for modules without a cleanup routine (I's stub goes there),
        and the export counts the wrapper publishes for modules with exports."""
        crc = next((c for c, n in self.versions if n == "module_layout"), None)
        layout = KNOWN_STRUCT_MODULE_LAYOUTS.get(crc) if crc is not None else None
        if layout is not None and (layout.size != self.this_module.size
                                   or layout.init != self.init_field
                                   or self.exit_field not in (-1, layout.exit)):
            layout = None  # the module's own relocations disagree with the table
        self.exports = {table: self._export_count(table, crcs) for table, crcs in EXPORT_TABLES}
        if self.exit_field < 0:
            if layout is None:
                raise SplitRefused("struct module layout unknown (no cleanup routine to locate ->exit)")
            self.exit_field = layout.exit
        if any(self.exports.values()) and layout is None:
            raise SplitRefused("struct module layout unknown (needed to publish exports after init)")
        self.layout = layout

    def _export_count(self, table: str, crcs: str) -> int:
        syms, crc = self.obj.section(table), self.obj.section(crcs)
        if syms is None and crc is None:
            return 0
        if syms is None or crc is None:
            raise SplitRefused("exports without CRCs")
        if syms.size % KSYMTAB_RECORD_SIZE or crc.size * 3 != syms.size:
            raise SplitRefused("export tables do not match")
        return syms.size // KSYMTAB_RECORD_SIZE

    def _place_core(self, core_bytes: bytes) -> None:
        """Where the kernel will put each of C's sections, relative to the anchor."""
        core = read_elf(core_bytes)
        placed = module_layout(core, self.rules)
        anchor_at = placed.core_offsets.get(self._c_index[self.this_module.index])
        if anchor_at is None:
            raise SplitRefused("C's struct module is not in its core layout")
        self._anchor_delta = {orig: placed.core_offsets[out] - anchor_at
                              for orig, out in self._c_index.items() if out in placed.core_offsets}
        self._c_names = {orig: core.sections[out].name for orig, out in self._c_index.items()}
        self._c_sizes = {orig: core.sections[out].size for orig, out in self._c_index.items()}
        self._reached = {self.this_module.index}
        self._checks = layout_checks(placed, self.rules, self.layout.core_layout)
        self._core_layout = placed
        self._core_object = core

    def _publish(self) -> tuple[codegen.Publish, ...]:
        """The wrapper's stores: the full count of each export table that has hidden records."""
        stores = []
        if self.exports[KSYMTAB]:
            stores.append(codegen.Publish(self.layout.num_syms,
                                          len(self.anchor_names) + self.exports[KSYMTAB]))
        if self.exports[KSYMTAB_GPL]:
            stores.append(codegen.Publish(self.layout.num_gpl_syms, self.exports[KSYMTAB_GPL]))
        return tuple(stores)

    def _check_symbols(self) -> None:
        self.percpu = self.obj.section(PERCPU)
        for sym in self.symbols:
            if sym.shndx == SHN_COMMON:
                raise SplitRefused("common symbol", sym.name)

    def _initcall_name(self) -> str:
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
        init = self.init_symbol
        assert init is not None
        for sym in self.symbols[1:]:
            if (sym.shndx == init.shndx and sym.value == init.value and sym.name
                    and not sym.is_section and not _is_arm_mapping_symbol(sym.name)):
                return sym.name
        return init.name

    def is_init_symbol(self, index: int) -> bool:
        return self.symbols[index].shndx in self.init_secs

    # --------------------------------------------------------------- tables
    def _split_tables(self) -> dict[str, _TableSplit]:
        splits: dict[str, _TableSplit] = {}
        for section in self.sections:
            table = TABLES_BY_SECTION.get(section.name)
            if table is None or not section.flags & SHF_ALLOC:
                continue
            if section.type != SHT_PROGBITS or section.size % table.record_size:
                raise SplitRefused("table size is not a multiple of its record size", section.name)
            count = section.size // table.record_size
            split = _TableSplit(table, section)
            key_side: dict[int, bool] = {}
            size, key = table.record_size, table.key_offset
            init_secs, symbols, relocs = self.init_secs, self.symbols, split.relocs
            rt = self.obj.relocations_for(section)
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
                    if self.is_init_symbol(rel.symbol):
                        raise SplitRefused(f"{section.name} record of core code points into init")
            if table.parallel:
                parallel = self.obj.section(table.parallel)
                if parallel is None or parallel.size != count * table.parallel_record_size:
                    raise SplitRefused("parallel table does not match", table.parallel)
                if len(self.obj.relocations_for(parallel)):
                    raise SplitRefused("parallel table has relocations", table.parallel)
            splits[section.name] = split
        return splits

    def _parse_versions(self) -> list[tuple[int, str]]:
        section = self.obj.section("__versions")
        if section is None:
            raise SplitRefused("no __versions (module built without modversions)")
        if section.size % MODVERSION_RECORD_SIZE:
            raise SplitRefused("__versions size is not a multiple of its record size")
        versions = []
        for crc, raw in _MODVERSION.iter_unpack(section.data):
            versions.append((crc, raw.split(b"\0", 1)[0].decode("utf-8", "replace")))
        return versions

    # ------------------------------------------------------------ init module
    def _build_init(self) -> bytes:
        obj = self.obj
        builder = ObjectBuilder(machine=EM_X86_64, flags=obj.flags)
        self._i_undefined: dict[str, int] = {}
        self._i_builder = builder

        # 1. init sections, copied byte for byte.
        i_index: dict[int, int] = {}
        for section in self.sections:
            if section.index in self.init_secs:
                i_index[section.index] = builder.add_section(
                    section.name, type=section.type, flags=section.flags, data=section.data,
                    size=section.size, addralign=section.addralign, entsize=section.entsize)
        self._i_index = i_index

        # 2. symbols defined in init sections keep their names (kallsyms during init).
        i_symbol: dict[int, int] = {}
        for index, sym in enumerate(self.symbols):
            if index and sym.shndx in self.init_secs:
                i_symbol[index] = builder.add_symbol(
                    sym.name, value=sym.value, size=sym.size, bind=sym.bind, type=sym.type,
                    other=sym.other, shndx=i_index[sym.shndx])
        self._i_symbol = i_symbol

        # 3. relocations of the init sections.
        for orig, out in i_index.items():
            table = obj.relocations.get(orig)
            if table is None:
                continue
            self._emit_init_relocs(out, table, self.sections[orig].name)

        # 4. synthesized code: the wrapper (init text) and the exit stub (core text).
        rethunk = any(n == RETURN_THUNK for _, n in self.versions)
        arm_exit = self.exit_symbol is not None
        slot = self.exit_field if arm_exit else self.init_field
        wrapper = codegen.init_wrapper(slot_addend=slot, rethunk=rethunk, publish=self._publish(),
                                       checks=self._checks)
        stub = codegen.exit_stub(rethunk=rethunk)
        wrapper_sec = builder.add_section(WRAPPER_SECTION, type=SHT_PROGBITS,
                                          flags=SHF_ALLOC | SHF_EXECINSTR, data=wrapper.code,
                                          addralign=16)
        stub_sec = builder.add_section(STUB_SECTION, type=SHT_PROGBITS,
                                       flags=SHF_ALLOC | SHF_EXECINSTR, data=stub.code, addralign=16)
        wrapper_sym = builder.add_symbol(self._initcall_name(), size=len(wrapper.code),
                                         bind=STB_LOCAL, type=STT_FUNC, shndx=wrapper_sec)
        stub_sym = builder.add_symbol("initsplit_exit", size=len(stub.code), bind=STB_LOCAL,
                                      type=STT_FUNC, shndx=stub_sec)
        this_module_anchor, _ = self._anchor(self.this_module.index)
        roles: dict[str, tuple[int, int]] = {
            "init": self._i_target(self.init_sym_index),
            "return_thunk": (self._i_undefined_symbol(RETURN_THUNK), 0) if rethunk else (0, 0),
            "core_module": (this_module_anchor, 0),
            "arm_value": (self._i_target(self.exit_sym_index)
                          if arm_exit else (this_module_anchor, 0)),
        }
        for routine, sec in ((wrapper, wrapper_sec), (stub, stub_sec)):
            for r in routine.relocs:
                handle, extra = roles[r.target]
                builder.add_relocation(sec, r.offset, r.type, handle, r.addend + extra)

        # 5. per-record tables: the records describing init code, plus ours.
        section_symbol = builder.section_symbol

        for split in self.tables.values():
            extra_orc: list[tuple[int, codegen.OrcEntry]] = []
            extra_sites: list[tuple[int, int]] = []
            if split.section.name == ".orc_unwind_ip":
                extra_orc = [(wrapper_sec, e) for e in wrapper.orc] + [(stub_sec, e) for e in stub.orc]
            if split.section.name == ".return_sites":
                extra_sites = [(wrapper_sec, o) for o in wrapper.return_sites] + \
                              [(stub_sec, o) for o in stub.return_sites]
            if not split.init and not extra_orc and not extra_sites:
                continue
            self._emit_init_table(builder, split, extra_orc, extra_sites, section_symbol)
        if wrapper.return_sites and ".return_sites" not in self.tables:
            data = bytes(4 * (len(wrapper.return_sites) + len(stub.return_sites)))
            sec = builder.add_section(".return_sites", type=SHT_PROGBITS, flags=SHF_ALLOC,
                                      data=data, addralign=1)
            sites = [(wrapper_sec, o) for o in wrapper.return_sites] + \
                    [(stub_sec, o) for o in stub.return_sites]
            for n, (target_sec, off) in enumerate(sites):
                builder.add_relocation(sec, 4 * n, R_X86_64_PC32, section_symbol(target_sec), off)
        if ".orc_unwind_ip" not in self.tables:
            raise SplitRefused("no ORC unwind tables")

        # 6. struct module, .modinfo and __versions of I.
        mod = bytearray(self.this_module.data)
        mod[self.name_offset:self.name_offset + MODULE_NAME_LEN] = \
            self.init_name.encode().ljust(MODULE_NAME_LEN, b"\0")
        mod_sec = builder.add_section(THIS_MODULE, type=SHT_PROGBITS, flags=self.this_module.flags,
                                      data=bytes(mod), addralign=self.this_module.addralign)
        builder.add_relocation(mod_sec, self.init_field, R_X86_64_64, wrapper_sym, 0)
        builder.add_relocation(mod_sec, self.exit_field, R_X86_64_64, stub_sym, 0)
        builder.add_symbol("__this_module", bind=STB_GLOBAL, type=1, shndx=mod_sec,
                           size=self.this_module.size)

        builder.add_section(".modinfo", type=SHT_PROGBITS, flags=SHF_ALLOC,
                            data=render_modinfo(self._init_modinfo()), addralign=1)
        versions = bytearray()
        for crc, vname in self.versions:
            versions += _MODVERSION.pack(crc, vname.encode())
        for anchor in self.anchor_names:
            versions += _MODVERSION.pack(anchor_crc(anchor), anchor.encode())
        builder.add_section("__versions", type=SHT_PROGBITS, flags=SHF_ALLOC, data=bytes(versions),
                            addralign=32)
        builder.add_section(".note.GNU-stack", type=SHT_PROGBITS, flags=0, data=b"")
        return builder.build()

    def _i_undefined_symbol(self, name: str) -> int:
        handle = self._i_undefined.get(name)
        if handle is None:
            handle = self._i_undefined[name] = self._i_builder.add_symbol(
                name, bind=STB_GLOBAL, type=STT_NOTYPE, shndx=SHN_UNDEF)
        return handle

    def _anchor(self, core_section: int) -> tuple[int, int]:
        """(I's undefined symbol naming C's anchor, the offset of *core_section*
        from it in C's core layout)."""
        delta = self._anchor_delta.get(core_section)
        if delta is None:
            raise SplitRefused("init refers to a part of C outside its core layout",
                               self.sections[core_section].name)
        self._reached.add(core_section)
        return self._i_undefined_symbol(self.anchor_names[0]), delta

    def _reached_sections(self) -> tuple[tuple[str, int], ...]:
        """(C's name, offset from the anchor) of each non-empty section I reaches;
        sysfs lists no empty section (sect_empty()), and none holds a byte."""
        return tuple(sorted((self._c_names[s], self._anchor_delta[s]) for s in self._reached
                            if self._c_sizes[s]))

    def _i_target(self, index: int) -> tuple[int, int]:
        """Map an original symbol to (I symbol handle, addend correction)."""
        handle = self._i_symbol.get(index)
        if handle is not None:
            return handle, 0
        sym = self.symbols[index]
        if sym.shndx == SHN_UNDEF:
            if not sym.name:
                raise SplitRefused("relocation against a nameless undefined symbol")
            return self._i_undefined_symbol(sym.name), 0
        if sym.shndx == SHN_ABS:
            handle = self._i_builder.add_symbol(sym.name, value=sym.value, bind=STB_LOCAL,
                                                type=sym.type, shndx=SHN_ABS)
            self._i_symbol[index] = handle
            return handle, 0
        if not sym.in_section:
            raise SplitRefused("symbol in an unsupported special section", sym.name)
        section = self.sections[sym.shndx]
        if not section.flags & SHF_ALLOC:
            raise SplitRefused("init refers to a section the kernel does not load", section.name)
        if section.name == PERCPU:
            raise SplitRefused("init refers to per-cpu data")
        if section.name in NOT_LOADED:
            raise SplitRefused("init refers to a section the kernel does not load", section.name)
        handle, delta = self._anchor(sym.shndx)
        return handle, sym.value + delta

    def _emit_init_relocs(self, out: int, table, where: str) -> None:
        offsets, types, handles, addends = [], [], [], []
        target = self._i_target
        for offset, type_, symbol, addend in zip(table.offsets, table.types, table.symbols,
                                                  table.addends):
            if type_ not in X86_64_RELOC_WIDTH:
                raise SplitRefused("unsupported relocation type", f"{type_} in {where}")
            handle, extra = target(symbol)
            offsets.append(offset)
            types.append(type_)
            handles.append(handle)
            addends.append(addend + extra)
        self._i_builder.add_relocations(out, offsets, types, handles, addends)

    def _emit_init_table(self, builder: ObjectBuilder, split: _TableSplit,
                         extra_orc: list, extra_sites: list, section_symbol) -> None:
        table, section = split.table, split.section
        size = table.record_size
        data = bytearray()
        relocs: list[tuple[int, int, int, int]] = []
        for new, record in enumerate(split.init):
            data += section.data[record * size:(record + 1) * size]
            for rel in split.relocs.get(record, ()):
                handle, extra = self._i_target(rel.symbol)
                relocs.append((new * size + rel.offset, rel.type, handle, rel.addend + extra))
        count = len(split.init)
        parallel = b""
        if table.parallel:
            par = self.obj.section(table.parallel)
            psize = table.parallel_record_size
            parallel = b"".join(par.data[r * psize:(r + 1) * psize] for r in split.init)
        for n, (target_sec, entry) in enumerate(extra_orc):
            data += bytes(size)
            relocs.append(((count + n) * size, R_X86_64_PC32, section_symbol(target_sec), entry.offset))
            parallel += entry.pack()
        for n, (target_sec, off) in enumerate(extra_sites):
            data += bytes(size)
            relocs.append(((count + n) * size, R_X86_64_PC32, section_symbol(target_sec), off))
        out = builder.add_section(section.name, type=section.type, flags=section.flags,
                                  data=bytes(data), addralign=section.addralign,
                                  entsize=section.entsize)
        if relocs:
            builder.add_relocations(out, *zip(*relocs))
        if table.parallel:
            par = self.obj.section(table.parallel)
            builder.add_section(par.name, type=par.type, flags=par.flags, data=parallel,
                                addralign=par.addralign, entsize=par.entsize)

    def _init_modinfo(self) -> list[tuple[str, str]]:
        keep = {"license", "vermagic", "retpoline", "intree", "staging", "import_ns"}
        out: list[tuple[str, str]] = []
        depends = ""
        for key, value in self.modinfo:
            if key == "name":
                out.append(("name", self.init_name))
            elif key == "depends":
                depends = value
            elif key in keep:
                out.append((key, value))
        out.append(("import_ns", NAMESPACE))
        out.append(("depends", ",".join(filter(None, [depends, self.name]))))
        out.append(("description", f"initsplit: init part of {self.name}"))
        return out

    # ------------------------------------------------------------ core module
    def _build_core(self) -> bytes:
        obj = self.obj
        builder = ObjectBuilder(machine=EM_X86_64, flags=obj.flags)
        c_index: dict[int, int] = {}
        skip_types = (SHT_SYMTAB, SHT_STRTAB, SHT_RELA)
        ksym_sections = {s: obj.section(s) for s in (KSYMTAB, KCRCTAB, KSYMTAB_STRINGS)}
        eval_copies = self._eval_map_copies()
        strings = ksym_sections[KSYMTAB_STRINGS]
        extra = bytearray()
        base = strings.size if strings is not None else 0
        self._ns_offset = base
        extra += NAMESPACE.encode() + b"\0"
        self._anchor_name_offsets = []
        for anchor in self.anchor_names:
            self._anchor_name_offsets.append(base + len(extra))
            extra += anchor.encode() + b"\0"

        for section in self.sections:
            if section.index == 0 or section.index in self.init_secs or section.type in skip_types:
                continue
            if not section.flags & SHF_ALLOC and section.index in obj.relocations:
                # Debug info and the like: the kernel never applies these relocations
                # (apply_relocations skips non-allocated targets) and some of them
                # would point at the init sections C no longer has.
                continue
            name, data = section.name, section.data
            if name == RO_AFTER_INIT:
                name = RO_AFTER_INIT_RENAMED
            split = self.tables.get(name)
            if split is not None:
                size = split.table.record_size
                data = b"".join(data[r * size:(r + 1) * size] for r in split.core)
            elif name in PARALLEL_SECTIONS:
                owner = self.tables.get(PARALLEL_SECTIONS[name].section)
                if owner is None:
                    raise SplitRefused("parallel table without its index table", name)
                psize = owner.table.parallel_record_size
                data = b"".join(data[r * psize:(r + 1) * psize] for r in owner.core)
            elif name in _REBUILT_IN_C:
                continue
            elif name == KSYMTAB_STRINGS:
                data = data + bytes(extra)
            c_index[section.index] = builder.add_section(
                name, type=section.type, flags=section.flags, data=data,
                size=len(data) if section.type != SHT_NOBITS else section.size,
                addralign=section.addralign, entsize=section.entsize)

        # Symbols: everything not defined in an init section.
        c_symbol: list[int | None] = [0] * len(self.symbols)
        for index, sym in enumerate(self.symbols):
            if index == 0:
                continue
            if sym.shndx in self.init_secs:
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
        section_symbol = builder.section_symbol

        # Relocations of the kept sections.
        eval_sec = None
        if eval_copies:
            eval_sec = builder.add_section(EVAL_MAP_COPIES, type=SHT_PROGBITS,
                                           flags=SHF_ALLOC | SHF_WRITE, addralign=8,
                                           data=b"".join(c[0] for c in eval_copies.values()))
        for orig, out in c_index.items():
            section = self.sections[orig]
            name = section.name
            table = obj.relocations.get(orig)
            if table is None:
                continue
            split = self.tables.get(name)
            if split is not None:
                self._emit_core_table(builder, out, split, c_symbol)
                continue
            if name in NOT_LOADED or not section.flags & SHF_ALLOC:
                # The kernel ignores these relocations (apply_relocations skips
                # non-allocated targets); keep the ones that still resolve.
                pass
            self._emit_core_relocs(builder, out, section, table, c_symbol, eval_copies, eval_sec,
                                   section_symbol)

        if eval_copies:
            offset = 0
            for blob, relocs in eval_copies.values():
                for rel in relocs:
                    mapped = c_symbol[rel.symbol]
                    if mapped is None:
                        raise SplitRefused("trace eval map points into init", self.symbols[rel.symbol].name)
                    builder.add_relocation(eval_sec, offset + rel.offset, rel.type, mapped, rel.addend)
                offset += len(blob)

        if strings is None:
            strings_out = builder.add_section(KSYMTAB_STRINGS, type=SHT_PROGBITS,
                                              flags=SHF_ALLOC | SHF_MERGE | SHF_STRINGS,
                                              data=bytes(extra), addralign=1, entsize=1)
        else:
            strings_out = c_index[strings.index]
        self._emit_exports(builder, ksym_sections, c_index, c_symbol, section_symbol(strings_out))
        self._c_index = c_index
        return builder.build()

    def _emit_core_relocs(self, builder, out, section, table, c_symbol, eval_copies, eval_sec,
                          section_symbol) -> None:
        name = section.name
        is_module = section.index == self.this_module.index
        is_eval = name == EVAL_MAP
        drop = {self.init_field, self.exit_field} if is_module else set()
        offsets, types, handles, addends = [], [], [], []
        for offset, type_, symbol, addend in zip(table.offsets, table.types, table.symbols,
                                                  table.addends):
            if offset in drop:
                continue
            handle = c_symbol[symbol]
            if handle is None:
                if is_eval and (symbol, addend) in eval_copies:
                    handle = section_symbol(eval_sec)
                    addend = list(eval_copies).index((symbol, addend)) * TRACE_EVAL_MAP_SIZE
                elif self.is_init_symbol(symbol):
                    target = self.sections[self.symbols[symbol].shndx].name
                    raise SplitRefused(f"{name} points into init", f"{target}")
                else:
                    raise SplitRefused("relocation against a dropped symbol", name)
            if type_ not in X86_64_RELOC_WIDTH and section.flags & SHF_ALLOC:
                raise SplitRefused("unsupported relocation type", f"{type_} in {name}")
            offsets.append(offset)
            types.append(type_)
            handles.append(handle)
            addends.append(addend)
        builder.add_relocations(out, offsets, types, handles, addends)

    def _emit_core_table(self, builder, out, split: _TableSplit, c_symbol) -> None:
        size = split.table.record_size
        offsets, types, handles, addends = [], [], [], []
        for new, record in enumerate(split.core):
            for rel in split.relocs.get(record, ()):
                handle = c_symbol[rel.symbol]
                if handle is None:
                    raise SplitRefused(f"{split.section.name} record of core code points into init")
                offsets.append(new * size + rel.offset)
                types.append(rel.type)
                handles.append(handle)
                addends.append(rel.addend)
        builder.add_relocations(out, offsets, types, handles, addends)

    def _eval_map_copies(self) -> dict[tuple[int, int], tuple[bytes, list[Relocation]]]:
        """Copy the struct trace_eval_map objects _ftrace_eval_map points to out of init data.

        The kernel reads them when C goes live (trace_module_add_evals), long
        before I exists, so they must live in C for the module's trace formats
        to show numeric values.
        """
        section = self.obj.section(EVAL_MAP)
        copies: dict[tuple[int, int], tuple[bytes, list[Relocation]]] = {}
        if section is None:
            return copies
        for rel in self.obj.relocations_for(section):
            sym = self.symbols[rel.symbol]
            if sym.shndx not in self.init_secs:
                continue
            if rel.type != R_X86_64_64:
                raise SplitRefused("unexpected relocation in _ftrace_eval_map")
            source = self.sections[sym.shndx]
            start = sym.value + rel.addend
            if start < 0 or start + TRACE_EVAL_MAP_SIZE > source.size or source.type == SHT_NOBITS:
                raise SplitRefused("trace eval map outside its section")
            inner = [r._replace(offset=r.offset - start) for r in self.obj.relocations_for(source)
                     if start <= r.offset < start + TRACE_EVAL_MAP_SIZE]
            copies[(rel.symbol, rel.addend)] = (source.data[start:start + TRACE_EVAL_MAP_SIZE], inner)
        return copies

    def _emit_exports(self, builder, ksym_sections, c_index, c_symbol, strings_sym: int) -> None:
        """Rebuild C's export tables: the anchors visible, the original's exports hidden.

        find_module_sections() (kernel/module/main.c) sets mod->syms to the start
        of __ksymtab and mod->num_syms to its size / 12, mod->crcs to __kcrctab, and
        the same for __ksymtab_gpl / __kcrctab_gpl. find_symbol() bsearches
        syms[0..num_syms) by name (find_exported_symbol_in_section) and takes the
        CRC at the same index in crcs. So:

        * __ksymtab holds only the anchors, sorted; __kcrctab their CRCs. The
          kernel counts only them, and nobody but I can link against C.
        * the original's records follow, sorted, in __initsplit_ksymtab (and
          __initsplit_kcrctab), which layout_sections() places right behind:
          sections of one flags class go in section-header order, each at the
          previous end aligned to sh_addralign (module_get_offset), and both
          are SHF_ALLOC, 4-aligned, and whole 4-byte records, with nothing between.
        * __ksymtab_gpl and __kcrctab_gpl are empty, but still placed, so
          gpl_syms/gpl_crcs point at the hidden GPL records behind them.

        Anchors sort before every export name (ANCHOR_LEAD), so anchors followed
        by the hidden records are one sorted array, and the wrapper publishes it
        by storing the full counts into num_syms / num_gpl_syms after init.
        """
        strings = ksym_sections[KSYMTAB_STRINGS]
        anchors = []
        for anchor, core_section, name_off in zip(self.anchor_names, self._anchor_sections,
                                                  self._anchor_name_offsets):
            target = c_index.get(core_section)
            if target is None:
                raise SplitRefused("anchor section missing from core", self.sections[core_section].name)
            relocs = [
                (0, R_X86_64_PC32, builder.section_symbol(target), 0),
                (4, R_X86_64_PC32, strings_sym, name_off),
                (8, R_X86_64_PC32, strings_sym, self._ns_offset),
            ]
            anchors.append((anchor.encode(), relocs, struct.pack("<I", anchor_crc(anchor)), None))
        anchors.sort(key=lambda e: e[0])
        for table, crcs in EXPORT_TABLES:
            exports = self._original_exports(table, crcs, strings, c_symbol)
            if exports and anchors and min(e[0] for e in exports) <= anchors[-1][0]:
                raise SplitRefused("an export name sorts before the anchors")
            visible = anchors if table == KSYMTAB else []
            if not visible and not exports and table != KSYMTAB:
                continue
            self._emit_export_table(builder, table, crcs, visible, exports)

    def _original_exports(self, table: str, crcs: str, strings, c_symbol) -> list[tuple]:
        """The original's records of *table*, sorted: (name, relocs, crc, old record)."""
        ksymtab, kcrctab = self.obj.section(table), self.obj.section(crcs)
        if ksymtab is None:
            return []
        per_record: dict[int, list[Relocation]] = {}
        for rel in self.obj.relocations_for(ksymtab):
            per_record.setdefault(rel.offset // KSYMTAB_RECORD_SIZE, []).append(rel)
        entries = []
        for record in range(ksymtab.size // KSYMTAB_RECORD_SIZE):
            rels = per_record.get(record, [])
            name_rel = [r for r in rels if r.offset % KSYMTAB_RECORD_SIZE == 4]
            if len(name_rel) != 1 or len(rels) != 3:
                raise SplitRefused("unexpected export record layout")
            sym = self.symbols[name_rel[0].symbol]
            if strings is None or sym.shndx != strings.index:
                raise SplitRefused("export name outside __ksymtab_strings")
            start = sym.value + name_rel[0].addend
            end = strings.data.find(b"\0", start)
            if start < 0 or end < 0:
                raise SplitRefused("bad export name")
            relocs = []
            for rel in rels:
                handle = c_symbol[rel.symbol]
                if handle is None:
                    raise SplitRefused("export points into init")
                relocs.append((rel.offset % KSYMTAB_RECORD_SIZE, rel.type, handle, rel.addend))
            crc = kcrctab.data[record * 4:record * 4 + 4]
            entries.append((strings.data[start:end], relocs, crc, record))
        entries.sort(key=lambda e: e[0])
        return entries

    def _emit_export_table(self, builder, table: str, crcs: str, visible: list, hidden: list) -> None:
        """Emit TABLE, its hidden successor, CRCS and its hidden successor, in that order."""
        source = self.obj.section(table)
        flags = source.flags if source is not None else SHF_ALLOC
        out: dict[str, int] = {}

        def record_bytes(name: str, entries: list) -> bytes:
            if name in (KCRCTAB, KCRCTAB_GPL, HIDDEN[KCRCTAB], HIDDEN[KCRCTAB_GPL]):
                return b"".join(e[2] for e in entries)  # the CRCs themselves
            return bytes(KSYMTAB_RECORD_SIZE * len(entries))  # struct kernel_symbol: relocations only

        # Each hidden section directly after its visible one in section-header order:
        # that is what places it directly behind in memory (see _emit_exports).
        for name in (table, HIDDEN[table], crcs, HIDDEN[crcs]):
            entries = hidden if name in HIDDEN.values() else visible
            if name in HIDDEN.values() and not entries:
                continue
            out[name] = builder.add_section(name, type=SHT_PROGBITS, flags=flags,
                                            data=record_bytes(name, entries), addralign=4)
        for section_name, entries in ((table, visible), (HIDDEN[table], hidden)):
            for n, (_, relocs, _, _) in enumerate(entries):
                for inner, type_, handle, addend in relocs:
                    builder.add_relocation(out[section_name], n * KSYMTAB_RECORD_SIZE + inner, type_,
                                           handle, addend)
        # The original's __ksymtab_NAME and __crc_NAME symbols (kallsyms shows them)
        # follow their records to the new places, so C's symbol table stays the
        # original's.
        new_position = {e[3]: n for n, e in enumerate(hidden)}
        for name, size in ((table, KSYMTAB_RECORD_SIZE), (crcs, KCRCTAB_RECORD_SIZE)):
            original = self.obj.section(name)
            if original is None:
                continue
            for sym in self.symbols:
                if sym.shndx != original.index or sym.type == STT_SECTION:
                    continue
                record, inner = divmod(sym.value, size)
                if record not in new_position:
                    raise SplitRefused("export table symbol outside its records", sym.name)
                builder.add_symbol(sym.name, value=new_position[record] * size + inner,
                                   size=sym.size, bind=sym.bind, type=sym.type, other=sym.other,
                                   shndx=out[HIDDEN[name]])
