"""The Linux 6.12 layout model (layout/linux612.py) against Debian 13's kernel, in QEMU (TCG).

One boot insmods about seventy real modules with their dependencies (file
systems, netfilter, bridge, virtio, crypto with .data..ro_after_init, kvm and
openvswitch with .data..percpu, xfs and kvm with large __jump_table, raid6_pq
with 80 kB of .rodata), each given to the guest decompressed. A kprobe on
execmem_alloc() records every allocation insmod makes, as move_module() asks for
one per non-empty mem[] type. Then the guest prints /proc/modules,
/sys/module/NAME/coresize and initsize, every section address in
/sys/module/NAME/sections and the module areas of /proc/vmallocinfo.

The checks, for every module loaded:

(i)   the model's core size is /proc/modules and coresize, byte for byte, and
      initsize reads 0 (do_init_module() zeroed the init types);
(ii)  the allocations move_module() made, in enum mod_mem_type order, are the
      model's page-rounded memories: core and init, type by type;
(iii) core_placement(): the sections the model puts in one core memory sit in
      the kernel at one base plus the model's offset each; the text base is the
      address /proc/modules prints, and each base starts a vmalloc area of the
      model's size plus its guard page.

A boot that fails fails the tests. Run with -s to see the figures.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from initsplit.elf import read_elf
from initsplit.elf.constants import SHF_ALLOC
from initsplit.layout.linux612 import core_placement, module_layout
from initsplit.layout.records import ModuleLayout
from initsplit.layout.rules import LayoutRules
from initsplit.modfile import read_module
from initsplit.split.decide import module_name
from tests.testbed import BootResult, DebianKernel, boot, dmesg_problems
from tests.testbed.fixtures import kernel612, rules612  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.vm

PAGE = 4096
TRACING = "/sys/kernel/tracing"
# include/linux/execmem.h enum execmem_type: what module_memory_alloc() asks for.
EXECMEM_MODULE_TEXT, EXECMEM_MODULE_DATA = 0, 4
# Modules that load without hardware, in this order with their dependencies.
# crc32c_generic first: libcrc32c asks the crypto API for "crc32c" from its init,
# which a guest without modprobe cannot load on demand.
TARGETS = (
    "crc32c_generic", "dummy", "loop", "virtio_net", "virtio_blk", "virtio_scsi", "sd_mod", "ahci",
    "ext4", "xfs", "btrfs", "nf_tables", "nf_conntrack", "nf_nat", "nft_chain_nat", "nft_ct",
    "bridge", "br_netfilter", "dm_mod", "dm_crypt", "overlay", "tun", "bonding", "vxlan", "8021q",
    "iptable_filter", "raid1", "wireguard", "openvswitch", "kvm", "vfat", "nls_utf8", "isofs",
    "squashfs", "e1000e", "sctp",
)

GUEST = rf"""
# Real addresses in /proc/modules, sysfs and /proc/vmallocinfo (root has CAP_SYSLOG).
echo 1 > /proc/sys/kernel/kptr_restrict
echo 'p:isplit_alloc execmem_alloc type=%di:u32 size=%si:u64' > {TRACING}/kprobe_events || echo "FAILED kprobe"
echo 1 > {TRACING}/events/kprobes/isplit_alloc/enable
echo 1 > {TRACING}/tracing_on
for m in $(cat /m/order); do
    echo "load $m" > {TRACING}/trace_marker
    insmod /m/$m.ko || echo "FAILED insmod $m"
done
echo 0 > {TRACING}/tracing_on
# do_free_init() frees the init memories from a workqueue after an RCU grace period.
sleep 2
echo "== modules"
cat /proc/modules
echo "== sizes"
for d in /sys/module/*; do
    [ -f $d/coresize ] && echo "size ${{d##*/}} $(cat $d/coresize) $(cat $d/initsize)"
