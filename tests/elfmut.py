"""Byte-level mutations of ELF64 relocatable objects, for the bad-input tests.

Deliberately independent of initsplit.elf: the mutations must be able to produce
objects that our reader would refuse, and must not share its assumptions. Every
mutation returns (description, new bytes); the description is a reproducer.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

EHDR_SHOFF = 0x28
EHDR_SHNUM = 0x3C
EHDR_SHSTRNDX = 0x3E
SHDR_SIZE = 64
SYM_SIZE = 24
RELA_SIZE = 24

SHT_SYMTAB = 2
SHT_RELA = 4
SHT_NOBITS = 8
SHF_WRITE = 0x1
SHF_ALLOC = 0x2
SHF_EXECINSTR = 0x4
# Allocated in the file, but the kernel reads them and never keeps them
# (kernel/module/main.c, rewrite_section_headers).
NOT_LOADED = frozenset({".modinfo", "__versions"})

# Section header fields: name -> (offset in the header, struct format).
SHDR_FIELDS = {
    "sh_name": (0, "<I"),
    "sh_type": (4, "<I"),
    "sh_flags": (8, "<Q"),
    "sh_offset": (24, "<Q"),
    "sh_size": (32, "<Q"),
    "sh_link": (40, "<I"),
    "sh_info": (44, "<I"),
    "sh_addralign": (48, "<Q"),
    "sh_entsize": (56, "<Q"),
}
SYM_FIELDS = {
    "st_name": (0, "<I"),
    "st_info": (4, "<B"),
    "st_other": (5, "<B"),
    "st_shndx": (6, "<H"),
    "st_value": (8, "<Q"),
    "st_size": (16, "<Q"),
}
RELA_FIELDS = {
    "r_offset": (0, "<Q"),
    "r_info": (8, "<Q"),
    "r_addend": (16, "<q"),
}
_MASK = {"<B": 0xFF, "<H": 0xFFFF, "<I": 0xFFFFFFFF, "<Q": 2**64 - 1, "<q": 2**64 - 1}


@dataclass(frozen=True, slots=True)
class Shdr:
    index: int
    at: int  # file offset of the header
    name: str
    type: int
    flags: int
    offset: int
    size: int
    link: int
    info: int


class RawElf:
    """Just enough of an ELF64 LE object to aim mutations at its structures."""

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.shoff = struct.unpack_from("<Q", data, EHDR_SHOFF)[0]
        self.shnum = struct.unpack_from("<H", data, EHDR_SHNUM)[0]
        shstrndx = struct.unpack_from("<H", data, EHDR_SHSTRNDX)[0]
        raw = []
        for index in range(self.shnum):
            at = self.shoff + index * SHDR_SIZE
            name, type_, flags, _addr, offset, size, link, info, _align, _ent = \
                struct.unpack_from("<IIQQQQIIQQ", data, at)
            raw.append((index, at, name, type_, flags, offset, size, link, info))
        names_at, names_size = raw[shstrndx][5], raw[shstrndx][6]
        names = data[names_at:names_at + names_size]
        self.name_offsets: list[int] = [r[2] for r in raw]
        self.sections = [
            Shdr(index, at, names[name:names.index(b"\0", name)].decode(), type_, flags, offset,
                 size, link, info)
            for index, at, name, type_, flags, offset, size, link, info in raw
        ]

    def section(self, name: str) -> Shdr | None:
        return next((s for s in self.sections if s.name == name), None)

    @property
    def symtab(self) -> Shdr:
        return next(s for s in self.sections if s.type == SHT_SYMTAB)

    @property
    def symbol_count(self) -> int:
        return self.symtab.size // SYM_SIZE

    def symbol(self, index: int) -> dict[str, int]:
        at = self.symtab.offset + index * SYM_SIZE
        return {f: struct.unpack_from(fmt, self.data, at + off)[0] for f, (off, fmt) in SYM_FIELDS.items()}

    def relas(self, *, alloc_target: bool | None = None) -> list[Shdr]:
        out = []
        for s in self.sections:
            if s.type != SHT_RELA or s.size < RELA_SIZE or s.info >= self.shnum:
                continue
            if alloc_target is not None and bool(self.sections[s.info].flags & SHF_ALLOC) != alloc_target:
                continue
            out.append(s)
        return out

    def rela(self, section: Shdr, entry: int) -> tuple[int, int, int, int]:
        offset, info, addend = struct.unpack_from("<QQq", self.data, section.offset + entry * RELA_SIZE)
        return offset, info >> 32, info & 0xFFFFFFFF, addend

    def alloc_with_bytes(self) -> list[Shdr]:
        return [s for s in self.sections
                if s.flags & SHF_ALLOC and s.type != SHT_NOBITS and s.size > 0]


def put(data: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value & _MASK[fmt] if fmt != "<q" else _signed(value))
    return bytes(out)


def _signed(value: int) -> int:
    value &= 2**64 - 1
    return value - 2**64 if value >= 2**63 else value


def flip(data: bytes, at: int, mask: int) -> bytes:
    out = bytearray(data)
    out[at] ^= mask or 1
    return bytes(out)


def odd_values(fmt: str, *, size: int, count: int, current: int) -> list[int]:
    """Values that have broken parsers before: edges, counts, sizes, off-by-ones."""
    common = [0, 1, current + 1, current - 1, current ^ 0x80, count - 1, count, count + 1]
    if fmt == "<B":
        return common + [0x0F, 0xF0, 0xFF]
    if fmt == "<H":
        return common + [0xFF00, 0xFFF1, 0xFFF2, 0xFFFF, 0x7FFF]
    if fmt == "<I":
        return common + [0xFF00, 0xFFF1, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, size, size - 1]
    return common + [7, size - 1, size, size + 1, size // 2, 2**31, 2**32, 2**32 - 1,
                     2**63 - 1, 2**63, 2**64 - 1, 2**64 - 24]


class Mutator:
    """Random but reproducible structural damage to one ELF object."""

    def __init__(self, data: bytes, rng: random.Random) -> None:
        self.data = bytes(data)
        self.elf = RawElf(data)
        self.rng = rng

    def kinds(self) -> list:
        return [
            self.truncate, self.flip_ehdr, self.flip_shdrs, self.flip_symtab, self.flip_rela,
            self.flip_alloc_body, self.zero_range, self.shdr_field, self.sym_field, self.rela_field,
            self.rela_info, self.duplicate_section, self.ehdr_field, self.rename_section,
            self.swap_shdrs, self.modinfo_edit,
        ]

    def any(self) -> tuple[str, bytes]:
        return self.rng.choice(self.kinds())()

    # ------------------------------------------------------------ whole file
    def truncate(self) -> tuple[str, bytes]:
        at = self.rng.randrange(len(self.data))
        return f"truncate at {at}", self.data[:at]

    def zero_range(self) -> tuple[str, bytes]:
        start = self.rng.randrange(len(self.data))
        length = self.rng.choice([1, 8, 24, 64, 256, 4096])
        out = bytearray(self.data)
        end = min(len(out), start + length)
        out[start:end] = bytes(end - start)
        return f"zero [{start}, {end})", bytes(out)

    def _flip_in(self, what: str, start: int, size: int, count: int = 0) -> tuple[str, bytes]:
        out = self.data
        spots = []
        for _ in range(count or self.rng.randint(1, 4)):
            at = start + self.rng.randrange(max(1, size))
            mask = self.rng.randrange(1, 256)
            if at < len(out):
                out = flip(out, at, mask)
                spots.append(f"{at}^{mask:#x}")
        return f"flip {what} bytes {', '.join(spots)}", out

    def flip_ehdr(self) -> tuple[str, bytes]:
        return self._flip_in("ELF header", 0, 64, 1)

    def flip_shdrs(self) -> tuple[str, bytes]:
        return self._flip_in("section header", self.elf.shoff, self.elf.shnum * SHDR_SIZE)

    def flip_symtab(self) -> tuple[str, bytes]:
        s = self.elf.symtab
        return self._flip_in("symtab", s.offset, s.size)

    def flip_rela(self) -> tuple[str, bytes]:
        s = self.rng.choice(self.elf.relas())
        return self._flip_in(f"{s.name}", s.offset, s.size)

    def flip_alloc_body(self) -> tuple[str, bytes]:
        s = self.rng.choice(self.elf.alloc_with_bytes())
        return self._flip_in(f"{s.name} body", s.offset, s.size)

    # ----------------------------------------------------------------- fields
    def shdr_field(self) -> tuple[str, bytes]:
        s = self.rng.choice(self.elf.sections)
        field = self.rng.choice(list(SHDR_FIELDS))
        off, fmt = SHDR_FIELDS[field]
        current = struct.unpack_from(fmt, self.data, s.at + off)[0]
        value = self.rng.choice(odd_values(fmt, size=len(self.data), count=self.elf.shnum,
                                           current=current))
        return f"section {s.index} ({s.name}) {field} = {value:#x}", put(self.data, s.at + off, fmt, value)

    def sym_field(self) -> tuple[str, bytes]:
        index = self.rng.randrange(self.elf.symbol_count)
        field = self.rng.choice(list(SYM_FIELDS))
        off, fmt = SYM_FIELDS[field]
        at = self.elf.symtab.offset + index * SYM_SIZE + off
        current = struct.unpack_from(fmt, self.data, at)[0]
        values = odd_values(fmt, size=len(self.data), count=self.elf.shnum, current=current)
        if field == "st_shndx":
            values += [s.index for s in self.elf.sections if s.name.startswith(".init")]
        value = self.rng.choice(values)
        return f"symbol {index} {field} = {value:#x}", put(self.data, at, fmt, value)

    def rela_field(self) -> tuple[str, bytes]:
        s = self.rng.choice(self.elf.relas())
        entry = self.rng.randrange(s.size // RELA_SIZE)
        field = self.rng.choice(list(RELA_FIELDS))
        off, fmt = RELA_FIELDS[field]
        at = s.offset + entry * RELA_SIZE + off
        current = struct.unpack_from(fmt, self.data, at)[0]
        target_size = self.elf.sections[s.info].size if s.info < self.elf.shnum else 0
        values = odd_values(fmt, size=target_size, count=self.elf.symbol_count, current=current)
        value = self.rng.choice(values)
        return f"{s.name}[{entry}] {field} = {value:#x}", put(self.data, at, fmt, value)

    def rela_info(self) -> tuple[str, bytes]:
        """r_info split in its two halves: symbol index and relocation type."""
        s = self.rng.choice(self.elf.relas())
        entry = self.rng.randrange(s.size // RELA_SIZE)
        _, sym, type_, _ = self.elf.rela(s, entry)
        n = self.elf.symbol_count
        if self.rng.random() < 0.5:
            sym = self.rng.choice([0, n - 1, n, n + 1, 2**32 - 1, self.rng.randrange(n)])
        else:
            type_ = self.rng.choice([0, 1, 2, 4, 9, 10, 11, 24, 37, 42, 0xFFFF, 2**32 - 1])
        at = s.offset + entry * RELA_SIZE + 8
        return (f"{s.name}[{entry}] r_info = sym {sym} type {type_}",
                put(self.data, at, "<Q", (sym << 32) | type_))

    def ehdr_field(self) -> tuple[str, bytes]:
        field, at, fmt = self.rng.choice([
            ("e_shoff", EHDR_SHOFF, "<Q"), ("e_shnum", EHDR_SHNUM, "<H"),
            ("e_shstrndx", EHDR_SHSTRNDX, "<H"), ("e_type", 0x10, "<H"),
            ("e_machine", 0x12, "<H"), ("e_shentsize", 0x3A, "<H"), ("e_ident class", 4, "<B"),
        ])
        current = struct.unpack_from(fmt, self.data, at)[0]
        value = self.rng.choice(odd_values(fmt, size=len(self.data), count=self.elf.shnum,
                                           current=current))
        return f"{field} = {value:#x}", put(self.data, at, fmt, value)

    # -------------------------------------------------------------- structure
    def duplicate_section(self) -> tuple[str, bytes]:
        """Append a copy of one section header: a second .symtab, .init.text, .rela..."""
        interesting = [s for s in self.elf.sections
                       if s.type in (SHT_SYMTAB, SHT_RELA) or s.flags & SHF_ALLOC]
        s = self.rng.choice(interesting)
        table = self.data[self.elf.shoff:self.elf.shoff + self.elf.shnum * SHDR_SIZE]
        new_shoff = (len(self.data) + 7) & ~7
        out = bytearray(self.data.ljust(new_shoff, b"\0"))
        out += table + self.data[s.at:s.at + SHDR_SIZE]
        struct.pack_into("<Q", out, EHDR_SHOFF, new_shoff)
        struct.pack_into("<H", out, EHDR_SHNUM, self.elf.shnum + 1)
        return f"duplicate section {s.index} ({s.name})", bytes(out)

    def rename_section(self) -> tuple[str, bytes]:
        """Give one section another section's name (.text becomes .init.text...)."""
        s = self.rng.choice(self.elf.sections[1:])
        other = self.rng.choice(self.elf.sections)
        value = self.elf.name_offsets[other.index]
        return (f"section {s.index} ({s.name}) renamed {other.name}",
                put(self.data, s.at, "<I", value))

    def swap_shdrs(self) -> tuple[str, bytes]:
        a, b = self.rng.sample(range(1, self.elf.shnum), 2)
        sa, sb = self.elf.sections[a], self.elf.sections[b]
        out = bytearray(self.data)
        out[sa.at:sa.at + SHDR_SIZE] = self.data[sb.at:sb.at + SHDR_SIZE]
        out[sb.at:sb.at + SHDR_SIZE] = self.data[sa.at:sa.at + SHDR_SIZE]
        return f"swap section headers {a} ({sa.name}) and {b} ({sb.name})", bytes(out)

    def modinfo_edit(self) -> tuple[str, bytes]:
        s = self.elf.section(".modinfo")
        if s is None:
            return self.truncate()
        body = self.data[s.offset:s.offset + s.size]
        key = self.rng.choice([b"name=", b"vermagic=", b"license=", b"depends=", b"\0"])
        at = body.find(key)
        if at < 0:
            return self.flip_alloc_body()
        replacement = self.rng.choice([b"X", b"\0", b"=", b"\xff", b"-"])
        at += self.rng.randrange(len(key) + 4)
        out = bytearray(self.data)
        out[s.offset + min(at, s.size - 1)] = replacement[0]
        return f".modinfo byte {at} (near {key!r}) = {replacement!r}", bytes(out)


