#!/usr/bin/python3
"""Benchmark: split a whole kernel module tree with all cores, against a parse-only baseline.

    /usr/bin/python3 bench/split_tree.py [MODULES_DIR] [--release 12|13] [-j N]

Without MODULES_DIR, the kernel of the test bed's Debian --release is used
(Debian 12's 6.1 or Debian 13's 6.12; default: INITSPLIT_DEBIAN, else 12),
downloaded into ~/.cache/initsplit on first use. The baseline, measured in the same run with
the same number of workers, only reads (decompressing .ko.xz) and parses every
module with initsplit.elf.read_elf: the ratio says what splitting, validating and writing
cost on top of looking at the module at all.

It prints figures; it does not pass or fail.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "daemon"), str(ROOT)]

from initsplit.elf import MalformedElf, read_elf  # noqa: E402
from initsplit.modfile import CompressedModuleError, read_module  # noqa: E402
from initsplit.tree import count_outcomes, find_modules, split_jobs  # noqa: E402

GOAL_SECONDS = 30.0  # the whole Debian tree, on 2 cores


def parse_one(path: Path) -> float:
    start = time.perf_counter()
    try:
        # read_module(): Debian 13 ships .ko.xz, which the splitter decompresses
        # too; read_elf() of the compressed bytes would fail at once and make
        # the baseline meaningless.
        read_elf(read_module(path))
    except (MalformedElf, CompressedModuleError):
        pass
    return time.perf_counter() - start


def parse_all(paths: list[Path], workers: int) -> float:
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        # Big chunks: the baseline should measure parsing, not task dispatch.
        list(pool.map(parse_one, paths, chunksize=32))
    return time.perf_counter() - start


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules_dir", nargs="?", type=Path)
    parser.add_argument("--release", choices=("12", "13"),
                        help="Debian release whose kernel to split when MODULES_DIR is not given")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    modules_dir = args.modules_dir
    if modules_dir is None:
        from tests.testbed.kernel import debian_kernel

        modules_dir = debian_kernel(release=args.release).modules_dir
    jobs = find_modules([modules_dir])
    total_bytes = sum(job.source.stat().st_size for job in jobs)
    print(f"tree: {modules_dir}")
    print(f"modules: {len(jobs)}, {total_bytes / 1e6:.1f} MB, workers: {args.jobs}, "
          f"cpus: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")

    # Warm the page cache so neither measurement pays for the disk.
    for job in jobs:
        job.source.read_bytes()

    parse_seconds = parse_all([job.source for job in jobs], args.jobs)

    with tempfile.TemporaryDirectory(prefix="initsplit-bench-") as out:
        start = time.perf_counter()
        results = split_jobs(jobs, Path(out), workers=args.jobs)
        split_seconds = time.perf_counter() - start

    per_module = [r.seconds for r in results]
    counts = count_outcomes(results)
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"split+validate+write: {split_seconds:.1f} s total, "
          f"{len(jobs) / split_seconds:.0f} modules/s, {total_bytes / 1e6 / split_seconds:.1f} MB/s")
    print(f"per module: median {statistics.median(per_module) * 1e3:.1f} ms, "
          f"p95 {percentile(per_module, 0.95) * 1e3:.1f} ms, "
          f"max {max(per_module):.2f} s ({max(results, key=lambda r: r.seconds).path})")
    print(f"baseline read+parse (read_elf): {parse_seconds:.1f} s; "
          f"split/parse ratio {split_seconds / parse_seconds:.1f}")
    verdict = "met" if split_seconds < GOAL_SECONDS else "NOT met"
    print(f"goal: whole tree under {GOAL_SECONDS:.0f} s on 2 cores: {verdict} "
          f"({split_seconds:.1f} s on {args.jobs} workers)")
    print(f"load average after: {os.getloadavg()[0]:.2f} (other work on the machine skews all of this)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
