"""The kernel's module layouts: what the module loader allocates for a module.

A loaded module costs what kernel/module/main.c lays out for it: the core layout,
kept for the module's life (what /proc/modules prints), and the init layout, freed
once its init has run. These models compute both from a .ko's section headers,
mirroring the kernel function by function, one model per supported kernel side by
side: linux61 (Linux 6.1, Debian 12) and linux612 (Linux 6.12, Debian 13). The
splitter's decisions, the daemon's figures and `initsplit analyze` all use them;
nothing here knows about splitting.

    records   Layout and ModuleLayout, the results
    rules     LayoutRules, the kernel configuration a layout depends on
    linux61   module_layout() for Linux 6.1: two allocations (core, init)
    linux612  module_layout() for Linux 6.12: one allocation per module_memory type
    models    which model lays out a module: the kernel it was built for
"""

from __future__ import annotations

import importlib
from typing import Any

from .records import CORE_GROUPS, INIT_GROUPS, PAGE_SIZE, Layout, ModuleLayout
from .rules import LayoutRules, rules_for_tree

__all__ = ["CORE_GROUPS", "INIT_GROUPS", "PAGE_SIZE", "Layout", "LayoutRules", "ModuleLayout",
           "layout_of", "module_layout", "rules_for_tree"]


def __getattr__(name: str) -> Any:
    # The models read ELF files (pyelftools): imported on first use, so that the
    # daemon can take LayoutRules without them (see initsplit/split/__init__.py).
    if name in ("layout_of", "module_layout"):
        return getattr(importlib.import_module(".models", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
