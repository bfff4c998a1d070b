"""A small model of ELF64 relocatable objects: read with pyelftools, decoded in bulk, written back.

The reader (pyelftools) and the writer are imported on first use: the daemon uses
model.py and discard.py at boot without splitting anything, and pyelftools costs
most of a second in a slow VM (see initsplit/split/__init__.py).
"""

from __future__ import annotations

import importlib
from typing import Any

from .model import ElfObject, MalformedElf, Relocation, RelocationTable, Section, Symbol

_LAZY = {"read_elf": ".reader", "ObjectBuilder": ".writer"}

__all__ = [
    "ElfObject",
    "MalformedElf",
    "ObjectBuilder",
    "Relocation",
    "RelocationTable",
    "Section",
    "Symbol",
    "read_elf",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
