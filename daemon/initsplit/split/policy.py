"""What the configuration says about two-stage loads (TwoStage=, WritableRoAfterInit=).

Kept apart from split/decide.py, which applies it: the daemon reads these options
at start, and decide() imports the splitter and the ELF model, which a daemon
with a pre-split cache never needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..modfile import canonical_name

from ..layout.rules import LayoutRules

TwoStagePolicy = Literal["when-not-worse", "when-it-saves", "always"]
TWO_STAGE_POLICIES: tuple[TwoStagePolicy, ...] = ("when-not-worse", "when-it-saves", "always")
# Discard= classes: what is dropped from every module the daemon loads, core
# modules and plain loads alike (elf/discard.py). "btf" (the default): .BTF (and
# .BTF.base), which the kernel copies and keeps for the module's life
# (layout/btf.py). "kallsyms-data" (opt-in): the names of the module's data
# symbols, which CONFIG_KALLSYMS_ALL keeps in the core layout for the module's
# life; /proc/kallsyms then lists its code symbols only (see README).
DISCARD_CLASSES = ("btf", "kallsyms-data")
# The sections of each class.
DISCARD_SECTIONS = {"btf": (".BTF", ".BTF.base")}
# A module with BTF ids registers kfuncs or BTF-typed hooks from its init
# (register_btf_kfunc_id_set()): it keeps its BTF.
BTF_IDS = ".BTF_ids"


@dataclass(frozen=True, slots=True)
class SplitOptions:
    """Which modules are loaded two-stage (split/decide.py applies these)."""

    # TwoStage=: when-not-worse (C takes no more core pages than the plain load),
    # when-it-saves (at least one page fewer) or always (every valid split).
    two_stage: TwoStagePolicy = "when-not-worse"
    # WritableRoAfterInit=: split modules with .data..ro_after_init too, which
    # leaves that data writable for the module's life.
    writable_ro_after_init: bool = False
    # The target kernel's layout rules (its configuration); not part of the tag:
    # a cache is made for one kernel, whose configuration does not change.
    rules: LayoutRules = LayoutRules()
    # Discard=: the classes dropped (DISCARD_CLASSES).
    discard: frozenset[str] = frozenset({"btf"})
    # KeepBTF=: modules (kernel spelling, "_") that keep their BTF.
    keep_btf: frozenset[str] = frozenset()

    def drops(self, what: str, module: str) -> bool:
        """Whether class *what* is dropped from *module*."""
        if what not in self.discard:
            return False
        return not (what == "btf" and canonical_name(module) in self.keep_btf)

    @property
    def tag(self) -> str:
        """The options the two-stage decision depends on, as cache manifests record
        them: an entry made under others is decided afresh (cache.read_entry).

        The BTF class is not part of it: a manifest says what its files lack
        (Manifest.discarded), and a daemon that wants a module's BTF kept (KeepBTF=,
        initsplit.btf=keep) loads the original plain instead of an entry without it
        (daemon/splits.py), rather than splitting again at boot. kallsyms-data is:
        it is applied before the split, so an entry made without it would be used
        without it.
        """
        tag = (f"two-stage={self.two_stage} "
               f"writable-ro-after-init={'yes' if self.writable_ro_after_init else 'no'}")
        if "kallsyms-data" in self.discard:
            tag += " discard=kallsyms-data"
        return tag

    def accepts(self, discarded: str, module: str) -> bool:
        """Whether files that lack the classes in *discarded* ("btf", "") may be loaded
        for *module*: none of them is one these options keep."""
        return all(self.drops(what, module) for what in discarded.split(",") if what)


DEFAULT_OPTIONS = SplitOptions()
