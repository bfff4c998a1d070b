"""`initsplit analyze`'s predictions against what the kernel reports, in QEMU (TCG), on
Debian 12's Linux 6.1 and Debian 13's Linux 6.12 (every test runs once per release).

Two fresh boots per kernel load the same real modules (with their dependencies):

* plain: every original with insmod, as modprobe would;
* two-stage: each module's core C, then its init module I; once all are loaded,
  every init module is deleted by one rmmod, as initsplitd does when boot goes quiet.

Each boot reads /proc/modules, /sys/module/*/coresize, VmallocUsed and the module
allocations in /proc/vmallocinfo, and a kprobe on the module allocator records the
size of every allocation as the loader asks for it. 6.1 allocates a module twice,
core then init (kernel/module/main.c move_module() -> module_alloc()); 6.12 once
per non-empty struct module_memory type, in enum mod_mem_type order (move_module()
-> module_memory_alloc() -> mm/execmem.c execmem_alloc(type, size), size already
PAGE_ALIGN()ed), so the expected allocations are the model's memories
(layout.linux612.core_memory_sizes() and the init ones). The test asserts that:

(i)   analyze's core layout equals /proc/modules and /sys/module/NAME/coresize, for
      the plain modules, for C and for I (to the byte), and its allocations, core and
      init, equal the sizes the allocator was asked for;
(ii)  the predicted saving against today's kernel (plain core pages minus C's core
      pages) equals the measured difference, module by module;
(iii) what the batch delete frees for each init module is exactly what
      /proc/vmallocinfo loses: I's core layout, page-rounded (plus its guard page of
      address space), and VmallocUsed drops by those pages (to within the vmap
      stacks of the shell's short-lived processes). On 6.12 an init module's core is
      up to four areas (its core memories); /proc/modules gives only mem[MOD_TEXT]'s
      base (procfs.c m_show()), so there the areas that leave must be that base's
      area plus areas of the model's other memory sizes, as a multiset, and no more.

Run with -s to see the figures.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from initsplit.analyze import ModuleAnalysis, analyze_module
from initsplit.elf import read_elf
from initsplit.layout.twostage_slab import listed_sections
from initsplit.layout import LayoutRules, ModuleLayout, linux612, rules_for_tree
from initsplit.layout.rules import MODULE_MEMORY_SINCE, kernel_version
from initsplit.modfile import read_module
from initsplit.split import split_module
from initsplit.split.policy import SplitOptions
from tests.testbed import BootResult, DebianKernel, boot, debian_kernel, dmesg_problems

pytestmark = pytest.mark.vm

PAGE = 4096
# Real modules that load without hardware. Chosen so that the set holds modules
# analyze predicts, in the one-anchor format, to save a page against today's kernel
# (psample, rfkill, target_core_mod, l2tp_netlink), to cost one (nls_iso8859_2,
# whose anchor pushes its rodata over a page), and to change nothing (the rest).
TARGETS = (
    "dummy", "loop", "jbd2", "libphy", "configfs", "psample", "team", "dm_mod", "rfkill",
    "ipvlan", "udp_tunnel", "nls_cp857", "nls_iso8859_2", "cls_flower", "drm",
    "ib_core", "crc32c_generic", "libceph", "target_core_mod", "scsi_mod", "videodev", "raid1", "snd_pcm",
    "l2tp_netlink", "vfat",
)
TRACING = "/sys/kernel/tracing"
RELEASES = ("12", "13")  # Debian 12 (Linux 6.1), Debian 13 (Linux 6.12)
# The kprobe on the allocator, per release: 6.1's module_alloc(size) (arch/x86/kernel/
# module.c), 6.12's execmem_alloc(type, size) (mm/execmem.c; module_alloc() is gone since
# v6.10). Both take the size the loader asks for, in the first and second argument.
ALLOCATOR = {"12": "module_alloc size=%di:u64", "13": "execmem_alloc size=%si:u64"}
EVERY_SPLIT = SplitOptions(two_stage="always", writable_ro_after_init=True)

GUEST_LIB = rf"""
# Real addresses in /proc/vmallocinfo and /proc/modules (root has CAP_SYSLOG).
echo 1 > /proc/sys/kernel/kptr_restrict
# Every allocation the loader makes, with its size (ALLOCATOR).
echo 'p:isplit_alloc @ALLOCATOR@' > {TRACING}/kprobe_events || echo "FAILED kprobe"
echo 1 > {TRACING}/events/kprobes/isplit_alloc/enable
echo 1 > {TRACING}/tracing_on
mark() {{ echo "$*" > {TRACING}/trace_marker; }}
load() {{ mark "load $1"; insmod /m/$1.ko || echo "FAILED insmod $1"; }}
# 6.1's areas are module_alloc()'s callers'; 6.12's execmem_alloc()'s (mm/execmem.c
# __execmem_alloc() passes __builtin_return_address(0) as the area's caller).
module_areas() {{ grep -E ' (load_module|move_module|module_alloc|execmem_alloc)\+' /proc/vmallocinfo; }}
area_pages() {{ sed 's/.*pages=\([0-9]*\).*/\1/' | awk '{{ s += $1 }} END {{ print s + 0 }}'; }}
module_pages() {{ awk '{{ s += $2 }} END {{ print s / {PAGE} }}' /proc/modules; }}
settle() {{
    # do_free_init() frees init layouts from a workqueue after an RCU grace period:
    # wait until the module areas hold exactly the pages /proc/modules counts (the
    # core layouts, on 6.12 the core memories: do_init_module() zeroes the init
    # types' sizes before it queues their freeing).
    i=0
    while [ $i -lt 100 ]; do
        a=$(module_areas | area_pages); m=$(module_pages)
        [ "$a" = "$m" ] && return 0
        sleep 0.1; i=$((i+1))
    done
    echo "FAILED to settle: $a pages in module areas for $m pages of modules"
}}
snapshot() {{
    settle
    echo "--- $1"
    # First and without forking: the least churn of vmap stacks before it.
    while read key value unit; do
        case $key in MemFree:|VmallocUsed:) echo "$key $value $unit";; esac
    done < /proc/meminfo
    cat /proc/modules
    for f in /sys/module/*/coresize; do
        m=${{f%/coresize}}; echo "coresize ${{m##*/}} $(cat $f)"
    done
    # /proc/vmallocinfo is read in page-sized chunks by position in an address-sorted
    # list; a vmap stack allocated or freed meanwhile (below the module area) shifts
    # the positions and a chunk boundary can skip or repeat a line. Two reads can
    # agree and both miss a line: the stack of the process that exited just before
    # each read is freed late (delayed_put_task_struct() -> vfree_atomic(), a
    # workqueue), at the same point of each read. So read until two reads agree and
    # hold as many pages as settle() saw, pausing between tries; a count that
    # stays wrong is printed as read and fails the test.
    m=$(module_pages)
    module_areas > /tmp/areas.1
    i=0
    while [ $i -lt 50 ]; do
        module_areas > /tmp/areas.2
        if cmp -s /tmp/areas.1 /tmp/areas.2 && [ "$(area_pages < /tmp/areas.2)" = "$m" ]; then
            break
        fi
        mv /tmp/areas.2 /tmp/areas.1; i=$((i+1)); sleep 0.1
    done
    [ $i -lt 50 ] || echo "FAILED to read /proc/vmallocinfo twice alike with $m pages"
    sed 's/^/vmalloc /' /tmp/areas.1
    # What the two-stage slab model counts (layout/twostage_slab.py): the sections
    # each module lists in sysfs.
    for d in /sys/module/*/sections; do
        mod=${{d%/sections}}; echo "sections ${{mod##*/}}" $(ls -A $d)
    done
    echo "--- end $1"
}}
"""


@dataclass
class Snapshot:
    modules: dict[str, tuple[int, int]]  # name -> (/proc/modules size, base address)
    coresize: dict[str, int]
    meminfo: dict[str, int]  # kB
    vmalloc: dict[int, tuple[int, int]]  # start address -> (area size, pages)
    sections: dict[str, list[str]]  # name -> what /sys/module/NAME/sections lists


@dataclass
class Prepared:
    rules: LayoutRules
    order: list[str]  # module names in load order
    plain: dict[str, ModuleLayout]
    core: dict[str, ModuleLayout]  # C, for the split ones
    init: dict[str, ModuleLayout]  # I, keyed by the module's name
    init_names: dict[str, str]
    analyses: dict[str, ModuleAnalysis]  # what `initsplit analyze` computes per module
    files: dict[str, bytes | Path]
    not_split: dict[str, str]  # name -> why
    # The same analysis with the default options (TwoStage=when-not-worse,
    # WritableRoAfterInit=no): what the daemon would load.
    defaults: dict[str, ModuleAnalysis] = dataclasses.field(default_factory=dict)


def parse_snapshot(output: str, tag: str) -> Snapshot:
    start = output.index(f"--- {tag}\n")
    block = output[start:output.index(f"--- end {tag}\n", start)]
    modules = {m.group(1): (int(m.group(2)), int(m.group(3), 16))
               for m in re.finditer(r"^(\S+) (\d+) \S+ \S+ \S+ 0x([0-9a-f]+)", block, re.M)}
    coresize = {m.group(1): int(m.group(2))
                for m in re.finditer(r"^coresize (\S+) (\d+)$", block, re.M)}
    meminfo = {m.group(1): int(m.group(2))
               for m in re.finditer(r"^(\w+):\s+(\d+) kB", block, re.M)}
    vmalloc = {int(m.group(1), 16): (int(m.group(2)), int(m.group(3)))
               for m in re.finditer(r"^vmalloc 0x([0-9a-f]+)-0x[0-9a-f]+\s+(\d+) .*pages=(\d+)",
                                    block, re.M)}
    sections = {m.group(1): sorted(m.group(2).split())
                for m in re.finditer(r"^sections (\S+)(.*)$", block, re.M)}
    return Snapshot(modules, coresize, meminfo, vmalloc, sections)


def module_allocs(trace: str) -> dict[str, list[int]]:
    """Sizes module_alloc() was asked for, per `load NAME` marker, in call order."""
    allocs: dict[str, list[int]] = {}
    current = None
    for line in trace.splitlines():
        marker = re.search(r"tracing_mark_write: load (\S+)", line)
        if marker:
            current = marker.group(1)
            allocs[current] = []
            continue
        size = re.search(r"isplit_alloc: .* size=(\d+)", line)
        if size and current is not None and "insmod" in line:
            allocs[current].append(int(size.group(1)))
    return allocs


def memories(layout: ModuleLayout, rules: LayoutRules, *, init: bool) -> list[int]:
    """The allocations of a module of *layout*, in the order the loader makes them:
    6.1's core then init layout (one module_alloc() each; a 0-byte init is none),
    6.12's non-empty memories in enum mod_mem_type order (kernel/module/main.c
    move_module()), the init ones too when *init*."""
    version = kernel_version(rules.kernel)
    if version is None or version < MODULE_MEMORY_SINCE:
        sizes = [layout.core.size] + ([layout.init.size] if init else [])
    else:
        core = linux612.core_memory_sizes(layout)
        sizes = [core[t] for t in sorted(core)]
        if init:
            sizes += [layout.init.group("text"), layout.init.group("data") + layout.init.group("kallsyms"),
                      layout.init.group("rodata")]
    return [size for size in sizes if size]


@pytest.fixture(scope="module", params=RELEASES, ids=lambda r: f"debian{r}")
def kernel(request: pytest.FixtureRequest) -> DebianKernel:
    """Debian 12's kernel (6.1), then Debian 13's (6.12): each test runs on both."""
    return debian_kernel(release=request.param)


@pytest.fixture(scope="module")
def prepared(kernel: DebianKernel) -> Prepared:
    rules = rules_for_tree(kernel.modules_dir)
    assert rules.config, "the Debian kernel's config must be found next to its modules"
    paths: list[Path] = []
    for target in TARGETS:
        for ko in kernel.module_deps(target):
            if ko not in paths:
                paths.append(ko)
    prep = Prepared(rules, [], {}, {}, {}, {}, {}, {}, {})
    for ko in paths:
        # The analysis `initsplit analyze` prints: split and validated like `initsplit split`,
        # every module that splits (the model is checked on all of them; what the
        # default policy makes of them is test_default_policy_is_never_worse's).
        analysis = analyze_module(ko, ko.relative_to(kernel.modules_dir), rules, EVERY_SPLIT)
        prep.defaults[analysis.name] = analyze_module(ko, ko.relative_to(kernel.modules_dir), rules)
        name = analysis.name
        assert analysis.plain is not None, analysis
        prep.order.append(name)
        prep.analyses[name] = analysis
        prep.plain[name] = analysis.plain
        # Decompressed: 6.12's modules are .ko.xz, which busybox's insmod passes as is.
        data = read_module(ko)
        prep.files[f"/m/plain/{name}.ko"] = data
        if not analysis.split:
            prep.not_split[name] = f"{analysis.outcome} {analysis.reason}".strip()
            prep.files[f"/m/split/{name}.ko"] = data
            continue
        split = split_module(data, rules)  # the same bytes the analysis laid out
        prep.core[name] = analysis.core
        prep.init[name] = analysis.init
        prep.init_names[name] = analysis.init_name
        prep.files[f"/m/split/{name}.ko"] = split.core
        prep.files[f"/m/split/{split.init_name}.ko"] = split.init
    assert len(prep.order) >= 20 and len(prep.core) >= 20, prep.not_split
    return prep


def run(kernel: DebianKernel, prep: Prepared, kind: str) -> BootResult:
    lib = GUEST_LIB.replace("/m/$1.ko", f"/m/{kind}/$1.ko")
    lines = [lib.replace("@ALLOCATOR@", ALLOCATOR[kernel.release.version])]
    for name in prep.order:
        lines.append(f"load {name}")
        if kind == "split" and name in prep.init_names:
            lines.append(f"load {prep.init_names[name]}")
    if kind == "plain":
        lines.append("snapshot plain")
    else:
        lines.append("snapshot loaded")
        batch = " ".join(prep.init_names[n] for n in prep.order if n in prep.init_names)
        lines.append(f"mark batch; rmmod {batch} || echo 'FAILED batch rmmod'")
        lines.append("snapshot after")
    lines.append(f"echo 0 > {TRACING}/tracing_on")
    lines.append(f"echo '--- trace'; cat {TRACING}/trace; echo '--- end trace'")
    files = {k: v for k, v in prep.files.items() if k.startswith(f"/m/{kind}/")}
    return boot(kernel, script="\n".join(lines) + "\n", files=files, timeout=900, memory_mb=1024)


@pytest.fixture(scope="module")
def plain_boot(kernel: DebianKernel, prepared: Prepared) -> BootResult:
    return run(kernel, prepared, "plain")


@pytest.fixture(scope="module")
def split_boot(kernel: DebianKernel, prepared: Prepared) -> BootResult:
    return run(kernel, prepared, "split")


def trace_of(result: BootResult) -> str:
    out = result.script_output
    start = out.index("--- trace\n")
    return out[start:out.index("--- end trace", start)]


def assert_ran(result: BootResult) -> None:
    assert result.ok and result.exit_status == 0, result.report()
    assert "FAILED" not in result.script_output, result.report(200)
    problems = dmesg_problems(result.dmesg, tainted=result.tainted, allowed_taint="E")
    assert not problems, "\n".join(problems) + "\n" + result.report()


def test_boots_clean(plain_boot: BootResult, split_boot: BootResult) -> None:
    assert_ran(plain_boot)
    assert_ran(split_boot)


def test_plain_layouts_match_the_kernel(prepared: Prepared, plain_boot: BootResult) -> None:
    """(i) for the originals: core layout = /proc/modules = coresize; init = module_alloc()."""
    assert_ran(plain_boot)
    snap = parse_snapshot(plain_boot.script_output, "plain")
    allocs = module_allocs(trace_of(plain_boot))
    mismatches = []
    for name in prepared.order:
        layout = prepared.plain[name]
        seen = (snap.modules[name][0], snap.coresize[name], allocs.get(name))
        want = (layout.core.size, layout.core.size, memories(layout, prepared.rules, init=True))
        if seen != want:
            mismatches.append(f"{name}: kernel {seen}, analyze {want}")
    assert not mismatches, "\n".join(mismatches)


def test_split_layouts_match_the_kernel(prepared: Prepared, split_boot: BootResult) -> None:
    """(i) for C and I: the same, read while both are loaded and after the batch delete."""
    assert_ran(split_boot)
    loaded = parse_snapshot(split_boot.script_output, "loaded")
    after = parse_snapshot(split_boot.script_output, "after")
    allocs = module_allocs(trace_of(split_boot))
    mismatches = []
    for name in prepared.order:
        if name not in prepared.core:
            layout = prepared.plain[name]
            if after.modules[name][0] != layout.core.size:
                mismatches.append(f"{name} (plain): kernel {after.modules[name][0]}, "
                                  f"analyze {layout.core.size}")
            continue
        core, init, init_name = prepared.core[name], prepared.init[name], prepared.init_names[name]
        checks = {
            f"{name} /proc/modules": (after.modules[name][0], core.core.size),
            f"{name} coresize": (after.coresize[name], core.core.size),
            f"{name} allocations": (allocs[name], memories(core, prepared.rules, init=True)),
            f"{init_name} /proc/modules": (loaded.modules[init_name][0], init.core.size),
            f"{init_name} coresize": (loaded.coresize[init_name], init.core.size),
            f"{init_name} allocations": (allocs[init_name], memories(init, prepared.rules, init=True)),
        }
        mismatches += [f"{what}: kernel {k}, analyze {a}" for what, (k, a) in checks.items() if k != a]
    assert not mismatches, "\n".join(mismatches)


def test_saving_against_today_matches(prepared: Prepared, plain_boot: BootResult,
                                      split_boot: BootResult) -> None:
    """(ii) plain core pages - C core pages, predicted = measured, module by module."""
    plain = parse_snapshot(plain_boot.script_output, "plain")
    after = parse_snapshot(split_boot.script_output, "after")
    rows, mismatches = [], []
    for name in prepared.order:
        measured = (plain.modules[name][0] - after.modules[name][0]) // PAGE
        predicted = prepared.analyses[name].saving_today
        rows.append((name, plain.modules[name][0], after.modules[name][0], predicted, measured))
        if measured != predicted or (plain.modules[name][0] - after.modules[name][0]) % PAGE:
            mismatches.append(f"{name}: predicted {predicted} pages, measured "
                              f"{plain.modules[name][0]} - {after.modules[name][0]} bytes")
    total_plain = sum(r[1] for r in rows)
    total_after = sum(r[2] for r in rows)
    assert not [m for m in after.modules if m.endswith("__init")]
    _print_figures(prepared, rows, plain, after, total_plain, total_after)
    assert not mismatches, "\n".join(mismatches)
    assert (total_plain - total_after) // PAGE == sum(r[3] for r in rows)


def test_default_policy_is_never_worse(prepared: Prepared, plain_boot: BootResult,
                                       split_boot: BootResult) -> None:
    """With the defaults, no module costs more than its plain load, core pages as
    the kernel counts them: each module the policy loads two-stage has C no larger
    in /proc/modules than the original, less the init module's slab; each one it
    turned down as costing more would indeed have won less in core pages than that
    slab (the slab model is checked against SUnreclaim by bench/twostage_slab.py and
    its section lists against sysfs below)."""
    plain = parse_snapshot(plain_boot.script_output, "plain")
    after = parse_snapshot(split_boot.script_output, "after")
    wrong, turned_down = [], []
    for name in prepared.order:
        default = prepared.defaults[name]
        if name not in prepared.core:
            assert default.outcome != "split", default
            continue
        pages_plain = -(-plain.modules[name][0] // PAGE)
        pages_split = -(-after.modules[name][0] // PAGE)
        net = (pages_plain - pages_split) * PAGE - default.twostage_slab
        if default.outcome == "split" and net < 0:
            wrong.append(f"{name}: loaded two-stage, {pages_split} pages against {pages_plain} "
                         f"plain and {default.twostage_slab} bytes of slab")
        if default.outcome == "plain" and "cost more than it frees" in default.reason:
            turned_down.append(name)
            if default.twostage_slab <= 0:
                wrong.append(f"{name}: turned down with no slab weighed")
            if net >= 0:
                wrong.append(f"{name}: loaded plain as costing more, but C took {pages_split} "
                             f"pages against {pages_plain} and the slab is "
                             f"{default.twostage_slab} bytes")
    assert not wrong, "\n".join(wrong)
    # Every module of the set that splits is weighed: the check bites.
    assert turned_down, "no module of the set was turned down as costing more"
    print(f"\ndefault policy: {len(turned_down)} modules loaded plain as costing more "
          f"than they free, as the kernel's core pages confirm")


def test_batch_delete_frees_what_vmallocinfo_loses(prepared: Prepared, split_boot: BootResult) -> None:
    """(iii) each init module's core allocation leaves /proc/vmallocinfo, page for page."""
    loaded = parse_snapshot(split_boot.script_output, "loaded")
    after = parse_snapshot(split_boot.script_output, "after")
    rules = prepared.rules
    # One area per core memory of each module once the init layouts are freed (the
    # snapshot waits): 6.1's core layout, 6.12's non-empty core memories.
    assert len(loaded.vmalloc) == sum(len(memories(kept_layout(prepared, name), rules, init=False))
                                      for name in loaded.modules)
    assert len(after.vmalloc) == sum(len(memories(kept_layout(prepared, name), rules, init=False))
                                     for name in after.modules)
    gone = {addr: area for addr, area in loaded.vmalloc.items() if addr not in after.vmalloc}
    expected = {}  # base -> area, where /proc/modules gives the base (6.1's core, 6.12's text)
    others: list[tuple[int, int]] = []  # 6.12: I's other core memories, by size only
    for name, init_name in prepared.init_names.items():
        size, base = loaded.modules[init_name]
        assert size == prepared.init[name].core.size, init_name
        # module_alloc() / execmem_alloc() -> __vmalloc_node_range(): the pages plus
        # one guard page (no VM_NO_GUARD in either).
        areas = [((mem // PAGE + 1) * PAGE, mem // PAGE)
                 for mem in memories(prepared.init[name], rules, init=False)]
        if base:  # 0 when 6.12's I has no MOD_TEXT: all its areas are known by size only
            expected[base], areas = areas[0], areas[1:]
        others += areas
    extra = {hex(a): gone[a] for a in gone.keys() - expected.keys()}
    missing = {hex(a): expected[a] for a in expected.keys() - gone.keys()}
    differ = {hex(a): (gone[a], expected[a]) for a in gone.keys() & expected.keys()
              if gone[a] != expected[a]}
    assert sorted(extra.values()) == sorted(others) and not missing and not differ, \
        (extra, others, missing, differ)
    # Every core module's allocation is still there.
    for name in prepared.order:
        assert after.modules[name][1] in after.vmalloc, name
    freed_pages = sum(pages for _, pages in [*expected.values(), *others])
    dropped_kb = loaded.meminfo["VmallocUsed"] - after.meminfo["VmallocUsed"]
    # VmallocUsed counts every vmalloc page in the system, and the shell's forks
    # come and go around the rmmod (each exiting task may vfree its 16 KiB vmap
    # stack, or keep it cached), so it matches to within a few such stacks.
    freed_kb = freed_pages * PAGE // 1024
    assert abs(dropped_kb - freed_kb) <= 4 * 16, (dropped_kb, freed_kb)
    print(f"\nbatch delete of {len(expected)} init modules: /proc/modules total "
          f"{sum(size for size, _ in loaded.modules.values()):,} bytes before, "
          f"{sum(size for size, _ in after.modules.values()):,} after; /proc/vmallocinfo lost "
          f"{len(gone)} areas, {freed_pages} pages (+{len(gone)} guard pages of address space); "
          f"VmallocUsed {loaded.meminfo['VmallocUsed']} -> {after.meminfo['VmallocUsed']} kB")


def kept_layout(prepared: Prepared, name: str) -> ModuleLayout:
    """The layout of the module /proc/modules calls *name*: an original, a C or an I."""
    for module, init_name in prepared.init_names.items():
        if init_name == name:
            return prepared.init[module]
    return prepared.core.get(name) or prepared.plain[name]


def _print_figures(prepared: Prepared, rows, plain: Snapshot, after: Snapshot,
                   total_plain: int, total_after: int) -> None:
    print()
    print(f"{'module':<20} {'plain':>9} {'two-stage':>9} {'predicted':>9} {'measured':>8}")
    for name, p, a, predicted, measured in rows:
        print(f"{name:<20} {p:>9} {a:>9} {predicted:>9} {measured:>8}")
    print(f"modules loaded: {len(rows)} ({len(prepared.core)} two-stage); /proc/modules total: "
          f"plain {total_plain:,} bytes, two-stage after the batch delete {total_after:,} bytes, "
          f"{(total_plain - total_after) // PAGE} pages less")
    print(f"VmallocUsed: plain {plain.meminfo['VmallocUsed']} kB, two-stage after the batch "
          f"{after.meminfo['VmallocUsed']} kB")


def test_sysfs_sections_are_the_slab_models(prepared: Prepared, plain_boot: BootResult,
                                            split_boot: BootResult) -> None:
    """The sections layout/twostage_slab.py counts for each module (each one a
    kernfs node, an attribute and two copies of its name) are the ones the kernel
    lists in /sys/module/NAME/sections: the originals, C and I."""
    assert_ran(plain_boot)
    assert_ran(split_boot)
    checked, wrong = 0, []
    for kind, result, tag in (("plain", plain_boot, "plain"), ("split", split_boot, "loaded")):
        listed = parse_snapshot(result.script_output, tag).sections
        for path, data in prepared.files.items():
            if not path.startswith(f"/m/{kind}/"):
                continue
            name = path.rsplit("/", 1)[1].removesuffix(".ko")
            raw = data.read_bytes() if isinstance(data, Path) else data
            model = sorted(listed_sections(read_elf(raw), kallsyms=prepared.rules.kallsyms))
            if listed.get(name) != model:
                wrong.append(f"{kind} {name}: kernel {listed.get(name)}, model {model}")
            checked += 1
    assert not wrong, "\n".join(wrong)
    assert checked >= 2 * len(prepared.order), checked
