"""What a routine of the splitter's x86-64 subset does, read from its bytes alone.

The validator (validate.py) proves I's init wrapper and exit stub right without
asking the code that wrote them (split/codegen.py, which this module must never
import): decode() turns the bytes into instructions, analyse() follows every
path through them and reports each path's effects (layout compares taken, the
call, the stores, the value left in %eax) and the stack depth at each
instruction. Whether those effects are the right ones is the validator's
question; this module only says what the machine would do.

The subset is what a two-stage init wrapper needs and nothing more; any other
byte sequence is refused ("unknown instruction at +N"). Opcode names are the
Intel SDM's (Vol. 2, "Instruction Set Reference"):

    F3 0F 1E FA        ENDBR64
    REX.W 83 /5 ib     SUB r/m64, imm8       sub  $imm8,%rsp
    REX.W 83 /0 ib     ADD r/m64, imm8       add  $imm8,%rsp
    81 /7 id           CMP r/m32, imm32      cmpl $imm32,disp32(%rip)
    0F 85 cd           JNE rel32
    E8 cd              CALL rel32
    85 /r              TEST r/m32, r32       test %eax,%eax
    79 cb / 7C cb      JNS rel8 / JL rel8
    EB cb / E9 cd      JMP rel8 / JMP rel32
    3D id              CMP EAX, imm32
    2D id              SUB EAX, imm32
    REX.W 8D /r        LEA r64, m            lea  disp32(%rip),%rdx
    REX.W 89 /r        MOV r/m64, r64        mov  %rdx,disp32(%rip)
    C7 /0 id           MOV r/m32, imm32      movl $imm32,disp32(%rip)
    B8+rd id           MOV r32, imm32        mov  $imm32,%eax
    C3                 RET (near)
    CC                 INT3

A 4-byte rel32 or disp32 field may be patched by a relocation; the caller says
which ones are (refs), and what they resolve to, as an opaque target.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

# --------------------------------------------------------------------- decoding


class CodeError(Exception):
    """The bytes are not a routine of the subset, or not one analyse() can follow."""


@dataclass(frozen=True, slots=True)
class _Form:
    opcode: bytes  # opcode, ModRM included where it is fixed
    op: str
    operands: tuple[str, ...]  # "imm8", "imm32", "rel8", "rel32", "disp32", in encoding order


# No opcode here is a prefix of another, so the first match is the only one.
_FORMS: tuple[_Form, ...] = (
    _Form(bytes.fromhex("f30f1efa"), "endbr64", ()),
    _Form(bytes.fromhex("4883ec"), "sub_rsp", ("imm8",)),     # ModRM EC: mod 11, /5, rm rsp
    _Form(bytes.fromhex("4883c4"), "add_rsp", ("imm8",)),     # ModRM C4: mod 11, /0, rm rsp
    _Form(bytes.fromhex("813d"), "cmpl_rip", ("disp32", "imm32")),  # ModRM 3D: mod 00, /7, rm 101 (RIP)
    _Form(bytes.fromhex("0f85"), "jne", ("rel32",)),
    _Form(bytes.fromhex("e8"), "call", ("rel32",)),
    _Form(bytes.fromhex("85c0"), "test_eax", ()),             # ModRM C0: %eax,%eax
    _Form(bytes.fromhex("79"), "jns", ("rel8",)),
    _Form(bytes.fromhex("7c"), "jl", ("rel8",)),
    _Form(bytes.fromhex("eb"), "jmp", ("rel8",)),
    _Form(bytes.fromhex("e9"), "jmp", ("rel32",)),
    _Form(bytes.fromhex("3d"), "cmp_eax", ("imm32",)),
    _Form(bytes.fromhex("2d"), "sub_eax", ("imm32",)),
    _Form(bytes.fromhex("488d15"), "lea_rdx", ("disp32",)),   # ModRM 15: mod 00, reg rdx, rm 101 (RIP)
    _Form(bytes.fromhex("488915"), "store_rdx", ("disp32",)),
    _Form(bytes.fromhex("c705"), "movl_rip", ("disp32", "imm32")),  # ModRM 05: mod 00, /0, rm 101 (RIP)
    _Form(bytes.fromhex("b8"), "mov_eax", ("imm32",)),
    _Form(bytes.fromhex("c3"), "ret", ()),
    _Form(bytes.fromhex("cc"), "int3", ()),
)

_SIZES = {"imm8": 1, "rel8": 1, "imm32": 4, "rel32": 4, "disp32": 4}


@dataclass(frozen=True, slots=True)
class Insn:
    offset: int
    length: int
    op: str
    imm: int | None = None  # sign-extended, as the CPU uses it
    disp: int | None = None  # rel8/rel32 or disp32 as encoded, signed
    # Offset in the routine of the 4-byte rel32/disp32 field a relocation may patch.
    field: int | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def target(self) -> int:
        """Where a branch goes (or a RIP-relative operand points) without relocation:
        both are relative to the end of the instruction."""
        assert self.disp is not None
        return self.end + self.disp

    def text(self) -> str:
        """The instruction in AT&T syntax as objdump prints it (without its comment)."""
        imm32 = f"${(self.imm or 0) & 0xFFFFFFFF:#x}"
        rip = f"{'-' if (self.disp or 0) < 0 else ''}{abs(self.disp or 0):#x}(%rip)"
        return {
            "endbr64": "endbr64",
            "sub_rsp": f"sub ${(self.imm or 0) & (2**64 - 1):#x},%rsp",
            "add_rsp": f"add ${(self.imm or 0) & (2**64 - 1):#x},%rsp",
            "cmpl_rip": f"cmpl {imm32},{rip}",
            "test_eax": "test %eax,%eax",
            "cmp_eax": f"cmp {imm32},%eax",
            "sub_eax": f"sub {imm32},%eax",
            "lea_rdx": f"lea {rip},%rdx",
            "store_rdx": f"mov %rdx,{rip}",
            "movl_rip": f"movl {imm32},{rip}",
            "mov_eax": f"mov {imm32},%eax",
            "ret": "ret",
            "int3": "int3",
        }.get(self.op) or f"{self.op} {self.target:#x}"


def decode(code: bytes) -> list[Insn]:
    """Every instruction of *code*, in address order; CodeError on anything else."""
    insns: list[Insn] = []
    at = 0
    while at < len(code):
        insns.append(_decode_one(code, at))
        at = insns[-1].end
    return insns


def _decode_one(code: bytes, at: int) -> Insn:
    form = next((f for f in _FORMS if code.startswith(f.opcode, at)), None)
    if form is None:
        raise CodeError(f"unknown instruction at +{at:#x} ({code[at:at + 4].hex()})")
    pos = at + len(form.opcode)
    imm = disp = place = None
    for operand in form.operands:
        size = _SIZES[operand]
        if pos + size > len(code):
            raise CodeError(f"truncated instruction at +{at:#x}")
        value = int.from_bytes(code[pos:pos + size], "little", signed=True)
        if operand.startswith("imm"):
            imm = value
        else:
            disp = value
            place = pos if size == 4 else None
        pos += size
    return Insn(at, pos - at, form.op, imm, disp, place)


# --------------------------------------------------------------------- analysis

# A symbolic address: what a relocated field resolves to (the caller's target),
# or ("local", offset) for an unrelocated RIP-relative operand or call.
Ref = Hashable

_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True, slots=True)
class Const:
    value: int  # a C int


@dataclass(frozen=True, slots=True)
class InitResult:
    """The called routine's return value R (a C int), plus *delta*, wrapped to 32 bits."""

    delta: int = 0


