#!/usr/bin/python3
"""Kill initsplitd with SIGKILL in the middle of coldplug, again and again, and count
the boots after which a device was left without its driver (or anything else of the
invariant broke: an init module, a load marker or the active flag left behind).

Each round is the "sigkill" case of tests/test_daemon_vm.py: a real Debian kernel in
QEMU (TCG) with an e1000 NIC, a virtio RNG, an AHCI disk and a USB stick, the daemon
killed DELAY seconds after its first two-stage load, then started again. The delays
are spread over the whole coldplug (0 to --max-delay seconds, a fixed sequence from
--seed), so the kill lands in every window between loads and their bookkeeping.
Several rounds share one boot (--per-boot); a boot resets the drivers between them.

    /usr/bin/python3 bench/kill_stress.py            # 30 rounds
    /usr/bin/python3 bench/kill_stress.py -n 60 --per-boot 10

Prints one line per round and the misses at the end; exits 1 if there was any.
Not part of the test suite (about a minute per round under TCG). A missed round's
whole output is saved to /tmp/kill_stress-roundN.txt.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "daemon"), str(REPO)]

from tests.test_daemon_vm import (  # noqa: E402
    GUEST_SETUP,
    boot_with_devices,
    devices_problems,
    prepare_share,
)
from tests.testbed import debian_kernel, script_section  # noqa: E402
from tests.testbed.kernel import cache_dir  # noqa: E402


def part(text: str, name: str) -> str:
    start = text.find(f"-- {name}\n")
    if start < 0:
        return ""
    end = text.find("\n-- ", start + 1)
    return text[start:end if end >= 0 else None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--rounds", type=int, default=30)
    parser.add_argument("--per-boot", type=int, default=5, help="rounds in one boot")
    parser.add_argument("--max-delay", type=float, default=3.0,
                        help="latest kill, in seconds after the first two-stage load")
    parser.add_argument("--seed", type=int, default=2002)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    delays = [round(rng.uniform(0, args.max_delay), 2) for _ in range(args.rounds)]
    kernel = debian_kernel()
    base = cache_dir() / "vmshare"
    base.mkdir(parents=True, exist_ok=True)
    share = prepare_share(Path(tempfile.mkdtemp(dir=base)), kernel)
    misses: list[tuple[int, float, str]] = []
    started = time.monotonic()
    try:
        for first in range(0, args.rounds, args.per_boot):
            batch = list(enumerate(delays[first:first + args.per_boot], start=first))
            script = GUEST_SETUP + "".join(f"sigkill_case round{i} {d}\n" for i, d in batch) + 'echo "== end"\n'
            result = boot_with_devices(kernel, share, script, timeout=300 * len(batch))
            for i, delay in batch:
                try:
                    case = script_section(result, f"case round{i}")
                except AssertionError:
                    problems = ["the round did not run (boot ended early)"]
                else:
                    problems = devices_problems(part(case, "devices"))
                    if "second rc=0" not in case:
                        problems.append("the restarted daemon failed")
                    if "process gone: yes" not in case:
                        problems.append("the kill did not reach the daemon")
                loaded = ""
                if not problems:
                    loaded = case.split("loaded before kill: ", 1)[1].split("\n", 1)[0]
                print(f"round {i + 1:3d}: kill {delay:4.2f} s after the first load: "
                      + ("ok" if not problems else "MISS: " + "; ".join(problems))
                      + (f" ({loaded} two-stage loads before the kill)" if loaded else ""),
                      flush=True)
                if problems:
                    misses.append((i + 1, delay, "; ".join(problems)))
                    # The whole round (both daemons' logs, the devices) for the post-mortem.
                    saved = Path(tempfile.gettempdir()) / f"kill_stress-round{i + 1}.txt"
                    try:
                        saved.write_text(script_section(result, f"case round{i}"))
                    except AssertionError:
                        saved.write_text(result.report())
                    else:
                        # The kernel's side: the boot's whole log (probe errors, ata resets).
                        with saved.open("a") as out:
                            out.write("\n-- dmesg of the boot\n" + result.dmesg)
                    print(f"           the round's output: {saved}", flush=True)
    finally:
        shutil.rmtree(share, ignore_errors=True)
    print(f"\n{args.rounds - len(misses)} of {args.rounds} rounds kept every device's driver; "
          f"{len(misses)} missed ({time.monotonic() - started:.0f} s)")
    for number, delay, why in misses:
        print(f"  miss: round {number} (kill at {delay} s): {why}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