done
echo "== sections"
grep -r . /sys/module/*/sections/
echo "== vmalloc"
grep -E 'execmem|module' /proc/vmallocinfo
echo "== trace"
grep -E 'isplit_alloc|tracing_mark_write' {TRACING}/trace
echo "== end"
"""


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    data: bytes  # decompressed
    layout: ModuleLayout
    placement: dict[str, tuple[str, int]]  # section name (unique ones) -> (memory, offset)


@dataclass(frozen=True)
class Measured:
    modules: dict[str, tuple[int, int]]  # name -> (/proc/modules size, text base)
    sizes: dict[str, tuple[int, int]]  # name -> (coresize, initsize)
    sections: dict[str, dict[str, int]]  # name -> section -> address
    vmalloc: dict[int, int]  # start -> area size
    allocs: dict[str, list[tuple[int, int]]]  # name -> [(execmem type, size)] in call order


@pytest.fixture(scope="module")
def modules(kernel612: DebianKernel, rules612: LayoutRules) -> list[Module]:
    paths: list[Path] = []
    for target in TARGETS:
        for ko in kernel612.module_deps(target):
            if ko not in paths:
                paths.append(ko)
    out = []
    for ko in paths:
        data = read_module(ko)
        obj = read_elf(data)
        allocated = Counter(s.name for s in obj.sections if s.flags & SHF_ALLOC)
        placement = {obj.sections[i].name: where for i, where in core_placement(obj, rules612).items()
                     if allocated[obj.sections[i].name] == 1}
        out.append(Module(module_name(obj), ko, data, module_layout(obj, rules612), placement))
    assert 40 <= len(out) <= 80, len(out)
    return out


def parse(result: BootResult) -> Measured:
    text = result.script_output

    def part(name: str) -> str:
        start = text.index(f"== {name}\n") + len(name) + 4
        return text[start:text.index("\n== ", start - 1)]

    modules = {m.group(1): (int(m.group(2)), int(m.group(3), 16))
               for m in re.finditer(r"^(\S+) (\d+) \S+ \S+ \S+ 0x([0-9a-f]+)", part("modules"), re.M)}
    sizes = {m.group(1): (int(m.group(2)), int(m.group(3)))
             for m in re.finditer(r"^size (\S+) (\d+) (\d+)$", part("sizes"), re.M)}
    sections: dict[str, dict[str, int]] = {}
    for m in re.finditer(r"^/sys/module/([^/]+)/sections/([^:]+):0x([0-9a-f]+)$", part("sections"), re.M):
        sections.setdefault(m.group(1), {})[m.group(2)] = int(m.group(3), 16)
    vmalloc = {int(m.group(1), 16): int(m.group(2))
               for m in re.finditer(r"^0x([0-9a-f]+)-0x[0-9a-f]+\s+(\d+) ", part("vmalloc"), re.M)}
    allocs: dict[str, list[tuple[int, int]]] = {}
    current: str | None = None
    for line in part("trace").splitlines():
        marker = re.search(r"tracing_mark_write: load (\S+)", line)
        if marker:
            current = marker.group(1)
            allocs[current] = []
            continue
        alloc = re.search(r"isplit_alloc: .* type=(\d+) size=(\d+)", line)
        if alloc and current is not None and "insmod" in line:
            allocs[current].append((int(alloc.group(1)), int(alloc.group(2))))
    return Measured(modules, sizes, sections, vmalloc, allocs)


@pytest.fixture(scope="module")
def measured(kernel612: DebianKernel, modules: list[Module]) -> Measured:
    files: dict[str, Path | bytes] = {"/m/order": " ".join(m.name for m in modules).encode()}
    files.update({f"/m/{m.name}.ko": m.data for m in modules})
    result = boot(kernel612, script=GUEST, files=files, timeout=900, memory_mb=1024, smp=1)
    # No skip: a boot that fails is a failed check of the model.
    assert result.ok and result.exit_status == 0, result.report()
    failed = [line for line in result.script_output.splitlines() if "FAILED" in line]
    assert not failed, "\n".join(failed) + "\n" + result.report(80)
    problems = dmesg_problems(result.dmesg, tainted=result.tainted, allowed_taint="E")
    assert not problems, "\n".join(problems) + "\n" + result.report()
    return parse(result)


def test_core_size_is_proc_modules(modules: list[Module], measured: Measured) -> None:
    """(i): every module loaded, its core size as the model says, to the byte."""
    wrong = []
    for m in modules:
        size, _ = measured.modules.get(m.name, (None, 0))
        coresize, initsize = measured.sizes.get(m.name, (None, None))
        if size != m.layout.core.size or coresize != m.layout.core.size or initsize != 0:
            wrong.append(f"{m.name}: /proc/modules {size}, coresize {coresize}, initsize {initsize}, "
                         f"model {m.layout.core.size} {dict(m.layout.core.groups)}")
    total = sum(m.layout.core.size for m in modules)
    print(f"\n{len(modules) - len(wrong)} of {len(modules)} modules: core size as /proc/modules "
          f"({total:,} bytes in all)")
    assert not wrong, "\n".join(wrong)


def model_allocs(layout: ModuleLayout) -> list[tuple[int, int]]:
    """move_module(): one execmem_alloc() per non-empty type, in enum mod_mem_type order."""
    core, init = layout.core, layout.init
    per_type = [
        (EXECMEM_MODULE_TEXT, core.group("text")),  # MOD_TEXT
        (EXECMEM_MODULE_DATA, core.group("data") + core.group("kallsyms")),  # MOD_DATA
        (EXECMEM_MODULE_DATA, core.group("rodata")),  # MOD_RODATA
        (EXECMEM_MODULE_DATA, core.group("ro_after_init")),  # MOD_RO_AFTER_INIT
        (EXECMEM_MODULE_TEXT, init.group("text")),  # MOD_INIT_TEXT
        (EXECMEM_MODULE_DATA, init.group("data") + init.group("kallsyms")),  # MOD_INIT_DATA
        (EXECMEM_MODULE_DATA, init.group("rodata")),  # MOD_INIT_RODATA
    ]
    return [(kind, size) for kind, size in per_type if size]


def test_each_memory_is_the_models(modules: list[Module], measured: Measured) -> None:
    """(ii): the seven memories, core and init, as allocated."""
    wrong = [f"{m.name}: execmem_alloc {measured.allocs.get(m.name)}, model {model_allocs(m.layout)}"
             for m in modules if measured.allocs.get(m.name) != model_allocs(m.layout)]
    init_total = sum(m.layout.init.size for m in modules)
    print(f"\n{len(modules) - len(wrong)} of {len(modules)} modules: every mem[] allocation as the "
          f"model says (init memories {init_total:,} bytes in all)")
    assert not wrong, "\n".join(wrong)


def test_core_placement(modules: list[Module], measured: Measured) -> None:
    """(iii): each core section at its memory's base plus the model's offset."""
    wrong = []
    checked = 0
    for m in modules:
        addresses = measured.sections.get(m.name, {})
        bases: dict[str, set[int]] = {}
        for name, (memory, offset) in m.placement.items():
            if name in addresses:
                bases.setdefault(memory, set()).add(addresses[name] - offset)
                checked += 1
        group_size = {"text": m.layout.core.group("text"), "rodata": m.layout.core.group("rodata"),
                      "ro_after_init": m.layout.core.group("ro_after_init"),
                      "data": m.layout.core.group("data") + m.layout.core.group("kallsyms")}
        for memory, found in bases.items():
            if len(found) != 1:
                wrong.append(f"{m.name} {memory}: sections at {len(found)} different bases")
                continue
            base = next(iter(found))
            if base % PAGE:
                wrong.append(f"{m.name} {memory}: base {base:#x} not page-aligned")
            if memory == "text" and base != measured.modules.get(m.name, (0, 0))[1]:
                wrong.append(f"{m.name}: text base {base:#x}, /proc/modules "
                             f"{measured.modules.get(m.name, (0, 0))[1]:#x}")
            area = measured.vmalloc.get(base)
            # vmallocinfo counts the guard page after each area.
            if area != group_size[memory] + PAGE:
                wrong.append(f"{m.name} {memory}: vmalloc area {area} at {base:#x}, "
                             f"model {group_size[memory]} + a guard page")
        if not bases.get("text"):
            wrong.append(f"{m.name}: no text section found in sysfs")
    print(f"\n{checked} core sections of {len(modules)} modules where core_placement() puts them")
    assert not wrong, "\n".join(wrong)
