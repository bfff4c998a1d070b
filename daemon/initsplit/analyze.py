"""`initsplit analyze`: what the kernel allocates for each module, and what splitting saves.

For every module of a tree this computes, with the layout rules of the target
kernel, the two allocations the module loader makes (kernel/module/main.c of
Linux 6.1, layout_sections() and layout_symtab(); arch/x86/kernel/module.c,
module_alloc()):

* the **core layout**, kept for the module's life. Its size is what
  /proc/modules and /sys/module/NAME/coresize print once the module is live;
* the **init layout**, freed by the kernel after the module's init has run.

It does so for the original module, and for the core module C and init module I
the splitter makes of it, and predicts the saving of a two-stage load against two
baselines:

(a) init kept resident, the 2002 situation of A. J. Richter's LKML post: the
    module's init sections in the same allocation as the rest, for its whole life;
(b) today's kernel, which frees the init layout itself but keeps, in core
    sections, the table records that describe init code (ORC, __mcount_loc,
    return sites, bug and jump table entries...). The split moves them into I,
    so the saving is: pages of the plain core layout minus pages of C's core
    layout, group by group.

The layout model follows the kernel line by line (the functions are named where
they are mirrored); `initsplit analyze` prints which rules it applied.
"""

from __future__ import annotations

import functools
import json
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .elf import ElfObject, MalformedElf, read_elf
from .elf.constants import SHF_ALLOC, SHF_EXECINSTR, SHF_WRITE, SHN_UNDEF
from .split.modinfo import first, parse_modinfo
from .tree import MODULE_SUFFIX, ModuleJob, decide, find_modules, run_jobs

PAGE_SIZE = 4096
HISTOGRAM_BIN = 512  # the bins of the 2002 table

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

CORE_GROUPS = ("text", "rodata", "ro_after_init", "data", "kallsyms")
INIT_GROUPS = ("text", "rodata", "data", "kallsyms")


# ------------------------------------------------------------------ layout rules

@dataclass(frozen=True, slots=True)
class LayoutRules:
    """The kernel configuration the layout depends on (Debian 6.1 amd64 by default)."""

    page_size: int = PAGE_SIZE
    strict_module_rwx: bool = True  # CONFIG_STRICT_MODULE_RWX: groups page-aligned
    kallsyms: bool = True  # CONFIG_KALLSYMS: layout_symtab() adds the symbol tables
    kallsyms_all: bool = True  # CONFIG_KALLSYMS_ALL: data symbols kept in core too
    module_unload: bool = True  # CONFIG_MODULE_UNLOAD: .exit* sections stay in core
    config: str = ""  # the config file read, "" when the defaults were assumed
    kernel: str = ""  # uname -r of the tree, when known

    def describe(self) -> list[str]:
        """One line per rule applied, for people (and kept in --json)."""
        page = self.page_size
        aligned = (f"each group page-aligned ({page}-byte pages, CONFIG_STRICT_MODULE_RWX=y)"
                   if self.strict_module_rwx else
                   "groups not page-aligned (CONFIG_STRICT_MODULE_RWX unset)")
        lines = [
            "model: Linux 6.1 kernel/module/main.c layout_sections() + kallsyms.c layout_symtab(),"
            " x86-64 (ARCH_SHF_SMALL = 0, core and data in one allocation)",
            "core layout = text | rodata | ro_after_init (.data..ro_after_init, __jump_table)"
            f" | data+bss, {aligned}",
        ]
        if self.kallsyms:
            which = ("every named symbol of a core section, data ones too (CONFIG_KALLSYMS_ALL=y)"
                     if self.kallsyms_all else "the named symbols of core code")
            lines.append("core layout += kallsyms: Elf_Sym + name + type byte for "
                         f"{which}, after the data group, rounded to a page")
            lines.append("init layout = .init* text | rodata | data, then the full .symtab, "
                         ".strtab, struct mod_kallsyms and one type byte per symbol")
        else:
            lines.append("init layout = .init* text | rodata | data (CONFIG_KALLSYMS unset)")
        if not self.module_unload:
            lines.append(".exit* sections go to the init layout (CONFIG_MODULE_UNLOAD unset)")
        lines.append("not loaded: .modinfo, __versions; .data..percpu is allocated per cpu,"
                     " outside both layouts")
        lines.append("/proc/modules and /sys/module/NAME/coresize print core_layout.size once"
                     " the module is live; module_alloc() adds one guard page of address"
                     " space, not memory")
        source = (f"kernel configuration: {self.config}" if self.config else
                  "kernel configuration: not found, Debian 6.1 amd64 defaults assumed")
        lines.append(source)
        return lines