@dataclass(frozen=True, slots=True)
class Address:
    ref: Ref


Value = Const | InitResult | Address | None  # None: undefined (nothing written it on this path)


@dataclass(frozen=True, slots=True)
class Compare:
    """cmpl $imm,mem followed by a jne: on this path the 32-bit word at *ref*
    equals *value* (holds) or does not."""

    at: int
    ref: Ref
    value: int
    holds: bool


@dataclass(frozen=True, slots=True)
class Call:
    at: int
    ref: Ref
    sp: int  # stack depth at the call (bytes below the caller's frame, return address included)


@dataclass(frozen=True, slots=True)
class Store:
    at: int
    ref: Ref
    width: int
    value: Value


Event = Compare | Call | Store


@dataclass(slots=True)
class Path:
    events: list[Event] = field(default_factory=list)
    # The range of R this path is taken for (all of int when nothing was called).
    low: int = _INT_MIN
    high: int = _INT_MAX
    eax: Value = None
    exit: Insn | None = None  # the ret, or the jmp rel32 out of the routine
    exit_ref: Ref | None = None
    exit_sp: int = 0

    def calls(self) -> list[Call]:
        return [e for e in self.events if isinstance(e, Call)]

    def stores(self) -> list[Store]:
        return [e for e in self.events if isinstance(e, Store)]

    def compares(self) -> list[Compare]:
        return [e for e in self.events if isinstance(e, Compare)]


