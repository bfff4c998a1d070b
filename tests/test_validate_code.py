"""The validator reads I's synthesized code itself (issue 11).

validate_x86.py decodes the init wrapper and exit stub and follows their paths;
validate.py checks what each path does against expectations it derives on its
own. Here: the decoder agrees with binutils on every instruction of the subset,
the validator never asks the code generator, and a code generator with a bug
(each one a plausible slip in split/codegen.py) makes splits the validator
refuses, on real Debian 6.1 modules.
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from initsplit import validate_x86 as x86
from initsplit.elf import read_elf
from initsplit.elf.constants import SHN_UNDEF
from initsplit.split import codegen, split_module, splitter
from initsplit.split.initresult import INIT_FAILED_BIAS
from initsplit.split.tables import MAX_ERRNO, ORC_TYPE_CALL
from initsplit.validate import ValidationError, validate_split
from tests.testbed.kernel import debian_kernel

DAEMON = Path(__file__).resolve().parents[1] / "daemon" / "initsplit"


# ------------------------------------------------------------ the decoder

def objdump(code: bytes, tmp_path: Path) -> list[tuple[int, int, str]]:
    """(offset, length, AT&T text without comment) of each instruction, by binutils."""
    raw = tmp_path / "code.bin"
    raw.write_bytes(code)
    out = subprocess.run(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", "--insn-width=16",
                          str(raw)], capture_output=True, text=True, check=True).stdout
    insns = []
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or not parts[0].strip().endswith(":"):
            continue
        text = " ".join(parts[2].split("#")[0].split())
        insns.append((int(parts[0].strip()[:-1], 16), len(parts[1].split()), text))
    return insns


def decoded(code: bytes) -> list[tuple[int, int, str]]:
    return [(i.offset, i.length, i.text()) for i in x86.decode(code)]


CHECKS = tuple(codegen.Check(320 + off, value) for off, value in
               ((12, 0x3000), (16, 0x7000), (20, 0x8000), (8, 0xA000)))
PUBLISH = (codegen.Publish(224, 31), codegen.Publish(276, 7))


@pytest.mark.parametrize("rethunk", [True, False])
@pytest.mark.parametrize("publish", [(), PUBLISH[:1], PUBLISH])
@pytest.mark.parametrize("checks", [(), CHECKS[:1], CHECKS])
def test_decoder_agrees_with_objdump_on_codegen_output(tmp_path: Path, rethunk: bool, publish: tuple,
                                                        checks: tuple) -> None:
    for routine in (codegen.init_wrapper(slot_addend=848, rethunk=rethunk, orc_type=ORC_TYPE_CALL,
                                         publish=publish, checks=checks),
                    codegen.exit_stub(rethunk=rethunk, orc_type=ORC_TYPE_CALL)):
        assert decoded(routine.code) == objdump(routine.code, tmp_path)
        # Every relocation of codegen patches an operand field the decoder found.
        fields = {i.field for i in x86.decode(routine.code)}
        assert {r.offset for r in routine.relocs} <= fields


# Each instruction of the subset with operands codegen never writes (non-zero
# displacements, negative values, the other jump widths), assembled by gas.
SUBSET_ASM = """
    .text
    endbr64
    sub     $0x18,%rsp
    cmpl    $0x12345678,0x10(%rip)
    cmpl    $-0x1000,-0x200(%rip)
    {disp32} jne 1f
    call    1f
    test    %eax,%eax
    jns     1f
    cmp     $-4095,%eax
    jl      1f
    sub     $0x10000,%eax
    sub     $-0x500,%eax
    {disp8} jmp 1f
    lea     -0x40(%rip),%rdx
    mov     %rdx,0x7fffffff(%rip)
    movl    $0x80000000,-0x80000000(%rip)
    mov     $-8,%eax
    {disp32} jmp 1f
1:  add     $0x18,%rsp
    ret
    int3
