"""Machine code the splitter synthesizes for the init module (x86-64 only).

Two routines, each with the relocations, ORC unwind entries and return-thunk
sites objtool would have produced for them:

* the init wrapper, I's ->init: call the original init routine; if it returned
  >= 0 (do_init_module() in kernel/module/main.c treats positive as success),
  arm the core module so it is exactly as unloadable as the original module;
  return the original result.
* the exit stub, I's ->exit: returns at once. delete_module() refuses to unload
  a module that has ->init but no ->exit.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..elf.constants import R_X86_64_PC32, R_X86_64_PLT32
from .tables import ORC_REG_SP, ORC_REG_UNDEFINED, ORC_TYPE_CALL

ENDBR64 = bytes.fromhex("f30f1efa")  # a NOP on CPUs without IBT, the landing pad on those with it


@dataclass(frozen=True, slots=True)
class CodeReloc:
    offset: int
    type: int
    target: str  # a role the splitter resolves: "init", "return_thunk", "arm_value", "arm_slot"
    addend: int


@dataclass(frozen=True, slots=True)
class OrcEntry:
    offset: int
    sp_offset: int
    sp_reg: int
    type: int = ORC_TYPE_CALL
    bp_offset: int = 0
    bp_reg: int = ORC_REG_UNDEFINED

    def pack(self) -> bytes:
        # struct orc_entry, little-endian bitfields: sp_reg:4 bp_reg:4 type:2 end:1
        bits = (self.sp_reg & 0xF) | ((self.bp_reg & 0xF) << 4) | ((self.type & 3) << 8)
        return struct.pack("<hhH", self.sp_offset, self.bp_offset, bits)


@dataclass(slots=True)
class Routine:
    code: bytes
    relocs: list[CodeReloc] = field(default_factory=list)
    orc: list[OrcEntry] = field(default_factory=list)
    return_sites: list[int] = field(default_factory=list)


def _return(code: bytearray, relocs: list[CodeReloc], sites: list[int], *, rethunk: bool) -> None:
    if rethunk:
        # jmp __x86_return_thunk, listed in .return_sites so apply_returns() can patch it.
        sites.append(len(code))
        relocs.append(CodeReloc(len(code) + 1, R_X86_64_PLT32, "return_thunk", -4))
        code += b"\xe9" + bytes(4)
    else:
        code += b"\xc3\xcc"  # ret; int3 (straight-line-speculation guard)


def _terminator(offset: int) -> OrcEntry:
    return OrcEntry(offset, 0, ORC_REG_UNDEFINED)


def init_wrapper(*, slot_addend: int, rethunk: bool) -> Routine:
    """Build I's init routine.

    The arm step stores "arm_value" into the core module's struct module at
    "arm_slot" + slot_addend: the original cleanup into ->exit, or (for modules
    without cleanup) any non-NULL value into ->init so delete_module() answers EBUSY.
    """
    code = bytearray(ENDBR64)
    relocs: list[CodeReloc] = []
    sites: list[int] = []
    orc = [OrcEntry(0, 8, ORC_REG_SP)]
    code += bytes.fromhex("4883ec08")  # sub $8,%rsp: keep the stack 16-byte aligned at the call
    orc.append(OrcEntry(len(code), 16, ORC_REG_SP))
    relocs.append(CodeReloc(len(code) + 1, R_X86_64_PLT32, "init", -4))
    code += b"\xe8" + bytes(4)  # call <original init>
    code += bytes.fromhex("85c0")  # test %eax,%eax
    js_at = len(code)
    code += b"\x78\x00"  # js .Lout (patched below)
    relocs.append(CodeReloc(len(code) + 3, R_X86_64_PC32, "arm_value", -4))
    code += bytes.fromhex("488d15") + bytes(4)  # lea arm_value(%rip),%rdx
    relocs.append(CodeReloc(len(code) + 3, R_X86_64_PC32, "arm_slot", slot_addend - 4))
    code += bytes.fromhex("488915") + bytes(4)  # mov %rdx,arm_slot(%rip)
    out = len(code)
    code[js_at + 1] = out - (js_at + 2)
    code += bytes.fromhex("4883c408")  # add $8,%rsp
    orc.append(OrcEntry(len(code), 8, ORC_REG_SP))
    _return(code, relocs, sites, rethunk=rethunk)
    orc.append(_terminator(len(code)))
    return Routine(bytes(code), relocs, orc, sites)


def exit_stub(*, rethunk: bool) -> Routine:
    code = bytearray(ENDBR64)
    relocs: list[CodeReloc] = []
    sites: list[int] = []
    orc = [OrcEntry(0, 8, ORC_REG_SP)]
    _return(code, relocs, sites, rethunk=rethunk)
    orc.append(_terminator(len(code)))
    return Routine(bytes(code), relocs, orc, sites)