@dataclass(slots=True)
class Analysis:
    insns: list[Insn]
    paths: list[Path]
    # Stack depth on entry to each reachable instruction, as ORC's sp_offset counts
    # it: 8 at the entry (the return address), more after each sub from %rsp.
    sp_at: dict[int, int]


@dataclass(slots=True)
class _State:
    at: int
    sp: int
    path: Path
    eax: Value = None
    rdx: Value = None
    # What the flags were last set from: ("mem", ref, imm), ("eax", value, imm, op) or None.
    flags: tuple | None = None
    called: bool = False


# Enough for any wrapper of the subset: four compares and two branches on R give seven.
MAX_PATHS = 64


def analyse(insns: list[Insn], refs: Mapping[int, Ref], *, entry_sp: int = 8) -> Analysis:
    """Follow every path of the routine decode() read as *insns* from its first byte.

    *refs* maps the offset of an instruction whose 4-byte field is relocated to
    what the relocation makes that field address (already corrected by the
    distance from the field to the end of the instruction, as the CPU reads it).
    Only forward branches are followed (there are no loops to prove terminating),
    %eax and %rdx are the only registers modelled, and a call clobbers %rdx and
    the flags (caller-saved in the x86-64 psABI) and leaves its result in %eax.
    """
    by_offset = {insn.offset: insn for insn in insns}
    for at in refs:
        if at not in by_offset or by_offset[at].field is None:
            raise CodeError(f"a relocation patches no operand of the instruction at +{at:#x}")
    sp_at: dict[int, int] = {}
    done: list[Path] = []
    todo = [_State(0, entry_sp, Path())]
    while todo:
        state = todo.pop()
        while state.path.exit is None:
            insn = by_offset.get(state.at)
            if insn is None:
                raise CodeError(f"execution runs off the end of the routine at +{state.at:#x}")
            seen = sp_at.setdefault(insn.offset, state.sp)
            if seen != state.sp:
                raise CodeError(f"stack depth at +{insn.offset:#x} is {seen} on one path, "
                                f"{state.sp} on another")
            todo.extend(_step(state, insn, refs.get(insn.offset), by_offset))
            if len(done) + len(todo) > MAX_PATHS:
                raise CodeError("too many paths")
        done.append(state.path)
    done.sort(key=lambda p: [e.at for e in p.events] + [p.low])
    return Analysis(insns, done, sp_at)


def _branch_to(insn: Insn, by_offset: Mapping[int, Insn]) -> int:
    target = insn.target
    if target not in by_offset:
        raise CodeError(f"{insn.op} at +{insn.offset:#x} goes to +{target:#x}, "
                        "not an instruction of the routine")
    if target <= insn.offset:
        raise CodeError(f"backward {insn.op} at +{insn.offset:#x}")
    return target


