"""Read a relocatable ELF64 object: headers through pyelftools, tables decoded in bulk."""

from __future__ import annotations

import io
import struct
from array import array
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .constants import (
    ELF64_RELA_SIZE,
    ELF64_SYM_SIZE,
    ELFCLASS64,
    ET_REL,
    SHN_LORESERVE,
    SHN_UNDEF,
    SHT_NOBITS,
    SHT_NULL,
    SHT_REL,
    SHT_RELA,
    SHT_STRTAB,
    SHT_SYMTAB,
)
from .model import ElfObject, MalformedElf, RelocationTable, Section, Symbol

_SYM = struct.Struct("<IBBHQQ")
# The writer pads to each section's alignment, so an absurd sh_addralign from a
# damaged file would make it allocate gigabytes. The Debian 6.1 tree's largest is
# 256; a huge page is far beyond anything a module asks for.
MAX_ALIGN = 1 << 21
# struct module_layout sizes are unsigned int (include/linux/module.h, 6.1): the
# kernel cannot load a section this large, and bounding sizes, symbol values and
# addends keeps every offset the splitter computes inside int64 (array "q").
MAX_SECTION_SIZE = 1 << 32
MAX_ADDEND = 1 << 62


class _StringTable:
    """A string table read in place, in the file's bytes: no copy of the table, and
    each name costs one bytes.find() from its offset, linear in its length."""

    def __init__(self, data: bytes, start: int, size: int) -> None:
        self._data, self._start, self._size = data, start, size

    def name(self, offset: int, what: str) -> str:
        if offset >= self._size and offset != 0:
            raise MalformedElf(f"{what}: name offset {offset} outside its string table")
        start = self._start + offset
        end = self._data.find(b"\0", start, self._start + self._size)
        if end < 0:
            raise MalformedElf(f"{what}: name at {offset} is not NUL-terminated")
        return self._data[start:end].decode("utf-8", "replace")


def read_elf(data: bytes) -> ElfObject:
    """Parse *data* as an ELF64 little-endian ET_REL object.

    Raises MalformedElf for anything that is not such an object or whose tables
    point outside the file; never lets a parser exception of another kind escape.
    """
    try:
        return _read(data)
    except MalformedElf:
        raise
    except (ELFError, struct.error, ValueError, IndexError, KeyError, UnicodeError) as exc:
        raise MalformedElf(f"cannot parse ELF: {exc}") from exc
    except Exception as exc:  # pyelftools' construct layer raises assorted types
        raise MalformedElf(f"cannot parse ELF: {type(exc).__name__}: {exc}") from exc


def _read(data: bytes) -> ElfObject:
    # Sections are views into these bytes until a caller asks for their data: they
    # must not change underneath (a bytearray could), and a copy of them is still
    # a single copy.
    data = bytes(data)
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise MalformedElf("not an ELF file")
    if data[4] != ELFCLASS64 or data[5] != 1:
        raise MalformedElf("not a 64-bit little-endian ELF file")
    elf = ELFFile(io.BytesIO(data))
    if elf.header["e_type"] != "ET_REL":
        raise MalformedElf(f"not a relocatable object (e_type {elf.header['e_type']})")
    if elf.header["e_shentsize"] != 64:
        raise MalformedElf("unexpected section header size")
    shnum = elf.num_sections()
    if shnum == 0 or shnum >= SHN_LORESERVE:
        raise MalformedElf(f"unsupported section count {shnum}")
    shoff = elf.header["e_shoff"]
    if shoff + shnum * 64 > len(data):
        raise MalformedElf("section headers run past the end of the file")

    sections: list[Section] = []
    symtab_index = -1
    view = memoryview(data).toreadonly()
    headers = [elf.get_section(index).header for index in range(shnum)]
    for index, hdr in enumerate(headers):
        sh_type = hdr["sh_type"]
        type_num = _section_type_number(sh_type)
        offset, size = hdr["sh_offset"], hdr["sh_size"]
        if size >= MAX_SECTION_SIZE:
            raise MalformedElf(f"section {index}: size {size} is beyond what the kernel loads")
        if type_num not in (SHT_NOBITS, SHT_NULL) and offset + size > len(data):
            raise MalformedElf(f"section {index} runs past the end of the file")
        body = b"" if type_num in (SHT_NOBITS, SHT_NULL) else view[offset : offset + size]
        align = hdr["sh_addralign"]
        if align & (align - 1) or align > MAX_ALIGN:
            raise MalformedElf(f"section {index}: alignment {align} is not a power of two up to {MAX_ALIGN}")
        if hdr["sh_link"] >= shnum and type_num in (SHT_SYMTAB, SHT_RELA, SHT_REL):
            raise MalformedElf(f"section {index} links to missing section {hdr['sh_link']}")
        sections.append(
            Section(
                index=index,
                name="",
                type=type_num,
                flags=hdr["sh_flags"],
                addralign=hdr["sh_addralign"],
                entsize=hdr["sh_entsize"],
                raw=body,
                size=size,
                link=hdr["sh_link"],
                info=hdr["sh_info"],
            )
        )
        if type_num == SHT_SYMTAB:
            if symtab_index >= 0:
                raise MalformedElf("more than one symbol table")
            symtab_index = index

    shstrndx = elf.header["e_shstrndx"]
    if not 0 < shstrndx < shnum or sections[shstrndx].type != SHT_STRTAB:
        raise MalformedElf("bad section name table index")
    names = _string_table(data, headers[shstrndx])
    for section, hdr in zip(sections, headers):
        section.name = names.name(hdr["sh_name"], "section")
    if sections[0].type != SHT_NULL:
        raise MalformedElf("section 0 is not SHT_NULL")
    if symtab_index < 0:
        raise MalformedElf("no symbol table")

    symbols = _read_symbols(data, headers, sections, symtab_index)
    relocations: dict[int, RelocationTable] = {}
    for section in sections:
        if section.type == SHT_REL:
            raise MalformedElf(f"{section.name}: REL relocations are not used on x86-64")
        if section.type != SHT_RELA:
            continue
        if section.link != symtab_index:
            raise MalformedElf(f"{section.name}: relocations against a foreign symbol table")
        if not 0 < section.info < shnum:
            raise MalformedElf(f"{section.name}: patches missing section {section.info}")
        if section.info in relocations:
            raise MalformedElf(f"{section.name}: second relocation table for one section")
        relocations[section.info] = _read_relocations(section, len(symbols))

    return ElfObject(
        sections=sections,
        symbols=symbols,
        relocations=relocations,
        symtab_index=symtab_index,
        machine=elf.header["e_machine"] == "EM_X86_64" and 62 or -1,
        flags=elf.header["e_flags"],
    )


