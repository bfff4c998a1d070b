"""Per-record tables of the Debian x86-64 kernels that describe module code.

Each declaration gives the record size and the offset, inside one record, of the
field whose relocation names the code (or data) the record describes: the
"key". The splitter moves a record into the init module exactly when its key
points into an init section, and keeps it in the core module otherwise. Layouts
were read from the linux-source-6.1 tree (6.1.192); the file is named per table.

Linux 6.12 (Debian 13) side by side: RECORD_TABLES_612, ORC_TYPE_CALL_612 and
KNOWN_STRUCT_MODULE_MEMORY_LAYOUTS, checked against Debian 13's kernel and its
modules (tests/test_tables612.py).

KERNEL_TABLES gathers each known build's tables in one KernelTables record, keyed
by the module_layout CRC in the module's __versions; the splitter and the
validator look them up there (kernel_tables()) and nowhere else. 6.12 gives each
struct module_memory type an allocation of its own (layout/linux612.py), so the
splitter anchors each memory of C that I reaches (splitter.py), the validator
checks I's offsets per memory and the loader C's placement per memory
(SplitModule.reached_from).

6.12's other sections need no table: .orc_header (the 20-byte ORC_HASH of
orc_types.h that arch/x86/include/asm/orc_header.h's ORC_HEADER emits for tools,
no relocations; kernel/module/ does not read it) moves to C whole like any
allocated section. I's synthesized code gets no
.call_sites record (its one call is not redirected by call depth tracking, which
only costs that accounting under retbleed=stuff), no __patchable_function_entries
record (it has no padding) and no .ibt_endbr_seal record (->init is called
indirectly: its endbr64 must stay).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RecordTable:
    section: str
    record_size: int
    key_offset: int
    source: str
    # A section with one record per record of this one, no relocations, same order.
    parallel: str | None = None
    parallel_record_size: int = 0


# Ordered for readability; lookups go through KernelTables.by_section.
RECORD_TABLES: tuple[RecordTable, ...] = (
    # int ip offsets, PC32 to the instruction; parallel struct orc_entry (6 bytes, __packed).
    RecordTable(".orc_unwind_ip", 4, 0, "arch/x86/include/asm/orc_types.h, arch/x86/kernel/unwind_orc.c",
                parallel=".orc_unwind", parallel_record_size=6),
    # unsigned long addresses of the __fentry__ call sites, R_X86_64_64.
    RecordTable("__mcount_loc", 8, 0, "kernel/trace/ftrace.c (ftrace_process_locs)"),
    # s32 PC32 offsets to return thunk jumps, retpoline calls, LOCK prefixes, ENDBR.
    RecordTable(".return_sites", 4, 0, "arch/x86/kernel/alternative.c (apply_returns)"),
    RecordTable(".retpoline_sites", 4, 0, "arch/x86/kernel/alternative.c (apply_retpolines)"),
    RecordTable(".smp_locks", 4, 0, "arch/x86/kernel/alternative.c (alternatives_smp_lock)"),
    RecordTable(".ibt_endbr_seal", 4, 0, "arch/x86/kernel/alternative.c (apply_ibt_endbr)"),
    # struct jump_entry { s32 code; s32 target; long key; }
    RecordTable("__jump_table", 16, 0, "include/linux/jump_label.h"),
    # struct bug_entry { s32 bug_addr_disp; s32 file_disp; u16 line; u16 flags; }
    # (CONFIG_GENERIC_BUG_RELATIVE_POINTERS, CONFIG_DEBUG_BUGVERBOSE)
    RecordTable("__bug_table", 12, 0, "include/asm-generic/bug.h"),
    # struct static_call_site { s32 addr; s32 key; }
    RecordTable(".static_call_sites", 8, 0, "include/linux/static_call_types.h"),
    # struct exception_table_entry { int insn, fixup, data; }
    RecordTable("__ex_table", 12, 0, "arch/x86/include/asm/extable.h"),
    # struct alt_instr { s32 instr_offset; s32 repl_offset; u16 cpuid; u8 instrlen; u8 replacementlen; } __packed
    RecordTable(".altinstructions", 12, 0, "arch/x86/include/asm/alternative.h"),
    # struct paravirt_patch_site { u8 *instr; u8 type; u8 len; } (padded to 16)
    RecordTable(".parainstructions", 16, 0, "arch/x86/include/asm/paravirt_types.h"),
)

# Linux 6.12: the tables of 6.1 with these differences (linux-source-6.12, 6.12.117).
RECORD_TABLES_612: tuple[RecordTable, ...] = tuple(
    t for t in RECORD_TABLES if t.section not in (".altinstructions", ".parainstructions")
) + (
    # struct alt_instr { s32 instr_offset; s32 repl_offset; union { struct { u32 cpuid: 16;
    # u32 flags: 16; }; u32 ft_flags; }; u8 instrlen; u8 replacementlen; } __packed
    RecordTable(".altinstructions", 14, 0, "arch/x86/include/asm/alternative.h"),
    # s32 PC32 offsets to the call sites that call depth tracking may redirect
    # (CONFIG_CALL_THUNKS); module_finalize() hands them to callthunks_patch_module_calls().
    RecordTable(".call_sites", 4, 0, "arch/x86/kernel/callthunks.c (callthunks_patch_module_calls)"),
    # unsigned long addresses of each function's padding (-fpatchable-function-entry,
    # CONFIG_CALL_PADDING), R_X86_64_64; allocated by scripts/module.lds.S, read by no
    # x86 code, but a record of init code must leave with it.
    RecordTable("__patchable_function_entries", 8, 0, "scripts/module.lds.S"),
    # .parainstructions is gone: 6.12 patches paravirt call sites as alternatives.
)


# struct kernel_symbol { int value_offset; int name_offset; int namespace_offset; }
# (CONFIG_HAVE_ARCH_PREL32_RELOCATIONS), include/linux/export.h; the CRC table
# beside it holds one s32 per symbol (kernel/module/version.c, check_version).
KSYMTAB_RECORD_SIZE = 12
KCRCTAB_RECORD_SIZE = 4

# struct modversion_info { unsigned long crc; char name[MODULE_NAME_LEN]; },
# include/linux/module.h; MODULE_NAME_LEN is 64 - sizeof(unsigned long).
MODULE_NAME_LEN = 56
MODVERSION_RECORD_SIZE = 8 + MODULE_NAME_LEN

# struct trace_eval_map { const char *system; const char *eval_string; unsigned long eval_value; },
# include/linux/tracepoint.h; _ftrace_eval_map holds pointers to them.
TRACE_EVAL_MAP_SIZE = 24

# struct orc_entry values for synthesized code (arch/x86/include/asm/orc_types.h).
ORC_REG_UNDEFINED = 0
ORC_REG_SP = 5
ORC_TYPE_CALL = 0
# Since v6.4 (fb799447ae29, "x86,objtool: Split UNWIND_HINT_EMPTY in two") the type
# field has 3 bits: ORC_TYPE_UNDEFINED 0 (the unwinder stops with an error),
# ORC_TYPE_END_OF_STACK 1, ORC_TYPE_CALL 2, ORC_TYPE_REGS 3, ORC_TYPE_REGS_PARTIAL 4.
ORC_TYPE_UNDEFINED_612 = 0
ORC_TYPE_CALL_612 = 2
# The entry objtool puts past the end of a section's code (tools/objtool/orc_gen.c,
# orc_create()'s "null" entry): sp_reg ORC_REG_UNDEFINED and type 0 on both kernels,
# 6.1's UNWIND_HINT_TYPE_CALL and 6.12's ORC_TYPE_UNDEFINED (measured: every entry
# with sp_reg 0 in Debian's dummy and loop is all zero, on 6.1 and 6.12).
ORC_TYPE_TERMINATOR = 0
_ORC_ENTRY = struct.Struct("<hhH")  # s16 sp_offset, s16 bp_offset, u16 bitfields


def pack_orc_entry(sp_offset: int, sp_reg: int, orc_type: int, *, bp_offset: int = 0,
                   bp_reg: int = ORC_REG_UNDEFINED) -> bytes:
    """struct orc_entry, packed and little-endian: s16 sp_offset, s16 bp_offset, then
    the bitfields sp_reg:4 bp_reg:4 type:2 end:1 (6.1) or type:3 signal:1 (6.12);
    *orc_type* is the kernel's (KernelTables), and the types written fit both."""
    bits = (sp_reg & 0xF) | ((bp_reg & 0xF) << 4) | ((orc_type & 7) << 8)
    return _ORC_ENTRY.pack(sp_offset, bp_offset, bits)


