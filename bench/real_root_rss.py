#!/usr/bin/python3
"""Benchmark: the real-root daemon's peak RSS when the kernel hook's pre-split cache
serves every module, in a full-system TCG boot (issue 12's goal: under 30 MB).

    /usr/bin/python3 bench/real_root_rss.py [--release 13] [--boots N] [--cache DIR]
                                            [--two-stage]

Builds the disk as the boot tests do (tests/testbed/system.py build_disk() with
initsplit's package installed by dpkg -i, install_initsplit()) from the cached
debootstrap root of the release, with the real root's pre-split cache of the whole
module tree, boots it N times (one QEMU at a time) and prints the real-root
daemon's INITSPLIT_PEAK_RSS_KIB (getrusage, logged at its exit) and whether it
split anything on the fly (it must not: then the cache served every load).

The cache: the package's postinst runs the kernel hook, which splits the whole
tree (Debian 13's 6.12 tree: about 6.5 minutes on two idle CPUs; the reason
tests/test_boot_debian13.py does not build it). With --cache DIR the hook's cache
is copied to DIR after the first build, and a later run with the same DIR copies
it into the image instead of running the hook again: an entry records the source's
SHA-256, the cache format and the split options, and the daemon checks all three
before it uses it, so a stale copy shows as INITSPLIT_SPLIT_ON_THE_FLY=yes (this
script then says so) rather than as a wrong figure. Delete DIR after changing the
splitter.

It prints figures; it exits 1 only if a boot did not give one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "daemon"), str(ROOT)]

from tests.testbed import debian_kernel  # noqa: E402
from tests.testbed.install import (DAEMON_REPORT, ROOT_UNIT, install_initsplit, peak_rss_bytes,  # noqa: E402
                                   split_on_the_fly_problems)
from tests.testbed.rootfs import debian_rootfs  # noqa: E402
from tests.testbed.system import boot_system, build_disk  # noqa: E402

from initsplit.daemon.journal import SYSLOG_IDENTIFIER  # noqa: E402

GOAL_BYTES = 30_000_000
CACHE_IN_ROOT = "usr/lib/initsplit/cache"
TWO_STAGE_DROPIN = "[Daemon]\nTwoStage=always\n"
REPORT = {
    **DAEMON_REPORT,
    "python": "python3 -c 'import sys; print(sys.version.split()[0])'",
}


class CopyCache:
    """prepare step after dpkg -i: the real root's cache, saved to or copied from `saved`."""

    def __init__(self, saved: Path | None, kver: str, reuse: bool) -> None:
        self.saved, self.kver, self.reuse = saved, kver, reuse

    def __call__(self, root: Path) -> None:
        dest = root / CACHE_IN_ROOT / self.kver
        if self.saved is None:
            return
        if self.reuse:
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(self.saved, dest, symlinks=True)
        else:
            tmp = self.saved.with_name(self.saved.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(dest, tmp, symlinks=True)
            tmp.rename(self.saved)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", default="13", help="Debian release of the root (12 or 13)")
    ap.add_argument("--boots", type=int, default=1)
    ap.add_argument("--cache", type=Path, help="where to keep the real root's cache between runs")
    ap.add_argument("--two-stage", action="store_true", help="TwoStage=always (as Debian 12's boot test)")
    args = ap.parse_args()

    rootfs = debian_rootfs(debian_kernel(release=args.release))
    dropins = {"50-two-stage.conf": TWO_STAGE_DROPIN} if args.two_stage else {}
    saved = args.cache / rootfs.kver if args.cache else None
    reuse = saved is not None and saved.is_dir()
    prepare = [install_initsplit(conf_dropins=dropins, real_root_cache=not reuse),
               CopyCache(saved, rootfs.kver, reuse)]
    failures = 0
    with tempfile.TemporaryDirectory(prefix="real-root-rss-", dir="/var/tmp") as tmp:
        t0 = time.monotonic()
        image = build_disk(rootfs, out=Path(tmp), prepare=prepare, report_commands=REPORT)
        how = f"copied from {saved}" if reuse else "built by the kernel hook"
        print(f"Debian {args.release} ({rootfs.kver}), {'TwoStage=always' if args.two_stage else 'defaults'}; "
              f"image built in {time.monotonic() - t0:.0f} s, real root's cache {how}", flush=True)
        for n in range(1, args.boots + 1):
            booted = boot_system(image, timeout=600)
            python = booted.sections["python"].output.strip() if "python" in booted.sections else "?"
            entries = [e for e in booted.journal_json if e.get("SYSLOG_IDENTIFIER") == SYSLOG_IDENTIFIER
                       and e.get("_SYSTEMD_UNIT") == ROOT_UNIT]
            try:
                peak = peak_rss_bytes(entries)
            except AssertionError as e:
                print(f"boot {n}: no figure ({e}); state {booted.state}\n{booted.report()}")
                failures += 1
                continue
            problems = split_on_the_fly_problems(entries)
            verdict = "under" if peak < GOAL_BYTES else "NOT under"
            print(f"boot {n}: Python {python}, real-root daemon peak RSS {peak / 1e6:.1f} MB "
                  f"({peak / 2**20:.1f} MiB), {verdict} the 30 MB goal; "
                  f"{'; '.join(problems) or 'nothing split on the fly'}; boot {booted.duration:.0f} s wall",
                  flush=True)
        image.disk.unlink(missing_ok=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