_SECTION_TYPES = {
    "SHT_NULL": 0, "SHT_PROGBITS": 1, "SHT_SYMTAB": 2, "SHT_STRTAB": 3, "SHT_RELA": 4,
    "SHT_HASH": 5, "SHT_DYNAMIC": 6, "SHT_NOTE": 7, "SHT_NOBITS": 8, "SHT_REL": 9,
    "SHT_SHLIB": 10, "SHT_DYNSYM": 11, "SHT_INIT_ARRAY": 14, "SHT_FINI_ARRAY": 15,
    "SHT_PREINIT_ARRAY": 16, "SHT_GROUP": 17, "SHT_SYMTAB_SHNDX": 18,
}


def _section_type_number(sh_type: object) -> int:
    # pyelftools decodes known types to names and leaves unknown ones as ints.
    if isinstance(sh_type, int):
        return sh_type
    try:
        return _SECTION_TYPES[str(sh_type)]
    except KeyError:
        raise MalformedElf(f"unsupported section type {sh_type}") from None


def _string_table(data: bytes, hdr: Any) -> _StringTable:
    return _StringTable(data, hdr["sh_offset"], hdr["sh_size"])


def _read_symbols(data: bytes, headers: list[Any], sections: list[Section],
                  symtab_index: int) -> list[Symbol]:
    symtab = sections[symtab_index]
    if symtab.size % ELF64_SYM_SIZE:
        raise MalformedElf("symbol table size is not a multiple of the entry size")
    if not 0 < symtab.link < len(sections) or sections[symtab.link].type != SHT_STRTAB:
        raise MalformedElf("symbol table does not link to a string table")
    strtab = _string_table(data, headers[symtab.link])
    shnum = len(sections)
    symbols: list[Symbol] = []
    for st_name, st_info, st_other, st_shndx, st_value, st_size in _SYM.iter_unpack(symtab.raw):
        if shnum <= st_shndx < SHN_LORESERVE:
            raise MalformedElf(f"symbol {len(symbols)} in missing section {st_shndx}")
        if SHN_UNDEF < st_shndx < SHN_LORESERVE and st_value > sections[st_shndx].size:
            raise MalformedElf(f"symbol {len(symbols)} lies beyond the end of its section")
        symbols.append(
            Symbol(
                name=strtab.name(st_name, "symbol") if st_name else "",
                value=st_value,
                size=st_size,
                bind=st_info >> 4,
                type=st_info & 0xF,
                other=st_other,
                shndx=st_shndx,
            )
        )
    if not symbols:
        raise MalformedElf("empty symbol table")
    return symbols


def _read_relocations(section: Section, symbol_count: int) -> RelocationTable:
    if section.size % ELF64_RELA_SIZE:
        raise MalformedElf(f"{section.name}: size is not a multiple of the RELA entry size")
    words = array("Q")
    words.frombytes(section.raw)
    signed = array("q")
    signed.frombytes(section.raw)
    infos = words[1::3]
    symbols = [info >> 32 for info in infos]
    if symbols and max(symbols) >= symbol_count:
        raise MalformedElf(f"{section.name}: relocation names a missing symbol")
    addends = signed[2::3]
    if addends and not -MAX_ADDEND < min(addends) <= max(addends) < MAX_ADDEND:
        raise MalformedElf(f"{section.name}: absurd relocation addend")
    return RelocationTable(
        target=section.info,
        offsets=words[0::3],
        types=[info & 0xFFFFFFFF for info in infos],
        symbols=symbols,
        addends=addends,
    )
