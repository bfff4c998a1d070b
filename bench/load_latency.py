#!/usr/bin/python3
"""Benchmark: load latency of two-stage loads against plain finit_module, in one QEMU guest.

    /usr/bin/python3 bench/load_latency.py [--release 12|13] [--rounds N] [MODULE ...]

Boots the Debian 12 kernel (6.1; --release 13: Debian 13's 6.12) once under QEMU (TCG). The guest runs Debian's python3
and this checkout from the host's root over 9p, copies the modules to a tmpfs, and
then, round after round, times with time.perf_counter_ns() around the system call:

* plain:          finit_module() of each original, as Debian ships it (signed);
* plain-unsigned: the same files with the signature stripped, so the kernel does not
                  verify one (the split modules are unsigned: this is the baseline
                  without the signature check);
* two-stage:      finit_module() of the core module C, then of the init module I
                  (unsplit modules: the original, as the daemon does); then every
                  init module deleted in one batch (timed apart, not part of the load).

With --mcount-diagnosis a fourth mode loads init modules whose __mcount_loc
section is renamed, so ftrace ignores their records. It is not a valid split (the
init code's __fentry__ calls stay unpatched); it shows what the RCU grace period
costs that ftrace_free_mem() waits for when an init module's last ftrace record
is freed after its init (kernel/trace/ftrace.c, 6.1.192).

After each mode every module is removed again, dependencies last. One warm-up
round is not counted; the order of the modes rotates from round to round. The
figures are per-module medians over the rounds; the ratio compares two-stage with
each plain baseline measured in the same guest. The goal (issue 12) is a ratio of at most 1.10.
It prints figures; it does not pass or fail.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "daemon"), str(ROOT)]

from initsplit.layout.rules import LayoutRules, rules_for_tree  # noqa: E402
from initsplit.modfile import read_module  # noqa: E402
from initsplit.split import NothingToSplit, SplitRefused, split_module  # noqa: E402
from initsplit.validate import validate_split  # noqa: E402
from tests.testbed import HOST_ROOT_SETUP, boot, cache_dir, debian_kernel, host_root_files  # noqa: E402

GOAL_RATIO = 1.10  # issue 12
# Real modules that load without hardware (the set of tests/test_savings_vm.py);
# their dependencies are loaded too, in modprobe's order.
MODULES = (
    "dummy", "loop", "jbd2", "libphy", "configfs", "psample", "team", "dm_mod", "rfkill",
    "ipvlan", "udp_tunnel", "nls_cp857", "nls_iso8859_2", "cls_flower", "drm",
    "ib_core", "crc32c_generic", "libceph", "target_core_mod", "scsi_mod", "videodev", "raid1",
    "snd_pcm", "l2tp_netlink", "vfat",
)
SIGNATURE_MAGIC = b"~Module signature appended~\n"

GUEST = r"""
import json, os, shutil, sys, time
from pathlib import Path
share = Path(sys.argv[1])
sys.path.insert(0, sys.argv[2] + "/daemon")
from initsplit.loader.syscalls import delete_module, finit_module_path as finit_module

plan = json.loads((share / "plan.json").read_text())
mods = Path(os.environ.get("TMPDIR", "/run/tmp")) / "mods"
shutil.copytree(share / "mods", mods)  # tmpfs: no 9p reads inside the timings
order, split = plan["order"], plan["split"]  # split: name -> init module name

def timed(call, *args):
    start = time.perf_counter_ns()
    call(*args)
    return time.perf_counter_ns() - start

def remove_all():
    for name in reversed(order):
        delete_module(name)

def plain(kind):
    times = {name: timed(finit_module, mods / kind / f"{name}.ko") for name in order}
    remove_all()
    return {"load": times}

def two_stage(kind="split"):
    times = {}
    for name in order:
        if name in split:
            times[name] = [timed(finit_module, mods / "split" / f"{name}.ko"),
                           timed(finit_module, mods / kind / f"{split[name]}.ko")]
        else:
            times[name] = [timed(finit_module, mods / "plain" / f"{name}.ko"), 0]
    start = time.perf_counter_ns()
    for name in order:
        if name in split:
            delete_module(split[name])
    batch = time.perf_counter_ns() - start
    remove_all()
    return {"load": times, "batch_delete": batch}

