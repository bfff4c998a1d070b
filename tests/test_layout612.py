"""The Linux 6.12 layout model (layout/linux612.py) on Debian 13's real modules.

What the kernel itself says is tests/test_layout612_vm.py's; these check the
model's own promises on a handful of .ko.xz files: dummy's 12,288 bytes (3 pages,
where the 6.1 model, with its page for the symbol tables alone, says 4), every
group a whole number of pages, and core_placement() agreeing with core_offsets.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from initsplit.elf import read_elf
from initsplit.layout import linux61
from initsplit.layout.linux612 import core_placement, layout_of, module_layout
from initsplit.layout.records import CORE_GROUPS, INIT_GROUPS
from initsplit.layout.rules import LayoutRules
from initsplit.modfile import read_module
from tests.testbed.fixtures import kernel612, rules612  # noqa: F401  (pytest fixtures)
from tests.testbed.kernel import DebianKernel

MODULES = ("dummy", "loop", "ext4", "xfs", "nf_tables", "wireguard", "openvswitch", "raid6_pq", "kvm")


def ko(kernel612: DebianKernel, name: str) -> bytes:
    path: Path = kernel612.module(name)
    return read_module(path)


def test_dummy_is_three_pages(kernel612: DebianKernel, rules612: LayoutRules) -> None:
    data = ko(kernel612, "dummy")
    layout = layout_of(data, rules612)
    # /proc/modules on 6.12.117+deb13-amd64 (tests/test_layout612_vm.py): text,
    # rodata, data with the symbol tables in its last page.
    assert layout.core.size == 12288, layout.core.groups
    assert dict(layout.core.groups) == {"text": 4096, "rodata": 4096, "ro_after_init": 0,
                                        "data": 4096, "kallsyms": 0}
    assert linux61.layout_of(data, rules612).core.size == 16384  # 6.1's: one page more


@pytest.mark.parametrize("name", MODULES)
def test_groups_are_whole_pages(kernel612: DebianKernel, rules612: LayoutRules, name: str) -> None:
    layout = layout_of(ko(kernel612, name), rules612)
    assert tuple(g for g, _ in layout.core.groups) == CORE_GROUPS
    assert tuple(g for g, _ in layout.init.groups) == INIT_GROUPS
    for which in (layout.core, layout.init):
        for group, size in which.groups:
            assert size >= 0 and size % rules612.page_size == 0, (name, group, size)
    assert layout.core.group("text") and layout.core.group("data")
    # The sections' bytes fit in what was allocated for them.
    assert layout.core_bytes <= layout.core.size and layout.init_bytes <= layout.init.size
    assert layout.flat_core <= layout.flat_all


@pytest.mark.parametrize("name", MODULES)
def test_placement_per_memory(kernel612: DebianKernel, rules612: LayoutRules, name: str) -> None:
    obj = read_elf(ko(kernel612, name))
    layout = module_layout(obj, rules612)
    placement = core_placement(obj, rules612)
    assert {i: offset for i, (_, offset) in placement.items()} == dict(layout.core_offsets)
    by_memory: dict[str, list[tuple[int, int]]] = {}
    for i, (memory, offset) in placement.items():
        by_memory.setdefault(memory, []).append((offset, obj.sections[i].size))
    for memory, spans in by_memory.items():
        spans.sort()
        # Back to back, no overlap, all inside the memory's page-rounded size.
        for (a, size_a), (b, _) in zip(spans, spans[1:]):
            assert a + size_a <= b, (name, memory)
        end = spans[-1][0] + spans[-1][1]
        limit = layout.core.group(memory) + (layout.core.group("kallsyms") if memory == "data" else 0)
        assert end <= limit, (name, memory, end, limit)
    # __jump_table and .data..ro_after_init are read-only after init, .data..percpu
    # is in no memory of the module's.
    names = {obj.sections[i].name: memory for i, (memory, _) in placement.items()}
    for section in ("__jump_table", ".data..ro_after_init"):
        if section in names:
            assert names[section] == "ro_after_init", (name, section)
    assert ".data..percpu" not in names


def test_init_resident_keeps_init_in_core(kernel612: DebianKernel, rules612: LayoutRules) -> None:
    data = ko(kernel612, "ext4")
    plain, resident = layout_of(data, rules612), layout_of(data, rules612, init_resident=True)
    assert resident.init.group("text") == resident.init.group("rodata") == 0
    assert resident.core.size > plain.core.size
    assert resident.core_bytes == plain.core_bytes + plain.init_bytes