@dataclass(frozen=True, slots=True)
class StructModuleFields:
    """The offsets in struct module that every supported kernel has (the fields of
    StructModuleLayout below, its core_layout aside)."""

    kernel: str
    size: int
    init: int
    exit: int
    syms: int
    crcs: int
    num_syms: int
    num_gpl_syms: int
    gpl_syms: int
    gpl_crcs: int


@dataclass(frozen=True, slots=True)
class StructModuleLayout(StructModuleFields):
    """Offsets in struct module (include/linux/module.h) for one kernel build.

    The export fields, in the order include/linux/module.h of 6.1 declares them:

        const struct kernel_symbol *syms;     /* "Exported symbols" */
        const s32 *crcs;
        unsigned int num_syms;
        ...
        unsigned int num_gpl_syms;            /* "GPL-only exported symbols." */
        const struct kernel_symbol *gpl_syms;
        const s32 *gpl_crcs;

    find_module_sections() in kernel/module/main.c fills them from the sections
    __ksymtab, __kcrctab, __ksymtab_gpl and __kcrctab_gpl; find_symbol() searches
    syms[0..num_syms) and gpl_syms[0..num_gpl_syms). The init wrapper publishes
    C's exports by storing the full counts into num_syms and num_gpl_syms.

    core_layout is C's struct module_layout (below); the wrapper compares it with
    the layout model before it runs anything (see splitter.py, one anchor).
    """

    core_layout: int