def _step(state: _State, insn: Insn, ref: Ref | None, by_offset: Mapping[int, Insn]) -> list[_State]:
    """Execute *insn* on *state* in place; return any states forked off it."""
    op, path, at = insn.op, state.path, insn.offset
    operand: Ref = ref if ref is not None else ("local", insn.target if insn.disp is not None else 0)
    state.at = insn.end
    if op == "endbr64":
        pass
    elif op in ("sub_rsp", "add_rsp"):
        state.sp += insn.imm if op == "sub_rsp" else -insn.imm
        state.flags = None
        if state.sp < 8:
            raise CodeError(f"{insn.text()} at +{at:#x} pops the return address")
    elif op == "cmpl_rip":
        state.flags = ("mem", operand, insn.imm)
    elif op in ("test_eax", "cmp_eax"):
        state.flags = ("eax", state.eax, insn.imm or 0, op)
    elif op == "sub_eax":
        state.eax = _sub(state.eax, insn.imm)
        state.flags = None
    elif op == "mov_eax":
        state.eax = Const(insn.imm)
    elif op == "lea_rdx":
        state.rdx = Address(operand)
    elif op == "store_rdx":
        if state.rdx is None:
            raise CodeError(f"store of an undefined %rdx at +{at:#x}")
        path.events.append(Store(at, operand, 8, state.rdx))
    elif op == "movl_rip":
        path.events.append(Store(at, operand, 4, Const(insn.imm)))
    elif op == "call":
        if state.called:
            raise CodeError(f"a second call on one path at +{at:#x}")
        path.events.append(Call(at, operand, state.sp))
        state.called, state.eax, state.rdx, state.flags = True, InitResult(), None, None
    elif op in ("ret", "int3") or (op == "jmp" and ref is not None):
        if op == "int3":
            raise CodeError(f"execution reaches int3 at +{at:#x}")
        path.exit, path.exit_ref, path.exit_sp = insn, ref, state.sp
        path.eax = state.eax
    elif op == "jmp":
        state.at = _branch_to(insn, by_offset)
    else:
        if ref is not None:
            raise CodeError(f"conditional jump at +{at:#x} leaves the routine")
        return _conditional(state, insn, _branch_to(insn, by_offset))
    return []


def _sub(value: Value, imm: int) -> Value:
    if isinstance(value, Const):
        return Const(_wrap32(value.value - imm))
    if isinstance(value, InitResult):
        return InitResult(value.delta - imm)
    return None


def _wrap32(value: int) -> int:
    return (value + 2**31) % 2**32 - 2**31


def _conditional(state: _State, insn: Insn, target: int) -> list[_State]:
    """Fork *state* at a conditional jump: it continues as the fall-through, the
    returned state (if feasible) takes the jump."""
    flags = state.flags
    if flags is None:
        raise CodeError(f"{insn.op} at +{insn.offset:#x} tests flags the subset does not model")
    if flags[0] == "mem":
        if insn.op != "jne":
            raise CodeError(f"{insn.op} after a memory compare at +{insn.offset:#x}")
        _, ref, value = flags
        taken = _fork(state, target)
        taken.path.events.append(Compare(insn.offset, ref, value, holds=False))
        state.path.events.append(Compare(insn.offset, ref, value, holds=True))
        return [taken]
    _, eax, imm, setter = flags
    # Which values of %eax take the jump: JL is SF != OF, signed less than the
    # compared value; JNS is SF = 0, which is "not negative" only after TEST (or
    # a compare with 0), where OF is 0.
    if insn.op == "jl":
        below = imm
    elif insn.op == "jns" and (setter == "test_eax" or imm == 0):
        below = 0
    else:
        raise CodeError(f"{insn.op} at +{insn.offset:#x} after {setter} is outside the subset")
    if not isinstance(eax, InitResult) or eax.delta:
        raise CodeError(f"{insn.op} at +{insn.offset:#x} branches on a value the validator cannot follow")
    low, high = state.path.low, state.path.high
    # R < below on one side, R >= below on the other.
    lower, upper = (low, min(high, below - 1)), (max(low, below), high)
    jumped, fell = (lower, upper) if insn.op == "jl" else (upper, lower)
    if jumped[0] > jumped[1] or fell[0] > fell[1]:
        # Equivalent to a jmp or to nothing, which is what the code would then
        # say: a branch that can go one way only is not code anyone wrote.
        raise CodeError(f"{insn.op} at +{insn.offset:#x} can only go one way on this path")
    taken = _fork(state, target)
    taken.path.low, taken.path.high = jumped
    state.path.low, state.path.high = fell
    return [taken]


def _fork(state: _State, target: int) -> _State:
    path = Path(list(state.path.events), state.path.low, state.path.high)
    return _State(target, state.sp, path, state.eax, state.rdx, state.flags, state.called)
