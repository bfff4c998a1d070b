"""Which layout model lays out a module: the one of the kernel it was built for.

A module can only be loaded by the kernel whose vermagic it carries
(kernel/module/version.c same_magic()), so its own vermagic names the layout
code that will place it. The line between the models is the kernel's:
"module: replace module_layout with module_memory" (ac3b43283923, v6.4) gave
each memory type its own allocation; before it, linux61's core and init layouts,
after it linux612's types.
"""

from __future__ import annotations

from types import ModuleType

from ..elf import ElfObject, read_elf
from ..split.modinfo import first, parse_modinfo
from . import linux61, linux612
from .records import ModuleLayout
from .rules import MODULE_MEMORY_SINCE, LayoutRules, kernel_version


def model_for(obj: ElfObject, rules: LayoutRules = LayoutRules()) -> ModuleType:
    """linux61 or linux612: from the module's vermagic, else the rules' kernel."""
    modinfo = obj.section(".modinfo")
    vermagic = (first(parse_modinfo(modinfo.data), "vermagic") or "") if modinfo is not None else ""
    version = kernel_version(vermagic) or kernel_version(rules.kernel)
    return linux612 if version is not None and version >= MODULE_MEMORY_SINCE else linux61


def module_layout(obj: ElfObject, rules: LayoutRules = LayoutRules(), *,
                  init_resident: bool = False) -> ModuleLayout:
    """The layout the module's own kernel gives *obj* (see model_for())."""
    return model_for(obj, rules).module_layout(obj, rules, init_resident=init_resident)


def layout_of(data: bytes, rules: LayoutRules = LayoutRules(), *,
              init_resident: bool = False) -> ModuleLayout:
    """module_layout() of the module in *data* (raises MalformedElf)."""
    return module_layout(read_elf(data), rules, init_resident=init_resident)
