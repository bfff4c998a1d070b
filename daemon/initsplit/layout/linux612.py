"""The module layout of Linux 6.12 on x86-64 (Debian 13's 6.12 kernels).

Since v6.4 (ac3b43283923, "module: replace module_layout with module_memory")
a module is no longer two allocations, core and init, each cut into groups: it
is struct module's mem[MOD_MEM_NUM_TYPES] (include/linux/module.h, enum
mod_mem_type), seven memories, each its own execmem_alloc() of PAGE_ALIGN(size)
(kernel/module/main.c module_memory_alloc(), called by move_module() for every
type whose size is not 0)::

    core, kept for the module's life            init, freed by do_init_module()
    MOD_TEXT           code (SHF_EXECINSTR)     MOD_INIT_TEXT    .init* code
    MOD_DATA           data, bss | kallsyms     MOD_INIT_DATA    .init* data | .symtab
    MOD_RODATA         read-only data                            | .strtab | mod_kallsyms
    MOD_RO_AFTER_INIT  .data..ro_after_init,                     | one type byte a symbol
                       __jump_table             MOD_INIT_RODATA  .init* read-only data

__layout_sections() walks the same five masks as 6.1's layout_sections(), but
each mask now appends to one mem[] type (core_m_to_mem_type[], init_m_to_mem_type[]:
the fifth mask, the leftover SHF_ALLOC sections, joins MOD_DATA, the third has
no init type), and module_get_offset_and_type() writes the type into the top
four bits of sh_entsize (SH_ENTSIZE_TYPE_SHIFT, kernel/module/internal.h) and
the offset within that type's memory below them. kernel/module/kallsyms.c
layout_symtab() appends the core symbols, their names and type bytes to MOD_DATA
and the full .symtab, .strtab, struct mod_kallsyms and the init type bytes to
MOD_INIT_DATA. What else differs from 6.1:

* nothing is page-aligned inside a memory: 6.1 rounded each group up under
  CONFIG_STRICT_MODULE_RWX within one allocation, 6.12 rounds each memory's size
  up in module_memory_alloc(), unconditionally (strict RWX only decides whether
  strict_rwx.c changes the pages' permissions). So the core kallsyms share
  MOD_DATA's last data page instead of starting a page of their own, and the
  init symbol tables share MOD_INIT_DATA's: dummy is 3 pages on 6.12, 4 on 6.1;
* /sys/module/NAME/coresize (main.c show_coresize()) is mem[MOD_TEXT].size plus
  every core_data type (MOD_DATA, MOD_RODATA, MOD_RO_AFTER_INIT; x86 has no
  CONFIG_ARCH_WANTS_MODULES_DATA_IN_VMALLOC), initsize (show_initsize()) the
  three init types; /proc/modules (procfs.c module_total_size()) prints the sum
  of all seven, the same as coresize once do_init_module() has set the init
  types' sizes to 0;
* a section's sh_entsize offset is within its own memory: offsets of sections
  of two types are not comparable (see core_placement());
* is_core_symbol() asks mod_mem_type_is_init() of the section's type, where 6.1
  tested INIT_OFFSET_MASK (see _layout_symtab() below).

Unchanged from 6.1: the flags layout_and_allocate() and rewrite_section_headers()
change (.modinfo, __versions and .data..percpu not allocated here;
.data..ro_after_init and __jump_table marked SHF_RO_AFTER_INIT), the masks and
their order, module_init_layout_section(), and what layout_symtab() counts.

The result in records.py's terms. The core Layout's groups are the core memories,
each page-rounded as allocated, so core.size is coresize byte for byte:
"text" MOD_TEXT, "rodata" MOD_RODATA, "ro_after_init" MOD_RO_AFTER_INIT, and
MOD_DATA split in two page multiples: "data" the pages its sections take alone,
"kallsyms" the pages the core symbol tables add to them (0 when they fit in the
last data page). A group per kernel memory would leave "kallsyms" 0 always; this
split keeps what dropping symbols gives back (whole pages) in "kallsyms" and
every group a page multiple, without changing the sum. The init Layout likewise:
"text" MOD_INIT_TEXT, "rodata" MOD_INIT_RODATA, "data" the pages MOD_INIT_DATA's
sections take, "kallsyms" what the symbol tables add. ModuleLayout.core_offsets
holds each core section's offset *within its own memory* (the sh_entsize offset),
which is only comparable between sections of the same type; core_placement()
gives the type too. ModuleLayout.core_marks() (6.1's core_layout marks) is then
the running sum of the groups, not an address in one allocation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..elf import ElfObject, read_elf
from ..elf.constants import SHF_ALLOC
from .linux61 import (ELF64_SYM, MOD_KALLSYMS_ALIGN, MOD_KALLSYMS_SIZE, _MASKS, _NOT_PLACED, _align,
                      core_symtab_bytes, loader_flags)
from .records import CORE_GROUPS, INIT_GROUPS, Layout, ModuleLayout
from .rules import LayoutRules

# include/linux/module.h enum mod_mem_type.
MOD_TEXT, MOD_DATA, MOD_RODATA, MOD_RO_AFTER_INIT, MOD_INIT_TEXT, MOD_INIT_DATA, MOD_INIT_RODATA = range(7)
MOD_MEM_NUM_TYPES = 7
MOD_INVALID = -1
# The record group each core type is (core_placement()).
_CORE_TYPE_GROUP = {MOD_TEXT: "text", MOD_DATA: "data", MOD_RODATA: "rodata",
                    MOD_RO_AFTER_INIT: "ro_after_init"}

# kernel/module/internal.h: the type in the top four bits of sh_entsize.
SH_ENTSIZE_TYPE_BITS = 4
SH_ENTSIZE_TYPE_SHIFT = 64 - SH_ENTSIZE_TYPE_BITS
SH_ENTSIZE_TYPE_MASK = (1 << SH_ENTSIZE_TYPE_BITS) - 1
SH_ENTSIZE_OFFSET_MASK = (1 << SH_ENTSIZE_TYPE_SHIFT) - 1

# kernel/module/main.c __layout_sections(): the memory each of _MASKS fills.
_CORE_M_TO_MEM_TYPE = (MOD_TEXT, MOD_RODATA, MOD_RO_AFTER_INIT, MOD_DATA, MOD_DATA)
_INIT_M_TO_MEM_TYPE = (MOD_INIT_TEXT, MOD_INIT_RODATA, MOD_INVALID, MOD_INIT_DATA, MOD_INIT_DATA)


def _is_init_type(mem_type: int) -> bool:
    """include/linux/module.h mod_mem_type_is_init()."""
    return mem_type in (MOD_INIT_TEXT, MOD_INIT_DATA, MOD_INIT_RODATA)


def _entsize_type(entsize: int) -> int:
    return entsize >> SH_ENTSIZE_TYPE_SHIFT


@dataclass(frozen=True, slots=True)
class _Placed:
    """What layout_sections() and layout_symtab() leave: sh_entsize per section and
    mem[].size per type before module_memory_alloc() rounds it."""

    entsize: list[int]
    sizes: list[int]
    data_end: int  # mem[MOD_DATA].size after layout_sections(), before the kallsyms
    init_data_end: int  # mem[MOD_INIT_DATA].size likewise
    core_bytes: int
    init_bytes: int
    flat_core: int
    flat_all: int
    symtab_index: int


def _place(obj: ElfObject, rules: LayoutRules, init_resident: bool) -> _Placed:
    sections = obj.sections
    shnum = len(sections)
    # 6.12's find_sec(), rewrite_section_headers() and layout_and_allocate() do
    # what 6.1's do to the flags.
    loader = loader_flags(obj, rules, init_resident=init_resident)
    flags, pcpu_index, livepatch, is_init = (loader.flags, loader.pcpu_index, loader.livepatch,
                                             loader.is_init)

    entsize = [_NOT_PLACED] * shnum
    sizes = [0] * MOD_MEM_NUM_TYPES
    placed_bytes = [0, 0]  # core, init

    def get_offset_and_type(mem_type: int, i: int) -> int:
        # main.c module_get_offset_and_type() (arch_mod_section_prepend() is 0 on x86).
        offset = _align(sizes[mem_type], sections[i].addralign)
        sizes[mem_type] = offset + sections[i].size
        return offset | (mem_type & SH_ENTSIZE_TYPE_MASK) << SH_ENTSIZE_TYPE_SHIFT

    # main.c layout_sections(): __layout_sections(mod, info, false), then true.
    for init_pass, to_type in ((False, _CORE_M_TO_MEM_TYPE), (True, _INIT_M_TO_MEM_TYPE)):
        for m, (required, forbidden) in enumerate(_MASKS):
            mem_type = to_type[m]
            for i in range(shnum):
                f = flags[i]
                if ((f & required) != required or f & forbidden or entsize[i] != _NOT_PLACED
                        or is_init(i) != init_pass):
                    continue
                if mem_type == MOD_INVALID:  # WARN_ON_ONCE(): left unplaced
                    continue
                entsize[i] = get_offset_and_type(mem_type, i)
                placed_bytes[init_pass] += sections[i].size

    # The 2002 rule: one allocation, the sections back to back with their own
    # alignment only (before layout_symtab() marks the symbol tables allocated).
    flat_core = flat_all = 0
    for i in range(1, shnum):
        if not flags[i] & SHF_ALLOC:
            continue
        flat_all = _align(flat_all, sections[i].addralign) + sections[i].size
        if not _is_init_type(_entsize_type(entsize[i])):
            flat_core = _align(flat_core, sections[i].addralign) + sections[i].size

    data_end, init_data_end = sizes[MOD_DATA], sizes[MOD_INIT_DATA]
    if rules.kallsyms:
        _layout_symtab(obj, rules, flags, entsize, sizes, pcpu_index, livepatch, get_offset_and_type)
    return _Placed(entsize, sizes, data_end, init_data_end, placed_bytes[0], placed_bytes[1],
                   flat_core, flat_all, obj.symtab_index)


def _layout_symtab(obj: ElfObject, rules: LayoutRules, flags: list[int], entsize: list[int],
                   sizes: list[int], pcpu_index: int, livepatch: bool,
                   get_offset_and_type: Callable[[int, int], int]) -> None:
    """kernel/module/kallsyms.c layout_symtab() (6.12): what 6.1's counts, but in
    MOD_DATA and MOD_INIT_DATA, with no page rounding of its own."""
    symsect = obj.sections[obj.symtab_index]

    # The full symbol table goes at the end of MOD_INIT_DATA...
    flags[obj.symtab_index] |= SHF_ALLOC
    entsize[obj.symtab_index] = get_offset_and_type(MOD_INIT_DATA, obj.symtab_index)

    # ...and the core symbols, with their names and type bytes, at the end of MOD_DATA.
    # is_core_symbol() asks mod_mem_type_is_init() of the type in sh_entsize's top
    # bits, where 6.1 tested its INIT_OFFSET_MASK bit (bit 63, which the init types
    # 4 to 6 do not set in 6.12's encoding).
    nsrc = symsect.size // ELF64_SYM.size
    symoffs = _align(sizes[MOD_DATA], symsect.addralign)
    sizes[MOD_DATA] = symoffs + core_symtab_bytes(
        obj, rules, flags, entsize, pcpu_index, livepatch,
        in_init=lambda e: _is_init_type(_entsize_type(e)))

    # The string table, struct mod_kallsyms and the type bytes close MOD_INIT_DATA.
    flags[symsect.link] |= SHF_ALLOC
    entsize[symsect.link] = get_offset_and_type(MOD_INIT_DATA, symsect.link)
    sizes[MOD_INIT_DATA] = _align(sizes[MOD_INIT_DATA], MOD_KALLSYMS_ALIGN) + MOD_KALLSYMS_SIZE + nsrc


def _page_align(size: int, page_size: int) -> int:
    """main.c module_memory_alloc(): PAGE_ALIGN(mod->mem[type].size), stored back."""
    return _align(size, page_size)


def module_layout(obj: ElfObject, rules: LayoutRules = LayoutRules(), *,
                  init_resident: bool = False) -> ModuleLayout:
    """Mirror load_module()'s layout of *obj*: layout_sections(), layout_symtab(),
    then move_module()'s module_memory_alloc() of each mem[] type.

    With init_resident, the .init* sections are laid out as core sections (the
    kernel that never frees init), their symbols then being core symbols too.
    core_offsets are per memory type (see the module docstring, core_placement()).
    rules.strict_module_rwx is not consulted: 6.12 page-rounds every memory anyway.
    """
    return _module_layout(_place(obj, rules, init_resident), rules)


def _module_layout(placed: _Placed, rules: LayoutRules) -> ModuleLayout:
    page = rules.page_size
    sizes = [_page_align(size, page) for size in placed.sizes]
    data = _page_align(placed.data_end, page)
    init_data = _page_align(placed.init_data_end, page)
    core = Layout(tuple(zip(CORE_GROUPS, (
        sizes[MOD_TEXT], sizes[MOD_RODATA], sizes[MOD_RO_AFTER_INIT], data, sizes[MOD_DATA] - data))), page)
    init = Layout(tuple(zip(INIT_GROUPS, (
        sizes[MOD_INIT_TEXT], sizes[MOD_INIT_RODATA], init_data, sizes[MOD_INIT_DATA] - init_data))), page)
    core_offsets = {i: offset for i, (_group, offset) in _core_placement(placed).items()}
    return ModuleLayout(core, init, placed.core_bytes, placed.init_bytes, placed.flat_core,
                        placed.flat_all, core_offsets)


def _core_placement(placed: _Placed) -> dict[int, tuple[str, int]]:
    out: dict[int, tuple[str, int]] = {}
    for i, entsize in enumerate(placed.entsize):
        if i == 0 or entsize == _NOT_PLACED or i == placed.symtab_index:
            continue
        group = _CORE_TYPE_GROUP.get(_entsize_type(entsize))
        if group is not None:
            out[i] = (group, entsize & SH_ENTSIZE_OFFSET_MASK)
    return out


def layout_and_placement(obj: ElfObject, rules: LayoutRules = LayoutRules(), *,
                         init_resident: bool = False
                         ) -> tuple[ModuleLayout, dict[int, tuple[str, int]]]:
    """module_layout() and core_placement() of *obj* from one run of the layout."""
    placed = _place(obj, rules, init_resident)
    return _module_layout(placed, rules), _core_placement(placed)


# The core memories by their group names (core_placement()), in enum mod_mem_type order.
CORE_MEMORIES = {"text": MOD_TEXT, "data": MOD_DATA, "rodata": MOD_RODATA,
                 "ro_after_init": MOD_RO_AFTER_INIT}


def core_memory_sizes(layout: ModuleLayout) -> dict[int, int]:
    """mem[type].size of each core memory type as the kernel keeps it once the
    module is loaded: kernel/module/main.c module_memory_alloc() stores
    PAGE_ALIGN(mem[type].size) back into it before it allocates, and nothing
    changes a core type's size afterwards (do_init_module() zeroes the init
    types' only). MOD_DATA is the "data" and "kallsyms" groups together."""
    core = layout.core
    return {MOD_TEXT: core.group("text"), MOD_DATA: core.group("data") + core.group("kallsyms"),
            MOD_RODATA: core.group("rodata"), MOD_RO_AFTER_INIT: core.group("ro_after_init")}


def core_placement(obj: ElfObject, rules: LayoutRules = LayoutRules(), *,
                   init_resident: bool = False) -> dict[int, tuple[str, int]]:
    """Section index -> (its core memory, offset within it) for every section
    layout_sections() puts in a core memory: the type and offset that
    module_get_offset_and_type() writes into its sh_entsize. The memory is named
    as its group in ModuleLayout.core: "text" (MOD_TEXT), "rodata" (MOD_RODATA),
    "ro_after_init" (MOD_RO_AFTER_INIT) or "data" (MOD_DATA). Two sections' offsets
    compare only when their memories are the same: each memory is its own
    allocation, wherever execmem_alloc() found room.
    """
    return _core_placement(_place(obj, rules, init_resident))


def layout_of(data: bytes, rules: LayoutRules = LayoutRules(), *,
              init_resident: bool = False) -> ModuleLayout:
    """module_layout() of the module in *data* (raises MalformedElf)."""
    return module_layout(read_elf(data), rules, init_resident=init_resident)
