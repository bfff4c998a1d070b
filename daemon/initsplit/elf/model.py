"""In-memory model of an ELF64 little-endian relocatable object (a kernel module).

Only what the splitter needs is modelled: section headers with their bytes, the one
symbol table, and the RELA relocation tables keyed by the section they patch.
Relocations are kept as parallel arrays, decoded in one pass per table, because a
kernel module tree holds millions of them and per-entry objects are too slow.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

from .constants import (
    SHF_ALLOC,
    SHN_LORESERVE,
    SHN_UNDEF,
    STT_SECTION,
)


class MalformedElf(ValueError):
    """The input is not a well-formed ELF64 relocatable object of the kind we handle."""


@dataclass(slots=True)
class Section:
    index: int
    name: str
    type: int
    flags: int
    addralign: int
    entsize: int
    # The section's bytes as read: a read-only view into the file's bytes, so that
    # a section nobody asks ``data`` of (the relocation and symbol tables, which the
    # reader decodes itself, say) is never copied.
    raw: bytes | memoryview
    size: int
    link: int = 0
    info: int = 0

    @property
    def data(self) -> bytes:
        """The section's bytes, copied out of the file on first use and kept."""
        raw = self.raw
        if not isinstance(raw, bytes):
            raw = self.raw = bytes(raw)
        return raw

    @property
    def is_alloc(self) -> bool:
        return bool(self.flags & SHF_ALLOC)


@dataclass(frozen=True, slots=True)
class Symbol:
    name: str
    value: int
    size: int
    bind: int
    type: int
    other: int
    shndx: int

    @property
    def is_section(self) -> bool:
        return self.type == STT_SECTION

    @property
    def in_section(self) -> bool:
        """True when the symbol is defined relative to a real section."""
        return SHN_UNDEF < self.shndx < SHN_LORESERVE


class Relocation(NamedTuple):
    offset: int
    type: int
    symbol: int
    addend: int


@dataclass(slots=True)
class RelocationTable:
    """The RELA entries that patch one section, as parallel arrays."""

    target: int
    offsets: array = field(default_factory=lambda: array("Q"))
    types: list[int] = field(default_factory=list)
    symbols: list[int] = field(default_factory=list)
    addends: array = field(default_factory=lambda: array("q"))

    def __len__(self) -> int:
        return len(self.offsets)

    def __iter__(self) -> Iterator[Relocation]:
        return map(Relocation, self.offsets, self.types, self.symbols, self.addends)

    def append(self, offset: int, type_: int, symbol: int, addend: int) -> None:
        self.offsets.append(offset)
        self.types.append(type_)
        self.symbols.append(symbol)
        self.addends.append(addend)


@dataclass(slots=True)
class ElfObject:
    sections: list[Section]
    symbols: list[Symbol]
    relocations: dict[int, RelocationTable]
    symtab_index: int
    machine: int
    flags: int = 0
    _by_name: dict[str, Section] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for section in self.sections:
            # First one wins, like the kernel's find_sec() in kernel/module/main.c.
            self._by_name.setdefault(section.name, section)

    def section(self, name: str) -> Section | None:
        return self._by_name.get(name)

    def relocations_for(self, section: Section) -> RelocationTable:
        return self.relocations.get(section.index) or RelocationTable(section.index)