def rules_for_tree(tree: Path | None) -> LayoutRules:
    """The layout rules for a module tree, from its kernel's config when it can be found.

    Looks for TREE/build/.config, then boot/config-KVER beside the tree (an
    extracted Debian package: ROOT/lib/modules/KVER and ROOT/boot), then
    /boot/config-KVER. Without one, Debian 6.1 amd64's settings are assumed.
    """
    if tree is None or not tree.exists():
        return LayoutRules()
    tree = tree.resolve()
    # The tree root is the directory right under .../lib/modules; a file or a
    # subdirectory given instead finds it among its ancestors.
    root = next((p for p in (tree, *tree.parents)
                 if p.parent.name == "modules" and p.parent.parent.name == "lib"), None)
    if root is None:
        if not tree.is_dir():
            return LayoutRules()
        root = tree
    kver = root.name
    candidates = [root / "build" / ".config"]
    if root.parent.name == "modules" and root.parent.parent.name == "lib":
        candidates.append(root.parent.parent.parent / "boot" / f"config-{kver}")
    candidates.append(Path("/boot") / f"config-{kver}")
    for path in candidates:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        config = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.startswith("CONFIG_"):
                config[key] = value.strip()
        return LayoutRules(
            strict_module_rwx=config.get("CONFIG_STRICT_MODULE_RWX") == "y",
            kallsyms=config.get("CONFIG_KALLSYMS") == "y",
            kallsyms_all=config.get("CONFIG_KALLSYMS_ALL") == "y",
            module_unload=config.get("CONFIG_MODULE_UNLOAD") == "y",
            config=str(path),
            kernel=kver,
        )
    return LayoutRules(kernel=kver)


# ---------------------------------------------------------------- layout model

