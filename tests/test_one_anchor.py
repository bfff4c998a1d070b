"""One anchor: C exports its struct module and nothing else before init, and I
reaches every other part of C by an offset the layout model computes, which the
validator recomputes; the daemon checks the sections I reaches against the
kernel's addresses before it loads I, and I's wrapper C's core_layout sizes.

On real Debian 6.1 modules; that the kernel lays C out as the model says is
proved in QEMU by every two-stage load (the daemon loads plain otherwise) and by
tests/test_loader_vm.py, where a placement or a wrapper expecting another layout
keeps I out or refuses.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from initsplit.elf import read_elf
from initsplit.elf.constants import SHN_UNDEF
from initsplit.layout import LayoutRules, module_layout
from initsplit.split import split_module
from initsplit.split.codegen import ENOEXEC
from initsplit.split.splitter import WRAPPER_SECTION, anchor_prefix, layout_checks
from initsplit.split.tables import KNOWN_STRUCT_MODULE_LAYOUTS, MODULE_LAYOUT_FIELDS
from initsplit.validate import ValidationError, validate_split
from tests.elfmut import RELA_SIZE, RawElf, put
from tests.testbed.kernel import debian_kernel

# A small module (dummy), exports (jbd2, mbcache), trace eval maps and many init
# references into C (ext4, xfs), a block driver (loop).
MODULES = ("kernel/drivers/net/dummy.ko", "kernel/fs/jbd2/jbd2.ko", "kernel/fs/mbcache.ko",
           "kernel/fs/ext4/ext4.ko", "kernel/fs/xfs/xfs.ko", "kernel/drivers/block/loop.ko")
LAYOUT = next(iter(KNOWN_STRUCT_MODULE_LAYOUTS.values()))


@pytest.fixture(scope="module")
def modules() -> Path:
    return debian_kernel().modules_dir


def anchor_relocations(init: bytes, anchor: str) -> list[tuple[int, int]]:
    """(file offset of the r_addend, the addend) of every relocation of I against the anchor."""
    obj = read_elf(init)
    index = next(i for i, s in enumerate(obj.symbols) if s.name == anchor)
    raw = RawElf(init)
    out = []
    for rela in raw.relas(alloc_target=True):
        for entry in range(rela.size // RELA_SIZE):
            _, symbol, _, addend = raw.rela(rela, entry)
            if symbol == index:
                out.append((rela.offset + entry * RELA_SIZE + 16, addend))
    return out


@pytest.mark.parametrize("rel", MODULES)
def test_c_exports_one_anchor_its_struct_module(modules: Path, rel: str) -> None:
    data = (modules / rel).read_bytes()
    split = split_module(data)
    assert split.anchors == (anchor_prefix(split.name) + "0",)
    report = validate_split(data, split.core, split.init)
    assert report.anchors == 1
    # I imports no other anchor, and C's visible __ksymtab is one record.
    init = read_elf(split.init)
    imported = {s.name for s in init.symbols[1:] if s.shndx == SHN_UNDEF}
    assert {n for n in imported if n.startswith("0_initsplit_")} == set(split.anchors)
    assert read_elf(split.core).section("__ksymtab").size == 12


@pytest.mark.parametrize("rel", MODULES)
def test_the_validator_recomputes_every_offset_from_the_anchor(modules: Path, rel: str) -> None:
    data = (modules / rel).read_bytes()
    split = split_module(data)
    validate_split(data, split.core, split.init)
    relocs = anchor_relocations(split.init, split.anchors[0])
    # The wrapper's own references (struct module fields) plus init's into C.
    assert len(relocs) >= 4
    rng = random.Random(rel)
    for at, addend in rng.sample(relocs, min(5, len(relocs))):
        for shift in (1, -4096, 4096):
            bad = put(split.init, at, "<q", addend + shift)
            with pytest.raises(ValidationError):
                validate_split(data, split.core, bad)


@pytest.mark.parametrize("rel", MODULES)
def test_the_wrapper_checks_cs_core_layout_against_the_model(modules: Path, rel: str) -> None:
    data = (modules / rel).read_bytes()
    split = split_module(data)
    core = read_elf(split.core)
    marks = module_layout(core).core_marks()
    checks = layout_checks(core, LayoutRules(), LAYOUT.core_layout)
    f = MODULE_LAYOUT_FIELDS
    assert [(c.field - LAYOUT.core_layout, c.value) for c in checks] == \
        list(zip((f.text_size, f.ro_size, f.ro_after_init_size, f.size), marks))
    # text <= ro <= ro_after_init <= size, each on a page boundary (STRICT_MODULE_RWX).
    assert list(marks) == sorted(marks) and all(m % 4096 == 0 for m in marks)
    # Each check is "cmpl $value,field(%rip)" in the wrapper; one that expects
    # another layout is not the wrapper the validator derives.
    wrapper = read_elf(split.init).section(WRAPPER_SECTION).data
    for check in checks:
        at = wrapper.index(b"\x81\x3d" + bytes(4) + struct.pack("<I", check.value))
        patched = bytearray(wrapper)
        patched[at + 6:at + 10] = struct.pack("<I", check.value + 4096)
        assert split.init.count(wrapper) == 1
        with pytest.raises(ValidationError, match="wrapper"):
            validate_split(data, split.core, split.init.replace(wrapper, bytes(patched)))
    # The refusal is -ENOEXEC, in the kernel's error range: "init did not run".
    assert b"\xb8" + struct.pack("<i", -ENOEXEC) in wrapper


@pytest.mark.parametrize("rel", MODULES)
def test_what_the_daemon_checks_is_what_the_validator_proved(modules: Path, rel: str) -> None:
    from initsplit.split.decide import decide
    from initsplit.split.policy import SplitOptions

    data = (modules / rel).read_bytes()
    decision = decide(data, SplitOptions(two_stage="always", writable_ro_after_init=True))
    assert decision.outcome == "split", decision.reason
    reached = dict(decision.split.reached)
    assert decision.report.reached == decision.split.reached
    # C's struct module is the anchor; every section is named as C has it, at the
    # model's offset from it.
    assert reached[".gnu.linkonce.this_module"] == 0
    core = read_elf(decision.split.core)
    layout = module_layout(core)
    base = layout.core_offsets[core.section(".gnu.linkonce.this_module").index]
    for name, offset in reached.items():
        section = core.section(name)
        assert section.size and layout.core_offsets[section.index] - base == offset, name
