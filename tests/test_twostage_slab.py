"""layout/twostage_slab.py on real Debian 6.1 modules: the slab a two-stage load
takes more than a plain one. The kernel's side of it (the sections each module
lists in sysfs) is checked in tests/test_savings_vm.py; the slab itself, 157 kB
modelled against 158 kB measured for 29 modules, by bench/twostage_slab.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from initsplit.analyze import analyze_module, summarize
from initsplit.elf import read_elf
from initsplit.layout import LayoutRules, module_layout
from initsplit.layout.twostage_slab import (KERNFS_NODE, kmalloc_bucket, listed_sections,
                                            sections_slab_bytes, twostage_slab_bytes)
from initsplit.split import split_module
from tests.testbed.kernel import debian_kernel

DUMMY = "kernel/drivers/net/dummy.ko"


@pytest.fixture(scope="module")
def modules() -> Path:
    return debian_kernel().modules_dir


def test_kmalloc_buckets() -> None:
    assert [kmalloc_bucket(n) for n in (1, 8, 9, 65, 97, 129, 193, 257, 513, 1025, 2049, 4097)] == \
        [8, 8, 16, 96, 128, 192, 256, 512, 1024, 2048, 4096, 8192]
    assert kmalloc_bucket(8193) == 12288  # whole pages above 8 KiB


def test_listed_sections_are_the_allocated_ones(modules: Path) -> None:
    obj = read_elf((modules / DUMMY).read_bytes())
    listed = listed_sections(obj)
    # rewrite_section_headers() takes SHF_ALLOC from these two; layout_symtab() gives it to
    # the symbol tables.
    assert ".modinfo" not in listed and "__versions" not in listed
    assert {".symtab", ".strtab", ".gnu.linkonce.this_module", ".init.text"} <= set(listed)
    assert ".symtab" not in listed_sections(obj, kallsyms=False)
    # Empty sections are not listed (sect_empty()).
    assert all(s.size for s in obj.sections if s.name in listed and s.name not in (".symtab", ".strtab"))


def test_two_stage_costs_the_init_modules_objects(modules: Path) -> None:
    data = (modules / DUMMY).read_bytes()
    original = read_elf(data)
    split = split_module(data)
    core, init = read_elf(split.core), read_elf(split.init)
    cost = twostage_slab_bytes(original, core, init, split.init_name)
    # I's directory and files alone are 10 kernfs nodes; its sections add more.
    assert cost > KERNFS_NODE * 10 + sections_slab_bytes(init)
    # C lists none of the original's .init sections, but the anchor's export tables:
    # for dummy, which exports nothing, that comes out even.
    assert not [n for n in listed_sections(core) if n.startswith(".init")]
    assert {"__ksymtab", "__ksymtab_strings"} <= set(listed_sections(core))
    assert sections_slab_bytes(core) == sections_slab_bytes(original)
    # More than the page a two-stage load of dummy could win, and it does win none.
    assert 4096 < cost < 8192
    assert module_layout(core).core.pages == module_layout(original).core.pages


def test_analyze_reports_it_beside_the_core_pages(modules: Path) -> None:
    rules = LayoutRules()
    result = analyze_module(modules / DUMMY, DUMMY, rules)
    assert result.outcome == "plain" and result.twostage_slab > 4096
    assert result.as_dict()["twostage_slab_bytes"] == result.twostage_slab
    summary = summarize([result], rules, tree="t")
    assert summary["savings"]["twostage_slab"] == {
        "bytes": result.twostage_slab, "modules": 1,
        "net_bytes": result.saving_if_split * 4096 - result.twostage_slab, "modules_freeing_more": 0}