@dataclass(frozen=True, slots=True)
class StructModuleMemoryLayout(StructModuleFields):
    """Offsets in struct module for a kernel with struct module_memory (v6.4's
    ac3b43283923, "module: replace module_layout with module_memory"; Debian 13's
    6.12). core_layout and init_layout are gone; in their place

        struct module_memory mem[MOD_MEM_NUM_TYPES] __module_memory_align;

    indexed by enum mod_mem_type (MOD_TEXT, MOD_DATA, MOD_RODATA, MOD_RO_AFTER_INIT,
    MOD_INIT_TEXT, MOD_INIT_DATA, MOD_INIT_RODATA: layout/linux612.py), each its own
    allocation (kernel/module/main.c module_memory_alloc()). The export fields are
    where 6.1 has them; ->exit sits behind mem[]. struct module changes within
    6.12.y stable (the indirect-target-selection fix added its_num_pages and
    its_page_array behind ->exit), so a build is known by its module_layout CRC,
    never by its version prefix.
    """

    mem: int


@dataclass(frozen=True, slots=True)
class ModuleMemoryFields:
    """struct module_memory (include/linux/module.h, 6.12):

        struct module_memory {
                void *base;
                unsigned int size;
        #ifdef CONFIG_MODULES_TREE_LOOKUP
                struct mod_tree_node mtn;
        #endif
        };

    module_memory_alloc() sets base; __layout_sections() and layout_symtab() set
    size (page-rounded per type under STRICT_MODULE_RWX).
    """

    base: int = 0
    size: int = 8
    record_size: int = 72  # with CONFIG_MODULES_TREE_LOOKUP's mtn (Debian's)


MODULE_MEMORY_FIELDS = ModuleMemoryFields()


# Keyed by the CRC of "module_layout" in __versions, which genksyms derives from
# struct module among others, so it changes whenever these offsets could. ->init
# and ->exit are cross-checked against every module's own relocations of them;
# the export fields have no relocation in a module and come from the kernel's
# BTF (tests/test_struct_module_layout.py reads them from the test kernel's
# vmlinux .BTF and compares).
KNOWN_STRUCT_MODULE_LAYOUTS: dict[int, StructModuleLayout] = {
    0x9060323F: StructModuleLayout("Debian 6.1.0-56/57-amd64 (6.1.192)", size=896, init=312, exit=848,
                                   syms=208, crcs=216, num_syms=224, num_gpl_syms=276,
                                   gpl_syms=280, gpl_crcs=288, core_layout=320),
}