class MeaningMutator:
    """Changes to a split output that alter what the kernel would load.

    Each one changes allocated bytes, a relocation of an allocated section, a
    symbol such a relocation resolves through, or an allocated section's header.
    A validator that accepts any of them has missed a real difference. Returns
    None when the object has nothing of the kind to change.
    """

    def __init__(self, data: bytes, rng: random.Random, *,
                 skip_sections: frozenset[str] = frozenset()) -> None:
        self.data = bytes(data)
        self.elf = RawElf(data)
        self.rng = rng
        self.skip = skip_sections

    def kinds(self) -> list:
        return [self.alloc_byte, self.reloc_offset, self.reloc_addend, self.reloc_type,
                self.reloc_symbol, self.reloc_drop, self.symbol_value, self.symbol_section,
                self.undefined_symbol_name, self.nobits_size]

    def _alloc_relocs(self) -> list[tuple[Shdr, int]]:
        entries = []
        for s in self.elf.relas(alloc_target=True):
            if self.elf.sections[s.info].name in self.skip:
                continue
            for entry in range(s.size // RELA_SIZE):
                if self.elf.rela(s, entry)[2] != 0:  # R_X86_64_NONE patches nothing
                    entries.append((s, entry))
        return entries

    def _pick_reloc(self) -> tuple[Shdr, int] | None:
        entries = self._alloc_relocs()
        return self.rng.choice(entries) if entries else None

    def _resolution(self, index: int) -> tuple:
        sym = self.elf.symbol(index)
        if sym["st_shndx"] == 0:
            return ("undef", self._symbol_name(sym))
        if sym["st_shndx"] == 0xFFF1:
            return ("abs", sym["st_value"])
        return ("def", sym["st_shndx"], sym["st_value"])

    def _symbol_name(self, sym: dict[str, int]) -> bytes:
        strtab = self.elf.sections[self.elf.symtab.link]
        start = strtab.offset + sym["st_name"]
        return self.data[start:self.data.index(b"\0", start)]

    def alloc_byte(self):
        sections = [s for s in self.elf.alloc_with_bytes() if s.name not in self.skip]
        s = self.rng.choice(sections)
        at = self.rng.randrange(s.size)
        mask = self.rng.randrange(1, 256)
        return f"{s.name}+{at:#x} ^= {mask:#x}", flip(self.data, s.offset + at, mask)

    def reloc_offset(self):
        picked = self._pick_reloc()
        if picked is None:
            return None
        s, entry = picked
        delta = self.rng.choice([1, 2, 4, 8, -1, -4, -8, 4096])
        at = s.offset + entry * RELA_SIZE
        offset = struct.unpack_from("<Q", self.data, at)[0]
        return f"{s.name}[{entry}] r_offset {delta:+d}", put(self.data, at, "<Q", offset + delta)

    def reloc_addend(self):
        picked = self._pick_reloc()
        if picked is None:
            return None
        s, entry = picked
        delta = self.rng.choice([1, -1, 4, 8, 2**32])
        at = s.offset + entry * RELA_SIZE + 16
        addend = struct.unpack_from("<q", self.data, at)[0]
        return f"{s.name}[{entry}] r_addend {delta:+d}", put(self.data, at, "<q", addend + delta)

    def reloc_type(self):
        picked = self._pick_reloc()
        if picked is None:
            return None
        s, entry = picked
        _, sym, type_, _ = self.elf.rela(s, entry)
        # Always a type of another width or meaning (never PC32 <-> PLT32, which
        # the x86-64 module loader treats alike).
        new = {1: 2, 2: 1, 4: 1, 10: 2, 11: 1, 24: 2}.get(type_, 1)
        at = s.offset + entry * RELA_SIZE + 8
        return f"{s.name}[{entry}] type {type_} -> {new}", put(self.data, at, "<Q", (sym << 32) | new)

    def reloc_symbol(self):
        picked = self._pick_reloc()
        if picked is None:
            return None
        s, entry = picked
        _, sym, type_, _ = self.elf.rela(s, entry)
        mine = self._resolution(sym)
        others = [i for i in range(1, self.elf.symbol_count) if self._resolution(i) != mine]
        if not others:
            return None
        new = self.rng.choice(others)
        at = s.offset + entry * RELA_SIZE + 8
        return f"{s.name}[{entry}] symbol {sym} -> {new}", put(self.data, at, "<Q", (new << 32) | type_)

    def reloc_drop(self):
        """Turn the entry into R_X86_64_NONE at offset 0: the relocation is gone."""
        picked = self._pick_reloc()
        if picked is None:
            return None
        s, entry = picked
        out = bytearray(self.data)
        at = s.offset + entry * RELA_SIZE
        out[at:at + RELA_SIZE] = bytes(RELA_SIZE)
        return f"{s.name}[{entry}] zeroed", bytes(out)

    def _relocated_symbol(self, predicate) -> int | None:
        candidates = sorted({self.elf.rela(s, e)[1] for s, e in self._alloc_relocs()})
        candidates = [i for i in candidates if i and predicate(self.elf.symbol(i))]
        return self.rng.choice(candidates) if candidates else None

    def _symbol_at(self, index: int, field: str) -> int:
        return self.elf.symtab.offset + index * SYM_SIZE + SYM_FIELDS[field][0]

    def symbol_value(self):
        index = self._relocated_symbol(lambda s: s["st_shndx"] != 0)
        if index is None:
            return None
        value = self.elf.symbol(index)["st_value"]
        delta = self.rng.choice([1, 8, -1, 16])
        return (f"symbol {index} st_value {delta:+d}",
                put(self.data, self._symbol_at(index, "st_value"), "<Q", value + delta))

    def symbol_section(self):
        index = self._relocated_symbol(lambda s: 0 < s["st_shndx"] < 0xFF00)
        if index is None:
            return None
        current = self.elf.symbol(index)["st_shndx"]
        others = [s.index for s in self.elf.sections if s.flags & SHF_ALLOC and s.index != current]
        new = self.rng.choice(others)
        return (f"symbol {index} st_shndx {current} -> {new}",
                put(self.data, self._symbol_at(index, "st_shndx"), "<H", new))

    def undefined_symbol_name(self):
        index = self._relocated_symbol(lambda s: s["st_shndx"] == 0)
        if index is None:
            return None
        name = self._symbol_name(self.elf.symbol(index))
        others = [self.elf.symbol(i)["st_name"] for i in range(1, self.elf.symbol_count)
                  if self.elf.symbol(i)["st_name"] and self._symbol_name(self.elf.symbol(i)) != name]
        if not others:
            return None
        new = self.rng.choice(others)
        return (f"undefined symbol {index} ({name.decode()}) renamed",
                put(self.data, self._symbol_at(index, "st_name"), "<I", new))

    def section_flags(self):
        """Every allocated section with SHF_WRITE, SHF_EXECINSTR or SHF_ALLOC toggled.

        These decide where the kernel lays a section out and with which page
        permissions (kernel/module/main.c, layout_sections), or whether it loads
        it at all. .modinfo and __versions are only looked up (find_sec() wants
        SHF_ALLOC) and then dropped, so for them only SHF_ALLOC matters.
        """
        off, fmt = SHDR_FIELDS["sh_flags"]
        for s in self.elf.sections:
            if not s.flags & SHF_ALLOC or s.name in self.skip:
                continue
            bits = (SHF_ALLOC,) if s.name in NOT_LOADED else (SHF_WRITE, SHF_EXECINSTR, SHF_ALLOC)
            for bit in bits:
                yield f"{s.name} sh_flags ^= {bit:#x}", put(self.data, s.at + off, fmt, s.flags ^ bit)

    def nobits_size(self):
        nobits = [s for s in self.elf.sections if s.flags & SHF_ALLOC and s.type == SHT_NOBITS]
        if not nobits:
            return None
        s = self.rng.choice(nobits)
        delta = self.rng.choice([1, 8, 4096])
        off, fmt = SHDR_FIELDS["sh_size"]
        return f"{s.name} (NOBITS) sh_size {delta:+d}", put(self.data, s.at + off, fmt, s.size + delta)
