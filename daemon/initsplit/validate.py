"""Static validation of a split: does the pair (C, I) account for the original exactly?

The validator re-reads all three objects from bytes and trusts nothing the
splitter computed. It proves that:

* every allocated byte of the original appears exactly once, in C or in I, in a
  section of the same name and flags (per-record tables record by record);
* every relocation of the original appears exactly once at the corresponding
  place, with an equivalent target: the same undefined symbol, the same absolute
  value, or the same byte of the same section after the move. Places in C are
  compared as offsets in C's core layout, which the layout model computes from
  C's own section headers (initsplit.layout): on 6.1 I reaches C only through
  C's one anchor, its struct module, plus such an offset; on 6.12, where each
  struct module_memory type is an allocation of its own, as (memory, offset in
  it), through one anchor per memory I reaches (layout/linux612.py), each named
  for its memory and at the start of a non-empty section of it, C's struct
  module for MOD_DATA;
* everything else in the outputs is the synthesized glue and exactly that: the
  anchors (sorted, namespaced, with CRCs I's __versions agrees on), I's struct
  module, .modinfo and __versions, the init wrapper and exit stub, their ORC and
  return-thunk records, and C's copies of trace eval maps;
* the wrapper and stub do what they must, read from their bytes without the code
  generator (split/codegen.py is never asked): validate_x86.py decodes them,
  refusing any instruction outside the small subset codegen emits, attaches I's
  relocations to the operands they patch, and follows every path. Each path must
  then have the effects derived here: compares of C's core_layout sizes (6.1)
  or of mem[type].size of each core memory type (6.12) with this validator's
  run of the layout model, returning -ENOEXEC without calling
  anything when one differs; otherwise exactly one call, to the original init,
  with the stack 16-byte aligned; an init result -MAX_ERRNO..-1 returned less
  INIT_FAILED_BIAS, other negatives unchanged, neither storing anything; a
  result >= 0 returned after the arm store (the original cleanup, or C's struct
  module, into C's ->exit or ->init) and then the publish stores of the counts
  derived here; every path ending in the one epilogue with the stack as on
  entry, by ret; int3 or by jmp __x86_return_thunk as the original returns. The
  stub is endbr64 and that return. No code may be unreachable, no branch may
  go to a jmp (codegen writes neither). Their ORC entries and return sites are
  derived from the decoded stack effects and exits;
* before I's init has run, C exports the anchors and nothing else, and the
  original's exports sit, sorted after every anchor, directly behind them in
  C's core layout, so that the wrapper's stores publish exactly those.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from .elf import ElfObject, MalformedElf, Section, read_elf
from .layout import LayoutRules, linux612
from .layout.linux61 import module_layout
from .elf.constants import (
    R_X86_64_64,
    R_X86_64_PC32,
    R_X86_64_PLT32,
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHF_MERGE,
    SHF_STRINGS,
    SHF_WRITE,
    SHN_ABS,
    SHN_UNDEF,
    SHT_NOBITS,
    SHT_PROGBITS,
)
from . import validate_x86 as x86
from .split.initresult import INIT_FAILED_BIAS
from .split.modinfo import first, parse_modinfo
from .split.splitter import (
    EVAL_MAP,
    EVAL_MAP_COPIES,
    EXPORT_TABLES,
    HIDDEN,
    KCRCTAB,
    KCRCTAB_GPL,
    KSYMTAB,
    KSYMTAB_GPL,
    KSYMTAB_STRINGS,
    FENTRY,
    MCOUNT_LOC,
    NAMESPACE,
    RETURN_THUNK,
    RO_AFTER_INIT,
    RO_AFTER_INIT_RENAMED,
    STUB_SECTION,
    THIS_MODULE,
    WRAPPER_SECTION,
    anchor_crc,
    anchor_prefix,
    init_module_name,
)
from .split.tables import (
    KSYMTAB_RECORD_SIZE,
    MAX_ERRNO,
    MODULE_LAYOUT_FIELDS,
    MODULE_NAME_LEN,
    MODVERSION_RECORD_SIZE,
    ORC_REG_SP,
    ORC_REG_UNDEFINED,
    ORC_TYPE_TERMINATOR,
    TRACE_EVAL_MAP_SIZE,
    MODULE_MEMORY_FIELDS,
    KernelTables,
    RecordTable,
    StructModuleMemoryLayout,
    kernel_tables,
    pack_orc_entry,
)

C, I = "C", "I"
_MODVERSION = struct.Struct(f"<Q{MODULE_NAME_LEN}s")
_NOT_LOADED = (".modinfo", "__versions")

# A canonical relocation target: ("sym", name, addend) | ("abs", value) |
# ("loc", side, section, offset) | ("core", offset in C's core layout) (6.1) |
# ("mem", C's memory, offset in it) (6.12, struct module_memory). C's own
# relocations name C's sections, as the original's do; I's reach C through the
# anchors, so what they are compared with is first turned into "core" or "mem"
# places (_as_seen_from).
Target = tuple
# One record of a per-record table as compared: its bytes, its relocations
# ((offset in the record, type, Target), sorted) and its parallel table's record.
_Record = tuple[bytes, tuple, bytes]
# The last character of each memory's anchor name (split/splitter.py), in
# __ksymtab's order.
_MEMORY_ANCHOR_SUFFIX = {"data": "0", "text": "1", "rodata": "2", "ro_after_init": "3"}

# include/uapi/asm-generic/errno-base.h, "Exec format error": what the wrapper
# returns when C's core_layout is not the layout model's (the original init has
# not run; the value is in the kernel's error range, initresult.py).
ENOEXEC = 8


def _shifted(target: Target, delta: int) -> Target:
    """*target* moved by *delta* bytes (every form ends in its offset or addend)."""
    return (*target[:-1], target[-1] + delta)


def _init_result_class(low: int, high: int) -> tuple[str, int] | None:
    """What the wrapper must add to init results low..high (initresult.encode()),
    or None when the range mixes results that need different treatment."""
    if low >= 0:
        return "success", 0
    if -MAX_ERRNO <= low and high < 0:
        return "failed init", -INIT_FAILED_BIAS
    if high < -MAX_ERRNO:
        return "negative outside the error range", 0
    return None


@dataclass(frozen=True, slots=True)
class _Routine:
    """What I's routine must have beside it, derived from its code."""

    orc: list[tuple[int, bytes]]  # (offset, packed struct orc_entry)
    return_sites: list[int]  # offsets of the jmp __x86_return_thunk
    fentry_sites: list[int]  # offsets of the call __fentry__ (each has an __mcount_loc record)


class ValidationError(Exception):
    """The split pair does not account for the original module exactly."""


@dataclass(frozen=True, slots=True)
class ValidationReport:
    name: str
    allocated_bytes: int
    relocations: int
    records_moved: int
    anchors: int
    synthesized_relocations: int
    # (C's name, offset from C's struct module) of each non-empty section of C that
    # I reaches, by this validator's run of the layout model (SplitModule.reached).
    reached: tuple[tuple[str, int], ...] = ()
    # 6.12: (C's name, its memory's anchor section, offset from it) of each
    # non-empty section I reaches and of each anchor's (SplitModule.reached_from).
    reached_from: tuple[tuple[str, str, int], ...] = ()


