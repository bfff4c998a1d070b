"""Whether to load a module two-stage or plain: split, validate, then weigh the layouts.

A two-stage load is worth it only where it costs the kernel no more than a plain
load of the same module. The kernel frees a module's init layout by itself, so a
split can only win the core-layout records that describe init code; C's anchors
and export tables can cost more than that. decide() asks the layout model
(initsplit.layout) for both core layouts, page-exact as /proc/modules shows them,
and applies the configured policy (``TwoStage=``):

* ``when-not-worse`` (the default): two-stage unless it would cost more than the
  plain load: C's core pages and the slab the init module leaves behind
  (layout/twostage_slab.py) against the plain load's core pages;
* ``when-it-saves``: two-stage only where that comes to at least a page less;
* ``always``: every module that splits and validates (for testing).

On Linux 6.1 the slab of a two-stage load, about 5.4 kB, outweighs the core pages
a split wins for every module of Debian's tree (README, "What two-stage loads
cost"): by default every module loads plain, with the discard classes, which is
where the memory comes back there.

Hardening is never traded: C cannot keep ``.data..ro_after_init`` read-only after
init (the kernel seals a module's section when *that module's* init returns, and
C's returns before I runs the original init that writes it), so by default a
module with such data loads plain. ``WritableRoAfterInit=yes`` allows the rename
to ordinary data (split/splitter.py RO_AFTER_INIT_RENAMED), which leaves that data
writable for the module's life.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import dataclasses

from ..elf import ElfObject, MalformedElf, read_elf
from ..elf.discard import sections as raw_sections
from ..elf.discard import without_data_symbol_names, without_sections
from ..layout import PAGE_SIZE, LayoutRules, layout_of, module_layout
from ..layout.btf import btf_kept_bytes, kernel_model
from ..layout.twostage_slab import twostage_slab_bytes
from ..validate import ValidationError, ValidationReport, validate_split
from .errors import NothingToSplit, SplitRefused
from .modinfo import first, parse_modinfo
from .discarding import KALLSYMS_DATA
from .policy import BTF_IDS, DEFAULT_OPTIONS, DISCARD_SECTIONS, SplitOptions
from .splitter import RO_AFTER_INIT, SplitModule, split_object

# "plain": the module splits, but the options load it plain (Decision.reason says why).
Outcome = Literal["split", "plain", "nothing", "refused", "invalid", "error"]
OUTCOMES: tuple[Outcome, ...] = ("split", "plain", "nothing", "refused", "invalid", "error")


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one module; split is set for "split", "plain" (the split the
    policy turned down, when one was made) and "invalid"."""

    outcome: Outcome
    reason: str = ""
    detail: str = ""
    split: SplitModule | None = None
    report: ValidationReport | None = None
    # The original as read for the split (for layout figures without reading it again).
    original: ElfObject | None = None
    # I as read for the validator and the slab figure (split.init, which the BTF
    # discard leaves as it is), so that layout_figures() need not read it again.
    init_object: ElfObject | None = None
    # Core layout pages, as the layout model computes them: the original loaded
    # plain, and C (0 when no split was weighed).
    plain_core_pages: int = 0
    split_core_pages: int = 0
    # Unreclaimable slab a two-stage load takes more than the plain one
    # (layout/twostage_slab.py); 0 when no split was weighed.
    twostage_slab_bytes: int = 0
    # Discard= classes dropped from what is loaded (C, or the rewritten original).
    discarded: tuple[str, ...] = ()
    # For a plain load with classes discarded: the original without them, which
    # is loaded instead of the original (None: the original as it is).
    rewritten: bytes | None = None
    # What the kernel would keep for the original's BTF (layout/btf.py), given
    # back by discarding it; 0 when it is kept.
    btf_bytes: int = 0
    # Core layout bytes the data symbols' kallsyms entries would take in a plain
    # load (layout/linux61.py, page-rounded as /proc/modules counts them), given
    # back by Discard=kallsyms-data; 0 when they are kept.
    kallsyms_bytes: int = 0