# The same, for kernels with struct module_memory (tests/test_tables612.py reads them
# from Debian 13's vmlinux .BTF).
KNOWN_STRUCT_MODULE_MEMORY_LAYOUTS: dict[int, StructModuleMemoryLayout] = {
    0x2F9B2B9A: StructModuleMemoryLayout("Debian 6.12.117+deb13-amd64", size=1280, init=312, exit=1200,
                                         syms=208, crcs=216, num_syms=224, num_gpl_syms=276,
                                         gpl_syms=280, gpl_crcs=288, mem=320),
}


@dataclass(frozen=True, slots=True)
class ModuleLayoutFields:
    """Offsets in struct module_layout (include/linux/module.h, 6.1):

        struct module_layout {
                void *base;                     /* The actual code + data. */
                unsigned int size;              /* Total size. */
                unsigned int text_size;         /* The size of the executable code. */
                unsigned int ro_size;           /* Size of RO section (text+rodata) */
                unsigned int ro_after_init_size;/* Size of RO after init section */
                struct mod_tree_node mtn;       /* CONFIG_MODULES_TREE_LOOKUP */
        };

    layout_sections() (kernel/module/main.c) sets text_size, ro_size and
    ro_after_init_size to the end of their groups and size to the whole, and
    layout_symtab() (kernel/module/kallsyms.c) adds the core symbol tables to size.
    """

    size: int = 8
    text_size: int = 12
    ro_size: int = 16
    ro_after_init_size: int = 20


MODULE_LAYOUT_FIELDS = ModuleLayoutFields()

# include/linux/err.h: the kernel's error returns are -MAX_ERRNO..-1; the x86-64
# syscall() of glibc treats exactly those as errors (errno = -value, result -1).
MAX_ERRNO = 4095


@dataclass(frozen=True, slots=True)
class KernelTables:
    """Everything per kernel build that the splitter and the validator read, in one
    record: the per-record tables, struct module's offsets and the ORC type of
    synthesized code. Found by the module's module_layout CRC (kernel_tables()), so
    the version differences live here and nowhere else."""

    kernel: str
    records: tuple[RecordTable, ...]
    struct_module: StructModuleLayout | StructModuleMemoryLayout
    orc_type_call: int
    by_section: dict[str, RecordTable]
    parallel: dict[str, RecordTable]  # a parallel section's name -> its index table

    @property
    def has_module_memory(self) -> bool:
        """6.4 and later: one allocation per struct module_memory type."""
        return isinstance(self.struct_module, StructModuleMemoryLayout)


def _kernel_tables(records: tuple[RecordTable, ...],
                   struct_module: StructModuleLayout | StructModuleMemoryLayout,
                   orc_type_call: int) -> KernelTables:
    return KernelTables(struct_module.kernel, records, struct_module, orc_type_call,
                        by_section={t.section: t for t in records},
                        parallel={t.parallel: t for t in records if t.parallel})


KERNEL_TABLES: dict[int, KernelTables] = {
    **{crc: _kernel_tables(RECORD_TABLES, layout, ORC_TYPE_CALL)
       for crc, layout in KNOWN_STRUCT_MODULE_LAYOUTS.items()},
    **{crc: _kernel_tables(RECORD_TABLES_612, layout, ORC_TYPE_CALL_612)
       for crc, layout in KNOWN_STRUCT_MODULE_MEMORY_LAYOUTS.items()},
}


def kernel_tables(module_layout_crc: int | None) -> KernelTables | None:
    """The tables of the kernel build a module's module_layout CRC names, or None."""
    return KERNEL_TABLES.get(module_layout_crc) if module_layout_crc is not None else None


_MODVERSION_RECORD = struct.Struct(f"<Q{MODULE_NAME_LEN}s")


def module_layout_crc(versions: bytes) -> int | None:
    """The CRC a module's __versions section (its bytes, *versions*) records for
    module_layout, the key of KERNEL_TABLES; None without one or for a section that
    is not whole struct modversion_info records (kernel/module/version.c
    check_modstruct_version() looks the same name up)."""
    if len(versions) % MODVERSION_RECORD_SIZE:
        return None
    for crc, raw in _MODVERSION_RECORD.iter_unpack(versions):
        if raw.split(b"\0", 1)[0] == b"module_layout":
            return crc
    return None
