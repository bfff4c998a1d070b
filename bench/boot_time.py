"""End-to-end boot time of the demo system with initsplit on versus initsplit=off.

Builds the `make demo` image once (the release's debootstrap root, initsplit's
package installed with dpkg, dracut initramfs with the initsplit module), then
boots it alternately with and without `initsplit=off` in QEMU (TCG) and reads
systemd's own "Startup finished in ..." line (kernel + initrd + userspace) from
each boot. The order alternates per round (on/off, then off/on, ...), so a
drift of the host's load does not favour one side. Prints every round, the
medians and the ratio on/off against issue 12's goal (1.03). A script that
prints figures, not a test: TCG timings vary by 20-50 % between runs, so use
several rounds.

By default the package's postinst runs the kernel hook, as on a user's machine,
so the real root has the pre-split cache of the whole tree (on Debian 13 that
adds ~6.5 min to the image build); --no-real-root-cache builds the demo's image
(postinst with INITSPLIT_NO_CACHE=1, the real-root daemon splits on the fly).

    /usr/bin/python3 bench/boot_time.py [--release 12|13] [--rounds N] [--no-real-root-cache]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "daemon"))
sys.path.insert(0, str(REPO))

from tests.testbed import cache_dir, debian_kernel  # noqa: E402
from tests.testbed.install import install_initsplit  # noqa: E402
from tests.testbed.rootfs import debian_rootfs, remove_tree  # noqa: E402
from tests.testbed.system import boot_system, build_disk  # noqa: E402

# A total over a minute reads "1min 40.273s" (systemd's format_timespan()).
STARTUP = re.compile(r"Startup finished in (?P<parts>.*?) = (?:(?P<minutes>\d+)min )?"
                     r"(?P<total>[\d.]+)(?P<unit>m?s)")
PART = re.compile(r"(?:(?P<minutes>\d+)min )?(?P<value>[\d.]+)(?P<unit>min|ms|s) \((?P<name>\w+)\)")


def seconds(value: str, unit: str) -> float:
    return float(value) * {"ms": 0.001, "s": 1.0, "min": 60.0}[unit]


def startup(analyze: str) -> dict[str, float]:
    match = STARTUP.search(analyze)
    if match is None:
        raise SystemExit(f"no 'Startup finished' line in systemd-analyze output:\n{analyze}")
    parts = {m["name"]: seconds(m["value"], m["unit"]) + 60 * int(m["minutes"] or 0)
             for m in PART.finditer(match["parts"])}
    parts["total"] = seconds(match["total"], match["unit"]) + 60 * int(match["minutes"] or 0)
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", choices=("12", "13"), default="12")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-real-root-cache", action="store_true",
                        help="the demo's image: no pre-split cache on the real root")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    kernel = debian_kernel(release=args.release)
    rootfs = debian_rootfs(kernel)
    work = cache_dir() / "bench-boot"
    if work.exists():
        remove_tree(work)
    work.mkdir(parents=True)
    image = build_disk(rootfs, out=work,
                       prepare=[install_initsplit(real_root_cache=not args.no_real_root_cache)])
    print(f"image: {image.initrd.stat().st_size / 1e6:.1f} MB initramfs, kernel {kernel.kver}, "
          f"real root {'without' if args.no_real_root_cache else 'with'} a pre-split cache",
          flush=True)

    runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    for round_ in range(1, args.rounds + 1):
        order = (("on", ""), ("off", "initsplit=off"))
        for label, append in order if round_ % 2 else order[::-1]:
            boot = boot_system(image, append=append, timeout=420)
            if not boot.reached_multi_user:
                print(boot.report(), file=sys.stderr)
                return 1
            figures = startup(boot.analyze)
            runs[label].append(figures)
            print(f"round {round_} initsplit {label:>3}: " + ", ".join(
                f"{name} {value:.2f} s" for name, value in figures.items()), flush=True)
    remove_tree(work)

    print()
    for part in ("kernel", "initrd", "userspace", "total"):
        on = statistics.median(r.get(part, 0.0) for r in runs["on"])
        off = statistics.median(r.get(part, 0.0) for r in runs["off"])
        ratio = on / off if off else float("nan")
        print(f"median {part:<9}: initsplit on {on:6.2f} s, initsplit=off {off:6.2f} s, "
              f"ratio on/off {ratio:.2f}")
    on = statistics.median(r["total"] for r in runs["on"])
    off = statistics.median(r["total"] for r in runs["off"])
    print(f"goal (issue 12): total on/off <= 1.03: {'met' if on / off <= 1.03 else 'NOT met'} "
          f"({on / off:.3f} over {args.rounds} boots each)")
    print("(TCG under QEMU; the off boots run the same image with every module loaded plain)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
