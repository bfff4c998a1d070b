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

The layouts come from the kernel's layout model (initsplit.layout, which follows
the kernel function by function); `initsplit analyze` prints which rules it applied.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence
from xml.sax.saxutils import escape

from .elf import ElfObject, MalformedElf, read_elf
from .layout import (CORE_GROUPS, PAGE_SIZE, Layout, LayoutRules, ModuleLayout, layout_of, module_layout,
                     rules_for_tree)
from .layout.btf import btf_kept_bytes, kernel_model
from .layout.twostage_slab import twostage_slab_bytes
from .split.modinfo import first, parse_modinfo
from .split.decide import OUTCOMES, decide
from .split.policy import DEFAULT_OPTIONS, SplitOptions
from .split.splitter import SplitModule
from .modfile import CompressedModuleError, module_file_name, read_module
from .tree import ModuleJob, find_modules, run_jobs

HISTOGRAM_BIN = 512  # the bins of the 2002 table


# ------------------------------------------------------------- one module

@dataclass(frozen=True, slots=True)
class ModuleAnalysis:
    path: str  # relative to its input root
    name: str
    outcome: str  # split, plain, nothing, refused, invalid, error (split.decide.Outcome)
    reason: str = ""
    plain: ModuleLayout | None = None
    resident: Layout | None = None  # core layout if the kernel kept init (baseline a)
    core: ModuleLayout | None = None  # C, when split (also when the policy loads it plain)
    init: ModuleLayout | None = None  # I, likewise
    init_name: str = ""
    detail: str = ""  # the figures behind a policy's "plain"
    # Unreclaimable slab the kernel keeps for the original's BTF (layout/btf.py),
    # and how much of it the load the options choose gives back (Discard=btf).
    btf_cost: int = 0
    btf_given_back: int = 0
    # Core layout bytes of the data symbols' kallsyms (CONFIG_KALLSYMS_ALL), and
    # what the chosen load gives back of them (Discard=kallsyms-data).
    kallsyms_cost: int = 0
    kallsyms_given_back: int = 0
    # Unreclaimable slab a two-stage load of this module takes more than its plain
    # load (layout/twostage_slab.py), when it splits, whatever the policy chose.
    twostage_slab: int = 0

    @property
    def class_pages(self) -> int:
        """Core pages the kallsyms-data class takes off C as off the plain load: not
        the two-stage load's doing, so left out of its savings."""
        return self.kallsyms_given_back // PAGE_SIZE

    @property
    def split(self) -> bool:
        return self.outcome == "split"

    @property
    def has_init(self) -> bool:
        return self.plain is not None and self.plain.init_bytes > 0

    @property
    def after_core(self) -> Layout | None:
        """The core layout that stays for the module's life under initsplit (C's
        for a module loaded two-stage, the original's for one loaded plain)."""
        if self.split:
            return self.core.core
        return self.plain.core if self.plain is not None else None

    @property
    def saving_today(self) -> int:
        """Pages saved against today's kernel (baseline b) by the load the options
        choose: 0 for a module loaded plain."""
        if not self.split:
            return 0
        return self.plain.core.pages - self.class_pages - self.core.core.pages

    @property
    def saving_if_split(self) -> int | None:
        """Pages a two-stage load would save against today's kernel whatever the
        policy (TwoStage=always; may be negative); None when the module does not split."""
        if self.core is None or self.plain is None:
            return None
        return self.plain.core.pages - self.class_pages - self.core.core.pages

    @property
    def saving_resident(self) -> int:
        """Pages saved against a kernel that keeps init resident (baseline a)."""
        if not self.split:
            return 0
        return self.resident.pages - self.class_pages - self.core.core.pages

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
        if self.detail:
            out["detail"] = self.detail
        if self.core is not None and self.init is not None:
            out.update(init_name=self.init_name,
                       split_core=self.core.core.as_dict(), split_core_init=self.core.init.as_dict(),
                       init_module_core=self.init.core.as_dict(),
                       init_module_init=self.init.init.as_dict())
        out["btf_bytes"] = {"cost": self.btf_cost, "given_back": self.btf_given_back}
        out["kallsyms_data_bytes"] = {"cost": self.kallsyms_cost, "given_back": self.kallsyms_given_back}
        if self.core is not None:
            out["twostage_slab_bytes"] = self.twostage_slab
        out["saving_pages"] = {"init_resident": self.saving_resident, "today": self.saving_today,
                               "if_split": self.saving_if_split, "flat_2002": self.saving_flat_2002}
        return out


