"""Discard=kallsyms-data on real Debian 6.1 modules, without a kernel: the rewrite
clears the names of exactly the symbols CONFIG_KALLSYMS_ALL adds to the core
kallsyms, changes nothing else, and decide() weighs and reports it.

That the kernel agrees (/proc/modules, /proc/kallsyms) is tests/test_kallsyms_vm.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from initsplit.elf.discard import data_symbols, sections, without_data_symbol_names
from initsplit.layout import layout_of, rules_for_tree
from initsplit.split.decide import decide
from initsplit.split.discarding import without_classes
from initsplit.split.policy import SplitOptions
from initsplit.validate import validate_split
from tests.testbed.kernel import debian_kernel

MODULES = ("kernel/drivers/net/dummy.ko", "kernel/fs/jbd2/jbd2.ko", "kernel/fs/ext4/ext4.ko",
           "kernel/drivers/block/loop.ko", "kernel/net/bridge/bridge.ko",
           "kernel/net/netfilter/nf_conntrack.ko", "kernel/drivers/md/dm-mod.ko")
DROP = SplitOptions(discard=frozenset({"btf", "kallsyms-data"}))


@pytest.fixture(scope="module")
def modules() -> Path:
    return debian_kernel().modules_dir


@pytest.mark.parametrize("rel", MODULES)
def test_the_rewrite_leaves_the_core_kallsyms_of_a_kernel_without_kallsyms_all(modules: Path,
                                                                               rel: str) -> None:
    data = (modules / rel).read_bytes()
    rules = rules_for_tree(modules)
    assert rules.kallsyms_all
    rewritten = without_data_symbol_names(data)
    assert data_symbols(data) and not data_symbols(rewritten)
    # is_core_symbol() with KALLSYMS_ALL over the rewritten module keeps what it
    # keeps without KALLSYMS_ALL over the original: the code symbols.
    assert layout_of(rewritten, rules).core == \
        layout_of(data, dataclasses.replace(rules, kallsyms_all=False)).core
    # Page-rounded: a small module's kallsyms may fit its page either way.
    assert layout_of(rewritten, rules).core.size <= layout_of(data, rules).core.size


@pytest.mark.parametrize("rel", MODULES[:3])
def test_only_symbol_names_change(modules: Path, rel: str) -> None:
    data = (modules / rel).read_bytes()
    rewritten = without_data_symbol_names(data)
    assert data.endswith(b"~Module signature appended~\n")
    assert not rewritten.endswith(b"~Module signature appended~\n")  # it no longer matches
    before, after = sections(data), sections(rewritten)
    assert [(s.name, s.offset, s.size) for s in before] == [(s.name, s.offset, s.size) for s in after]
    for old in before:
        if old.name != ".symtab" and old.file_bytes:
            assert rewritten[old.offset:old.offset + old.size] == data[old.offset:old.offset + old.size]
    symtab = next(s for s in before if s.name == ".symtab")
    cleared = set(data_symbols(data))
    for i in range(symtab.size // 24):
        at = symtab.offset + 24 * i
        if i in cleared:
            assert rewritten[at:at + 4] == bytes(4) and rewritten[at + 4:at + 24] == data[at + 4:at + 24]
        else:
            assert rewritten[at:at + 24] == data[at:at + 24]


def test_decide_drops_the_names_before_it_splits(modules: Path) -> None:
    data = (modules / "kernel/fs/jbd2/jbd2.ko").read_bytes()
    rules = rules_for_tree(modules)
    options = dataclasses.replace(DROP, rules=rules, two_stage="always")
    decision = decide(data, options)
    assert decision.outcome == "split" and decision.discarded == ("btf", "kallsyms-data")
    # What the class gives back is the plain load's, page-exact.
    plain = layout_of(data, rules).core.pages
    assert decision.kallsyms_bytes == (plain - layout_of(without_data_symbol_names(data), rules).core.pages) * 4096
    assert decision.kallsyms_bytes > 0
    # C lacks the names, and is what the validator checked (against the rewritten original).
    core = decision.split.core
    assert not data_symbols(core)
    validate_split(without_data_symbol_names(data), without_classes(core, ()), decision.split.init, rules)
    # Two-stage is weighed against the plain load with the same classes.
    assert decision.plain_core_pages == layout_of(without_data_symbol_names(data), rules).core.pages


def test_a_plain_load_gets_the_original_without_both_classes(modules: Path) -> None:
    data = (modules / "kernel/lib/crc7.ko").read_bytes()  # nothing to split
    decision = decide(data, DROP)
    assert decision.outcome == "nothing" and decision.discarded == ("btf", "kallsyms-data")
    assert decision.rewritten == without_classes(data, ("btf", "kallsyms-data"))
    # A module that keeps its BTF (KeepBTF=) still loses its data symbols' names.
    keep = decide(data, dataclasses.replace(DROP, keep_btf=frozenset({"crc7"})))
    assert keep.discarded == ("kallsyms-data",) and keep.btf_bytes == 0
    assert keep.rewritten == without_data_symbol_names(data)


def test_kept_by_default(modules: Path) -> None:
    data = (modules / "kernel/lib/crc7.ko").read_bytes()
    decision = decide(data)
    assert decision.discarded == ("btf",) and decision.kallsyms_bytes == 0
    assert data_symbols(decision.rewritten)


def test_an_entry_made_without_the_class_is_decided_again() -> None:
    # The class changes C (it is applied before the split): the options tag says so.
    assert SplitOptions().tag == "two-stage=when-not-worse writable-ro-after-init=no"
    assert DROP.tag == "two-stage=when-not-worse writable-ro-after-init=no discard=kallsyms-data"


def test_a_live_patch_module_keeps_its_names(modules: Path) -> None:
    from initsplit.split.modinfo import parse_modinfo, render_modinfo

    data = (modules / "kernel/lib/crc7.ko").read_bytes()
    raw = next(s for s in sections(data) if s.name == ".modinfo")
    info = parse_modinfo(data[raw.offset:raw.offset + raw.size])
    patched = render_modinfo([("livepatch", "Y"), *info])[:raw.size]
    if len(patched) < raw.size:
        patched += bytes(raw.size - len(patched))
    livepatch = data[:raw.offset] + patched + data[raw.offset + raw.size:]
    # (The renamed field takes the place of the tail of the last one: same size.)
    decision = decide(livepatch, DROP)
    assert "kallsyms-data" not in decision.discarded and decision.kallsyms_bytes == 0


def test_a_module_a_live_patch_refers_to_is_loaded_as_the_original(tmp_path: Path) -> None:
    from initsplit.loader.kernel_state import livepatch_targets

    (tmp_path / "kernel/livepatch/kpatch_1/ext4").mkdir(parents=True)
    (tmp_path / "kernel/livepatch/kpatch_1/vmlinux").mkdir()
    assert livepatch_targets("ext4", sys_root=tmp_path)
    assert not livepatch_targets("jbd2", sys_root=tmp_path)
    assert not livepatch_targets("ext4", sys_root=tmp_path / "none")
