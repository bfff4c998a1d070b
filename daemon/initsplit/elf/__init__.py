"""A small model of ELF64 relocatable objects: read with pyelftools, decoded in bulk, written back."""

from .model import ElfObject, MalformedElf, Relocation, RelocationTable, Section, Symbol
from .reader import read_elf
from .writer import ObjectBuilder

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