def analyze_module(source: Path, relative: Path | str, rules: LayoutRules = LayoutRules(),
                   options: SplitOptions = DEFAULT_OPTIONS) -> ModuleAnalysis:
    """Lay out one module plain, and its two halves when the splitter splits it;
    the outcome is the load the options choose (split/decide.py)."""
    relative = str(relative)
    fallback_name = module_file_name(Path(relative).name)
    try:
        data = read_module(Path(source))
        obj = read_elf(data)
        modinfo = obj.section(".modinfo")
        name = (first(parse_modinfo(modinfo.data), "name") if modinfo is not None else None) \
            or fallback_name
        plain = module_layout(obj, rules)
        resident = module_layout(obj, rules, init_resident=True).core
        decision = decide(data, dataclasses.replace(options, rules=rules))
        btf = obj.section(".BTF")
        btf_cost = btf_kept_bytes(btf.data, name, kernel=kernel_model(rules.kernel)) if btf else 0
        # What the data symbols take: the core layout with and without them, as a
        # kernel without CONFIG_KALLSYMS_ALL would lay it out.
        kallsyms_cost = (plain.core.size - module_layout(obj, dataclasses.replace(
            rules, kallsyms_all=False)).core.size) if rules.kallsyms_all else 0
    except (OSError, MalformedElf, CompressedModuleError) as exc:
        return ModuleAnalysis(relative, fallback_name, "error", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # one module's surprise must not end a tree's analysis
        return ModuleAnalysis(relative, fallback_name, "error", f"{type(exc).__name__}: {exc}")
    btf_fields = {"btf_cost": btf_cost, "btf_given_back": decision.btf_bytes,
                  "kallsyms_cost": kallsyms_cost, "kallsyms_given_back": decision.kallsyms_bytes}
    if decision.outcome not in ("split", "plain") or decision.split is None:
        return ModuleAnalysis(relative, name, decision.outcome, decision.reason, plain, resident,
                              **btf_fields)
    split = decision.split
    try:
        core, init, slab = split_figures(obj, split, rules)
    except MalformedElf as exc:
        return ModuleAnalysis(relative, name, "error", f"split output: {exc}", plain, resident)
    return ModuleAnalysis(relative, name, decision.outcome, decision.reason, plain, resident, core,
                          init, split.init_name, decision.detail, **btf_fields,
                          twostage_slab=slab)


def split_figures(original: ElfObject, split: SplitModule,
                  rules: LayoutRules = LayoutRules()) -> tuple[ModuleLayout, ModuleLayout, int]:
    """C's and I's layouts, and the slab the two-stage load takes more than the plain
    one (layout/twostage_slab.py), from C as the splitter parsed it."""
    core_obj, init_obj = split.core_object or read_elf(split.core), read_elf(split.init)
    core, init = module_layout(core_obj, rules), module_layout(init_obj, rules)
    slab = twostage_slab_bytes(original, core_obj, init_obj, split.init_name,
                               kallsyms=rules.kallsyms, init_pages=(init.core.pages, init.init.pages))
    return core, init, slab


def _analyze_job(job: ModuleJob, rules: LayoutRules, options: SplitOptions) -> ModuleAnalysis:
    return analyze_module(job.source, job.relative, rules, options)


def analyze_jobs(jobs: Sequence[ModuleJob], rules: LayoutRules, *, workers: int | None = None,
                 progress: Callable[[ModuleAnalysis], None] | None = None,
                 options: SplitOptions = DEFAULT_OPTIONS) -> list[ModuleAnalysis]:
    """analyze_module() for every job, on every core; results in job order."""

    def pool_error(job: ModuleJob, exc: Exception) -> ModuleAnalysis:
        return ModuleAnalysis(str(job.relative), job.relative.name, "error",
                              f"{type(exc).__name__}: {exc}")

    return run_jobs(jobs, functools.partial(_analyze_job, rules=rules, options=options), workers=workers,
                    progress=progress, on_pool_error=pool_error)


def loaded_jobs(jobs: Sequence[ModuleJob], *, proc_modules: Path = Path("/proc/modules")
                ) -> tuple[list[ModuleJob], list[str]]:
    """The jobs of the modules loaded now, and the loaded modules not among them.

    A module's name is its file's, "-" read as "_" (Kbuild's KBUILD_MODNAME); an
    init module of initsplit's (NAME__init, between the two stages) is not one.
    """
    loaded = [line.split()[0] for line in proc_modules.read_text().splitlines() if line.strip()]
    by_name = {module_file_name(job.source.name): job for job in jobs}
    wanted = [name for name in loaded if not name.endswith("__init")]
    return ([by_name[n] for n in wanted if n in by_name], [n for n in wanted if n not in by_name])


def analyze_paths(paths: Iterable[Path], *, rules: LayoutRules | None = None,
                  workers: int | None = None, options: SplitOptions = DEFAULT_OPTIONS
                  ) -> tuple[LayoutRules, list[ModuleAnalysis]]:
    paths = [Path(p) for p in paths]
    if rules is None:
        rules = rules_for_tree(paths[0] if len(paths) == 1 else None)
    return rules, analyze_jobs(find_modules(paths), rules, workers=workers, options=options)


# ---------------------------------------------------------------- summary

def histogram(sizes: Iterable[int], page_size: int = PAGE_SIZE, bin_size: int = HISTOGRAM_BIN
              ) -> list[int]:
    counts = [0] * (page_size // bin_size)
    for size in sizes:
        counts[(size % page_size) // bin_size] += 1
    return counts


def summarize(results: Sequence[ModuleAnalysis], rules: LayoutRules, tree: str = "",
              options: SplitOptions = DEFAULT_OPTIONS) -> dict:
    """Everything `analyze` prints, as plain data (the --json document without per_module)."""
    page = rules.page_size
    laid = [r for r in results if r.plain is not None]
    split = [r for r in laid if r.split]
    every = [s for r in laid if (s := r.saving_if_split) is not None]
    weighed = [r for r in laid if r.saving_if_split is not None]
    outcomes = Counter(r.outcome for r in results)
    reasons = Counter(r.reason for r in results if r.outcome == "refused")
    policy = Counter(r.reason for r in results if r.outcome == "plain")
    over = [r for r in laid if r.plain.core_bytes > page]
    with_init = [r for r in laid if r.has_init]

    def pages(layouts: Iterable[Layout]) -> int:
        return sum(layout.pages for layout in layouts)

    by_group = {}
    for group in CORE_GROUPS:
        # Against the plain load with the same classes: the kallsyms-data class
        # shrinks the kallsyms group of C and of a plain load alike.
        plain_pages = sum(r.plain.core.group_pages(group) - (r.class_pages if group == "kallsyms" else 0)
                          for r in split)
        core_pages = sum(r.core.core.group_pages(group) for r in split)
        by_group[group] = {"plain": plain_pages, "split": core_pages, "saving": plain_pages - core_pages}
    today = [r.saving_today for r in split]
    resident = [r.saving_resident for r in split]
    flat = [r.saving_flat_2002 for r in with_init]
    plain_total = pages(r.plain.core for r in laid)
    # C's layout already lacks what the classes drop; a plain load's, the original's.
    after_total = sum(r.after_core.pages - (0 if r.split else r.class_pages) for r in laid)
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
        "options": {"two_stage": options.two_stage,
                    "writable_ro_after_init": options.writable_ro_after_init,
                    "discard": sorted(options.discard), "keep_btf": sorted(options.keep_btf)},
        "outcomes": {k: outcomes.get(k, 0) for k in OUTCOMES},
        "refusal_reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "policy_reasons": dict(sorted(policy.items(), key=lambda kv: (-kv[1], kv[0]))),
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
            "btf": {
                "cost_bytes": sum(r.btf_cost for r in laid),
                "given_back_bytes": sum(r.btf_given_back for r in laid),
                "modules_dropped": sum(1 for r in laid if r.btf_given_back),
                "modules_kept": sum(1 for r in laid if r.btf_cost and not r.btf_given_back),
                "kept_bytes": sum(r.btf_cost for r in laid if not r.btf_given_back),
            },
            "kallsyms_data": {
                "cost_bytes": sum(r.kallsyms_cost for r in laid),
                "given_back_bytes": sum(r.kallsyms_given_back for r in laid),
                "modules_dropped": sum(1 for r in laid if r.kallsyms_given_back),
            },
            "every_split": {
                "pages": sum(every), "bytes": sum(every) * page, "modules": len(every),
                "modules_saving": sum(1 for s in every if s > 0),
                "modules_costing": sum(1 for s in every if s < 0),
            },
            # What a two-stage load would take in slab, for every module that splits,
            # against the core pages it would win (what TwoStage= weighs).
            "twostage_slab": {
                "bytes": sum(r.twostage_slab for r in weighed),
                "modules": len(weighed),
                "net_bytes": sum(r.saving_if_split * page - r.twostage_slab for r in weighed),
                "modules_freeing_more": sum(1 for r in weighed
                                            if r.saving_if_split * page > r.twostage_slab),
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
    opts = summary["options"]
    add(f"splitter: two-stage {o['split']}, plain by policy {o['plain']}, nothing to split "
        f"{o['nothing']}, refused {o['refused']}, invalid {o['invalid']}, errors {o['error']} "
        f"(TwoStage={opts['two_stage']}, "
        f"WritableRoAfterInit={'yes' if opts['writable_ro_after_init'] else 'no'})")
    for reason, count in summary["refusal_reasons"].items():
        add(f"  refused {count:5d}  {reason}")
    for reason, count in summary["policy_reasons"].items():
        add(f"  plain   {count:5d}  {reason}")
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
    add(f"  as initsplit loads them (TwoStage=, Discard=), for the module's life: core layouts "
        f"{lay['after_split_core_pages']}")
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
    k = s["btf"]
    add(f"  BTF (Discard={' '.join(opts['discard']) or '-'}): the kernel keeps {k['cost_bytes']:,} bytes "
        f"of unreclaimable memory for the modules' BTF; {k['given_back_bytes']:,} given back by "
        f"dropping it from {k['modules_dropped']} modules, {k['kept_bytes']:,} kept by "
        f"{k['modules_kept']} (.BTF_ids or KeepBTF=)")
    d = s["kallsyms_data"]
    dropped = "kallsyms-data" in opts["discard"]
    add(f"  data symbols in kallsyms (CONFIG_KALLSYMS_ALL): {d['cost_bytes']:,} bytes of core "
        f"layout; " + (f"{d['given_back_bytes']:,} given back from {d['modules_dropped']} modules"
                       if dropped else "kept (Discard=kallsyms-data would drop them)"))
    e = s["every_split"]
    add(f"      every module that splits loaded two-stage (TwoStage=always): {e['pages']} pages "
        f"over {e['modules']} modules ({e['modules_saving']} save pages, "
        f"{e['modules_costing']} need more)")
    t = s["twostage_slab"]
    add(f"      and the slab it would take (layout/twostage_slab.py): {t['bytes']:,} bytes; "
        f"with the core pages, two-stage would give back {t['net_bytes']:,} bytes net "
        f"({t['modules_freeing_more']} modules free more than they take)")
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

# Geometry of the chart, in SVG user units (pixels at 100 %).
_PLOT_WIDTH, _PLOT_HEIGHT = 760, 420
_PLOT_LEFT, _PLOT_RIGHT, _PLOT_TOP, _PLOT_BOTTOM = 70, _PLOT_WIDTH - 20, 70, _PLOT_HEIGHT - 80
_BAR_COLOUR = "#466eaa"
_GRID_COLOUR = "#e1e1e1"
_FONT = "font-family=\"sans-serif\""


def write_plot(summary: dict, path: Path) -> None:
    """Write render_svg(summary) to *path*."""
    path.write_text(render_svg(summary), encoding="utf-8")


def render_svg(summary: dict) -> str:
    """An SVG bar chart of the 2002 histogram (modules above one page) with the savings.

    SVG is text, so the standard library draws it: the daemon and the initramfs
    never import this, and no plotting package is needed for `analyze --plot`
    either. Each bar is a <rect class="bar"> whose height is proportional to its
    bin's count, labelled with the count (class "count") and the bin's byte range
    (class "bin"), so a test, or a reader of the file, finds the figures in it.
    """
    hist = summary["histogram"]
    counts: list[int] = hist["over_one_page"]
    bin_bytes: int = hist["bin_bytes"]
    s = summary["savings"]
    left, right, top, bottom = _PLOT_LEFT, _PLOT_RIGHT, _PLOT_TOP, _PLOT_BOTTOM
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_PLOT_WIDTH}" height="{_PLOT_HEIGHT}" '
        f'viewBox="0 0 {_PLOT_WIDTH} {_PLOT_HEIGHT}">',
        f'<rect width="{_PLOT_WIDTH}" height="{_PLOT_HEIGHT}" fill="white"/>',
        _svg_text(left, 28, f"Non-init size modulo {summary['rules']['page_size']} "
                  f"({summary['over_one_page']} modules above one page)", size=16, cls="title"),
        _svg_text(left, 50, f"Saving vs init resident: {s['init_resident']['pages']} pages;  "
                  f"vs today's kernel: {s['today']['pages']} pages  ({summary['modules']} modules)",
                  size=12, cls="subtitle", fill="#3c3c3c"),
    ]
    peak = max(counts, default=0) or 1
    step = _nice_step(peak)
    ymax = -(-peak // step) * step
    for tick in range(0, ymax + 1, step):
        y = _bar_top(tick, ymax)
        if tick:
            out.append(_svg_line(left + 1, y, right, y, _GRID_COLOUR))
        out.append(_svg_line(left - 4, y, left, y, "black"))
        out.append(_svg_text(left - 8, y + 4, str(tick), anchor="end", cls="tick"))
    out.append(_svg_line(left, bottom, right, bottom, "black"))
    out.append(_svg_line(left, top, left, bottom, "black"))
    slot = (right - left) / max(len(counts), 1)
    for n, count in enumerate(counts):
        x0 = left + n * slot + slot / 6
        width = slot * 2 / 3
        y = _bar_top(count, ymax)
        middle = x0 + width / 2
        out.append(f'<rect class="bar" x="{x0:.2f}" y="{y:.2f}" width="{width:.2f}" '
                   f'height="{bottom - y:.2f}" fill="{_BAR_COLOUR}"/>')
        out.append(_svg_text(middle, y - 4, str(count), anchor="middle", cls="count"))
        lo = n * bin_bytes
        out.append(_svg_text(middle, bottom + 16, f"{lo}-{lo + bin_bytes - 1}", anchor="middle",
                             cls="bin"))
    out.append(_svg_text(left, bottom + 40, f"bytes (modulo page size), {bin_bytes}-byte bins as "
                         "in the 2002 LKML table", cls="xlabel"))
    out.append(_svg_text(8, top - 8, "modules", cls="ylabel"))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _bar_top(count: int, ymax: int) -> float:
    """The y of a bar of *count* (SVG's y grows downwards, so the axis is at _PLOT_BOTTOM)."""
    return _PLOT_BOTTOM - (_PLOT_BOTTOM - _PLOT_TOP) * count / ymax


def _svg_line(x0: float, y0: float, x1: float, y1: float, colour: str) -> str:
    return (f'<line x1="{x0:.2f}" y1="{y0:.2f}" x2="{x1:.2f}" y2="{y1:.2f}" '
            f'stroke="{colour}" stroke-width="1"/>')


def _svg_text(x: float, y: float, text: str, *, size: int = 11, anchor: str = "start",
              cls: str = "", fill: str = "black") -> str:
    # The text is the summary's (module counts, the tree's page size): escaped all
    # the same, as a name with '<' or '&' would otherwise break the document.
    return (f'<text class="{cls}" x="{x:.2f}" y="{y:.2f}" font-size="{size}" {_FONT} '
            f'text-anchor="{anchor}" fill="{fill}">{escape(text)}</text>')


def _nice_step(peak: int) -> int:
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000):
        if peak / step <= 8:
            return step
    return 10000


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
    "render_svg",
    "render_text",
    "rules_for_tree",
    "summarize",
    "write_plot",
]