def ro_after_init_bytes(obj: ElfObject) -> int:
    """Bytes of .data..ro_after_init that a plain load makes read-only after init.

    kernel/module/main.c layout_and_allocate() flags the first allocated section
    of exactly that name (find_sec()) SHF_RO_AFTER_INIT.
    """
    section = next((s for s in obj.sections if s.is_alloc and s.name == RO_AFTER_INIT), None)
    return section.size if section is not None else 0


def decide(data: bytes, options: SplitOptions = DEFAULT_OPTIONS) -> Decision:
    """Split the module in *data*, validate the result and weigh it, then drop the
    Discard= classes from what will be loaded; all in memory.

    MalformedElf propagates: for one module named on the command line it is a
    usage error, in a tree it is that module's error.
    """
    source = data
    kallsyms_bytes = 0
    modinfo = _raw_modinfo(data)
    # A live patch module keeps every symbol in its core kallsyms
    # (kernel/module/kallsyms.c layout_symtab(): is_livepatch_module()); the class
    # is not for it.
    if options.drops(KALLSYMS_DATA, first(modinfo, "name") or "") and not first(modinfo, "livepatch"):
        # Before the split: C then lacks the names too, and the validator, the
        # layout checks in I's wrapper and the policy all see what is loaded.
        try:
            data = without_data_symbol_names(source)
        except MalformedElf:
            data = source
        if data is not source:
            kallsyms_bytes = (layout_of(source, options.rules).core.pages
                              - layout_of(data, options.rules).core.pages) * PAGE_SIZE
    original = read_elf(data)
    decision = _discard(data, original, _decide_load(data, original, options), options)
    if data is source or decision.outcome in ("invalid", "error"):
        # (An invalid split is not loaded: the daemon loads the original as it is.)
        return decision
    return dataclasses.replace(
        decision, discarded=(*decision.discarded, KALLSYMS_DATA), kallsyms_bytes=kallsyms_bytes,
        rewritten=(decision.rewritten or data) if decision.outcome != "split" else None)


def _raw_modinfo(data: bytes) -> list[tuple[str, str]]:
    """The module's .modinfo, read without pyelftools (empty if none)."""
    try:
        modinfo = next((s for s in raw_sections(data) if s.name == ".modinfo"), None)
    except MalformedElf:
        return []
    if modinfo is None:
        return []
    return parse_modinfo(data[modinfo.offset:modinfo.offset + modinfo.size])


def module_name(obj: ElfObject) -> str:
    """The module's name from .modinfo (Kbuild writes name=KBUILD_MODNAME), or ""."""
    modinfo = obj.section(".modinfo")
    return (first(parse_modinfo(modinfo.data), "name") or "") if modinfo is not None else ""


def _discard(data: bytes, original: ElfObject, decision: Decision, options: SplitOptions) -> Decision:
    """*decision* with the classes that apply dropped from what it loads.

    The validator has checked C before: the rewrite touches no loaded byte
    (elf/discard.py), so what it proved still holds. A file the rewriter cannot
    handle is loaded as it is.
    """
    if decision.outcome in ("invalid", "error"):
        return decision
    name = module_name(original)
    btf = original.section(".BTF")
    if not (btf is not None and btf.size and options.drops("btf", name)
            and original.section(BTF_IDS) is None):
        return decision
    names = DISCARD_SECTIONS["btf"]
    # The module's own kernel (its vermagic) sizes what that kernel keeps.
    modinfo = original.section(".modinfo")
    vermagic = (first(parse_modinfo(modinfo.data), "vermagic") or "") if modinfo is not None else ""
    kept = btf_kept_bytes(btf.data, name, kernel=kernel_model(vermagic or options.rules.kernel))
    try:
        if decision.outcome == "split" and decision.split is not None:
            core = without_sections(decision.split.core, names)
            return dataclasses.replace(decision, split=dataclasses.replace(decision.split, core=core),
                                       discarded=("btf",), btf_bytes=kept)
        return dataclasses.replace(decision, rewritten=without_sections(data, names),
                                   discarded=("btf",), btf_bytes=kept)
    except MalformedElf:
        return decision