modes = {"plain": lambda: plain("plain"), "plain-unsigned": lambda: plain("unsigned"),
         "two-stage": two_stage}
if plan["mcount_diagnosis"]:
    modes["two-stage-no-init-mcount"] = lambda: two_stage("nomcount")
names = list(modes)
rounds = []
for n in range(plan["rounds"] + 1):
    k = n % len(names)
    rounds.append({mode: modes[mode]() for mode in names[k:] + names[:k]})
print("@@RESULT@@" + json.dumps({"warmup": rounds[0], "rounds": rounds[1:]}))
"""


def strip_signature(data: bytes) -> bytes:
    """The module without its appended signature (include/linux/module_signature.h)."""
    if not data.endswith(SIGNATURE_MAGIC):
        return data
    sig_len = int.from_bytes(data[-len(SIGNATURE_MAGIC) - 4:-len(SIGNATURE_MAGIC)], "big")
    return data[:len(data) - len(SIGNATURE_MAGIC) - 12 - sig_len]


def rename_section(data: bytes, old: bytes, new: bytes) -> bytes:
    """*data* with section name *old* replaced by *new* (same length) in its name table."""
    at = data.find(b"\0" + old + b"\0")
    if at < 0 or len(old) != len(new):
        return data
    return data[:at + 1] + new + data[at + 1 + len(old):]


def prepare(kernel, names: list[str], share: Path, *, rules: LayoutRules
            ) -> tuple[list[str], dict[str, str], dict[str, str]]:
    order: list[str] = []
    split: dict[str, str] = {}
    why: dict[str, str] = {}
    for target in names:
        for ko in kernel.module_deps(target):
            name = ko.name.split(".ko")[0].replace("-", "_")
            if name in order:
                continue
            order.append(name)
            data = read_module(ko)  # Debian 13's .ko.xz decompressed, as finit_module() gets it
            for kind, blob in (("plain", data), ("unsigned", strip_signature(data))):
                (share / "mods" / kind).mkdir(parents=True, exist_ok=True)
                (share / "mods" / kind / f"{name}.ko").write_bytes(blob)
            try:
                result = split_module(data, rules)
                validate_split(data, result.core, result.init, rules)
            except (NothingToSplit, SplitRefused) as exc:
                why[name] = "nothing to split" if isinstance(exc, NothingToSplit) else str(exc)
                continue
            (share / "mods" / "split").mkdir(parents=True, exist_ok=True)
            (share / "mods" / "split" / f"{name}.ko").write_bytes(result.core)
            (share / "mods" / "split" / f"{result.init_name}.ko").write_bytes(result.init)
            (share / "mods" / "nomcount").mkdir(parents=True, exist_ok=True)
            (share / "mods" / "nomcount" / f"{result.init_name}.ko").write_bytes(
                rename_section(result.init, b"__mcount_loc", b"__mcount_off"))
            split[name] = result.init_name
    return order, split, why


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE",
                        help=f"modules to load (default: {len(MODULES)} real Debian modules)")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--mcount-diagnosis", action="store_true",
                        help="also time init modules without __mcount_loc (see above)")
    parser.add_argument("--release", choices=("12", "13"), default="12",
                        help="the Debian release whose kernel to boot (default 12: Linux 6.1)")
    args = parser.parse_args()

    kernel = debian_kernel(release=args.release)
    rules = rules_for_tree(kernel.modules_dir)
    base = cache_dir() / "vmshare"
    base.mkdir(parents=True, exist_ok=True)
    share = Path(tempfile.mkdtemp(dir=base, prefix="latency-"))
    try:
        order, split, why = prepare(kernel, list(args.modules or MODULES), share, rules=rules)
        (share / "plan.json").write_text(json.dumps(
            {"order": order, "split": split, "rounds": args.rounds,
             "mcount_diagnosis": args.mcount_diagnosis}))
        (share / "guest.py").write_text(GUEST)
        script = HOST_ROOT_SETUP + (f"PYTHONDONTWRITEBYTECODE=1 hostrun /usr/bin/python3 "
                                    f"{share}/guest.py {share} {ROOT}\n")
        print(f"kernel {kernel.kver}; {len(order)} modules ({len(split)} split), "
              f"{args.rounds} rounds + 1 warm-up, QEMU TCG -smp 2")
        start = time.monotonic()
        result = boot(kernel, script=script, files=host_root_files(kernel), host_root=True,
                      timeout=1800, memory_mb=1024)
    finally:
        shutil.rmtree(share, ignore_errors=True)
    data = result.result_json() if result.ok else None
    if data is None:
        print(result.report(80))
        return 1
    report(order, split, why, data["rounds"])
    print(f"(VM ran {result.duration:.0f} s; total {time.monotonic() - start:.0f} s)")
    return 0


def report(order: list[str], split: dict[str, str], why: dict[str, str], rounds: list[dict]) -> None:
    def med(values: list[float]) -> float:
        return statistics.median(values) / 1e6  # ns -> ms

    print(f"{'module':<18} {'plain':>8} {'unsigned':>8} {'C':>8} {'I':>8} {'C+I':>8} {'ratio':>6}"
          "   (ms, median over rounds; ratio = C+I / plain)")
    totals = {"plain": 0.0, "unsigned": 0.0, "two": 0.0}
    split_totals = {"plain": 0.0, "unsigned": 0.0, "two": 0.0}
    for name in order:
        plain = med([r["plain"]["load"][name] for r in rounds])
        unsigned = med([r["plain-unsigned"]["load"][name] for r in rounds])
        core = med([r["two-stage"]["load"][name][0] for r in rounds])
        init = med([r["two-stage"]["load"][name][1] for r in rounds])
        both = med([sum(r["two-stage"]["load"][name]) for r in rounds])
        for key, value in (("plain", plain), ("unsigned", unsigned), ("two", both)):
            totals[key] += value
            if name in split:
                split_totals[key] += value
        note = "" if name in split else f"  (plain load: {why.get(name, '')})"
        print(f"{name:<18} {plain:8.2f} {unsigned:8.2f} {core:8.2f} {init:8.2f} {both:8.2f} "
              f"{both / plain:6.2f}{note}")
    per_round = [sum(sum(v) for v in r["two-stage"]["load"].values()) /
                 sum(r["plain"]["load"].values()) for r in rounds]
    batch = med([r["two-stage"]["batch_delete"] for r in rounds])
    print()
    print(f"total over {len(order)} modules: plain {totals['plain']:.1f} ms, plain-unsigned "
          f"{totals['unsigned']:.1f} ms, two-stage {totals['two']:.1f} ms")
    print(f"ratio two-stage / plain (signed, as shipped): {totals['two'] / totals['plain']:.2f}  "
          f"(per round: {', '.join(f'{x:.2f}' for x in per_round)})")
    print(f"ratio two-stage / plain-unsigned (no signature check): "
          f"{totals['two'] / totals['unsigned']:.2f}")
    print(f"the {len(split)} split modules alone: ratio {split_totals['two'] / split_totals['plain']:.2f}"
          f" against plain, {split_totals['two'] / split_totals['unsigned']:.2f} against unsigned")
    print(f"batch delete of {len(split)} init modules: {batch:.1f} ms (not part of the loads)")
    if "two-stage-no-init-mcount" in rounds[0]:
        init = sum(med([r["two-stage"]["load"][n][1] for r in rounds]) for n in split)
        bare = sum(med([r["two-stage-no-init-mcount"]["load"][n][1] for r in rounds]) for n in split)
        total = sum(med([sum(r["two-stage-no-init-mcount"]["load"][n]) for r in rounds])
                    for n in order)
        print(f"diagnosis: the {len(split)} init module loads take {init:.1f} ms, "
              f"{bare:.1f} ms without their __mcount_loc records "
              f"({(init - bare) / len(split):.1f} ms each: ftrace_free_mem()'s synchronize_rcu());"
              f" two-stage would then total {total:.1f} ms, ratio {total / totals['plain']:.2f} "
              f"against plain, {total / totals['unsigned']:.2f} against unsigned")
    ratio = totals["two"] / totals["unsigned"]
    verdict = "met" if ratio <= GOAL_RATIO else "NOT met"
    print(f"goal: two-stage at most {GOAL_RATIO}x plain: {verdict} against the unsigned baseline "
          f"({ratio:.2f}), {'met' if totals['two'] / totals['plain'] <= GOAL_RATIO else 'NOT met'}"
          f" against the signed one ({totals['two'] / totals['plain']:.2f})")


if __name__ == "__main__":
    sys.exit(main())
