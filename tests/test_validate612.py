"""The validator on Debian 13's Linux 6.12: I reaches C per struct module_memory type.

On 6.12 the validator places C with its own run of layout/linux612.py and names
every place in C that I reaches as (memory, offset in it), so an offset taken
from the wrong anchor, or in the wrong memory, is not the original's target. It
requires one anchor per memory that I reaches, named for its memory and at the
start of a non-empty section of it (C's struct module for MOD_DATA), and the
wrapper's compares to be mem[type].size of every core memory. Here: the
splitter's pairs pass, and pairs a splitter with a plausible slip would make
fail, on real 6.12 modules.
"""

from __future__ import annotations

import random

import pytest

from initsplit.elf import read_elf
from initsplit.layout.rules import LayoutRules
from initsplit.modfile import read_module
from initsplit.split import codegen, split_module, splitter
from initsplit.split.decide import decide
from initsplit.split.policy import SplitOptions
from initsplit.split.tables import KNOWN_STRUCT_MODULE_MEMORY_LAYOUTS
from initsplit.validate import ValidationError, validate_split
from tests.elfmut import RELA_SIZE, RawElf, put
from tests.test_one_anchor import anchor_relocations
from tests.testbed.fixtures import kernel612, rules612  # noqa: F401  (pytest fixtures)
from tests.testbed.kernel import DebianKernel

MODULES = ("dummy", "loop", "mbcache", "jbd2", "ext4")
LAYOUT = next(iter(KNOWN_STRUCT_MODULE_MEMORY_LAYOUTS.values()))


@pytest.fixture(scope="module")
def originals(kernel612: DebianKernel) -> dict[str, bytes]:  # noqa: F811
    return {name: read_module(kernel612.module(name)) for name in MODULES}


@pytest.mark.parametrize("name", MODULES)
def test_the_splitters_pairs_pass(originals: dict[str, bytes], rules612: LayoutRules,  # noqa: F811
                                  name: str) -> None:
    data = originals[name]
    split = split_module(data, rules612)
    report = validate_split(data, split.core, split.init, rules612)
    assert report.anchors == len(split.anchors) >= 2
    assert report.reached == () and report.reached_from == split.reached_from
    # Through decide(), as the daemon and initsplit split ask: a split.
    decision = decide(data, SplitOptions(two_stage="always", writable_ro_after_init=True,
                                         rules=rules612))
    assert decision.outcome == "split", decision.reason
    assert decision.report.reached_from == decision.split.reached_from


@pytest.mark.parametrize("name", MODULES)
def test_every_offset_from_every_anchor_is_recomputed(originals: dict[str, bytes],  # noqa: F811
                                                       rules612: LayoutRules, name: str) -> None:
    data = originals[name]
    split = split_module(data, rules612)
    rng = random.Random(name)
    for anchor in split.anchors:
        relocs = anchor_relocations(split.init, anchor)
        assert relocs, anchor
        for at, addend in rng.sample(relocs, min(4, len(relocs))):
            for shift in (1, -4096, 4096):
                with pytest.raises(ValidationError):
                    validate_split(data, split.core, put(split.init, at, "<q", addend + shift), rules612)


def _swap_symbols(init: bytes, old: str, new: str) -> bytes:
    """I with one relocation against anchor *old* made against anchor *new*,
    addend unchanged: the offset taken from the wrong memory's anchor."""
    obj = read_elf(init)
    index = {s.name: i for i, s in enumerate(obj.symbols)}
    raw = RawElf(init)
    for rela in raw.relas(alloc_target=True):
        for entry in range(rela.size // RELA_SIZE):
            at = rela.offset + entry * RELA_SIZE
            _, symbol, type_, _ = raw.rela(rela, entry)
            if symbol == index[old]:
                return put(init, at + 8, "<Q", index[new] << 32 | type_)
    raise AssertionError(f"no relocation against {old}")


@pytest.mark.parametrize("name", MODULES)
def test_an_offset_from_another_memorys_anchor_fails(originals: dict[str, bytes],  # noqa: F811
                                                     rules612: LayoutRules, name: str) -> None:
    data = originals[name]
    split = split_module(data, rules612)
    for old in split.anchors:
        for new in split.anchors:
            if old != new:
                with pytest.raises(ValidationError):
                    validate_split(data, split.core, _swap_symbols(split.init, old, new), rules612)


def test_anchors_named_for_another_memory_fail(originals: dict[str, bytes], rules612: LayoutRules,  # noqa: F811
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(splitter, "_MEMORY_ANCHOR_SUFFIX",
                        {"data": "0", "text": "2", "rodata": "1", "ro_after_init": "3"})
    data = originals["dummy"]
    split = split_module(data, rules612)
    with pytest.raises(ValidationError, match="is not the anchor of C's memory|not sorted"):
        validate_split(data, split.core, split.init, rules612)


def test_an_anchor_of_a_memory_i_does_not_reach_fails(originals: dict[str, bytes],  # noqa: F811
                                                      rules612: LayoutRules,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A splitter that keeps the trial's anchors: ext4's C has a read-only-after-init
    memory (its __jump_table) that I does not reach."""
    def keep_every(original, rules):
        prefix = splitter.anchor_prefix(original.name)
        module = splitter._Anchor(prefix + "0", original.this_module.index, "data")
        trial = splitter._build_core(original, (module,))
        every = (module, *splitter._first_in_memories(trial, read_elf(trial.data), rules, prefix))
        core = splitter._build_core(original, every)
        placement = splitter._place_core_memories(original, core, read_elf(core.data), rules, every)
        return core, placement, splitter._build_init(original, placement)

    data = originals["ext4"]
    assert len(split_module(data, rules612).anchors) == 3
    monkeypatch.setattr(splitter, "_anchor_memories", keep_every)
    split = split_module(data, rules612)
    assert len(split.anchors) == 4
    with pytest.raises(ValidationError, match="C anchors the memories"):
        validate_split(data, split.core, split.init, rules612)


@pytest.mark.parametrize("name", ("dummy", "jbd2"))
def test_a_wrapper_that_checks_other_sizes_fails(originals: dict[str, bytes],  # noqa: F811
                                                 rules612: LayoutRules,
                                                 monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """A check short, a size a page off, 6.1's core_layout fields instead of mem[]."""
    data = originals[name]
    real = codegen.init_wrapper
    core_layout_checks = tuple(codegen.Check(LAYOUT.mem + off, 4096) for off in (8, 12, 16, 20))
    bugs = [
        lambda checks: checks[:-1],
        lambda checks: (*checks[:-1], codegen.Check(checks[-1].field, checks[-1].value + 4096)),
        lambda checks: (*checks[:1], codegen.Check(checks[1].field + 72, checks[1].value), *checks[2:]),
        lambda checks: core_layout_checks,
    ]
    for bug in bugs:
        def buggy(**kw):
            kw["checks"] = bug(kw["checks"])
            return real(**kw)

        monkeypatch.setattr(codegen, "init_wrapper", buggy)
        split = split_module(data, rules612)
        with pytest.raises(ValidationError, match="core_layout sizes"):
            validate_split(data, split.core, split.init, rules612)
