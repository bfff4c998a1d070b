"""The module layout of Linux 6.1 on x86-64 (Debian 12's 6.1.0 kernels).

kernel/module/main.c layout_sections() places every allocated section in one of
two allocations, the core layout and the init layout, group by group (text,
rodata, ro_after_init, data), each group page-aligned under
CONFIG_STRICT_MODULE_RWX; kernel/module/kallsyms.c layout_symtab() then appends
the symbol tables. On 6.1 each layout is one module_alloc() allocation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Sequence

from ..elf import ElfObject, read_elf
from ..elf.constants import SHF_ALLOC, SHF_EXECINSTR, SHF_WRITE, SHN_UNDEF
from ..split.modinfo import first, parse_modinfo
from .records import CORE_GROUPS, INIT_GROUPS, Layout, ModuleLayout
from .rules import LayoutRules

# include/uapi/linux/elf.h: the flag layout_and_allocate() sets on the sections
# that become read-only after init.
SHF_RO_AFTER_INIT = 0x00200000
# kernel/module/internal.h: the high bit of sh_entsize marks an init-layout section.
INIT_OFFSET_MASK = 1 << 63
_NOT_PLACED = (1 << 64) - 1  # layout_sections() starts with sh_entsize = ~0UL

# layout_sections(): the masks walked in order, {required flags, forbidden flags};
# ARCH_SHF_SMALL is 0 on x86.
_MASKS = (
    (SHF_EXECINSTR | SHF_ALLOC, 0),
    (SHF_ALLOC, SHF_WRITE),
    (SHF_RO_AFTER_INIT | SHF_ALLOC, 0),
    (SHF_WRITE | SHF_ALLOC, 0),
    (SHF_ALLOC, 0),
)

ELF64_SYM = struct.Struct("<IBBHQQ")
# include/linux/module.h: struct mod_kallsyms { Elf_Sym *symtab; unsigned int
# num_symtab; char *strtab; char *typetab; } on x86-64.
MOD_KALLSYMS_SIZE = 32
MOD_KALLSYMS_ALIGN = 8


def _align(value: int, align: int) -> int:
    align = align or 1
    return (value + align - 1) // align * align


@dataclass(frozen=True, slots=True)
class LoaderFlags:
    """The section flags as load_module() hands them to layout_sections(): the same
    in 6.1 and 6.12 (linux612.py uses this too)."""

    flags: list[int]
    """sh_flags per section, after rewrite_section_headers() and layout_and_allocate()."""
    pcpu_index: int
    """The .data..percpu section (0: none); allocated per cpu, outside the layouts."""
    livepatch: bool
    """modinfo livepatch=Y: layout_symtab() keeps every symbol in core."""
    is_init: Callable[[int], bool]
    """module_init_layout_section() of a section index."""


def loader_flags(obj: ElfObject, rules: LayoutRules, *, init_resident: bool = False) -> LoaderFlags:
    """What kernel/module/main.c does to the section headers before layout_sections().

    With init_resident, no section is an init section (the kernel that never
    frees init).
    """
    sections = obj.sections
    shnum = len(sections)
    flags = [s.flags for s in sections]
    names = [s.name for s in sections]

    def find_sec(name: str) -> int:
        # kernel/module/main.c find_sec(): the first *allocated* section of that name.
        for i in range(1, shnum):
            if flags[i] & SHF_ALLOC and names[i] == name:
                return i
        return 0

    modinfo_index = find_sec(".modinfo")
    livepatch = False
    if modinfo_index:
        livepatch = first(parse_modinfo(sections[modinfo_index].data), "livepatch") is not None
    versions_index = find_sec("__versions")
    pcpu_index = find_sec(".data..percpu")
    # rewrite_section_headers(): track but do not keep .modinfo and __versions.
    flags[versions_index] &= ~SHF_ALLOC
    flags[modinfo_index] &= ~SHF_ALLOC
    # layout_and_allocate(): per-cpu data gets its own allocation...
    flags[pcpu_index] &= ~SHF_ALLOC
    # ...and .data..ro_after_init and __jump_table become read-only after init.
    for name in (".data..ro_after_init", "__jump_table"):
        index = find_sec(name)
        if index:
            flags[index] |= SHF_RO_AFTER_INIT

    def is_init(i: int) -> bool:
        # module_init_layout_section(): module_init_section() is strstarts(".init")
        # (no x86 override); .exit* join it only without CONFIG_MODULE_UNLOAD.
        if init_resident:
            return False
        name = names[i]
        return name.startswith(".init") or (not rules.module_unload and name.startswith(".exit"))

    return LoaderFlags(flags, pcpu_index, livepatch, is_init)


def module_layout(obj: ElfObject, rules: LayoutRules = LayoutRules(), *,
                  init_resident: bool = False) -> ModuleLayout:
    """Mirror load_module()'s layout of *obj*: layout_sections() then layout_symtab().

    With init_resident, the .init* sections are laid out as core sections (the
    kernel that never frees init), their symbols then being core symbols too.
    """
    sections = obj.sections
    shnum = len(sections)
    loader = loader_flags(obj, rules, init_resident=init_resident)
    flags, pcpu_index, livepatch, is_init = (loader.flags, loader.pcpu_index, loader.livepatch,
                                             loader.is_init)

    def strict_align(size: int) -> int:
        return _align(size, rules.page_size) if rules.strict_module_rwx else size

    entsize = [_NOT_PLACED] * shnum
    core_size = init_size = 0
    core_bytes = init_bytes = 0
    core_marks: list[int] = []
    init_marks: list[int] = []

    # layout_sections(), core pass.
    for m, (required, forbidden) in enumerate(_MASKS):
        for i in range(shnum):
            f = flags[i]
            if (f & required) != required or f & forbidden or entsize[i] != _NOT_PLACED or is_init(i):
                continue
            offset = _align(core_size, sections[i].addralign)  # module_get_offset()
            core_size = offset + sections[i].size
            entsize[i] = offset
            core_bytes += sections[i].size
        if m in (0, 1, 2, 4):
            core_size = strict_align(core_size)
        if m != 3:
            core_marks.append(core_size)

    # layout_sections(), init pass.
    for m, (required, forbidden) in enumerate(_MASKS):
        for i in range(shnum):
            f = flags[i]
            if (f & required) != required or f & forbidden or entsize[i] != _NOT_PLACED or not is_init(i):
                continue
            offset = _align(init_size, sections[i].addralign)
            init_size = offset + sections[i].size
            entsize[i] = offset | INIT_OFFSET_MASK
            init_bytes += sections[i].size
        if m in (0, 1, 4):  # case 2 only copies ro_size: nothing is ro_after_init in init
            init_size = strict_align(init_size)
            init_marks.append(init_size)

    # The 2002 rule: one allocation, the sections back to back with their own
    # alignment only (before layout_symtab() marks the symbol tables allocated).
    flat_core = flat_all = 0
    for i in range(1, shnum):
        if not flags[i] & SHF_ALLOC:
            continue
        flat_all = _align(flat_all, sections[i].addralign) + sections[i].size
        if not (entsize[i] & INIT_OFFSET_MASK):
            flat_core = _align(flat_core, sections[i].addralign) + sections[i].size
    if rules.kallsyms:
        core_size, init_size = _layout_symtab(obj, rules, flags, entsize, pcpu_index, livepatch,
                                              core_size, init_size, strict_align)

    core = _groups(CORE_GROUPS, [*core_marks, core_size], rules.page_size)
    init = _groups(INIT_GROUPS, [*init_marks, init_size], rules.page_size)
    core_offsets = {i: entsize[i] for i in range(1, shnum)
                    if entsize[i] != _NOT_PLACED and not entsize[i] & INIT_OFFSET_MASK
                    and i != obj.symtab_index}
    return ModuleLayout(core, init, core_bytes, init_bytes, flat_core, flat_all, core_offsets)


def _groups(names: Sequence[str], marks: Sequence[int], page_size: int) -> Layout:
    spans, previous = [], 0
    for name, mark in zip(names, marks):
        spans.append((name, mark - previous))
        previous = mark
    return Layout(tuple(spans), page_size)


def _layout_symtab(obj: ElfObject, rules: LayoutRules, flags: list[int], entsize: list[int],
                   pcpu_index: int, livepatch: bool, core_size: int, init_size: int,
                   strict_align: Callable[[int], int]) -> tuple[int, int]:
    """kernel/module/kallsyms.c layout_symtab() (6.1)."""
    symsect = obj.sections[obj.symtab_index]
    strsect = obj.sections[symsect.link]

    # The full symbol table goes at the end of the init layout...
    flags[obj.symtab_index] |= SHF_ALLOC
    offset = _align(init_size, symsect.addralign)
    entsize[obj.symtab_index] = offset | INIT_OFFSET_MASK
    init_size = offset + symsect.size

    # ...and the core symbols, with their names, at the end of the core layout.
    nsrc = symsect.size // ELF64_SYM.size
    symoffs = _align(core_size, symsect.addralign)
    core_size = symoffs + core_symtab_bytes(obj, rules, flags, entsize, pcpu_index, livepatch,
                                            in_init=lambda e: bool(e & INIT_OFFSET_MASK))
    core_size = strict_align(core_size)

    # The string table, struct mod_kallsyms and the type bytes close the init layout.
    flags[symsect.link] |= SHF_ALLOC
    offset = _align(init_size, strsect.addralign)
    entsize[symsect.link] = offset | INIT_OFFSET_MASK
    init_size = offset + strsect.size
    init_size = _align(init_size, MOD_KALLSYMS_ALIGN) + MOD_KALLSYMS_SIZE + nsrc
    init_size = strict_align(init_size)
    return core_size, init_size


def core_symtab_bytes(obj: ElfObject, rules: LayoutRules, flags: list[int], entsize: list[int],
                      pcpu_index: int, livepatch: bool, *, in_init: Callable[[int], bool]) -> int:
    """What kernel/module/kallsyms.c layout_symtab() adds for the core symbols: an
    Elf_Sym, the name and a type byte for each (the null symbol included), counted
    the same way in 6.1 and 6.12. *in_init* says whether a section's sh_entsize
    places it in init memory: the one thing is_core_symbol() asks differently
    (6.1 tests INIT_OFFSET_MASK, 6.12 mod_mem_type_is_init() of the type bits).
    """
    symsect = obj.sections[obj.symtab_index]
    strtab = obj.sections[symsect.link].data
    shnum = len(obj.sections)
    nsrc = symsect.size // ELF64_SYM.size
    ndst = strtab_size = 0
    for i, (st_name, _info, _other, st_shndx, _value, _size) in enumerate(
            ELF64_SYM.iter_unpack(symsect.data[:nsrc * ELF64_SYM.size])):
        if i == 0 or livepatch or _is_core_symbol(st_name, st_shndx, flags, entsize, shnum,
                                                    pcpu_index, rules.kallsyms_all, in_init):
            end = strtab.find(b"\0", st_name)
            strtab_size += (end if end >= 0 else len(strtab)) - st_name + 1
            ndst += 1
    return ndst * ELF64_SYM.size + strtab_size + ndst


def _is_core_symbol(st_name: int, st_shndx: int, flags: list[int], entsize: list[int], shnum: int,
                    pcpu_index: int, kallsyms_all: bool, in_init: Callable[[int], bool]) -> bool:
    """kernel/module/kallsyms.c is_core_symbol()."""
    if st_shndx == SHN_UNDEF or st_shndx >= shnum or not st_name:
        return False
    if kallsyms_all and st_shndx == pcpu_index:
        return True
    f = flags[st_shndx]
    if not f & SHF_ALLOC or (not kallsyms_all and not f & SHF_EXECINSTR):
        return False
    return not in_init(entsize[st_shndx])


def layout_of(data: bytes, rules: LayoutRules = LayoutRules(), *,
              init_resident: bool = False) -> ModuleLayout:
    """module_layout() of the module in *data* (raises MalformedElf)."""
    return module_layout(read_elf(data), rules, init_resident=init_resident)
