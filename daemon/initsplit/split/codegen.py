"""Machine code the splitter synthesizes for the init module (x86-64 only).

Two routines, each with the relocations, ORC unwind entries and return-thunk
sites objtool would have produced for them:

* the init wrapper, I's ->init, in four steps:
  (0) a coarse check that C lies in memory as the layout model put it: I
      reaches C through anchors and offsets from them (splitter.py), so each
      of C's core_layout sizes (6.1; page-rounded), or mem[type].size of each
      core memory type (6.12: struct module_memory, page-aligned and stored
      back by kernel/module/main.c module_memory_alloc()), must be the model's,
      or the wrapper returns -ENOEXEC before the original init runs. Either is
      an unsigned int in C's struct module (a Check). The exact check
      is the daemon's, before I is loaded at all (loader/kernel_state.py
      placement_problem()): the kernel follows some of I's pointers into C
      while it loads I, before this code runs. This one is for an I loaded by
      hand;
  (a) call the original init routine;
  (b) if it failed, report that through the return value (initresult.py: an
      error -E becomes -(INIT_FAILED_BIAS + E), which the daemon tells apart
      from the kernel refusing I before its init ran);
  (c) if it returned >= 0 (do_init_module() in kernel/module/main.c treats
      positive as success), arm the core module so it is exactly as unloadable
      as the original module, then publish C's exports by storing their full
      counts into C's struct module num_syms / num_gpl_syms.
  It returns the (possibly biased) result.
* the exit stub, I's ->exit: returns at once. delete_module() refuses to unload
  a module that has ->init but no ->exit. When I has __mcount_loc records (all
  of them describe init code), the stub also begins, after its endbr64, with
  the `call __fentry__` the compiler puts at every traced function's entry
  (-mfentry), and I gets an __mcount_loc record for it (fentry_sites). Why: the
  kernel keeps I's records in ftrace pages of I's own (ftrace_process_locs(),
  kernel/trace/ftrace.c, 6.1 and 6.12); when do_init_module() frees I's init
  layout, ftrace_free_mem() removes the init records and, for each page that
  became empty, waits in synchronize_rcu() before freeing it (about 18 ms
  under TCG, on every I load). A plain module's page also holds its core
  records and never empties; the stub's record, in I's core text, keeps I's
  page non-empty too. At load ftrace_init_nop() -> ftrace_make_nop()
  (arch/x86/kernel/ftrace.c) turns the call into a 5-byte NOP after checking
  (ftrace_verify_code()) that the bytes there are exactly `e8 <rel32 to
  __fentry__>`: a record anywhere else is a WARN and ftrace disabled. The
  record's cost moves to I's unload, in the batch: ftrace_release_mod() then
  frees the page behind a synchronize_rcu() of its own. On a kernel without
  IBT (Debian 12's 6.1) FTRACE_MCOUNT_MAX_OFFSET is 0, so test_for_valid_rec()
  disables the record, 4 bytes into the stub, as it does weak functions': it
  is never traced, and stays in the page all the same.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..elf.constants import R_X86_64_PC32, R_X86_64_PLT32
from .initresult import INIT_FAILED_BIAS
from .tables import MAX_ERRNO, ORC_REG_SP, ORC_REG_UNDEFINED, ORC_TYPE_TERMINATOR, pack_orc_entry

ENDBR64 = bytes.fromhex("f30f1efa")  # a NOP on CPUs without IBT, the landing pad on those with it


@dataclass(frozen=True, slots=True)
class CodeReloc:
    offset: int
    type: int
    # A role the splitter resolves: "init", "return_thunk", "fentry", "arm_value",
    # or "core_module" (C's struct module; the addend carries the field offset).
    target: str
    addend: int


@dataclass(frozen=True, slots=True)
class OrcEntry:
    offset: int
    sp_offset: int
    sp_reg: int
    type: int  # the kernel's ORC_TYPE_CALL (tables.KernelTables.orc_type_call) or the terminator's
    bp_offset: int = 0
    bp_reg: int = ORC_REG_UNDEFINED

    def pack(self) -> bytes:
        return pack_orc_entry(self.sp_offset, self.sp_reg, self.type,
                              bp_offset=self.bp_offset, bp_reg=self.bp_reg)


@dataclass(frozen=True, slots=True)
class Publish:
    """Store *count* into the unsigned int at *field* of C's struct module."""

    field: int
    count: int