def validate_split(original: bytes, core: bytes, init: bytes,
                   rules: LayoutRules = LayoutRules(), *,
                   parsed: tuple[ElfObject | None, ElfObject | None, ElfObject | None] = (None, None, None)
                   ) -> ValidationReport:
    """Prove the pair (core, init) equivalent to *original* on a kernel of *rules*.

    *parsed* may give, for any of the three, what read_elf() made of exactly those
    bytes (decide() has each already: the original it split, C as the splitter
    placed it, I as the policy weighs it). read_elf() is deterministic and its
    objects are not changed after reading, so the proof is the same; it saves
    parsing each module a second time, the largest cost of a split (PERFORMANCE.md).
    """
    try:
        objects = tuple(read_elf(data) if obj is None else obj
                        for data, obj in zip((original, core, init), parsed))
    except MalformedElf as exc:
        raise ValidationError(f"unreadable object: {exc}") from exc
    try:
        return _Validator(*objects, rules).run()
    except ValidationError:
        raise
    except (IndexError, KeyError, ValueError, struct.error, UnicodeError, TypeError) as exc:
        raise ValidationError(f"inconsistent objects: {type(exc).__name__}: {exc}") from exc


def _fail(message: str) -> None:
    raise ValidationError(message)


class _Validator:
    def __init__(self, orig: ElfObject, core: ElfObject, init: ElfObject, rules: LayoutRules) -> None:
        self.orig, self.out = orig, {C: core, I: init}
        self.rules = rules
        self.reached: set[int] = set()  # C's sections I's relocations land in
        self.init_secs = {s.index for s in orig.sections
                          if s.flags & SHF_ALLOC and s.name.startswith(".init")}
        self.bytes_checked = 0
        self.relocs_checked = 0
        self.synthesized = 0
        # I's wrapper and stub, section index -> what was derived of each: set
        # by run() (_routines) before the tables, whose records for them it gives.
        self.routines: dict[int, _Routine] = {}
        # (side, section index) -> {offset: (type, target)}; entries are removed when accounted for.
        self.pending: dict[tuple[str, int], dict[int, tuple[int, Target]]] = {}

    # ----------------------------------------------------------------- driver
    def run(self) -> ValidationReport:
        if not self.init_secs:
            _fail("original has no init sections")
        modinfo = parse_modinfo(self._section(self.orig, ".modinfo").data)
        self.name = first(modinfo, "name") or ""
        self.init_name = init_module_name(self.name)
        self.kernel = self._kernel_tables()
        self._place_c()
        self._index_sections()
        self.anchors = None
        self._index_output_relocations(C)
        self.anchors = self._check_exports()
        self._index_output_relocations(I)
        self._check_plain_sections()
        self._module_fields()
        self.routines = self._routines()
        moved = self._check_tables()
        self._check_struct_modules()
        self._check_eval_map_copies()
        self._check_modinfo_and_versions(modinfo)
        self._check_headers()
        self._check_all_accounted()
        module = self._section(self.out[C], THIS_MODULE).index
        if self.kernel.has_module_memory:
            return ValidationReport(self.name, self.bytes_checked, self.relocs_checked, moved,
                                    len(self.anchors), self.synthesized, (), self._reached_from(module))
        base = self.c_offsets[module]
        reached = tuple(sorted((self.out[C].sections[i].name, self.c_offsets[i] - base)
                               for i in self.reached | {module} if self.out[C].sections[i].size))
        return ValidationReport(self.name, self.bytes_checked, self.relocs_checked, moved,
                                len(self.anchors), self.synthesized, reached)

    # ------------------------------------------------------------ C's layout
    def _place_c(self) -> None:
        """Where the kernel puts each of C's sections, by this validator's run of
        the layout model of the original's kernel: self.c_place maps C's section
        index to its place as I's relocations name it, ("core", offset) in 6.1's
        one core layout, ("mem", memory, offset) in one of 6.12's core memories
        (layout/linux612.py core_placement())."""
        core = self.out[C]
        if self.kernel.has_module_memory:
            self.c_layout, where = linux612.layout_and_placement(core, self.rules)
            self.c_place = {i: ("mem", memory, offset) for i, (memory, offset) in where.items()}
        else:
            self.c_layout = module_layout(core, self.rules)
            self.c_place = {i: ("core", offset) for i, offset in self.c_layout.core_offsets.items()}
        self.c_offsets = self.c_layout.core_offsets

    def _reached_from(self, module: int) -> tuple[tuple[str, str, int], ...]:
        """ValidationReport.reached_from; also that each memory C anchors is one I
        reaches (C exports no anchor I does not need) and that the struct module
        anchors MOD_DATA."""
        core = self.out[C]
        anchor_at = {place[1]: (section, place[2]) for section, place in self.anchor_sections.items()}
        reached = self.reached | {module}
        if {self.c_place[i][1] for i in reached} != set(anchor_at):
            _fail(f"C anchors the memories {sorted(anchor_at)}, I reaches "
                  f"{sorted({self.c_place[i][1] for i in reached})}")
        out = []
        for i in reached | set(self.anchor_sections):
            if core.sections[i].size:
                _, memory, offset = self.c_place[i]
                section, at = anchor_at[memory]
                out.append((core.sections[i].name, core.sections[section].name, offset - at))
        return tuple(sorted(out))

    # ------------------------------------------------------------- structure
    @staticmethod
    def _section(obj: ElfObject, name: str) -> Section:
        section = obj.section(name)
        if section is None:
            _fail(f"missing section {name}")
        return section

    def _index_sections(self) -> None:
        self.by_name: dict[str, dict[str, int]] = {}
        for side, obj in self.out.items():
            names = Counter(s.name for s in obj.sections if s.flags & SHF_ALLOC)
            dup = [n for n, k in names.items() if k > 1]
            if dup:
                _fail(f"{side} has duplicate allocated sections {dup}")
            self.by_name[side] = {s.name: s.index for s in obj.sections if s.flags & SHF_ALLOC}
        names = Counter(s.name for s in self.orig.sections if s.flags & SHF_ALLOC)
        if any(k > 1 for k in names.values()):
            _fail("original has duplicate allocated section names")
        # Where each original allocated section lives now, for sections moved whole.
        self.home: dict[int, tuple[str, int]] = {}
        for section in self.orig.sections:
            if not section.flags & SHF_ALLOC or section.name in _NOT_LOADED:
                continue
            if section.name in self.kernel.by_section or section.name in self.kernel.parallel:
                continue
            if section.name in (KSYMTAB, KCRCTAB, KSYMTAB_GPL, KCRCTAB_GPL):
                continue
            side = I if section.index in self.init_secs else C
            name = RO_AFTER_INIT_RENAMED if section.name == RO_AFTER_INIT else section.name
            index = self.by_name[side].get(name)
            if index is None:
                _fail(f"{section.name} is missing from {side}")
            other = I if side == C else C
            if name in self.by_name[other] and name not in (THIS_MODULE, STUB_SECTION):
                _fail(f"{section.name} appears in both modules")
            self.home[section.index] = (side, index)

    def _index_output_relocations(self, side: str) -> None:
        obj = self.out[side]
        out_target = self._out_target
        for target, table in obj.relocations.items():
            if not obj.sections[target].flags & SHF_ALLOC:
                continue
            places = {offset: (type_, out_target(side, symbol, addend))
                      for offset, type_, symbol, addend
                      in zip(table.offsets, table.types, table.symbols, table.addends)}
            if len(places) != len(table):
                _fail(f"{side}: two relocations at one place in {obj.sections[target].name}")
            self.pending[(side, target)] = places

    # ---------------------------------------------------------------- targets
    def _orig_target(self, symbol: int, addend: int) -> Target:
        sym = self.orig.symbols[symbol]
        if sym.shndx == SHN_UNDEF:
            return ("sym", sym.name, addend)
        if sym.shndx == SHN_ABS:
            return ("abs", sym.value + addend)
        home = self.home.get(sym.shndx)
        if home is None:
            _fail(f"original relocation targets {self.orig.sections[sym.shndx].name}, "
                  "which has no single home after the split")
        return ("loc", home[0], home[1], sym.value + addend)

    def _as_seen_from(self, side: str, target: Target) -> Target:
        """*target* as a relocation of *side* names it: from I, a place in C is an
        offset in C's core layout (I reaches it from the anchor)."""
        if side == I and target[0] == "loc" and target[1] == C:
            place = self.c_place.get(target[2])
            if place is None:
                _fail(f"I refers to C's {self.out[C].sections[target[2]].name}, "
                      "outside C's core layout")
            self.reached.add(target[2])
            return _shifted(place, target[3])
        return target

    def _out_target(self, side: str, symbol: int, addend: int) -> Target:
        sym = self.out[side].symbols[symbol]
        if sym.shndx == SHN_UNDEF:
            if side == I and self.anchors is not None and sym.name in self.anchors:
                return _shifted(self.anchors[sym.name], addend)
            return ("sym", sym.name, addend)
        if sym.shndx == SHN_ABS:
            return ("abs", sym.value + addend)
        return ("loc", side, sym.shndx, sym.value + addend)

    def _take(self, side: str, section: int, offset: int) -> tuple[int, Target]:
        places = self.pending.get((side, section))
        if places is None or offset not in places:
            name = self.out[side].sections[section].name
            _fail(f"{side}: no relocation at {name}+{offset:#x}")
        return places.pop(offset)

    def _expect(self, side: str, section: int, offset: int, type_: int, target: Target,
                what: str) -> None:
        got = self._take(side, section, offset)
        target = self._as_seen_from(side, target)
        if got != (type_, target):
            _fail(f"{what}: relocation at {side}:{self.out[side].sections[section].name}"
                  f"+{offset:#x} is {got}, expected {(type_, target)}")

    # ---------------------------------------------------------------- exports
    def _check_exports(self) -> dict[str, int]:
        """Check C's export tables; return anchor name -> offset in C's core layout.

        __ksymtab must hold exactly one anchor (INITSPLIT namespace, C's struct
        module, its CRC). For each export table of the original, the
        hidden table behind it holds exactly the original's records (name, value,
        namespace, CRC), sorted, every name after the last anchor; the visible
        GPL tables are empty. _check_adjacent proves that each hidden table is
        laid out right behind its visible one; self.publish_counts records the
        counts the wrapper must store (checked in _check_wrapper).
        """
        core = self.out[C]
        strings = self._section(core, KSYMTAB_STRINGS)
        visible = self._c_export_records(KSYMTAB, KCRCTAB, strings)
        anchors: dict[str, Target] = {}
        module = self._section(core, THIS_MODULE)
        if self.kernel.has_module_memory:
            anchors = self._memory_anchors(visible, module.index)
        for name, value, namespace, crc in visible if not anchors else ():
            if namespace != NAMESPACE.encode():
                _fail(f"C's __ksymtab exports {name!r} before init")
            if value != ("loc", C, module.index, 0) or module.index not in self.c_offsets:
                _fail(f"anchor {name!r} is not C's struct module")
            if crc != anchor_crc(name.decode()):
                _fail(f"anchor {name!r} has the wrong CRC")
            anchors[name.decode()] = self.c_place[module.index]
        if len(visible) != 1 and not self.kernel.has_module_memory:
            _fail(f"C exports {len(visible)} anchors, not one")
        names = [record[0] for record in visible]
        if names != sorted(names) or len(set(names)) != len(names):
            _fail("C's __ksymtab is not sorted by name, or names one anchor twice")
        self.synthesized += 3 * len(anchors)
        self.publish_counts: dict[str, int] = {}
        for table, crcs in EXPORT_TABLES:
            want = self._orig_export_records(table, crcs)
            if want is None:
                absent = (HIDDEN[table], HIDDEN[crcs]) + ((table, crcs) if table != KSYMTAB else ())
                if any(core.section(n) is not None for n in absent):
                    _fail(f"C has {table} records the original lacks")
                continue
            if table != KSYMTAB and self._c_export_records(table, crcs, strings):
                _fail(f"C's {table} is not empty before init")
            got = self._c_export_records(HIDDEN[table], HIDDEN[crcs], strings)
            if got != sorted(want, key=lambda r: r[0]):
                _fail(f"C's {HIDDEN[table]} is not the original's {table}, sorted")
            if got and names and got[0][0] <= names[-1]:
                _fail(f"an export of {table} sorts before the anchors")
            self._check_adjacent(table, HIDDEN[table])
            self._check_adjacent(crcs, HIDDEN[crcs])
            self.relocs_checked += 3 * len(want)
            self.publish_counts[table] = (len(visible) if table == KSYMTAB else 0) + len(got)
        return anchors

    def _memory_anchors(self, visible: list[tuple[bytes, Target, bytes, int]], module: int
                        ) -> dict[str, Target]:
        """6.12's anchors (anchor name -> its place in C's memories): each at the
        start of a non-empty section of C (the loader finds its address in
        /sys/module/NAME/sections, which lists no empty section), named for its
        memory, so one per memory, C's struct module the one of MOD_DATA. That
        each anchors a memory I reaches is checked once I's relocations are
        (_reached_from)."""
        core = self.out[C]
        prefix = anchor_prefix(self.name)
        anchors: dict[str, Target] = {}
        self.anchor_sections: dict[int, Target] = {}
        for raw, value, namespace, crc in visible:
            name = raw.decode()
            if namespace != NAMESPACE.encode():
                _fail(f"C's __ksymtab exports {name!r} before init")
            place = self.c_place.get(value[2]) if value[:2] == ("loc", C) else None
            if place is None or value[3] != 0:
                _fail(f"anchor {name!r} does not mark the start of a section in C's core memories")
            if name != prefix + _MEMORY_ANCHOR_SUFFIX[place[1]]:
                _fail(f"anchor {name!r} is not the anchor of C's memory {place[1]}")
            if crc != anchor_crc(name):
                _fail(f"anchor {name!r} has the wrong CRC")
            if not core.sections[value[2]].size:
                _fail(f"anchor {name!r} marks an empty section")
            if place[1] == "data" and value[2] != module:
                _fail(f"anchor {name!r} of MOD_DATA is not C's struct module")
            anchors[name] = place
            self.anchor_sections[value[2]] = place
        if prefix + _MEMORY_ANCHOR_SUFFIX["data"] not in anchors:
            _fail("C does not export its struct module as the anchor of MOD_DATA")
        return anchors

    def _c_export_records(self, table: str, crcs: str, strings: Section) -> list[tuple[bytes, Target, bytes, int]]:
        """(name, value, namespace, CRC) of each record of C's *table*; its relocations are taken."""
        core = self.out[C]
        ksymtab, kcrctab = self._section(core, table), self._section(core, crcs)
        count = ksymtab.size // KSYMTAB_RECORD_SIZE
        if ksymtab.size % KSYMTAB_RECORD_SIZE or kcrctab.size != 4 * count:
            _fail(f"C's {table} and {crcs} do not match")
        if ksymtab.data != bytes(ksymtab.size):
            _fail(f"C's {table} has bytes where only relocations belong")
        fields: dict[int, dict[int, tuple[int, Target]]] = {}
        for offset, (type_, target) in self.pending.pop((C, ksymtab.index), {}).items():
            if type_ != R_X86_64_PC32:
                _fail(f"C's {table} has a relocation that is not PC32")
            fields.setdefault(offset // KSYMTAB_RECORD_SIZE, {})[offset % KSYMTAB_RECORD_SIZE] = target
        records = []
        for record in range(count):
            got = fields.get(record, {})
            if set(got) != {0, 4, 8}:
                _fail(f"C {table} record without its three relocations")
            crc = struct.unpack_from("<I", kcrctab.data, 4 * record)[0]
            records.append((self._string(C, strings, got[4]), got[0],
                            self._string(C, strings, got[8]), crc))
        return records

    def _orig_export_records(self, table: str, crcs: str) -> list[tuple[bytes, Target, bytes, int]] | None:
        """The original's records of *table* as C must hold them, or None without the table."""
        ksymtab = self.orig.section(table)
        if ksymtab is None:
            return None
        strings = self._section(self.orig, KSYMTAB_STRINGS)
        kcrctab = self._section(self.orig, crcs)
        fields: dict[int, dict[int, tuple[int, int]]] = {}
        for rel in self.orig.relocations_for(ksymtab):
            fields.setdefault(rel.offset // KSYMTAB_RECORD_SIZE, {})[rel.offset % KSYMTAB_RECORD_SIZE] = \
                (rel.symbol, rel.addend)
        records = []
        for record in range(ksymtab.size // KSYMTAB_RECORD_SIZE):
            got = fields.get(record, {})
            if set(got) != {0, 4, 8}:
                _fail(f"original {table} record without its three relocations")
            name, namespace = (self._orig_string(strings, *got[k]) for k in (4, 8))
            crc = struct.unpack_from("<I", kcrctab.data, 4 * record)[0]
            records.append((name, self._orig_target(*got[0]), namespace, crc))
        return records

    def _string(self, side: str, strings: Section, target: Target) -> bytes:
        if target[:3] != ("loc", side, strings.index):
            _fail("export name outside __ksymtab_strings")
        start = target[3]
        end = strings.data.find(b"\0", start)
        if start < 0 or end < 0:
            _fail("bad export string")
        return strings.data[start:end]

    def _orig_string(self, strings: Section, symbol: int, addend: int) -> bytes:
        sym = self.orig.symbols[symbol]
        if sym.shndx != strings.index:
            _fail("original export name outside __ksymtab_strings")
        start = sym.value + addend
        return strings.data[start:strings.data.find(b"\0", start)]

    def _check_adjacent(self, visible: str, hidden: str) -> None:
        """C's *hidden* table is laid out directly behind its *visible* one.

        layout_sections() (kernel/module/main.c) walks the section headers in
        index order once per flags class, and module_get_offset() puts each
        section at ALIGN(size so far, sh_addralign) and adds its sh_size
        (arch_mod_section_prepend() is 0 on x86). Neighbouring headers with the
        same flags (SHF_ALLOC, not writable: the read-only class), both 4-aligned,
        the first a whole number of 4-byte records long, therefore touch. The
        records are then one array for the kernel: mod->syms (or crcs) is the
        visible start, and counts past its end reach the hidden records.
        """
        core = self.out[C]
        v, h = self._section(core, visible), self._section(core, hidden)
        if h.index != v.index + 1:
            _fail(f"C's {hidden} does not follow {visible}")
        if v.flags != h.flags or not v.flags & SHF_ALLOC or v.flags & (SHF_WRITE | SHF_EXECINSTR):
            _fail(f"C's {visible} and {hidden} are not in the same read-only layout class")
        if (v.type, h.type) != (SHT_PROGBITS, SHT_PROGBITS) or (v.addralign, h.addralign) != (4, 4) \
                or v.size % 4:
            _fail(f"C's {hidden} is not laid out right behind {visible}")
        if visible.startswith(".init") or hidden.startswith(".init"):
            _fail("export tables must not be init sections")

    # ------------------------------------------------------- whole sections
    def _check_plain_sections(self) -> None:
        for orig_index, (side, index) in self.home.items():
            src = self.orig.sections[orig_index]
            dst = self.out[side].sections[index]
            if src.name == THIS_MODULE:
                continue  # checked field by field in _check_struct_modules
            if src.flags != dst.flags or src.type != dst.type or src.addralign != dst.addralign:
                _fail(f"{src.name}: header changed")
            if src.name == KSYMTAB_STRINGS:
                if dst.data[:src.size] != src.data:
                    _fail("__ksymtab_strings: original strings changed")
            elif src.size != dst.size or (src.type != SHT_NOBITS and src.data != dst.data):
                _fail(f"{src.name}: bytes changed")
            self.bytes_checked += src.size
            for rel in self.orig.relocations_for(src):
                sym = self.orig.symbols[rel.symbol]
                if src.name == EVAL_MAP and sym.shndx in self.init_secs:
                    # Checked in _check_eval_map_copies: now points at C's copy.
                    continue
                self._expect(side, index, rel.offset, rel.type,
                             self._orig_target(rel.symbol, rel.addend), src.name)
                self.relocs_checked += 1

    # ---------------------------------------------------------------- tables
    def _check_tables(self) -> int:
        moved = 0
        init_mcount = 0
        for table in self.kernel.records:
            src = self.orig.section(table.section)
            if src is None:
                if self.by_name[C].get(table.section) is not None:
                    _fail(f"C has a {table.section} the original lacks")
                if table.section in self.by_name[I]:
                    self._check_synthesized_records(table, self._records(I, table.section, table), 0)
                continue
            count = self._check_table(table, src)
            if table.section == MCOUNT_LOC:
                init_mcount = count
            moved += count
        self._check_stub_traced(init_mcount)
        return moved

    def _check_stub_traced(self, init_mcount: int) -> None:
        """The stub is traced exactly when I has ftrace records of init code.

        Those records are all I has otherwise, in ftrace pages of I's own
        (ftrace_process_locs(), kernel/trace/ftrace.c); when do_init_module()
        frees I's init layout, ftrace_free_mem() removes them and waits in
        synchronize_rcu() for each page that became empty. The stub's record,
        in I's core text, keeps the page from emptying (split/codegen.py)."""
        traced = any(r.fentry_sites for r in self.routines.values())
        if init_mcount and not traced:
            _fail(f"I's {MCOUNT_LOC} records all describe init code and its exit stub has no "
                  f"{FENTRY} call: ftrace_free_mem() would empty I's ftrace page")
        if traced and not init_mcount:
            _fail(f"I's exit stub calls {FENTRY}, but I has no {MCOUNT_LOC} records of init code")

    def _records(self, side: str, name: str, table: RecordTable) -> list[_Record]:
        index = self.by_name[side].get(name)
        if index is None:
            return []
        section = self.out[side].sections[index]
        size = table.record_size
        if section.size % size:
            _fail(f"{side}:{name} is not whole records")
        places = self.pending.get((side, index), {})
        parallel = b""
        if table.parallel:
            pindex = self.by_name[side].get(table.parallel)
            if pindex is None:
                _fail(f"{side}: {table.parallel} missing")
            parallel = self.out[side].sections[pindex].data
            if len(parallel) != section.size // size * table.parallel_record_size:
                _fail(f"{side}: {table.parallel} does not match {name}")
        by_record: dict[int, list] = {}
        for off, (type_, target) in places.items():
            record, inner = divmod(off, size)
            by_record.setdefault(record, []).append((inner, type_, target))
        psize = table.parallel_record_size
        data = section.data
        return [(data[n * size:(n + 1) * size], tuple(sorted(by_record.get(n, ()))),
                 parallel[n * psize:(n + 1) * psize]) for n in range(section.size // size)]

    def _record_seen_from_i(self, record: _Record) -> _Record:
        data, relocs, parallel = record
        return (data, tuple(sorted((inner, type_, self._as_seen_from(I, target))
                                   for inner, type_, target in relocs)), parallel)

    def _check_table(self, table: RecordTable, src: Section) -> int:
        size = table.record_size
        if src.size % size:
            _fail(f"{src.name} is not whole records")
        orig_rels: dict[int, list] = {}
        for rel in self.orig.relocations_for(src):
            orig_rels.setdefault(rel.offset // size, []).append(
                (rel.offset % size, rel.type, self._orig_target(rel.symbol, rel.addend)))
        parallel = b""
        psize = table.parallel_record_size
        if table.parallel:
            parallel = self._section(self.orig, table.parallel).data
        core = self._records(C, src.name, table)
        init = self._records(I, src.name, table)
        ci = ii = 0
        for n in range(src.size // size):
            want = (src.data[n * size:(n + 1) * size], tuple(sorted(orig_rels.get(n, []))),
                    parallel[n * psize:(n + 1) * psize])
            if ci < len(core) and core[ci] == want:
                ci += 1
            elif ii < len(init) and init[ii] == self._record_seen_from_i(want):
                ii += 1
            else:
                _fail(f"{src.name} record {n} has no exact copy in order in C or I")
            self.bytes_checked += size + psize
            self.relocs_checked += len(want[1])
        if ci != len(core):
            _fail(f"C's {src.name} has {len(core) - ci} records the original lacks")
        for side, count in ((C, ci), (I, ii)):
            index = self.by_name[side].get(src.name)
            if index is not None:
                places = self.pending[(side, index)] if (side, index) in self.pending else {}
                for off in [o for o in places if o < count * size]:
                    del places[off]
        self._check_synthesized_records(table, init[ii:], ii)
        return ii

    def _check_synthesized_records(self, table: RecordTable, extra: Sequence[_Record],
                                   first_index: int) -> None:
        """The records I has beyond the original's: exactly the ones for our code,
        as the validator's own reading of that code (_routines) derives them."""
        routines = self.routines
        expected: list[_Record] = []
        zero = bytes(table.record_size)
        if table.section == ".orc_unwind_ip":
            for index, routine in routines.items():
                for offset, entry in routine.orc:
                    expected.append((zero, ((0, 2, ("loc", I, index, offset)),), entry))
        elif table.section == ".return_sites":
            for index, routine in routines.items():
                for offset in routine.return_sites:
                    expected.append((zero, ((0, 2, ("loc", I, index, offset)),), b""))
        elif table.section == MCOUNT_LOC:
            # The address of each call __fentry__ (R_X86_64_64), as the compiler's
            # records (objtool --mcount or recordmcount) have it.
            for index, routine in routines.items():
                for offset in routine.fentry_sites:
                    expected.append((zero, ((0, R_X86_64_64, ("loc", I, index, offset)),), b""))
        if list(extra) != expected:
            _fail(f"I's {table.section} holds records that describe neither init code nor ours")
        index = self.by_name[I].get(table.section)
        if index is not None:
            places = self.pending.get((I, index), {})
            start = first_index * table.record_size
            for off in [o for o in places if o >= start]:
                del places[off]
            self.synthesized += len(expected)

    # ------------------------------------------------------ synthesized code
    def _routines(self) -> dict[int, _Routine]:
        """I's wrapper and stub (section index -> what was derived), each decoded
        and checked, its relocations taken (validate_x86.py: decode, analyse).
        Run once, by run(), after the struct module fields and C's exports.

        Nothing here asks the code generator: the expectations are the
        validator's own (struct module fields from the layout table, sizes from
        its run of the layout model, counts from its reading of C's exports)."""
        w_index, s_index = self.by_name[I].get(WRAPPER_SECTION), self.by_name[I].get(STUB_SECTION)
        if w_index is None or s_index is None:
            _fail("I lacks its wrapper or stub")
        if self.layout is None:
            _fail("struct module layout unknown (the wrapper checks C's core_layout)")
        c_module = self._section(self.out[C], THIS_MODULE).index
        self.module_ref = self._as_seen_from(I, ("loc", C, c_module, 0))
        self.rethunk = any(n == RETURN_THUNK for _, n in self._versions(self.orig))
        wrapper = self._analyse(w_index, "init wrapper")
        self._check_wrapper(wrapper)
        stub = self._analyse(s_index, "exit stub")
        fentry = self._check_stub(stub)
        orc_type = self.kernel.orc_type_call
        return {w_index: self._derived(wrapper, orc_type),
                s_index: self._derived(stub, orc_type, fentry)}

    @staticmethod
    def _check_stub(stub: x86.Analysis) -> list[int]:
        """The stub is endbr64 and the return, or endbr64, `call __fentry__` and
        the return: the offsets of its __fentry__ calls (none or that one).

        The call must reach __fentry__ itself (MCOUNT_ADDR): at load,
        ftrace_init_nop() -> ftrace_make_nop() (arch/x86/kernel/ftrace.c) compares
        the five bytes at the record with `e8 <rel32 to __fentry__>`
        (ftrace_verify_code()) before it writes the NOP, and anything else is
        ftrace_bug(): a WARN, and ftrace disabled for the whole kernel."""
        path = stub.paths[0]
        assert path.exit is not None
        ops = [i.op for i in stub.insns if i.offset in stub.sp_at]
        if ops == ["endbr64", path.exit.op]:
            return []
        if ops != ["endbr64", "call", path.exit.op]:
            _fail("I's exit stub does more than return")
        call = path.calls()[0]
        if call.ref != ("sym", FENTRY, 0):
            _fail(f"I's exit stub calls {call.ref}, not {FENTRY} (ftrace_make_nop() would refuse it)")
        return [call.at]

    def _analyse(self, index: int, what: str) -> x86.Analysis:
        """Decode I's routine in section *index*, attach its relocations to the
        operands they patch, follow its paths, and check what every routine of
        ours must be: endbr64 at the entry, nothing unreachable but the int3 of a
        ret, one epilogue, the stack as it was on entry when it returns."""
        code = self.out[I].sections[index].data
        try:
            insns = x86.decode(code)
            refs = self._operand_refs(index, insns, what)
            analysis = x86.analyse(insns, refs)
        except x86.CodeError as exc:
            raise ValidationError(f"I's {what}: {exc}") from exc
        # A branch to a jmp behaves as a branch to the jmp's target, but it is
        # not what the code generator writes (each of its jumps goes straight to
        # where the path continues): refused, so that a flipped rel8 is too.
        local_jumps = {i.offset for i in insns if i.op == "jmp" and i.offset not in refs}
        for insn in insns:
            if insn.op in ("jne", "jns", "jl", "jmp") and insn.offset not in refs \
                    and insn.target in local_jumps:
                _fail(f"I's {what}: {insn.text()} at +{insn.offset:#x} goes to another jmp")
        if not insns or insns[0].op != "endbr64":
            _fail(f"I's {what} does not begin with endbr64 (the IBT landing pad of an indirect call)")
        for prev, insn in zip(insns, insns[1:]):
            if insn.op == "endbr64":
                _fail(f"I's {what} has a second indirect-branch target, endbr64 at +{insn.offset:#x}")
            if prev.op == "ret" and insn.op != "int3":
                _fail(f"I's {what}: ret at +{prev.offset:#x} lacks its int3 (straight-line "
                      "speculation guard)")
            if insn.offset not in analysis.sp_at and not (insn.op == "int3" and prev.op == "ret"):
                _fail(f"I's {what} has unreachable code at +{insn.offset:#x} ({insn.text()})")
        if insns[-1].op == "ret":
            _fail(f"I's {what}: the final ret lacks its int3 (straight-line speculation guard)")
        exits = {p.exit.offset for p in analysis.paths if p.exit is not None}
        if len(exits) != 1:
            _fail(f"I's {what}: its paths end in {len(exits)} epilogues, not one")
        thunk = ("sym", RETURN_THUNK, 0)
        for path in analysis.paths:
            assert path.exit is not None
            returns = (path.exit.op == "jmp" and path.exit_ref == thunk) if self.rethunk \
                else path.exit.op == "ret"
            if not returns:
                how = "jmp __x86_return_thunk" if self.rethunk else "ret"
                _fail(f"I's {what} leaves by {path.exit.text()} at +{path.exit.offset:#x}, "
                      f"not {how} as the original does")
            if path.exit_sp != 8:
                _fail(f"I's {what} returns with {path.exit_sp - 8} bytes of its own on the "
                      "stack: the stack adjust is not undone")
        return analysis

    def _operand_refs(self, index: int, insns: list[x86.Insn], what: str) -> dict[int, Target]:
        """Instruction offset -> the address its relocated rel32/disp32 operand
        reaches. The x86-64 module loader writes S + A - P into the field (PC32
        and PLT32 alike, apply_relocate_add() in arch/x86/kernel/module.c) and the
        CPU adds the end of the instruction, so the operand reaches S + A + (end - P)."""
        code = self.out[I].sections[index].data
        places = self.pending.get((I, index), {})
        refs: dict[int, Target] = {}
        for insn in insns:
            if insn.field is None or insn.field not in places:
                continue
            type_, target = places.pop(insn.field)
            if type_ not in (R_X86_64_PC32, R_X86_64_PLT32):
                _fail(f"I's {what}: relocation of type {type_} on the operand at +{insn.offset:#x}")
            if code[insn.field:insn.field + 4] != bytes(4):
                # The loader refuses a relocation onto a non-zero field.
                _fail(f"I's {what}: relocated field at +{insn.field:#x} is not zero")
            refs[insn.offset] = _shifted(target, insn.end - insn.field)
            self.synthesized += 1
        if places:
            _fail(f"I's {what}: relocation at +{min(places):#x} patches no operand")
        return refs

    def _field(self, offset: int) -> Target:
        """Where the field at *offset* of C's struct module is, as I reaches it."""
        return _shifted(self.module_ref, offset)

    def _check_wrapper(self, analysis: x86.Analysis) -> None:
        """Each path of the wrapper does what this path must (see the module doc of
        split/codegen.py for the intent, initresult.py for the result's encoding):

        * a compare of C's core_layout with the model fails: -ENOEXEC, nothing
          called, nothing stored;
        * otherwise every check compared first, then one call, to the original
          init, with the stack 16-byte aligned; then by the result R:
          R >= 0 returns R after arming C and then publishing its exports;
          -MAX_ERRNO <= R < 0 returns R - INIT_FAILED_BIAS, nothing stored;
          R < -MAX_ERRNO returns R, nothing stored.
        """
        for path in analysis.paths:
            failed = [c for c in path.compares() if not c.holds]
            if failed:
                self._check_refusal(path, failed[0])
            else:
                self._check_init_path(path)

    def _check_refusal(self, path: x86.Path, failed: x86.Compare) -> None:
        where = f"I's init wrapper, when the compare at +{failed.at:#x} fails"
        if path.calls() or path.stores():
            _fail(f"{where}: it still calls or stores")
        if path.eax != x86.Const(-ENOEXEC):
            _fail(f"{where}: it returns {path.eax}, not -ENOEXEC")

    def _layout_checks(self) -> list[tuple[Target, int]]:
        """What C's core_layout holds once the kernel has laid C out as this
        validator's run of the layout model did: each group's end and the total
        (layout_sections(), layout_symtab()), page-rounded under STRICT_MODULE_RWX."""
        if isinstance(self.layout, StructModuleMemoryLayout):
            # 6.12: mem[type].size of each core memory type, page-aligned and stored
            # back by module_memory_alloc() (kernel/module/main.c); 0 for a type C
            # has nothing in (move_module() allocates nothing for it).
            m = MODULE_MEMORY_FIELDS
            return sorted((self._field(self.layout.mem + mem_type * m.record_size + m.size), size)
                          for mem_type, size in linux612.core_memory_sizes(self.c_layout).items())
        f = MODULE_LAYOUT_FIELDS
        fields = (f.text_size, f.ro_size, f.ro_after_init_size, f.size)
        return sorted((self._field(self.layout.core_layout + off), value & 0xFFFFFFFF)
                      for off, value in zip(fields, self.c_layout.core_marks()))

    def _publish(self) -> list[tuple[Target, int]]:
        """The stores that make C's hidden exports visible: the full count of each table."""
        stores = []
        for table, name in ((KSYMTAB, "num_syms"), (KSYMTAB_GPL, "num_gpl_syms")):
            if table in self.publish_counts:
                stores.append((self._field(getattr(self.layout, name)), self.publish_counts[table]))
        return sorted(stores)

    def _check_init_path(self, path: x86.Path) -> None:
        where = f"I's init wrapper, for init results {path.low}..{path.high}"
        calls = path.calls()
        if len(calls) != 1:
            _fail(f"{where}: {len(calls)} calls, not one (to the original init)")
        call = calls[0]
        if call.ref != self._as_seen_from(I, self._orig_target(self.init_sym, 0)):
            _fail(f"{where}: the call at +{call.at:#x} is not to the original init")
        if call.sp % 16:
            _fail(f"{where}: the stack is not 16-byte aligned at the call")
        before = path.events[:path.events.index(call)]
        compares = sorted((c.ref, c.value & 0xFFFFFFFF) for c in path.compares())
        if compares != self._layout_checks() or len([e for e in before if isinstance(e, x86.Compare)]) \
                != len(compares):
            _fail(f"{where}: the compares before the call, {compares}, are not C's "
                  f"core_layout sizes by the layout model, {self._layout_checks()}")
        if any(isinstance(e, x86.Store) for e in before):
            _fail(f"{where}: a store before the original init ran")
        result = _init_result_class(path.low, path.high)
        if result is None:
            _fail(f"{where}: one path for results that need different treatment")
        kind, delta = result
        if path.eax != x86.InitResult(delta):
            _fail(f"{where} ({kind}): returns {path.eax}, not R{delta:+#x}")
        stores = [(s.ref, s.width, s.value) for s in path.stores()]
        if kind != "success":
            if stores:
                _fail(f"{where} ({kind}): stores into memory")
            return
        slot = self.exit_field if self.has_cleanup else self.init_field
        arm_value = (self._as_seen_from(I, self._orig_target(self.exit_sym, 0)) if self.has_cleanup
                     else self.module_ref)
        arm = (self._field(slot), 8, x86.Address(arm_value))
        if not stores or stores[0] != arm:
            if arm in stores:
                _fail(f"{where}: the arm store comes after a publish store")
            _fail(f"{where}: the first store is not the arm store {arm}")
        publish = sorted((ref, value.value & 0xFFFFFFFF) for ref, width, value in stores[1:]
                         if width == 4 and isinstance(value, x86.Const))
        if len(publish) != len(stores) - 1 or publish != self._publish():
            _fail(f"{where}: the publish stores {stores[1:]} are not {self._publish()}")

    @staticmethod
    def _derived(analysis: x86.Analysis, orc_type: int, fentry_sites: Sequence[int] = ()) -> _Routine:
        """The ORC entries and return sites of a routine, from its decoded stack
        effects: an entry wherever the stack depth on entry to an instruction
        changes in address order (the int3 after a ret keeps the depth before
        it), and a terminator past the end, as objtool writes them."""
        orc: list[tuple[int, bytes]] = []
        depth = None
        for insn in analysis.insns:
            sp = analysis.sp_at.get(insn.offset, depth)
            if sp != depth:
                orc.append((insn.offset, pack_orc_entry(sp, ORC_REG_SP, orc_type)))
                depth = sp
        end = analysis.insns[-1].end
        orc.append((end, pack_orc_entry(0, ORC_REG_UNDEFINED, ORC_TYPE_TERMINATOR)))
        sites = sorted({p.exit.offset for p in analysis.paths
                        if p.exit is not None and p.exit.op == "jmp"})
        return _Routine(orc, sites, list(fentry_sites))

    # --------------------------------------------------------- struct module
    def _versions(self, obj: ElfObject) -> list[tuple[int, str]]:
        section = self._section(obj, "__versions")
        if section.size % MODVERSION_RECORD_SIZE:
            _fail("__versions is not whole records")
        return [(crc, raw.split(b"\0", 1)[0].decode("utf-8", "replace"))
                for crc, raw in _MODVERSION.iter_unpack(section.data)]

    def _kernel_tables(self) -> KernelTables:
        """The tables of the kernel build the original names by its module_layout CRC
        (split/tables.py): the validator's own reading, not the splitter's."""
        crc = next((c for c, n in self._versions(self.orig) if n == "module_layout"), None)
        kernel = kernel_tables(crc)
        if kernel is None:
            _fail("kernel build unknown (module_layout CRC)")
        return kernel

    def _module_fields(self) -> None:
        """->init and ->exit of the original's struct module (by its relocations),
        and the struct module layout of its kernel; run once, by run()."""
        mod = self._section(self.orig, THIS_MODULE)
        fields = {}
        for rel in self.orig.relocations_for(mod):
            name = self.orig.symbols[rel.symbol].name
            if rel.type == R_X86_64_64 and name in ("init_module", "cleanup_module"):
                fields[name] = (rel.offset, rel.symbol, rel.addend)
        if "init_module" not in fields:
            _fail("original has no init routine")
        self.init_field, self.init_sym, _ = fields["init_module"]
        self.has_cleanup = "cleanup_module" in fields
        self.layout = self.kernel.struct_module
        if self.layout is not None:
            # The table must agree with what the module itself says about ->init/->exit.
            if self.layout.size != mod.size or self.layout.init != self.init_field or \
                    (self.has_cleanup and self.layout.exit != fields["cleanup_module"][0]):
                _fail("struct module layout table disagrees with the module's relocations")
        if self.has_cleanup:
            self.exit_field, self.exit_sym, _ = fields["cleanup_module"]
        else:
            if self.layout is None:
                _fail("struct module layout unknown")
            self.exit_field = self.layout.exit

    def _check_struct_modules(self) -> None:
        orig = self._section(self.orig, THIS_MODULE)
        core = self._section(self.out[C], THIS_MODULE)
        init = self._section(self.out[I], THIS_MODULE)
        if core.data != orig.data or core.flags != orig.flags:
            _fail("C's struct module changed")
        name_at = orig.data.find(self.name.encode() + b"\0")
        want = bytearray(orig.data)
        want[name_at:name_at + MODULE_NAME_LEN] = self.init_name.encode().ljust(MODULE_NAME_LEN, b"\0")
        if init.data != bytes(want):
            _fail("I's struct module is not the original's with I's name")
        self.bytes_checked += orig.size
        # C: the original's relocations minus ->init and ->exit (so C loads inert).
        for rel in self.orig.relocations_for(orig):
            if rel.offset in (self.init_field, self.exit_field):
                continue
            self._expect(C, core.index, rel.offset, rel.type,
                         self._orig_target(rel.symbol, rel.addend), THIS_MODULE)
            self.relocs_checked += 1
        # I: ->init is the wrapper, ->exit the stub, nothing else.
        w_index, s_index = self.by_name[I].get(WRAPPER_SECTION), self.by_name[I].get(STUB_SECTION)
        if w_index is None or s_index is None:
            _fail("I lacks its wrapper or stub")
        self._expect(I, init.index, self.init_field, R_X86_64_64, ("loc", I, w_index, 0), "I ->init")
        self._expect(I, init.index, self.exit_field, R_X86_64_64, ("loc", I, s_index, 0), "I ->exit")
        if self.pending.get((I, init.index)):
            _fail("I's struct module has extra relocations")
        self.relocs_checked += 1 if self.has_cleanup else 0
        self.relocs_checked += 1

    # ------------------------------------------------------- eval map copies
    def _check_eval_map_copies(self) -> None:
        section = self.orig.section(EVAL_MAP)
        copies_index = self.by_name[C].get(EVAL_MAP_COPIES)
        if section is None:
            if copies_index is not None:
                _fail("C has trace eval map copies but the original has no eval maps")
            return
        c_map = self.home[section.index][1]
        copies = self.out[C].sections[copies_index] if copies_index is not None else None
        for rel in self.orig.relocations_for(section):
            sym = self.orig.symbols[rel.symbol]
            if sym.shndx not in self.init_secs:
                continue
            if copies is None:
                _fail("eval map into init data without a copy in C")
            got_type, got = self._take(C, c_map, rel.offset)
            if got_type != rel.type or got[:3] != ("loc", C, copies_index):
                _fail("eval map entry does not point at C's copy")
            offset = got[3]
            source = self.orig.sections[sym.shndx]
            start = sym.value + rel.addend
            if copies.data[offset:offset + TRACE_EVAL_MAP_SIZE] != source.data[start:start + TRACE_EVAL_MAP_SIZE]:
                _fail("eval map copy differs from the original object")
            for inner in self.orig.relocations_for(source):
                if start <= inner.offset < start + TRACE_EVAL_MAP_SIZE:
                    self._expect(C, copies_index, offset + inner.offset - start, inner.type,
                                 self._orig_target(inner.symbol, inner.addend), "eval map copy")
                    self.synthesized += 1
            self.relocs_checked += 1

    # --------------------------------------------------- modinfo, versions
    def _check_modinfo_and_versions(self, modinfo: list[tuple[str, str]]) -> None:
        core_info = self._section(self.out[C], ".modinfo").data
        if core_info != self._section(self.orig, ".modinfo").data:
            _fail("C's .modinfo changed")
        if self._section(self.out[C], "__versions").data != self._section(self.orig, "__versions").data:
            _fail("C's __versions changed")
        init_info = parse_modinfo(self._section(self.out[I], ".modinfo").data)
        if first(init_info, "name") != self.init_name:
            _fail("I's .modinfo has the wrong name")
        if (NAMESPACE not in [v for k, v in init_info if k == "import_ns"]):
            _fail(f"I does not import {NAMESPACE}")
        for key in ("vermagic", "license"):
            if first(init_info, key) != first(modinfo, key):
                _fail(f"I's .modinfo changed {key}")
        versions = dict((n, c) for c, n in self._versions(self.out[I]))
        for crc, name in self._versions(self.orig):
            if versions.get(name) != crc:
                _fail(f"I's __versions lost {name}")
        for anchor in self.anchors:
            if versions.get(anchor) != anchor_crc(anchor):
                _fail(f"I's __versions lacks anchor {anchor}")
        # Every symbol I imports must carry a version, or 6.1.192 refuses it.
        init = self.out[I]
        for sym in init.symbols[1:]:
            if sym.shndx == SHN_UNDEF and sym.name and sym.name not in versions:
                _fail(f"I imports {sym.name} without a symbol version")

    # -------------------------------------------------------------- headers
    def _expect_header(self, side: str, name: str, flags: int, addralign: int | None = None,
                       type_: int = SHT_PROGBITS) -> None:
        section = self.out[side].section(name)
        if section is None:
            return
        if section.flags != flags or section.type != type_ or \
                (addralign is not None and section.addralign != addralign):
            _fail(f"{side}: header of {name} is not what the loader needs "
                  f"(flags {section.flags:#x}, type {section.type}, align {section.addralign})")

    def _check_headers(self) -> None:
        """Headers of every section that is not a byte-for-byte move of an original one."""
        orig = self.orig
        for name in (".modinfo", "__versions", THIS_MODULE):
            src = self._section(orig, name)
            for side in (C, I):
                self._expect_header(side, name, src.flags, src.addralign, src.type)
        for table in self.kernel.records:
            for name in filter(None, (table.section, table.parallel)):
                src = orig.section(name)
                for side in (C, I):
                    if src is not None:
                        self._expect_header(side, name, src.flags, src.addralign, src.type)
                    else:
                        # Only I may have a table the original lacks (for our own code).
                        self._expect_header(side, name, SHF_ALLOC)
        for table, crcs in EXPORT_TABLES:
            source = orig.section(table)
            export_flags = source.flags if source is not None else SHF_ALLOC
            for name in (table, crcs, HIDDEN[table], HIDDEN[crcs]):
                self._expect_header(C, name, export_flags, 4)
        if orig.section(KSYMTAB_STRINGS) is None:
            self._expect_header(C, KSYMTAB_STRINGS, SHF_ALLOC | SHF_MERGE | SHF_STRINGS)
        self._expect_header(C, EVAL_MAP_COPIES, SHF_ALLOC | SHF_WRITE, 8)
        self._expect_header(I, WRAPPER_SECTION, SHF_ALLOC | SHF_EXECINSTR, 16)
        self._expect_header(I, STUB_SECTION, SHF_ALLOC | SHF_EXECINSTR, 16)

    # ------------------------------------------------------------- closing
    def _check_all_accounted(self) -> None:
        for (side, index), places in self.pending.items():
            if places:
                name = self.out[side].sections[index].name
                offset = min(places)
                _fail(f"{side}:{name}+{offset:#x} has a relocation the original does not account for")
        known = {C: {EVAL_MAP_COPIES, KSYMTAB_STRINGS, THIS_MODULE, ".modinfo", "__versions",
                     *HIDDEN, *HIDDEN.values()},
                 I: {WRAPPER_SECTION, STUB_SECTION, THIS_MODULE, ".modinfo", "__versions"}}
        homes = {(side, index) for side, index in self.home.values()}
        for side, obj in self.out.items():
            for section in obj.sections:
                if not section.flags & SHF_ALLOC:
                    continue
                if (side, section.index) in homes or section.name in known[side]:
                    continue
                if section.name in self.kernel.by_section or section.name in self.kernel.parallel:
                    continue
                _fail(f"{side} has an allocated section {section.name} of unknown origin")
