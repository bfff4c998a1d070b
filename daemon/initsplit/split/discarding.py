"""What the Discard= classes take out of a module, as one rewrite of its bytes.

Plain struct parsing (elf/discard.py), no pyelftools: the daemon applies the
classes at boot to modules it loads plain from a runtime entry.
"""

from __future__ import annotations

from collections.abc import Collection

from ..elf.discard import without_data_symbol_names, without_sections
from .policy import DISCARD_SECTIONS

KALLSYMS_DATA = "kallsyms-data"


def without_classes(data: bytes, classes: Collection[str]) -> bytes:
    """*data* without what *classes* drop: the sections of "btf", the data symbol
    names of "kallsyms-data". Raises MalformedElf where it cannot rewrite."""
    if KALLSYMS_DATA in classes:
        data = without_data_symbol_names(data)
    names = [name for what in classes for name in DISCARD_SECTIONS.get(what, ())]
    return without_sections(data, names) if names else data
