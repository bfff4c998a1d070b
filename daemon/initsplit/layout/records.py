"""What a layout model computes: the bytes of each group of one allocation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

PAGE_SIZE = 4096

CORE_GROUPS = ("text", "rodata", "ro_after_init", "data", "kallsyms")
INIT_GROUPS = ("text", "rodata", "data", "kallsyms")


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
    # Section index -> offset from the start of the core layout (the sh_entsize
    # layout_sections() gives it), for every section placed there. On 6.1 the core
    # layout is one allocation, so these offsets hold between any two of them.
    core_offsets: Mapping[int, int] = field(default_factory=dict)

    def core_marks(self) -> tuple[int, int, int, int]:
        """What the kernel stores in core_layout: (text_size, ro_size,
        ro_after_init_size, size), each the end of its group (layout_sections())."""
        text = self.core.group("text")
        ro = text + self.core.group("rodata")
        ro_after_init = ro + self.core.group("ro_after_init")
        return text, ro, ro_after_init, self.core.size