@dataclass(frozen=True, slots=True)
class Check:
    """The unsigned int at *field* of C's struct module must be *value*."""

    field: int
    value: int


# include/uapi/asm-generic/errno-base.h: "Exec format error"; what the wrapper
# returns when C's layout is not the model's. In the kernel's error range, so the
# daemon knows the original init did not run (initresult.py).
ENOEXEC = 8


@dataclass(slots=True)
class Routine:
    code: bytes
    relocs: list[CodeReloc] = field(default_factory=list)
    orc: list[OrcEntry] = field(default_factory=list)
    return_sites: list[int] = field(default_factory=list)
    # Offsets of `call __fentry__` sites, each needing an __mcount_loc record.
    fentry_sites: list[int] = field(default_factory=list)


def _return(code: bytearray, relocs: list[CodeReloc], sites: list[int], *, rethunk: bool) -> None:
    if rethunk:
        # jmp __x86_return_thunk, listed in .return_sites so apply_returns() can patch it.
        sites.append(len(code))
        relocs.append(CodeReloc(len(code) + 1, R_X86_64_PLT32, "return_thunk", -4))
        code += b"\xe9" + bytes(4)
    else:
        code += b"\xc3\xcc"  # ret; int3 (straight-line-speculation guard)


def _terminator(offset: int) -> OrcEntry:
    return OrcEntry(offset, 0, ORC_REG_UNDEFINED, ORC_TYPE_TERMINATOR)


