"""`initsplit analyze`'s predictions against what the Debian 6.1 kernel reports, in QEMU (TCG).

Two fresh boots load the same real modules (with their dependencies):

* plain: every original with insmod, as modprobe would;
* two-stage: each module's core C, then its init module I; once all are loaded,
  every init module is deleted by one rmmod, as initsplitd does when boot goes quiet.

Each boot reads /proc/modules, /sys/module/*/coresize, VmallocUsed and the module
allocations in /proc/vmallocinfo, and a kprobe on module_alloc() records the size
of every core and init allocation as the loader asks for it. The test asserts that:

(i)   analyze's core layout equals /proc/modules and /sys/module/NAME/coresize, for
      the plain modules, for C and for I (to the byte), and its init layout equals the
      size module_alloc() was asked for;
(ii)  the predicted saving against today's kernel (plain core pages minus C's core
      pages) equals the measured difference, module by module;
(iii) what the batch delete frees for each init module is exactly what
      /proc/vmallocinfo loses: I's core layout, page-rounded (plus its guard page of
      address space), and VmallocUsed drops by those pages (to within the vmap
      stacks of the shell's short-lived processes).

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
from initsplit.layout import LayoutRules, ModuleLayout, rules_for_tree
from initsplit.split import split_module
from initsplit.split.policy import SplitOptions
from tests.testbed import BootResult, DebianKernel, boot, dmesg_problems
from tests.testbed.fixtures import kernel  # noqa: F401  (pytest fixture)

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
EVERY_SPLIT = SplitOptions(two_stage="always", writable_ro_after_init=True)

GUEST_LIB = rf"""
# Real addresses in /proc/vmallocinfo and /proc/modules (root has CAP_SYSLOG).
echo 1 > /proc/sys/kernel/kptr_restrict
# Every module_alloc() call with its size: the core allocation, then the init one.
echo 'p:isplit_alloc module_alloc size=%di:u64' > {TRACING}/kprobe_events || echo "FAILED kprobe"
echo 1 > {TRACING}/events/kprobes/isplit_alloc/enable
echo 1 > {TRACING}/tracing_on
mark() {{ echo "$*" > {TRACING}/trace_marker; }}
load() {{ mark "load $1"; insmod /m/$1.ko || echo "FAILED insmod $1"; }}
module_areas() {{ grep -E ' (load_module|move_module|module_alloc)\+' /proc/vmallocinfo; }}
settle() {{
    # do_free_init() frees init layouts from a workqueue after an RCU grace period:
    # wait until each module has its core allocation and nothing else.
    i=0
    while [ $i -lt 100 ]; do
        a=$(module_areas | grep -c .); m=$(grep -c . /proc/modules)
        [ "$a" = "$m" ] && return 0
        sleep 0.1; i=$((i+1))
    done
    echo "FAILED to settle: $a module areas for $m modules"
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
    # hold as many areas as settle() saw modules, pausing between tries; a count that
    # stays wrong is printed as read and fails the test.
    m=$(grep -c . /proc/modules)
    module_areas > /tmp/areas.1
    i=0
    while [ $i -lt 50 ]; do
        module_areas > /tmp/areas.2
        if cmp -s /tmp/areas.1 /tmp/areas.2 && [ "$(grep -c . /tmp/areas.2)" = "$m" ]; then
            break
        fi
        mv /tmp/areas.2 /tmp/areas.1; i=$((i+1)); sleep 0.1
    done
    [ $i -lt 50 ] || echo "FAILED to read /proc/vmallocinfo twice alike with $m areas"
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


@pytest.fixture(scope="module")
def prepared(kernel: DebianKernel) -> Prepared:  # noqa: F811
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
        prep.files[f"/m/plain/{name}.ko"] = ko
        if not analysis.split:
            prep.not_split[name] = f"{analysis.outcome} {analysis.reason}".strip()
            prep.files[f"/m/split/{name}.ko"] = ko
            continue
        split = split_module(ko.read_bytes())  # the same bytes the analysis laid out
        prep.core[name] = analysis.core
        prep.init[name] = analysis.init
        prep.init_names[name] = analysis.init_name
        prep.files[f"/m/split/{name}.ko"] = split.core
        prep.files[f"/m/split/{split.init_name}.ko"] = split.init
    assert len(prep.order) >= 20 and len(prep.core) >= 20, prep.not_split
    return prep


def run(kernel: DebianKernel, prep: Prepared, kind: str) -> BootResult:  # noqa: F811
    lines = [GUEST_LIB.replace("/m/$1.ko", f"/m/{kind}/$1.ko")]
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
def plain_boot(kernel: DebianKernel, prepared: Prepared) -> BootResult:  # noqa: F811
    return run(kernel, prepared, "plain")


@pytest.fixture(scope="module")
def split_boot(kernel: DebianKernel, prepared: Prepared) -> BootResult:  # noqa: F811
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
        want = (layout.core.size, layout.core.size,
                [layout.core.size] + ([layout.init.size] if layout.init.size else []))
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
            f"{name} module_alloc": (allocs[name], [core.core.size, core.init.size]),
            f"{init_name} /proc/modules": (loaded.modules[init_name][0], init.core.size),
            f"{init_name} coresize": (loaded.coresize[init_name], init.core.size),
            f"{init_name} module_alloc": (allocs[init_name], [init.core.size, init.init.size]),
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
    # One allocation per module once the init layouts are freed (the snapshot waits).
    assert len(loaded.vmalloc) == len(loaded.modules) and len(after.vmalloc) == len(after.modules)
    gone = {addr: area for addr, area in loaded.vmalloc.items() if addr not in after.vmalloc}
    expected = {}
    for name, init_name in prepared.init_names.items():
        size, base = loaded.modules[init_name]
        pages = -(-prepared.init[name].core.size // PAGE)
        assert size == prepared.init[name].core.size, init_name
        # module_alloc() -> __vmalloc_node_range(): the pages plus one guard page.
        expected[base] = ((pages + 1) * PAGE, pages)
    extra = {hex(a): gone[a] for a in gone.keys() - expected.keys()}
    missing = {hex(a): expected[a] for a in expected.keys() - gone.keys()}
    differ = {hex(a): (gone[a], expected[a]) for a in gone.keys() & expected.keys()
              if gone[a] != expected[a]}
    assert not extra and not missing and not differ, (extra, missing, differ)
    # Every core module's allocation is still there.
    for name in prepared.order:
        assert after.modules[name][1] in after.vmalloc, name
    freed_pages = sum(pages for _, pages in expected.values())
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
