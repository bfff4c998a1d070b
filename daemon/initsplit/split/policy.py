"""What the configuration says about two-stage loads (TwoStage=, WritableRoAfterInit=).

Kept apart from split/decide.py, which applies it: the daemon reads these options
at start, and decide() imports the splitter and the ELF model, which a daemon
with a pre-split cache never needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..layout.rules import LayoutRules

TwoStagePolicy = Literal["when-not-worse", "when-it-saves", "always"]
TWO_STAGE_POLICIES: tuple[TwoStagePolicy, ...] = ("when-not-worse", "when-it-saves", "always")


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

    @property
    def tag(self) -> str:
        """The options a decision depends on, as cache manifests record them: an
        entry made under other options is decided afresh (cache.read_entry)."""
        return f"two-stage={self.two_stage} writable-ro-after-init={'yes' if self.writable_ro_after_init else 'no'}"


DEFAULT_OPTIONS = SplitOptions()