def init_wrapper(*, slot_addend: int, rethunk: bool, orc_type: int, publish: tuple[Publish, ...] = (),
                 checks: tuple[Check, ...] = ()) -> Routine:
    """Build I's init routine.

    The arm step stores "arm_value" into the core module's struct module at
    slot_addend: the original cleanup into ->exit, or (for modules without
    cleanup) any non-NULL value into ->init so delete_module() answers EBUSY.
    Arming comes before publishing, so C is the original module in full by the
    time anyone can link against its exports. Each publish store is one aligned
    4-byte movl: a concurrent find_symbol() (kernel/module/main.c) reads
    num_syms once into its search bounds and sees either the anchors alone or
    every record, both sorted prefixes of records that were in place, read-only,
    since C was loaded.

        endbr64
        sub   $8,%rsp                 keep the stack 16-byte aligned at the call
        cmpl  $value,field(%rip)      once per Check
        jne   .Lrefuse
        call  <original init>
        test  %eax,%eax
        jns   .Lok
        cmp   $-MAX_ERRNO,%eax        an error code: bias it out of the range
        jl    .Lout
        sub   $INIT_FAILED_BIAS,%eax
        jmp   .Lout
    .Lok:
        lea   arm_value(%rip),%rdx
        mov   %rdx,slot(%rip)
        movl  $count,field(%rip)      once per Publish
        jmp   .Lout                   (only when there are checks)
    .Lrefuse:
        mov   $-ENOEXEC,%eax
    .Lout:
        add   $8,%rsp
        ret                           (or jmp __x86_return_thunk)
    """
    code = bytearray(ENDBR64)
    relocs: list[CodeReloc] = []
    sites: list[int] = []
    orc = [OrcEntry(0, 8, ORC_REG_SP, orc_type)]
    code += bytes.fromhex("4883ec08")  # sub $8,%rsp
    orc.append(OrcEntry(len(code), 16, ORC_REG_SP, orc_type))
    refuse_jumps = []
    for check in checks:
        # cmpl $imm32,disp32(%rip): the displacement, like a store's, is relative to
        # the end of the instruction, 4 immediate bytes after the displacement field.
        relocs.append(CodeReloc(len(code) + 2, R_X86_64_PC32, "core_module", check.field - 8))
        code += bytes.fromhex("813d") + bytes(4) + struct.pack("<I", check.value)
        refuse_jumps.append(len(code))
        code += bytes.fromhex("0f85") + bytes(4)  # jne .Lrefuse (rel32, patched below)
    relocs.append(CodeReloc(len(code) + 1, R_X86_64_PLT32, "init", -4))
    code += b"\xe8" + bytes(4)  # call <original init>
    code += bytes.fromhex("85c0")  # test %eax,%eax
    jns_at = len(code)
    code += b"\x79\x00"  # jns .Lok (patched below)
    code += b"\x3d" + struct.pack("<i", -MAX_ERRNO)  # cmp $-MAX_ERRNO,%eax
    jl_at = len(code)
    code += b"\x7c\x00"  # jl .Lout (patched below)
    code += b"\x2d" + struct.pack("<i", INIT_FAILED_BIAS)  # sub $INIT_FAILED_BIAS,%eax
    jmp_at = len(code)
    code += b"\xeb\x00"  # jmp .Lout (patched below)
    _patch_jump(code, jns_at, len(code))
    relocs.append(CodeReloc(len(code) + 3, R_X86_64_PC32, "arm_value", -4))
    code += bytes.fromhex("488d15") + bytes(4)  # lea arm_value(%rip),%rdx
    relocs.append(CodeReloc(len(code) + 3, R_X86_64_PC32, "core_module", slot_addend - 4))
    code += bytes.fromhex("488915") + bytes(4)  # mov %rdx,slot(%rip)
    for store in publish:
        # movl $imm32,disp32(%rip): the displacement is relative to the end of the
        # instruction, 4 immediate bytes after the displacement field.
        relocs.append(CodeReloc(len(code) + 2, R_X86_64_PC32, "core_module", store.field - 8))
        code += bytes.fromhex("c705") + bytes(4) + struct.pack("<I", store.count)
    skip_at = -1
    if checks:
        skip_at = len(code)
        code += b"\xeb\x00"  # jmp .Lout (patched below)
        for at in refuse_jumps:
            code[at + 2:at + 6] = struct.pack("<i", len(code) - (at + 6))
        code += b"\xb8" + struct.pack("<i", -ENOEXEC)  # mov $-ENOEXEC,%eax
    out = len(code)
    if skip_at >= 0:
        _patch_jump(code, skip_at, out)
    _patch_jump(code, jl_at, out)
    _patch_jump(code, jmp_at, out)
    code += bytes.fromhex("4883c408")  # add $8,%rsp
    orc.append(OrcEntry(len(code), 8, ORC_REG_SP, orc_type))
    _return(code, relocs, sites, rethunk=rethunk)
    orc.append(_terminator(len(code)))
    return Routine(bytes(code), relocs, orc, sites)


def _patch_jump(code: bytearray, at: int, target: int) -> None:
    """Set the rel8 of the two-byte jump at *at* to reach *target*."""
    distance = target - (at + 2)
    if not 0 <= distance <= 127:
        raise ValueError("short jump out of range")
    code[at + 1] = distance


def exit_stub(*, rethunk: bool, orc_type: int, traced: bool = False) -> Routine:
    """I's ->exit: endbr64, with *traced* `call __fentry__`, then the return.

    The call leaves the stack as it was (it returns), so one ORC entry covers
    the stub, as objtool writes it for a traced leaf function."""
    code = bytearray(ENDBR64)
    relocs: list[CodeReloc] = []
    sites: list[int] = []
    fentry: list[int] = []
    orc = [OrcEntry(0, 8, ORC_REG_SP, orc_type)]
    if traced:
        fentry.append(len(code))
        relocs.append(CodeReloc(len(code) + 1, R_X86_64_PLT32, "fentry", -4))
        code += b"\xe8" + bytes(4)  # call __fentry__
    _return(code, relocs, sites, rethunk=rethunk)
    orc.append(_terminator(len(code)))
    return Routine(bytes(code), relocs, orc, sites, fentry)