@dataclass(frozen=True, slots=True)
class Layout:
    """One of the two allocations: bytes per group, in layout order.

    Under CONFIG_STRICT_MODULE_RWX every group ends on a page boundary, so each
    group's bytes are whole pages; `size` is what the kernel stores in
    core_layout.size (or init_layout.size) and hands to module_alloc().
    """

    groups: tuple[tuple[str, int], ...]
    page_size: int = PAGE_SIZE

    @property
    def size(self) -> int:
        return sum(n for _, n in self.groups)

    @property
    def pages(self) -> int:
        return -(-self.size // self.page_size)

    def group(self, name: str) -> int:
        return dict(self.groups).get(name, 0)

    def group_pages(self, name: str) -> int:
        return -(-self.group(name) // self.page_size)

    def as_dict(self) -> dict:
        return {"size": self.size, "pages": self.pages, "groups": dict(self.groups)}


@dataclass(frozen=True, slots=True)
class ModuleLayout:
    core: Layout
    init: Layout
    core_bytes: int  # sum of the sizes of the sections placed in the core layout
    init_bytes: int  # the same for the .init* sections (not the symbol tables)
    flat_core: int  # the same sections in one unpadded run, as in 2002
    flat_all: int  # core and init sections together in one unpadded run


def _align(value: int, align: int) -> int:
    align = align or 1
    return (value + align - 1) // align * align


def module_layout(obj: ElfObject, rules: LayoutRules = LayoutRules(), *,
                  init_resident: bool = False) -> ModuleLayout:
    """Mirror load_module()'s layout of *obj*: layout_sections() then layout_symtab().

    With init_resident, the .init* sections are laid out as core sections (the
    kernel that never frees init), their symbols then being core symbols too.
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
    return ModuleLayout(core, init, core_bytes, init_bytes, flat_core, flat_all)


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
    sections = obj.sections
    shnum = len(sections)
    symsect = sections[obj.symtab_index]
    strsect = sections[symsect.link]
    strtab = strsect.data

    # The full symbol table goes at the end of the init layout...
    flags[obj.symtab_index] |= SHF_ALLOC
    offset = _align(init_size, symsect.addralign)
    entsize[obj.symtab_index] = offset | INIT_OFFSET_MASK
    init_size = offset + symsect.size

    # ...and the core symbols, with their names, at the end of the core layout.
    nsrc = symsect.size // ELF64_SYM.size
    ndst = strtab_size = 0
    for i, (st_name, _info, _other, st_shndx, _value, _size) in enumerate(
            ELF64_SYM.iter_unpack(symsect.data[:nsrc * ELF64_SYM.size])):
        if i == 0 or livepatch or _is_core_symbol(st_name, st_shndx, flags, entsize, shnum,
                                                    pcpu_index, rules.kallsyms_all):
            end = strtab.find(b"\0", st_name)
            strtab_size += (end if end >= 0 else len(strtab)) - st_name + 1
            ndst += 1
    symoffs = _align(core_size, symsect.addralign)
    core_size = symoffs + ndst * ELF64_SYM.size + strtab_size + ndst
    core_size = strict_align(core_size)

    # The string table, struct mod_kallsyms and the type bytes close the init layout.
    flags[symsect.link] |= SHF_ALLOC
    offset = _align(init_size, strsect.addralign)
    entsize[symsect.link] = offset | INIT_OFFSET_MASK
    init_size = offset + strsect.size
    init_size = _align(init_size, MOD_KALLSYMS_ALIGN) + MOD_KALLSYMS_SIZE + nsrc
    init_size = strict_align(init_size)
    return core_size, init_size


def _is_core_symbol(st_name: int, st_shndx: int, flags: list[int], entsize: list[int], shnum: int,
                    pcpu_index: int, kallsyms_all: bool) -> bool:
    """kernel/module/kallsyms.c is_core_symbol()."""
    if st_shndx == SHN_UNDEF or st_shndx >= shnum or not st_name:
        return False
    if kallsyms_all and st_shndx == pcpu_index:
        return True
    f = flags[st_shndx]
    if not f & SHF_ALLOC or (not kallsyms_all and not f & SHF_EXECINSTR):
        return False
    return not entsize[st_shndx] & INIT_OFFSET_MASK


def layout_of(data: bytes, rules: LayoutRules = LayoutRules(), *,
              init_resident: bool = False) -> ModuleLayout:
    """module_layout() of the module in *data* (raises MalformedElf)."""
    return module_layout(read_elf(data), rules, init_resident=init_resident)


# ------------------------------------------------------------- one module

@dataclass(frozen=True, slots=True)
class ModuleAnalysis:
    path: str  # relative to its input root
    name: str
    outcome: str  # split, nothing, refused, invalid, error (initsplit.tree.Outcome)
    reason: str = ""
    plain: ModuleLayout | None = None
    resident: Layout | None = None  # core layout if the kernel kept init (baseline a)
    core: ModuleLayout | None = None  # C, when split
    init: ModuleLayout | None = None  # I, when split
    init_name: str = ""

    @property
    def split(self) -> bool:
        return self.outcome == "split"

    @property
    def has_init(self) -> bool:
        return self.plain is not None and self.plain.init_bytes > 0

    @property
    def after_core(self) -> Layout | None:
        """The core layout that stays for the module's life under initsplit."""
        if self.core is not None:
            return self.core.core
        return self.plain.core if self.plain is not None else None

    @property
    def saving_today(self) -> int:
        """Pages saved against today's kernel (baseline b); may be negative."""
        if not self.split:
            return 0
        return self.plain.core.pages - self.core.core.pages

    @property
    def saving_resident(self) -> int:
        """Pages saved against a kernel that keeps init resident (baseline a)."""
        if not self.split:
            return 0
        return self.resident.pages - self.core.core.pages

    @property
    def saving_flat_2002(self) -> int:
        """Pages freed by discarding init under the 2002 one-allocation rule."""
        if self.plain is None:
            return 0
        p = self.plain
        return -(-p.flat_all // PAGE_SIZE) - -(-p.flat_core // PAGE_SIZE)

    def as_dict(self) -> dict:
        out: dict = {"path": self.path, "name": self.name, "outcome": self.outcome}
        if self.reason:
            out["reason"] = self.reason
        if self.plain is not None:
            out.update(non_init_bytes=self.plain.core_bytes, init_bytes=self.plain.init_bytes,
                       plain_core=self.plain.core.as_dict(), plain_init=self.plain.init.as_dict(),
                       resident_core=self.resident.as_dict(),
                       flat_2002={"non_init": self.plain.flat_core, "all": self.plain.flat_all})
        if self.split:
            out.update(init_name=self.init_name,
                       split_core=self.core.core.as_dict(), split_core_init=self.core.init.as_dict(),
                       init_module_core=self.init.core.as_dict(),
                       init_module_init=self.init.init.as_dict())
        out["saving_pages"] = {"init_resident": self.saving_resident, "today": self.saving_today,
                               "flat_2002": self.saving_flat_2002}
        return out


def analyze_module(source: Path, relative: Path | str, rules: LayoutRules = LayoutRules()
                   ) -> ModuleAnalysis:
    """Lay out one module plain, and its two halves when the splitter splits it."""
    relative = str(relative)
    fallback_name = Path(relative).name.removesuffix(MODULE_SUFFIX).replace("-", "_")
    try:
        data = Path(source).read_bytes()
        obj = read_elf(data)
        modinfo = obj.section(".modinfo")
        name = (first(parse_modinfo(modinfo.data), "name") if modinfo is not None else None) \
            or fallback_name
        plain = module_layout(obj, rules)
        resident = module_layout(obj, rules, init_resident=True).core
        decision = decide(data)
    except (OSError, MalformedElf) as exc:
        return ModuleAnalysis(relative, fallback_name, "error", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # one module's surprise must not end a tree's analysis
        return ModuleAnalysis(relative, fallback_name, "error", f"{type(exc).__name__}: {exc}")
    if decision.outcome != "split":
        return ModuleAnalysis(relative, name, decision.outcome, decision.reason, plain, resident)
    split = decision.split
    try:
        core = layout_of(split.core, rules)
        init = layout_of(split.init, rules)
    except MalformedElf as exc:
        return ModuleAnalysis(relative, name, "error", f"split output: {exc}", plain, resident)
    return ModuleAnalysis(relative, name, "split", "", plain, resident, core, init, split.init_name)


def _analyze_job(job: ModuleJob, rules: LayoutRules) -> ModuleAnalysis:
    return analyze_module(job.source, job.relative, rules)


def analyze_jobs(jobs: Sequence[ModuleJob], rules: LayoutRules, *, workers: int | None = None,
                 progress: Callable[[ModuleAnalysis], None] | None = None) -> list[ModuleAnalysis]:
    """analyze_module() for every job, on every core; results in job order."""

    def pool_error(job: ModuleJob, exc: Exception) -> ModuleAnalysis:
        return ModuleAnalysis(str(job.relative), job.relative.name, "error",
                              f"{type(exc).__name__}: {exc}")

    return run_jobs(jobs, functools.partial(_analyze_job, rules=rules), workers=workers,
                    progress=progress, on_pool_error=pool_error)


def analyze_paths(paths: Iterable[Path], *, rules: LayoutRules | None = None,
                  workers: int | None = None) -> tuple[LayoutRules, list[ModuleAnalysis]]:
    paths = [Path(p) for p in paths]
    if rules is None:
        rules = rules_for_tree(paths[0] if len(paths) == 1 else None)
    return rules, analyze_jobs(find_modules(paths), rules, workers=workers)


# ---------------------------------------------------------------- summary

def histogram(sizes: Iterable[int], page_size: int = PAGE_SIZE, bin_size: int = HISTOGRAM_BIN
              ) -> list[int]:
    counts = [0] * (page_size // bin_size)
    for size in sizes:
        counts[(size % page_size) // bin_size] += 1
    return counts


def summarize(results: Sequence[ModuleAnalysis], rules: LayoutRules, tree: str = "") -> dict:
    """Everything `analyze` prints, as plain data (the --json document without per_module)."""
    page = rules.page_size
    laid = [r for r in results if r.plain is not None]
    split = [r for r in laid if r.split]
    outcomes = Counter(r.outcome for r in results)
    reasons = Counter(r.reason for r in results if r.outcome == "refused")
    over = [r for r in laid if r.plain.core_bytes > page]
    with_init = [r for r in laid if r.has_init]

    def pages(layouts: Iterable[Layout]) -> int:
        return sum(layout.pages for layout in layouts)

    by_group = {}
    for group in CORE_GROUPS:
        plain_pages = sum(r.plain.core.group_pages(group) for r in split)
        core_pages = sum(r.core.core.group_pages(group) for r in split)
        by_group[group] = {"plain": plain_pages, "split": core_pages, "saving": plain_pages - core_pages}
    today = [r.saving_today for r in split]
    resident = [r.saving_resident for r in split]
    flat = [r.saving_flat_2002 for r in with_init]
    plain_total = pages(r.plain.core for r in laid)
    after_total = pages(r.after_core for r in laid)
    return {
        "tree": tree,
        "kernel": rules.kernel,
        "rules": {
            "page_size": page,
            "strict_module_rwx": rules.strict_module_rwx,
            "kallsyms": rules.kallsyms,
            "kallsyms_all": rules.kallsyms_all,
            "module_unload": rules.module_unload,
            "config": rules.config,
            "applied": rules.describe(),
        },
        "modules": len(results),
        "laid_out": len(laid),
        "with_init_sections": len(with_init),
        "over_one_page": len(over),
        "outcomes": {k: outcomes.get(k, 0) for k in ("split", "nothing", "refused", "invalid", "error")},
        "refusal_reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "histogram": {
            "bin_bytes": HISTOGRAM_BIN,
            "of": "non-init allocated bytes (text+data+bss, as in 2002) modulo the page size",
            "over_one_page": histogram((r.plain.core_bytes for r in over), page),
            "all": histogram((r.plain.core_bytes for r in laid), page),
        },
        "layouts": {
            "plain_core_pages": plain_total,
            "plain_init_pages": pages(r.plain.init for r in laid),
            "resident_core_pages": pages(r.resident for r in laid),
            "after_split_core_pages": after_total,
            "init_modules_core_pages": pages(r.init.core for r in split),
            "init_modules_init_pages": pages(r.init.init for r in split),
        },
        "savings": {
            "init_resident": {
                "pages": sum(resident), "bytes": sum(resident) * page, "modules": len(split),
                "modules_saving": sum(1 for s in resident if s > 0),
            },
            "flat_2002": {
                "pages": sum(flat), "bytes": sum(flat) * page, "modules": len(with_init),
                "modules_saving": sum(1 for s in flat if s > 0),
            },
            "today": {
                "pages": sum(today), "bytes": sum(today) * page, "modules": len(split),
                "modules_saving": sum(1 for s in today if s > 0),
                "modules_costing": sum(1 for s in today if s < 0),
                "by_group": by_group,
                "modules_by_saving": {str(k): v for k, v in sorted(Counter(today).items())},
            },
        },
        "problems": [{"path": r.path, "outcome": r.outcome, "reason": r.reason}
                     for r in results if r.outcome in ("invalid", "error")],
    }


def render_text(summary: dict, results: Sequence[ModuleAnalysis] = (), *,
                per_module: bool = False) -> str:
    page = summary["rules"]["page_size"]
    out: list[str] = []
    add = out.append
    add(f"tree: {summary['tree'] or '-'}" + (f" (kernel {summary['kernel']})" if summary["kernel"] else ""))
    add("layout rules applied:")
    for line in summary["rules"]["applied"]:
        add(f"  - {line}")
    add("")
    if per_module and results:
        add(_per_module_table(results))
        add("")
    o = summary["outcomes"]
    add(f"modules: {summary['modules']}; with init sections: {summary['with_init_sections']}; "
        f"non-init size above one page ({page} bytes): {summary['over_one_page']}")
    add(f"splitter: split {o['split']}, nothing to split {o['nothing']}, refused {o['refused']}, "
        f"invalid {o['invalid']}, errors {o['error']}")
    for reason, count in summary["refusal_reasons"].items():
        add(f"  refused {count:5d}  {reason}")
    add("")
    hist = summary["histogram"]
    add(f"non-init size modulo {page} (text+data+bss, as in the 2002 table), "
        f"{hist['bin_bytes']}-byte bins:")
    add(f"  {'bytes':<12} {'> 1 page':>9} {'all':>6}")
    top = max(hist["over_one_page"]) or 1
    for n, (over, every) in enumerate(zip(hist["over_one_page"], hist["all"])):
        lo = n * hist["bin_bytes"]
        bar = "#" * round(30 * over / top)
        add(f"  {lo:04d}...{lo + hist['bin_bytes'] - 1:04d} {over:>9} {every:>6}  {bar}")
    add("")
    lay = summary["layouts"]
    add(f"pages ({page} bytes), all modules:")
    add(f"  plain load: core layouts {lay['plain_core_pages']}, init layouts (freed after init) "
        f"{lay['plain_init_pages']}")
    add(f"  two-stage, for the module's life: core layouts {lay['after_split_core_pages']}")
    add(f"  two-stage, until the batch delete: init modules' core layouts "
        f"{lay['init_modules_core_pages']} (their init layouts {lay['init_modules_init_pages']}"
        " are freed after init)")
    add("")
    s = summary["savings"]
    a, f, b = s["init_resident"], s["flat_2002"], s["today"]
    add("predicted saving of the two-stage load:")
    add(f"  (a) against init kept resident (core+init in one allocation, today's groups): "
        f"{a['pages']} pages = {a['bytes']:,} bytes over {a['modules']} split modules "
        f"({a['modules_saving']} save at least a page)")
    add(f"      under the 2002 rule (one unpadded allocation, no RWX groups), discarding init "
        f"frees {f['pages']} pages = {f['bytes']:,} bytes over {f['modules']} modules with init "
        f"sections ({f['modules_saving']} save a page or more)")
    add(f"  (b) against today's kernel (init layout freed, init-code table records kept): "
        f"{b['pages']} pages = {b['bytes']:,} bytes over {b['modules']} split modules "
        f"({b['modules_saving']} save pages, {b['modules_costing']} need more)")
    add(f"      {'group':<14} {'plain':>7} {'split':>7} {'saving':>7}")
    for group, g in b["by_group"].items():
        add(f"      {group:<14} {g['plain']:>7} {g['split']:>7} {g['saving']:>7}")
    dist = ", ".join(f"{k:>s}: {v}" for k, v in b["modules_by_saving"].items()) or "-"
    add(f"      split modules per pages saved: {dist}")
    if summary["problems"]:
        add("")
        add(f"problems: {len(summary['problems'])} (see stderr)")
    return "\n".join(out)


def _per_module_table(results: Sequence[ModuleAnalysis]) -> str:
    head = (f"{'module':<28} {'outcome':<8} {'non-init':>9} {'init':>8} {'core pg':>7} "
            f"{'init pg':>7} {'C pg':>5} {'I pg':>5} {'(a)':>4} {'(b)':>4}")
    rows = [head]
    for r in results:
        if r.plain is None:
            rows.append(f"{r.name:<28} {r.outcome:<8} {r.reason}")
            continue
        c = str(r.core.core.pages) if r.split else "-"
        i = str(r.init.core.pages) if r.split else "-"
        rows.append(f"{r.name:<28} {r.outcome:<8} {r.plain.core_bytes:>9} {r.plain.init_bytes:>8} "
                    f"{r.plain.core.pages:>7} {r.plain.init.pages:>7} {c:>5} {i:>5} "
                    f"{r.saving_resident:>4} {r.saving_today:>4}")
    return "\n".join(rows)


def render_json(summary: dict, results: Sequence[ModuleAnalysis]) -> str:
    document = dict(summary)
    document["per_module"] = [r.as_dict() for r in results]
    return json.dumps(document, indent=1, sort_keys=False)


# ------------------------------------------------------------------ the plot

def write_plot(summary: dict, path: Path) -> None:
    """A PNG bar chart of the 2002 histogram with the savings, written with zlib only."""
    hist = summary["histogram"]
    counts = hist["over_one_page"]
    width, height = 760, 420
    img = _Canvas(width, height)
    left, right, top, bottom = 70, width - 20, 70, height - 80
    img.text(left, 16, f"NON-INIT SIZE MODULO {summary['rules']['page_size']} "
             f"({summary['over_one_page']} MODULES ABOVE ONE PAGE)", scale=2)
    s = summary["savings"]
    img.text(left, 40, f"SAVING VS INIT RESIDENT: {s['init_resident']['pages']} PAGES;  "
             f"VS TODAY'S KERNEL: {s['today']['pages']} PAGES  ({summary['modules']} MODULES)",
             scale=1, color=(60, 60, 60))
    peak = max(counts) or 1
    step = _nice_step(peak)
    ymax = -(-peak // step) * step
    img.line_h(left, right, bottom, (0, 0, 0))
    img.line_v(left, top, bottom, (0, 0, 0))
    for tick in range(0, ymax + 1, step):
        y = bottom - (bottom - top) * tick // ymax
        img.line_h(left - 4, left, y, (0, 0, 0))
        if tick:
            img.line_h(left + 1, right, y, (225, 225, 225))
        label = str(tick)
        img.text(left - 8 - 6 * len(label), y - 3, label)
    slot = (right - left) // len(counts)
    for n, count in enumerate(counts):
        x0 = left + n * slot + slot // 6
        x1 = left + (n + 1) * slot - slot // 6
        y = bottom - (bottom - top) * count // ymax
        img.rect(x0, y, x1, bottom, (70, 110, 170))
        label = str(count)
        img.text((x0 + x1) // 2 - 3 * len(label), y - 11, label)
        lo = n * hist["bin_bytes"]
        rng = f"{lo}-{lo + hist['bin_bytes'] - 1}"
        img.text((x0 + x1) // 2 - 3 * len(rng), bottom + 8, rng)
    img.text(left, bottom + 28, "BYTES (MODULO PAGE SIZE), 512-BYTE BINS AS IN THE 2002 LKML TABLE")
    img.text(8, top - 16, "MODULES")
    path.write_bytes(img.png())


def _nice_step(peak: int) -> int:
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000):
        if peak / step <= 8:
            return step
    return 10000


# 5x7 glyphs, one int per row, bit 4 the leftmost pixel.
_FONT = {
    " ": (0, 0, 0, 0, 0, 0, 0),
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14),
    "2": (14, 17, 1, 2, 4, 8, 31), "3": (31, 2, 4, 2, 1, 17, 14),
    "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8),
    "8": (14, 17, 17, 14, 17, 17, 14), "9": (14, 17, 17, 15, 1, 2, 12),
    "A": (14, 17, 17, 31, 17, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30),
    "C": (14, 17, 16, 16, 16, 17, 14), "D": (28, 18, 17, 17, 17, 18, 28),
    "E": (31, 16, 16, 30, 16, 16, 31), "F": (31, 16, 16, 30, 16, 16, 16),
    "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17),
    "I": (14, 4, 4, 4, 4, 4, 14), "J": (7, 2, 2, 2, 2, 18, 12),
    "K": (17, 18, 20, 24, 20, 18, 17), "L": (16, 16, 16, 16, 16, 16, 31),
    "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17),
    "O": (14, 17, 17, 17, 17, 17, 14), "P": (30, 17, 17, 30, 16, 16, 16),
    "Q": (14, 17, 17, 17, 21, 18, 13), "R": (30, 17, 17, 30, 20, 18, 17),
    "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4),
    "U": (17, 17, 17, 17, 17, 17, 14), "V": (17, 17, 17, 17, 17, 10, 4),
    "W": (17, 17, 17, 21, 21, 21, 10), "X": (17, 17, 10, 4, 10, 17, 17),
    "Y": (17, 17, 10, 4, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31),
    "-": (0, 0, 0, 31, 0, 0, 0), ".": (0, 0, 0, 0, 0, 12, 12),
    ",": (0, 0, 0, 0, 12, 4, 8), ":": (0, 12, 12, 0, 12, 12, 0),
    ";": (0, 12, 12, 0, 12, 4, 8), "(": (2, 4, 8, 8, 8, 4, 2),
    ")": (8, 4, 2, 2, 2, 4, 8), "/": (0, 1, 2, 4, 8, 16, 0),
    "'": (4, 4, 8, 0, 0, 0, 0), "%": (24, 25, 2, 4, 8, 19, 3),
    "+": (0, 4, 4, 31, 4, 4, 0), "=": (0, 0, 31, 0, 31, 0, 0),
    "_": (0, 0, 0, 0, 0, 0, 31), "#": (10, 10, 31, 10, 31, 10, 10),
}


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def set(self, x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            at = (y * self.width + x) * 3
            self.pixels[at:at + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int]) -> None:
        row = bytes(color) * max(0, x1 - x0)
        for y in range(max(0, y0), min(self.height, y1)):
            at = (y * self.width + x0) * 3
            self.pixels[at:at + len(row)] = row

    def line_h(self, x0: int, x1: int, y: int, color: tuple[int, int, int]) -> None:
        self.rect(x0, y, x1 + 1, y + 1, color)

    def line_v(self, x: int, y0: int, y1: int, color: tuple[int, int, int]) -> None:
        self.rect(x, y0, x + 1, y1 + 1, color)

    def text(self, x: int, y: int, text: str, *, scale: int = 1,
             color: tuple[int, int, int] = (0, 0, 0)) -> None:
        for ch in text.upper():
            rows = _FONT.get(ch, _FONT[" "])
            for dy, bits in enumerate(rows):
                for dx in range(5):
                    if bits & (16 >> dx):
                        self.rect(x + dx * scale, y + dy * scale, x + (dx + 1) * scale,
                                  y + (dy + 1) * scale, color)
            x += 6 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.pixels[y * self.width * 3:(y + 1) * self.width * 3])
                       for y in range(self.height))

        def chunk(kind: bytes, body: bytes) -> bytes:
            return (struct.pack(">I", len(body)) + kind + body
                    + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


__all__ = [
    "Layout",
    "LayoutRules",
    "ModuleAnalysis",
    "ModuleLayout",
    "analyze_jobs",
    "analyze_module",
    "analyze_paths",
    "histogram",
    "layout_of",
    "module_layout",
    "render_json",
    "render_text",
    "rules_for_tree",
    "summarize",
    "write_plot",
]
