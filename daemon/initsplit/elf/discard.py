"""Drop sections the kernel keeps for a module's life but the module does not need.

A rewritten copy of a .ko, byte for byte the original except that the named
sections are emptied: their bytes leave the file and their section headers stay,
with size 0, so that no section index changes (the symbol table, the relocation
tables and every sh_link/sh_info stay valid as they are). The kernel then finds
the section (kernel/module/main.c find_module_sections(): any_section_objs(info,
".BTF", 1, &mod->btf_data_size) reads sh_size) with nothing in it, and
kernel/bpf/btf.c btf_module_notify() returns early for btf_data_size == 0.

Only sections that are not loaded may go (no SHF_ALLOC: the kernel copies them
from the temporary image, and nothing points into them) and that no relocation
table patches. The appended module signature goes too: it signs the original's
bytes and no longer matches (kernel/module/signing.c mod_verify_sig()).

Plain struct parsing, no pyelftools: the daemon rewrites modules at boot.
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from dataclasses import dataclass

from .constants import (
    ELF64_SHDR_SIZE,
    ELF64_SYM_SIZE,
    ELFCLASS64,
    ELFDATA2LSB,
    ET_REL,
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHT_NOBITS,
    SHT_REL,
    SHT_RELA,
    SHT_SYMTAB,
)
from ..modsig import MODULE_SIG_STRING, MODULE_SIGNATURE
from .model import MalformedElf

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")


@dataclass(frozen=True, slots=True)
class RawSection:
    """One section header as the file has it."""

    index: int
    name: str
    type: int
    flags: int
    offset: int
    size: int
    link: int
    info: int

    @property
    def file_bytes(self) -> int:
        """Bytes the section occupies in the file (none for SHT_NOBITS)."""
        return 0 if self.type == SHT_NOBITS else self.size


def signature_length(data: bytes) -> int:
    """Bytes of the appended module signature at the end of *data*, 0 if unsigned.

    kernel/module/signing.c module_sig_check(): the marker, then mod_verify_sig()
    reads struct module_signature just before it and sig_len bytes before that.
    """
    if not data.endswith(MODULE_SIG_STRING):
        return 0
    end = len(data) - len(MODULE_SIG_STRING)
    if end < MODULE_SIGNATURE.size:
        raise MalformedElf("module signature marker without a signature")
    *_, sig_len = MODULE_SIGNATURE.unpack_from(data, end - MODULE_SIGNATURE.size)
    total = sig_len + MODULE_SIGNATURE.size + len(MODULE_SIG_STRING)
    if total > len(data):
        raise MalformedElf(f"module signature of {sig_len} bytes is longer than the file")
    return total


def sections(data: bytes) -> list[RawSection]:
    """The section headers of the ELF64 little-endian relocatable object in *data*."""
    if len(data) < _EHDR.size:
        raise MalformedElf("shorter than an ELF header")
    (ident, e_type, _machine, _version, _entry, _phoff, e_shoff, _flags, _ehsize, _phentsize,
     _phnum, e_shentsize, e_shnum, e_shstrndx) = _EHDR.unpack_from(data)
    if ident[:4] != b"\x7fELF" or ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        raise MalformedElf("not an ELF64 little-endian file")
    if e_type != ET_REL:
        raise MalformedElf("not a relocatable object")
    if e_shentsize != ELF64_SHDR_SIZE or not e_shnum or e_shstrndx >= e_shnum:
        raise MalformedElf("unusable section header table")
    if e_shoff + e_shnum * ELF64_SHDR_SIZE > len(data):
        raise MalformedElf("section header table beyond the end of the file")
    headers = [_SHDR.unpack_from(data, e_shoff + i * ELF64_SHDR_SIZE) for i in range(e_shnum)]
    for i, (_, sh_type, _, _, offset, size, *_) in enumerate(headers):
        if sh_type != SHT_NOBITS and offset + size > len(data):
            raise MalformedElf(f"section {i} extends beyond the end of the file")
    _, _, _, _, str_offset, str_size, *_ = headers[e_shstrndx]
    strtab = data[str_offset:str_offset + str_size]
    out = []
    for i, (name, sh_type, flags, _addr, offset, size, link, info, _align, _entsize) in enumerate(headers):
        end = strtab.find(b"\0", name)
        if name >= len(strtab) or end < 0:
            raise MalformedElf(f"section {i} has a name outside the section name table")
        out.append(RawSection(i, strtab[name:end].decode(errors="replace"), sh_type, flags,
                              offset, size, link, info))
    return out


def without_sections(data: bytes, names: Collection[str]) -> bytes:
    """*data* with the named sections emptied and its signature dropped.

    Raises MalformedElf for a file this cannot rewrite safely: a named section
    that is loaded (SHF_ALLOC), patched by a relocation table, or shares bytes
    with another section or the section header table. Returns *data* unchanged
    when none of the names is there with bytes in it (and then keeps the
    signature too). The result is checked against *data* before it is returned:
    every other section's header and bytes are the same.
    """
    try:
        return _without_sections(data, names)
    except struct.error as exc:  # a header that points outside the file
        raise MalformedElf(f"cannot rewrite: {exc}") from None


def _without_sections(data: bytes, names: Collection[str]) -> bytes:
    table = sections(data)
    drop = [s for s in table if s.name in names and s.index and s.file_bytes]
    if not drop:
        return data
    body_end = len(data) - signature_length(data)
    e_shoff = _EHDR.unpack_from(data)[6]
    shdr_end = e_shoff + len(table) * ELF64_SHDR_SIZE
    if shdr_end > body_end:
        raise MalformedElf("the section header table overlaps the module signature")
    for section in drop:
        if section.flags & SHF_ALLOC:
            raise MalformedElf(f"{section.name} is loaded (SHF_ALLOC): not dropped")
        if any(s.type in (SHT_REL, SHT_RELA) and s.info == section.index for s in table):
            raise MalformedElf(f"{section.name} has relocations: not dropped")
        if any(s.link == section.index for s in table):
            raise MalformedElf(f"another section links to {section.name}: not dropped")
        end = section.offset + section.size
        if end > body_end or (section.offset < shdr_end and e_shoff < end) or section.offset < _EHDR.size:
            raise MalformedElf(f"{section.name} overlaps the ELF header, the section headers "
                               "or the signature")
        for other in table:
            if other is not section and other.file_bytes and \
                    other.offset < end and section.offset < other.offset + other.file_bytes:
                raise MalformedElf(f"{section.name} shares bytes with {other.name}")
    # What is cut keeps every later offset where it was modulo the largest
    # alignment that follows (8 at least: the symbol, relocation and section
    # header tables are read in place), so nothing ends up misaligned.
    cuts = []
    for section in sorted(drop, key=lambda s: s.offset):
        later = [s.addralign for s in _aligns(data, table) if s.offset >= section.offset + section.size]
        align = min(max([8, *later]), 4096)
        length = section.size - section.size % align
        cuts.append((section.offset, section.offset + length))

    def moved(offset: int) -> int:
        """Where a byte at *offset* of the original lands in the rewritten file."""
        return offset - sum(min(end, offset) - start for start, end in cuts if start < offset)

    out = bytearray()
    previous = 0
    for start, end in cuts:
        out += data[previous:start]
        previous = end
    out += data[previous:body_end]
    new_shoff = moved(e_shoff)
    struct.pack_into("<Q", out, 0x28, new_shoff)  # e_shoff
    dropped = {s.index for s in drop}
    for section in table:
        at = new_shoff + section.index * ELF64_SHDR_SIZE
        # sh_offset is at byte 24 of an Elf64_Shdr, sh_size at byte 32.
        struct.pack_into("<Q", out, at + 24, moved(section.offset))
        if section.index in dropped:
            struct.pack_into("<Q", out, at + 32, 0)
    result = bytes(out)
    _check_rewrite(data, table, result, dropped)
    return result


@dataclass(frozen=True, slots=True)
class _Aligned:
    offset: int
    addralign: int


def _aligns(data: bytes, table: list[RawSection]) -> list[_Aligned]:
    e_shoff = _EHDR.unpack_from(data)[6]
    out = [_Aligned(e_shoff, 8)]
    for s in table:
        if s.file_bytes:
            align = struct.unpack_from("<Q", data, e_shoff + s.index * ELF64_SHDR_SIZE + 48)[0]
            out.append(_Aligned(s.offset, align or 1))
    return out


def _addr_align_entsize(data: bytes, index: int) -> tuple[int, int, int]:
    """sh_addr, sh_addralign and sh_entsize of section *index*."""
    at = _EHDR.unpack_from(data)[6] + index * ELF64_SHDR_SIZE
    (addr,) = struct.unpack_from("<Q", data, at + 16)
    align, entsize = struct.unpack_from("<QQ", data, at + 48)
    return addr, align, entsize


def _check_rewrite(data: bytes, before: list[RawSection], result: bytes, dropped: set[int]) -> None:
    """The rewrite changed nothing but the dropped sections: the same headers (but
    for the offsets) and the same bytes for every other section. What a validator
    proved of *data* then holds for *result*, which the kernel loads instead."""
    after = sections(result)
    if len(after) != len(before):
        raise MalformedElf("rewrite check: the section count changed")
    for old, new in zip(before, after):
        if (old.name, old.type, old.flags, old.link, old.info) != (new.name, new.type, new.flags, new.link, new.info) \
                or _addr_align_entsize(data, old.index) != _addr_align_entsize(result, new.index):
            raise MalformedElf(f"rewrite check: {old.name}'s header changed")
        if old.index in dropped:
            if new.size:
                raise MalformedElf(f"rewrite check: {old.name} still has bytes")
            continue
        if new.size != old.size or (old.file_bytes and
                                    result[new.offset:new.offset + new.size] != data[old.offset:old.offset + old.size]):
            raise MalformedElf(f"rewrite check: {old.name}'s bytes changed")
    if result[:0x28] != data[:0x28] or result[0x30:_EHDR.size] != data[0x30:_EHDR.size]:
        raise MalformedElf("rewrite check: the ELF header changed")


# Sections whose symbols never reach the core kallsyms whatever their flags:
# kernel/module/main.c rewrite_section_headers() clears SHF_ALLOC of these.
_NEVER_LOADED = (".modinfo", "__versions")
PERCPU = ".data..percpu"


def data_symbols(data: bytes) -> list[int]:
    """Indices of the symbols the core kallsyms keeps only under CONFIG_KALLSYMS_ALL.

    kernel/module/kallsyms.c is_core_symbol() (6.1) keeps a named, defined symbol
    of a core section when the section is executable, or, with KALLSYMS_ALL,
    allocated at all, and the per-cpu section's symbols with KALLSYMS_ALL. These
    are the others: named symbols of allocated, non-executable sections outside
    the init layout (names starting ".init"), and of .data..percpu.
    """
    table = sections(data)
    symtab = next((s for s in table if s.type == SHT_SYMTAB), None)
    if symtab is None or symtab.size % ELF64_SYM_SIZE:
        raise MalformedElf("no usable symbol table")
    out = []
    for i in range(1, symtab.size // ELF64_SYM_SIZE):
        st_name, _info, _other, st_shndx = struct.unpack_from("<IBBH", data, symtab.offset + i * ELF64_SYM_SIZE)
        if not st_name or not 0 < st_shndx < len(table):
            continue
        section = table[st_shndx]
        if section.name == PERCPU or (section.flags & SHF_ALLOC and not section.flags & SHF_EXECINSTR
                                      and not section.name.startswith(".init")
                                      and section.name not in _NEVER_LOADED):
            out.append(i)
    return out


def without_data_symbol_names(data: bytes) -> bytes:
    """*data* with the names of its data symbols (data_symbols()) cleared, and its
    signature dropped: is_core_symbol() skips a symbol without a name, so the core
    kallsyms keeps only the code symbols, as without CONFIG_KALLSYMS_ALL.

    Only st_name changes, in the symbol table (not loaded): every relocation still
    names the same symbol index, every loaded byte is the same. Returns *data*
    unchanged when it has no such symbol. Raises MalformedElf for a file this cannot
    rewrite.
    """
    try:
        indices = data_symbols(data)
        if not indices:
            return data
        table = sections(data)
        symtab = next(s for s in table if s.type == SHT_SYMTAB)
        out = bytearray(data[:len(data) - signature_length(data)])
        for i in indices:
            struct.pack_into("<I", out, symtab.offset + i * ELF64_SYM_SIZE, 0)
    except struct.error as exc:
        raise MalformedElf(f"cannot rewrite: {exc}") from None
    return bytes(out)