def _decide_load(data: bytes, original: ElfObject, options: SplitOptions) -> Decision:
    """Two-stage or plain, and why."""
    try:
        split = split_object(original, options.rules)
    except NothingToSplit:
        return Decision("nothing")
    except SplitRefused as exc:
        return Decision("refused", reason=exc.reason, detail=exc.detail)
    # Nothing is loaded that the validator has not checked against the original.
    # I is read once, for the validator and the slab figure below.
    try:
        init = read_elf(split.init)
    except MalformedElf as exc:
        return Decision("invalid", reason=f"unreadable object: {exc}", split=split)
    try:
        report = validate_split(data, split.core, split.init, options.rules,
                                parsed=(original, split.core_object, init))
    except ValidationError as exc:
        return Decision("invalid", reason=str(exc) or type(exc).__name__, split=split)
    if report.reached != split.reached or report.reached_from != split.reached_from:
        # What the daemon checks against the kernel before it loads I must be what
        # the validator proved I reaches.
        return Decision("invalid", reason="the sections I reaches differ from the validator's",
                        split=split)
    rules = options.rules
    plain_pages = module_layout(original, rules).core.pages
    core_pages = (split.core_layout or layout_of(split.core, rules)).core.pages
    init_layout = module_layout(init, rules)
    slab = twostage_slab_bytes(original, split.core_object or read_elf(split.core), init,
                               split.init_name, kallsyms=rules.kallsyms,
                               init_pages=(init_layout.core.pages, init_layout.init.pages))
    refusal = _policy_refusal(original, options, plain_pages=plain_pages, core_pages=core_pages,
                              slab_bytes=slab)
    reason, detail = refusal if refusal else ("", "")
    return Decision("plain" if refusal else "split", reason=reason, detail=detail, split=split,
                    report=report, original=original, init_object=init, plain_core_pages=plain_pages,
                    split_core_pages=core_pages, twostage_slab_bytes=slab)


def _policy_refusal(original: ElfObject, options: SplitOptions, *, plain_pages: int,
                    core_pages: int, slab_bytes: int) -> tuple[str, str] | None:
    """(reason, detail) when the options load this split module plain, else None."""
    sealed = ro_after_init_bytes(original)
    if sealed and not options.writable_ro_after_init:
        return ("two-stage would leave .data..ro_after_init writable (WritableRoAfterInit=no)",
                f"{sealed} bytes that a plain load makes read-only after init")
    page = options.rules.page_size
    # What two-stage gives back net: the core pages it wins, less the slab I leaves.
    net = (plain_pages - core_pages) * page - slab_bytes
    figures = (f"core layout {core_pages} pages two-stage, {plain_pages} plain, "
               f"and {slab_bytes} bytes of slab for the init module")
    if options.two_stage == "when-not-worse" and net < 0:
        return "two-stage would cost more than it frees (TwoStage=when-not-worse)", figures
    if options.two_stage == "when-it-saves" and net < page:
        return "two-stage would free less than a page (TwoStage=when-it-saves)", figures
    return None


def manifest_reason(decision: Decision) -> str:
    """What a manifest (and the journal, for the daemon's plain load) says of a
    module that is not loaded two-stage."""
    if decision.outcome == "nothing":
        return "nothing to split"
    prefix = "refused: " if decision.outcome == "refused" else ""
    return prefix + decision.reason + (f": {decision.detail}" if decision.detail else "")


def layout_figures(decision: Decision, rules: LayoutRules = LayoutRules()) -> dict[str, int]:
    """What the daemon reports per module beside the kernel's own sizes (cache manifest),
    for a decision to split."""
    original, split = decision.original, decision.split
    if original is None or split is None:
        raise ValueError("layout figures need the parsed original and its split")
    return {"plain_core_bytes": module_layout(original, rules).core.size,
            "init_layout_pages": (layout_of(split.init, rules) if decision.init_object is None
                                  else module_layout(decision.init_object, rules)).init.pages,
            "twostage_slab_bytes": decision.twostage_slab_bytes}