"""


def test_decoder_agrees_with_objdump_on_assembled_subset(tmp_path: Path) -> None:
    (tmp_path / "s.s").write_text(SUBSET_ASM)
    subprocess.run(["as", "--64", "-o", str(tmp_path / "s.o"), str(tmp_path / "s.s")], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(tmp_path / "s.o"),
                    str(tmp_path / "s.bin")], check=True)
    code = (tmp_path / "s.bin").read_bytes()
    got = decoded(code)
    assert got == objdump(code, tmp_path)
    # Every form of the subset is there, both widths of jmp.
    insns = x86.decode(code)
    assert {(i.op, i.length) for i in insns} >= {("jmp", 2), ("jmp", 5)}
    assert {i.op for i in insns} == {form.op for form in x86._FORMS}


@pytest.mark.parametrize("code,message", [
    (b"\x90", "unknown instruction at +0x0"),                   # nop
    (bytes.fromhex("f30f1efa0f8400000000"), "unknown instruction at +0x4"),  # je rel32
    (bytes.fromhex("f30f1efa4883ed08"), "unknown instruction at +0x4"),      # sub $8,%rbp
    (bytes.fromhex("f30f1efa813d0000"), "truncated instruction at +0x4"),
    (bytes.fromhex("e8000000"), "truncated instruction at +0x0"),
])
def test_decoder_refuses_bytes_outside_the_subset(code: bytes, message: str) -> None:
    with pytest.raises(x86.CodeError, match=message.replace("+", r"\+")):
        x86.decode(code)


def test_analysis_follows_the_three_outcomes() -> None:
    """Without relocations the operands are ("local", ...) places; the paths
    still show the shape: compares refuse, then R < 0 biased or not, R >= 0 stores."""
    routine = codegen.init_wrapper(slot_addend=848, rethunk=False, orc_type=ORC_TYPE_CALL, publish=PUBLISH,
                                   checks=CHECKS[:2])
    analysis = x86.analyse(x86.decode(routine.code), {})
    refusals = [p for p in analysis.paths if any(not c.holds for c in p.compares())]
    assert len(refusals) == 2 and all(p.eax == x86.Const(-8) and not p.calls() for p in refusals)
    ran = sorted((p.low, p.high, p.eax, len(p.stores())) for p in analysis.paths if p not in refusals)
    assert ran == [(-(2**31), -MAX_ERRNO - 1, x86.InitResult(0), 0),
                   (-MAX_ERRNO, -1, x86.InitResult(-INIT_FAILED_BIAS), 0),
                   (0, 2**31 - 1, x86.InitResult(0), 3)]
    assert {p.exit_sp for p in analysis.paths} == {8}
    assert {p.calls()[0].sp for p in analysis.paths if p.calls()} == {16}


# ------------------------------------------------- independence of codegen

def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
            names.update(f"{node.module or ''}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_the_validator_does_not_import_the_code_generator() -> None:
    assert not any("codegen" in n or "layout_checks" in n for n in _imports(DAEMON / "validate.py"))
    assert not any("split" in n for n in _imports(DAEMON / "validate_x86.py"))


@pytest.fixture(scope="module")
def modules() -> Path:
    return debian_kernel().modules_dir


# jbd2: exports (publish stores), a cleanup routine (arm ->exit); vrf: no
# cleanup (arm ->init with C's struct module); dummy: neither exports nor much else.
JBD2, VRF, DUMMY = "kernel/fs/jbd2/jbd2.ko", "kernel/drivers/net/vrf.ko", "kernel/drivers/net/dummy.ko"


def test_the_validator_never_calls_the_code_generator(modules: Path, monkeypatch) -> None:
    data = (modules / JBD2).read_bytes()
    split = split_module(data)

    def refuse(*args, **kwargs):
        raise AssertionError("the validator asked the code generator")

    for name in ("init_wrapper", "exit_stub", "OrcEntry", "Publish", "Check"):
        monkeypatch.setattr(codegen, name, refuse)
    monkeypatch.setattr(splitter, "layout_checks", refuse)
    validate_split(data, split.core, split.init)


# ------------------------------------------------------ codegen with bugs

Routine = codegen.Routine
Mutation = Callable[[Routine], Routine]


def _insns(routine: Routine, op: str) -> list[x86.Insn]:
    return [i for i in x86.decode(routine.code) if i.op == op]


def _patch(routine: Routine, at: int, new: bytes) -> Routine:
    code = bytearray(routine.code)
    code[at:at + len(new)] = new
    return dataclasses.replace(routine, code=bytes(code))


def _imm32(op: str, index: int, change: Callable[[int], int]) -> Mutation:
    def mutate(routine: Routine) -> Routine:
        insn = _insns(routine, op)[index]
        at = insn.end - 4
        return _patch(routine, at, (change(insn.imm) & 0xFFFFFFFF).to_bytes(4, "little"))
    return mutate


def _imm8(op: str, value: int) -> Mutation:
    def mutate(routine: Routine) -> Routine:
        return _patch(routine, _insns(routine, op)[0].end - 1, bytes([value]))
    return mutate


def _retarget(op: str, index: int, target: Callable[[Routine, x86.Insn], int]) -> Mutation:
    """Point the index-th *op* (a rel8 or rel32 jump) at target(routine, jump)."""
    def mutate(routine: Routine) -> Routine:
        jump = _insns(routine, op)[index]
        rel = target(routine, jump) - jump.end
        size = 1 if jump.length == 2 else 4
        return _patch(routine, jump.end - size, rel.to_bytes(size, "little", signed=True))
    return mutate


def _at(op: str, index: int = 0, plus: int = 0) -> Callable[[Routine, x86.Insn], int]:
    return lambda routine, jump: _insns(routine, op)[index].offset + plus


def _swap(routine: Routine, start: int, mid: int, end: int) -> Routine:
    """Exchange the code [start, mid) and [mid, end), relocations moving along
    (only for instructions without relative branches)."""
    code = routine.code
    moved = code[:start] + code[mid:end] + code[start:mid] + code[end:]

    def new(offset: int) -> int:
        if start <= offset < mid:
            return offset + (end - mid)
        if mid <= offset < end:
            return offset - (mid - start)
        return offset

    relocs = [dataclasses.replace(r, offset=new(r.offset)) for r in routine.relocs]
    return dataclasses.replace(routine, code=moved, relocs=relocs)


def _publish_before_arm(routine: Routine) -> Routine:
    lea, movl = _insns(routine, "lea_rdx")[0], _insns(routine, "movl_rip")
    return _swap(routine, lea.offset, lea.end + 7, movl[-1].end)


def _arm_before_call(routine: Routine) -> Routine:
    """The arm pair moved in front of the call (the init is called armed)."""
    call, lea = _insns(routine, "call")[0], _insns(routine, "lea_rdx")[0]
    start, mid, end = call.offset, lea.offset, lea.end + 7
    routine = _swap(routine, start, mid, end)
    # The jumps to .Lout in the moved block now start 14 bytes nearer to it (jns
    # still reaches what follows the block: the publish stores).
    for op in ("jl", "jmp"):
        for jump in _insns(routine, op):
            if start + (end - mid) <= jump.offset < end and jump.length == 2:
                routine = _patch(routine, jump.end - 1, bytes([routine.code[jump.end - 1] - (end - mid)]))
    return routine


def _drop_orc_step(routine: Routine) -> Routine:
    return dataclasses.replace(routine, orc=[e for e in routine.orc if e.sp_offset != 16])


def _call_reloc(addend: int) -> Mutation:
    def mutate(routine: Routine) -> Routine:
        relocs = [dataclasses.replace(r, addend=addend) if r.target == "init" else r
                  for r in routine.relocs]
        return dataclasses.replace(routine, relocs=relocs)
    return mutate


# (name, module, mutation of the wrapper, what the validator says)
BUGS: list[tuple[str, str, Mutation, str]] = [
    ("arm store after the publish stores", JBD2, _publish_before_arm, "arm store comes after"),
    ("arm store before the call", JBD2, _arm_before_call, "store before the original init"),
    ("jns into the middle of the lea", JBD2, _retarget("jns", 0, _at("lea_rdx", plus=1)),
     "not an instruction"),
    ("jns past the lea", JBD2, _retarget("jns", 0, _at("store_rdx")), "undefined %rdx"),
    ("jns to the exit: success not armed", JBD2, _retarget("jns", 0, _at("add_rsp")),
     "unreachable code"),
    ("jl to the bias: every negative biased", JBD2, _retarget("jl", 0, _at("sub_eax")),
     "not R"),
    ("failed init runs into the arm store", JBD2, _retarget("jmp", 0, _at("lea_rdx")),
     "stores into memory"),
    ("num_syms count off by one", JBD2, _imm32("movl_rip", 0, lambda v: v + 1), "publish stores"),
    ("bias missing", JBD2, _imm32("sub_eax", 0, lambda v: 0), "not R-0x10000"),
    ("bias off by one", VRF, _imm32("sub_eax", 0, lambda v: v + 1), "not R-0x10000"),
    ("errno bound off by one", VRF, _imm32("cmp_eax", 0, lambda v: v + 1),
     "results that need different treatment"),
    ("success runs into the refusal", VRF, _retarget("jmp", 1, _at("mov_eax")), "not R"),
    ("a jns that always jumps for the jmp over the refusal", VRF,
     lambda r: _patch(r, _insns(r, "jmp")[1].offset, b"\x79"), "can only go one way"),
    ("refusal skips -ENOEXEC", VRF, _retarget("jne", 0, _at("add_rsp")), "not -ENOEXEC"),
    ("refusal returns another error", DUMMY, _imm32("mov_eax", 0, lambda v: -22), "not -ENOEXEC"),
    ("refusal runs the init", DUMMY, _retarget("jne", 3, _at("call")), "still calls"),
    ("stack adjust missing", DUMMY, lambda r: _imm8("add_rsp", 0)(_imm8("sub_rsp", 0)(r)),
     "not 16-byte aligned"),
    ("stack adjust not undone", DUMMY, _imm8("add_rsp", 0), "stack adjust is not undone"),
    ("stack adjust too deep", DUMMY, lambda r: _imm8("add_rsp", 16)(_imm8("sub_rsp", 16)(r)),
     "not 16-byte aligned"),
    ("a layout compare expects another size", DUMMY,
     _imm32("cmpl_rip", 2, lambda v: v + 4096), "core_layout sizes"),
    ("calls init+4", DUMMY, _call_reloc(0), "not to the original init"),
    ("ORC step after the sub missing", DUMMY, _drop_orc_step, "orc_unwind_ip"),
    ("endbr64 missing", DUMMY, lambda r: _patch(r, 0, bytes.fromhex("0f1f4000")), "unknown instruction"),
    ("a nop after the return", DUMMY, lambda r: dataclasses.replace(r, code=r.code + b"\x90"),
     "unknown instruction"),
]


def test_every_other_target_of_every_jump_fails_validation(modules: Path) -> None:
    """Only one target of each jump in the wrapper is right, even where another
    would behave the same (a jump to the jmp over the refusal)."""
    data = (modules / DUMMY).read_bytes()
    split = split_module(data)
    wrapper = read_elf(split.init).section(splitter.WRAPPER_SECTION).data
    assert split.init.count(wrapper) == 1
    insns = x86.decode(wrapper)
    cases = 0
    for jump in insns:
        if jump.op not in ("jns", "jl", "jmp", "jne") or jump.field is not None and jump.op == "jmp" \
                and jump.target >= len(wrapper):
            continue
        for other in insns:
            if other.offset <= jump.offset or other.offset == jump.target:
                continue
            rel = other.offset - jump.end
            size = 1 if jump.length == 2 else 4
            if size == 1 and rel > 127:
                continue
            patched = bytearray(wrapper)
            patched[jump.end - size:jump.end] = rel.to_bytes(size, "little", signed=True)
            with pytest.raises(ValidationError):
                validate_split(data, split.core, split.init.replace(wrapper, bytes(patched)))
            cases += 1
    assert cases >= 40


REAL_INIT_WRAPPER = codegen.init_wrapper


def _with_wrapper_bug(monkeypatch, mutation: Mutation) -> None:
    monkeypatch.setattr(codegen, "init_wrapper", lambda **kw: mutation(REAL_INIT_WRAPPER(**kw)))


@pytest.mark.parametrize("rel", [JBD2, VRF, DUMMY])
def test_the_unmutated_splits_pass(modules: Path, rel: str) -> None:
    data = (modules / rel).read_bytes()
    split = split_module(data)
    validate_split(data, split.core, split.init)


@pytest.mark.parametrize("name,rel,mutation,message", BUGS, ids=[b[0] for b in BUGS])
def test_a_codegen_bug_fails_validation(modules: Path, monkeypatch, name: str, rel: str,
                                        mutation: Mutation, message: str) -> None:
    data = (modules / rel).read_bytes()
    _with_wrapper_bug(monkeypatch, mutation)
    split = split_module(data)
    with pytest.raises(ValidationError, match=message):
        validate_split(data, split.core, split.init)


def test_a_wrapper_built_with_wrong_parameters_fails_validation(modules: Path, monkeypatch) -> None:
    """codegen given the wrong slot (->init for a module with cleanup), no
    publish store, one layout compare short, ret where the original uses the
    return thunk."""
    data = (modules / JBD2).read_bytes()
    real = codegen.init_wrapper
    bugs: list[tuple[str, Callable, str]] = [
        ("slot_addend", lambda slot: 312, "not the arm store"),
        ("publish", lambda publish: (), "publish stores"),
        ("checks", lambda checks: checks[:-1], "core_layout sizes"),
        ("rethunk", lambda rethunk: False, "not jmp __x86_return_thunk"),
    ]
    for parameter, change, message in bugs:
        def buggy(**kw):
            kw[parameter] = change(kw[parameter])
            return real(**kw)

        monkeypatch.setattr(codegen, "init_wrapper", buggy)
        split = split_module(data)
        with pytest.raises(ValidationError, match=message):
            validate_split(data, split.core, split.init)


def test_an_exit_stub_that_does_more_fails_validation(modules: Path, monkeypatch) -> None:
    data = (modules / DUMMY).read_bytes()
    real = codegen.exit_stub

    def busy(**kw):
        stub = real(**kw)
        # mov $0,%eax between endbr64 and the return: harmless, but not a stub.
        extra = b"\xb8" + bytes(4)
        code = stub.code[:4] + extra + stub.code[4:]
        return Routine(code, [dataclasses.replace(r, offset=r.offset + 5) for r in stub.relocs],
                       [e if e.offset < 4 else dataclasses.replace(e, offset=e.offset + 5) for e in stub.orc],
                       [s + 5 for s in stub.return_sites])

    monkeypatch.setattr(codegen, "exit_stub", busy)
    split = split_module(data)
    with pytest.raises(ValidationError, match="exit stub does more than return"):
        validate_split(data, split.core, split.init)


# ------------------------------------------------ a kernel without rethunk

@pytest.fixture
def without_return_thunk(monkeypatch) -> None:
    """Splitter and validator both take the original for one built without
    CONFIG_RETHUNK: the return is ret; int3 (the original's own init code still
    jumps to the thunk, which I imports with the original's version)."""
    from initsplit import validate

    for module in (splitter, validate):
        monkeypatch.setattr(module, "RETURN_THUNK", "__no_such_return_thunk")


def test_ret_wrappers_pass_and_their_guard_is_checked(modules: Path, monkeypatch,
                                                     without_return_thunk: None) -> None:
    data = (modules / JBD2).read_bytes()
    split = split_module(data)
    validate_split(data, split.core, split.init)
    init = read_elf(split.init)
    wrapper = init.section(splitter.WRAPPER_SECTION).data
    assert wrapper.endswith(b"\xc3\xcc")
    assert not [s for s in init.symbols if s.shndx == SHN_UNDEF and s.name == "__no_such_return_thunk"]
    # The int3 after the ret is the straight-line-speculation guard: a wrapper
    # without it (the ret then last) is refused.
    def unguarded(r: Routine) -> Routine:
        last = dataclasses.replace(r.orc[-1], offset=len(r.code) - 1)
        return dataclasses.replace(r, code=r.code[:-1], orc=r.orc[:-1] + [last])

    def dead_ret(r: Routine) -> Routine:
        return dataclasses.replace(r, code=r.code + b"\xc3\xcc")

    for mutation, message in ((unguarded, "lacks its int3"), (dead_ret, "unreachable code")):
        _with_wrapper_bug(monkeypatch, mutation)
        split = split_module(data)
        with pytest.raises(ValidationError, match=message):
            validate_split(data, split.core, split.init)
