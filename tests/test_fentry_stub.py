"""I's exit stub is a traced function, so I's ftrace page outlives its init code.

All of I's __mcount_loc records describe init code; the kernel keeps them in
ftrace pages of I's own (ftrace_process_locs(), kernel/trace/ftrace.c), and when
do_init_module() frees the init layout, ftrace_free_mem() removes them and
waits in synchronize_rcu() for each page that became empty, on every I load.
The splitter gives the stub a `call __fentry__` after its endbr64 and one
__mcount_loc record for it (split/codegen.py exit_stub()). The validator must
accept exactly that: a record a byte off, a stub without the call, or a call to
anything but __fentry__ would make ftrace_make_nop() (arch/x86/kernel/ftrace.c)
WARN and disable ftrace at load, and are refused here, on 6.1 and 6.12 modules.
"""

from __future__ import annotations

import struct

import pytest

from initsplit.elf import read_elf
from initsplit.elf.constants import R_X86_64_64
from initsplit.layout.rules import LayoutRules
from initsplit.modfile import read_module
from initsplit.split import codegen, split_module
from initsplit.split.splitter import FENTRY, MCOUNT_LOC, STUB_SECTION
from initsplit.validate import ValidationError, validate_split
from tests.elfmut import RELA_SIZE, RawElf, put
from tests.testbed.fixtures import kernel612, rules612  # noqa: F401  (pytest fixtures)
from tests.testbed.kernel import DebianKernel, debian_kernel

MODULES = ("dummy", "ext4")
CALL_AT = len(codegen.ENDBR64)  # the call follows the IBT landing pad


@pytest.fixture(scope="module", params=("6.1", "6.12"))
def build(request: pytest.FixtureRequest) -> tuple[dict[str, bytes], LayoutRules | None]:
    """The originals of MODULES and the layout rules to split them with."""
    if request.param == "6.1":
        modules = debian_kernel().modules_dir
        rels = {"dummy": "kernel/drivers/net/dummy.ko", "ext4": "kernel/fs/ext4/ext4.ko"}
        return {n: (modules / r).read_bytes() for n, r in rels.items()}, None
    kernel: DebianKernel = request.getfixturevalue("kernel612")
    rules: LayoutRules = request.getfixturevalue("rules612")
    return {n: read_module(kernel.module(n)) for n in MODULES}, rules


def _validate(data: bytes, core: bytes, init: bytes, rules: LayoutRules | None) -> None:
    if rules is None:
        validate_split(data, core, init)
    else:
        validate_split(data, core, init, rules)


def _split(data: bytes, rules: LayoutRules | None):
    return split_module(data) if rules is None else split_module(data, rules)


def _stub_record(init: bytes) -> tuple[int, int]:
    """(file offset of r_addend, addend) of I's __mcount_loc relocation that
    targets the stub section: there must be exactly one."""
    obj = read_elf(init)
    stub = next(s.index for s in obj.sections if s.name == STUB_SECTION)
    raw = RawElf(init)
    mcount = raw.section(MCOUNT_LOC)
    assert mcount is not None
    found = []
    for rela in raw.relas(alloc_target=True):
        if rela.info != mcount.index:
            continue
        for entry in range(rela.size // RELA_SIZE):
            _, symbol, type_, addend = raw.rela(rela, entry)
            sym = obj.symbols[symbol]
            if sym.shndx == stub:
                assert type_ == R_X86_64_64
                found.append((rela.offset + entry * RELA_SIZE + 16, addend + sym.value))
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("name", MODULES)
def test_the_stub_calls_fentry_and_has_its_record(build, name: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    originals, rules = build
    data = originals[name]
    split = _split(data, rules)
    _validate(data, split.core, split.init, rules)
    init = read_elf(split.init)
    stub = init.section(STUB_SECTION)
    assert stub.data[:CALL_AT + 1] == codegen.ENDBR64 + b"\xe8"
    # The call's rel32 is relocated against __fentry__ (the loader writes it).
    relocs = init.relocations[stub.index]
    call = [init.symbols[s].name for o, s in zip(relocs.offsets, relocs.symbols) if o == CALL_AT + 1]
    assert call == [FENTRY]
    assert _stub_record(split.init)[1] == CALL_AT
    # C is untouched by the change: the same bytes as a split with a plain stub,
    # whose I differs only by the call (5 bytes), its relocation and record.
    real = codegen.exit_stub
    monkeypatch.setattr(codegen, "exit_stub", lambda **kw: real(**{**kw, "traced": False}))
    plain = _split(data, rules)
    assert plain.core == split.core
    assert plain.init != split.init
    assert read_elf(plain.init).section(STUB_SECTION).data == codegen.ENDBR64 + stub.data[CALL_AT + 5:]


@pytest.mark.parametrize("name", MODULES)
def test_a_stub_record_off_the_call_is_refused(build, name: str) -> None:
    originals, rules = build
    data = originals[name]
    split = _split(data, rules)
    at, addend = _stub_record(split.init)
    sym_value = addend - struct.unpack_from("<q", split.init, at)[0]
    for wrong in (0, CALL_AT + 1, CALL_AT - 1, CALL_AT + 5):
        bad = put(split.init, at, "<q", wrong - sym_value)
        with pytest.raises(ValidationError, match=MCOUNT_LOC):
            _validate(data, split.core, bad, rules)


@pytest.mark.parametrize("name", MODULES)
def test_a_stub_without_the_call_or_its_record_is_refused(build, name: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    originals, rules = build
    data = originals[name]
    real = codegen.exit_stub

    def untraced(**kw):
        return real(**{**kw, "traced": False})

    monkeypatch.setattr(codegen, "exit_stub", untraced)
    split = _split(data, rules)
    with pytest.raises(ValidationError, match="no __fentry__ call"):
        _validate(data, split.core, split.init, rules)

    def unrecorded(**kw):
        routine = real(**kw)
        routine.fentry_sites = []
        return routine

    monkeypatch.setattr(codegen, "exit_stub", unrecorded)
    split = _split(data, rules)
    with pytest.raises(ValidationError, match=MCOUNT_LOC):
        _validate(data, split.core, split.init, rules)


@pytest.mark.parametrize("name", MODULES)
def test_a_stub_calling_anything_else_is_refused(build, name: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The call made against the original init instead (a role mix-up), or
    its relocation dropped (a call to the next instruction)."""
    originals, rules = build
    data = originals[name]
    real = codegen.exit_stub

    def to_init(**kw):
        routine = real(**kw)
        routine.relocs = [codegen.CodeReloc(r.offset, r.type, "init" if r.target == "fentry"
                                            else r.target, r.addend) for r in routine.relocs]
        return routine

    monkeypatch.setattr(codegen, "exit_stub", to_init)
    split = _split(data, rules)
    with pytest.raises(ValidationError, match="not __fentry__"):
        _validate(data, split.core, split.init, rules)

    def unrelocated(**kw):
        routine = real(**kw)
        routine.relocs = [r for r in routine.relocs if r.target != "fentry"]
        return routine

    monkeypatch.setattr(codegen, "exit_stub", unrelocated)
    split = _split(data, rules)
    with pytest.raises(ValidationError, match="not __fentry__"):
        _validate(data, split.core, split.init, rules)
