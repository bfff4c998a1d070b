"""Write ELF64 relocatable objects (the part no library we depend on provides).

The builder takes sections, symbols and relocations in any order and lays them
out the way the kernel's module loader expects (kernel/module/main.c,
elf_validity_check): one SHT_SYMTAB linked to its SHT_STRTAB, locals before
globals, one SHT_RELA per patched section linked to the symbol table, and the
section name table named by e_shstrndx.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass
from typing import Iterable

from .constants import (
    ELF64_EHDR_SIZE,
    ELF64_RELA_SIZE,
    ELF64_SHDR_SIZE,
    ELF64_SYM_SIZE,
    EM_X86_64,
    ET_REL,
    SHF_INFO_LINK,
    SHN_LORESERVE,
    SHN_UNDEF,
    SHT_NOBITS,
    SHT_NULL,
    SHT_RELA,
    SHT_STRTAB,
    SHT_SYMTAB,
    STB_LOCAL,
    STT_SECTION,
)

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")


@dataclass(slots=True)
class _OutSection:
    name: str
    type: int
    flags: int
    addralign: int
    entsize: int
    data: bytes
    size: int
    link: int = 0
    info: int = 0


@dataclass(slots=True)
class _OutSymbol:
    name: str
    value: int
    size: int
    bind: int
    type: int
    other: int
    # An output section index (from add_section) or a special index (SHN_UNDEF, SHN_ABS).
    shndx: int


class _StringTable:
    def __init__(self) -> None:
        self._blob = bytearray(b"\0")
        self._index: dict[str, int] = {"": 0}

    def add(self, text: str) -> int:
        offset = self._index.get(text)
        if offset is None:
            offset = len(self._blob)
            self._blob += text.encode() + b"\0"
            self._index[text] = offset
        return offset

    def bytes(self) -> bytes:
        return bytes(self._blob)


class ObjectBuilder:
    """Collects the parts of a relocatable object and serialises it."""

    def __init__(self, *, machine: int = EM_X86_64, flags: int = 0) -> None:
        self._machine = machine
        self._flags = flags
        self._sections: list[_OutSection] = [_OutSection("", SHT_NULL, 0, 0, 0, b"", 0)]
        self._symbols: list[_OutSymbol] = [_OutSymbol("", 0, 0, 0, 0, 0, SHN_UNDEF)]
        self._relocs: dict[int, tuple[array, list[int], list[int], array]] = {}
        self._section_symbols: dict[int, int] = {}

    # -- sections ---------------------------------------------------------
    def add_section(
        self,
        name: str,
        *,
        type: int,
        flags: int,
        data: bytes = b"",
        size: int | None = None,
        addralign: int = 1,
        entsize: int = 0,
    ) -> int:
        """Add a section and return its index in the output."""
        if type == SHT_NOBITS:
            data = b""
            if size is None:
                raise ValueError("NOBITS section needs a size")
        else:
            size = len(data)
        self._sections.append(_OutSection(name, type, flags, addralign, entsize, bytes(data), size))
        return len(self._sections) - 1

    def section_name(self, index: int) -> str:
        return self._sections[index].name

    # -- symbols ----------------------------------------------------------
    def add_symbol(
        self,
        name: str,
        *,
        value: int = 0,
        size: int = 0,
        bind: int,
        type: int,
        shndx: int,
        other: int = 0,
    ) -> int:
        """Add a symbol and return a handle that relocations refer to."""
        self._symbols.append(_OutSymbol(name, value, size, bind, type, other, shndx))
        return len(self._symbols) - 1

    def section_symbol(self, section: int) -> int:
        """The STT_SECTION symbol of output section *section* (made on first use)."""
        handle = self._section_symbols.get(section)
        if handle is None:
            handle = self._section_symbols[section] = self.add_symbol(
                "", bind=STB_LOCAL, type=STT_SECTION, shndx=section)
        return handle

    # -- relocations ------------------------------------------------------
    def add_relocations(
        self,
        target: int,
        offsets: Iterable[int],
        types: Iterable[int],
        symbols: Iterable[int],
        addends: Iterable[int],
    ) -> None:
        """Append relocations patching output section *target* (symbols are handles)."""
        entry = self._relocs.get(target)
        if entry is None:
            entry = self._relocs[target] = (array("Q"), [], [], array("q"))
        entry[0].extend(offsets)
        entry[1].extend(types)
        entry[2].extend(symbols)
        entry[3].extend(addends)

    def add_relocation(self, target: int, offset: int, type: int, symbol: int, addend: int) -> None:
        self.add_relocations(target, (offset,), (type,), (symbol,), (addend,))

    # -- output -----------------------------------------------------------
    def build(self) -> bytes:
        sections = list(self._sections)
        strtab = _StringTable()

        # Locals first: ELF requires it and the kernel's symtab sh_info relies on it.
        order = [0] + [i for i in range(1, len(self._symbols)) if self._symbols[i].bind == STB_LOCAL]
        first_global = len(order)
        order += [i for i in range(1, len(self._symbols)) if self._symbols[i].bind != STB_LOCAL]
        final_index = [0] * len(self._symbols)
        for new, old in enumerate(order):
            final_index[old] = new
        symtab_blob = bytearray()
        for old in order:
            sym = self._symbols[old]
            symtab_blob += _SYM.pack(
                strtab.add(sym.name) if sym.name else 0,
                (sym.bind << 4) | (sym.type & 0xF),
                sym.other,
                sym.shndx,
                sym.value & 0xFFFFFFFFFFFFFFFF,
                sym.size,
            )

        symtab_index = len(sections)
        sections.append(
            _OutSection(".symtab", SHT_SYMTAB, 0, 8, ELF64_SYM_SIZE, bytes(symtab_blob),
                        len(symtab_blob), link=symtab_index + 1, info=first_global)
        )
        strtab_blob = strtab.bytes()
        sections.append(_OutSection(".strtab", SHT_STRTAB, 0, 1, 0, strtab_blob, len(strtab_blob)))

        for target in sorted(self._relocs):
            offsets, types, symbols, addends = self._relocs[target]
            words = array("Q")
            for offset, type_, symbol, addend in zip(offsets, types, symbols, addends):
                words.append(offset)
                words.append((final_index[symbol] << 32) | type_)
                words.append(addend & 0xFFFFFFFFFFFFFFFF)
            blob = words.tobytes()
            sections.append(
                _OutSection(".rela" + self._sections[target].name, SHT_RELA, SHF_INFO_LINK, 8,
                            ELF64_RELA_SIZE, blob, len(blob), link=symtab_index, info=target)
            )

        shstrtab = _StringTable()
        name_offsets = [shstrtab.add(s.name) for s in sections]
        shstrndx = len(sections)
        name_offsets.append(shstrtab.add(".shstrtab"))
        shstr_blob = shstrtab.bytes()
        sections.append(_OutSection(".shstrtab", SHT_STRTAB, 0, 1, 0, shstr_blob, len(shstr_blob)))
        if len(sections) >= SHN_LORESERVE:
            raise ValueError("too many sections for a plain ELF header")

        out = bytearray(ELF64_EHDR_SIZE)
        offsets: list[int] = []
        for section in sections:
            align = max(section.addralign, 1)
            if section.type in (SHT_NOBITS, SHT_NULL):
                offsets.append(len(out) if section.type == SHT_NOBITS else 0)
                continue
            out += bytes(-len(out) % align)
            offsets.append(len(out))
            out += section.data
        out += bytes(-len(out) % 8)
        shoff = len(out)
        for section, offset, name in zip(sections, offsets, name_offsets):
            out += _SHDR.pack(name, section.type, section.flags, 0, offset, section.size,
                              section.link, section.info, section.addralign, section.entsize)
        ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
        _EHDR.pack_into(out, 0, ident, ET_REL, self._machine, 1, 0, 0, shoff, self._flags,
                        ELF64_EHDR_SIZE, 0, 0, ELF64_SHDR_SIZE, len(sections), shstrndx)
        return bytes(out)
