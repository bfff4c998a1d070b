#!/usr/bin/python3
"""Benchmark: where the unreclaimable slab of two-stage loads goes, per slab cache.

    /usr/bin/python3 bench/twostage_slab.py [--boots N]

Boots the Debian 6.1 kernel under QEMU (TCG, one CPU, slab_nomerge so that every
cache is counted apart) and loads the modules of tests/test_savings_vm.py with
their dependencies, on fresh boots:

* plain:     every original (its BTF dropped, elf/discard.py, as initsplitd loads
             it: what BTF costs is the BTF class's, not this benchmark's);
* two-stage: each module's core C (BTF dropped) and init module I as the daemon's
             defaults choose them (split/decide.py; the others plain as above),
             then every init module deleted in one rmmod, as initsplitd's batch.

Each boot reads SUnreclaim and /proc/slabinfo before loading and after (once RCU
and the init-layout frees have run), then writes 1 to every
/sys/kernel/slab/*/shrink and reads them again. It prints, per cache, what each
configuration gained in objects and in slab pages, and the difference: objects
that two-stage keeps more of are a leak or a real cost, pages without objects are
fragmentation (the freed init modules' objects leave partly used slabs behind,
which shrink gives back only where a slab became empty). It prints figures; it
does not pass or fail.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "daemon"), str(ROOT)]

from initsplit.elf.discard import without_sections  # noqa: E402
from initsplit.split.decide import decide, module_name  # noqa: E402
from initsplit.elf import read_elf  # noqa: E402
from initsplit.split.policy import DISCARD_SECTIONS  # noqa: E402
from initsplit.analyze import split_figures  # noqa: E402
from tests.test_savings_vm import TARGETS  # noqa: E402
from tests.testbed import boot, debian_kernel  # noqa: E402

GUEST = r"""
snap() {
    sleep 2
    echo "--- $1 sunreclaim_kb=$(sed -n 's/^SUnreclaim: *\([0-9]*\) kB/\1/p' /proc/meminfo)"
    # name active_objs num_objs objsize objperslab pagesperslab : ... : slabdata active_slabs num_slabs
    sed -n '3,$p' /proc/slabinfo | awk '{print "slab", $1, $2, $4, $6, $15}'
    echo "--- end $1"
}
snap before
for m in $(cat /m/order); do insmod /m/$m.ko || echo "FAILED insmod $m"; done
inits=$(cat /m/inits)
[ -n "$inits" ] && { rmmod $inits || echo "FAILED rmmod"; }
snap after
for f in /sys/kernel/slab/*/shrink; do echo 1 > $f 2>/dev/null; done
snap shrunk
"""


def files_for(kernel, two_stage: bool) -> tuple[dict[str, bytes], int]:
    """The guest's files, and what the slab model (layout/twostage_slab.py) says the
    two-stage loads among them take more than plain ones."""
    order, inits, files, model = [], [], {}, 0
    seen = set()
    for target in TARGETS:
        for ko in kernel.module_deps(target):
            if ko in seen:
                continue
            seen.add(ko)
            data = ko.read_bytes()
            name = module_name(read_elf(data))
            decision = decide(data)
            if two_stage and decision.outcome == "split":
                files[f"/m/{name}.ko"] = decision.split.core
                files[f"/m/{decision.split.init_name}.ko"] = decision.split.init
                order += [name, decision.split.init_name]
                inits.append(decision.split.init_name)
                model += split_figures(decision.original, decision.split)[2]
            else:
                files[f"/m/{name}.ko"] = without_sections(data, DISCARD_SECTIONS["btf"])
                order.append(name)
    files["/m/order"] = " ".join(order).encode()
    files["/m/inits"] = " ".join(inits).encode()
    return files, model


def parse(out: str, tag: str) -> tuple[int, dict[str, tuple[int, int]]]:
    """SUnreclaim kB and {cache: (active objects, slab pages)} of one snapshot."""
    start = out.index(f"--- {tag} ")
    block = out[start:out.index(f"--- end {tag}", start)]
    sunreclaim = int(re.search(r"sunreclaim_kb=(\d+)", block).group(1))
    caches = {}
    for name, active, _objsize, pages_per_slab, slabs in re.findall(
            r"^slab (\S+) (\d+) (\d+) (\d+) (\d+)$", block, re.M):
        caches[name] = (int(active), int(pages_per_slab) * int(slabs))
    return sunreclaim, caches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=2)
    args = parser.parse_args()
    kernel = debian_kernel()
    deltas: dict[str, list] = {"plain": [], "two-stage": []}
    model = 0
    for kind in ("plain", "two-stage"):
        files, kind_model = files_for(kernel, kind == "two-stage")
        model += kind_model
        for n in range(args.boots):
            result = boot(kernel, script=GUEST, files=files, timeout=900, memory_mb=1024, smp=1,
                          append="slab_nomerge")
            if not result.ok or "FAILED" in result.script_output:
                print(result.report(80))
                return 1
            before = parse(result.script_output, "before")
            after = parse(result.script_output, "after")
            shrunk = parse(result.script_output, "shrunk")
            deltas[kind].append((before, after, shrunk))
            print(f"{kind} boot {n + 1}: SUnreclaim +{after[0] - before[0]} kB, "
                  f"after shrink +{shrunk[0] - before[0]} kB", flush=True)

    def mean_gain(kind: str, stage: int) -> dict[str, tuple[float, float]]:
        per: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for runs in deltas[kind]:
            before, later = runs[0][1], runs[stage][1]
            for cache, (objs, pages) in later.items():
                b = before.get(cache, (0, 0))
                per[cache].append((objs - b[0], pages - b[1]))
        return {c: (statistics.mean(o for o, _ in v), statistics.mean(p for _, p in v)) for c, v in per.items()}

    for stage, label in ((1, "after the loads"), (2, "after shrink")):
        plain, two = mean_gain("plain", stage), mean_gain("two-stage", stage)
        rows = []
        for cache in set(plain) | set(two):
            po, pp = plain.get(cache, (0, 0))
            to, tp = two.get(cache, (0, 0))
            if abs(tp - pp) >= 1 or abs(to - po) >= 1:
                rows.append((tp - pp, to - po, cache, pp, tp))
        rows.sort(reverse=True)
        su_plain = statistics.mean(r[stage][0] - r[0][0] for r in deltas["plain"])
        su_two = statistics.mean(r[stage][0] - r[0][0] for r in deltas["two-stage"])
        print(f"\n{label}: SUnreclaim gained, plain {su_plain:.0f} kB, two-stage {su_two:.0f} kB "
              f"({su_two - su_plain:+.0f} kB; the slab model says {model / 1000:.0f} kB)")
        print(f"  {'cache':<28} {'pages +':>8} {'objects +':>10}   (plain pages, two-stage pages)")
        for dpages, dobjs, cache, pp, tp in rows[:25]:
            print(f"  {cache:<28} {dpages:>+8.1f} {dobjs:>+10.1f}   ({pp:.1f}, {tp:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
