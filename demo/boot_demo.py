"""`make demo`: a Debian system boots with initsplitd loading its drivers.

`demo/boot_demo.py --debian 13` (the default, `make demo`) boots Debian 13
"trixie" (Linux 6.12, Python 3.13, .ko.xz modules); `--debian 12` (`make demo
DEBIAN=12`) boots Debian 12 "bookworm" (Linux 6.1, Python 3.11). Without
--debian, INITSPLIT_DEBIAN names the release, else 13.

On a fresh Debian 12 machine, as root:

1. fetches the release's kernel package and builds a root of that release with
   debootstrap (both cached in ~/.cache/initsplit or $INITSPLIT_CACHE, outside the
   repository; only the first run pays for them);
2. builds initsplit's Debian package (`make deb`, cached by the tree's content)
   and installs it into (an overlay of) that root with `dpkg -i`, as a user
   would: its postinst puts initsplit's 80-drivers.rules in place of udev's and
   enables initsplitd.service on the real root;
3. builds the initramfs with dracut: the initsplit dracut module adds python3, the
   daemon and a pre-split cache of every kernel module in the image;
4. boots the disk in QEMU (TCG, root on a virtio ext4 disk) to multi-user;
5. prints what `journalctl -b` shows of initsplit: every module the two daemons
   loaded (initramfs, then real root) with its mode and sizes, the batches of init
   modules given back, and each daemon's summary;
6. adds up what both daemons say they gave back for good and holds it against
   the kernel: every module's core size in the journal against /proc/modules,
   and every module whose BTF was dropped against /sys/kernel/btf (the bytes a
   module's BTF would have kept are the retention model's, layout/btf.py, which
   tests/test_btf_vm.py checks against the kernel's slab counters).

The only change from the installed defaults is ExitAfterQuietSec=10s (instead of
30 s), so the real-root daemon's summary is in the journal sooner.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "daemon"))
sys.path.insert(0, str(REPO))

from initsplit.daemon.journal import (  # noqa: E402
    MESSAGE_ID_BATCH_UNLOADED,
    MESSAGE_ID_LOAD_FAILED,
    MESSAGE_ID_LOADED_PLAIN,
    MESSAGE_ID_LOADED_TWO_STAGE,
    MESSAGE_ID_SUMMARY,
    SYSLOG_IDENTIFIER,
)
from tests.testbed import TestbedError, cache_dir, debian_kernel  # noqa: E402
from tests.testbed.apt import RELEASE_ENV, RELEASES, DebianRelease, debian_release  # noqa: E402
from tests.testbed.given_back import check_given_back  # noqa: E402
from tests.testbed.install import initsplit_deb, install_initsplit  # noqa: E402
from tests.testbed.rootfs import RootFS, debian_rootfs  # noqa: E402
from tests.testbed.system import SystemBoot, boot_system, build_disk  # noqa: E402

UNITS = (
    ("initsplitd-initrd.service", "in the initramfs"),
    ("initsplitd.service", "on the real root"),
)
DROPIN = "[Daemon]\nExitAfterQuietSec=10s\n"
# Until the real-root daemon is fully gone (is-active is false already while it is
# still "deactivating", before its last journal entries are flushed).
WAIT_DAEMON = ("timeout 180 sh -c 'until [ \"$(systemctl show -P ActiveState initsplitd.service)\" "
               "= inactive ]; do sleep 1; done'")


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def info(message: str) -> None:
    print(f"    {message}", flush=True)


# The release `make demo` boots when neither --debian nor INITSPLIT_DEBIAN names one.
DEFAULT_DEBIAN = "13"


def rootfs_is_cached(kver: str) -> bool:
    return (cache_dir() / "rootfs" / kver / "READY").exists()


def kib(value: str | None) -> str:
    return f"{int(value) // 1024:>5} KiB" if value else "        -"


def print_journal(boot: SystemBoot) -> None:
    entries = [e for e in boot.journal_json if e.get("SYSLOG_IDENTIFIER") == SYSLOG_IDENTIFIER]
    switch = next((e for e in boot.journal_json if e.get("MESSAGE") == "Switching root."), None)
    for unit, where in UNITS:
        mine = [e for e in entries if e.get("_SYSTEMD_UNIT") == unit]
        print()
        print(f"--- initsplitd {where} ({unit}): journalctl -b _SYSTEMD_UNIT={unit}")
        if not mine:
            print("    (no entries)")
            continue
        print(f"    {'module':<22} {'mode':<10} {'core':>9} {'init module':>11} {'BTF back':>9} {'load':>8}  reason")
        for e in mine:
            mid = e.get("MESSAGE_ID")
            if mid in (MESSAGE_ID_LOADED_TWO_STAGE, MESSAGE_ID_LOADED_PLAIN, MESSAGE_ID_LOAD_FAILED):
                seconds = int(e.get("INITSPLIT_LOAD_USEC", "0")) / 1e6
                print(f"    {e['INITSPLIT_MODULE']:<22} {e['INITSPLIT_MODE']:<10} "
                      f"{kib(e.get('INITSPLIT_CORE_BYTES'))} {kib(e.get('INITSPLIT_INIT_BYTES')):>11} "
                      f"{kib(e.get('INITSPLIT_BTF_BYTES')):>9} "
                      f"{seconds:>7.2f}s  {e.get('INITSPLIT_REASON', '')}")
        if any(e.get("MESSAGE_ID") == MESSAGE_ID_LOAD_FAILED and e.get("ERRNO") == "19" for e in mine):
            print("    (\"No such device\": the driver's init found no hardware for it in this VM;"
                  " modprobe fails the same way.)")
        for e in mine:
            mid = e.get("MESSAGE_ID")
            if mid == MESSAGE_ID_BATCH_UNLOADED:
                print(f"    batch ({e['INITSPLIT_TRIGGER']}): {e['MESSAGE']}")
                print(f"        deleted: {e['INITSPLIT_BATCH_MODULES']}")
            elif mid == MESSAGE_ID_SUMMARY:
                print(f"    summary: {e['MESSAGE']}")
            elif e.get("MESSAGE", "").startswith("initsplitd exiting:"):
                when = ""
                if switch is not None and unit == UNITS[0][0]:
                    gap = (int(switch["__MONOTONIC_TIMESTAMP"]) - int(e["__MONOTONIC_TIMESTAMP"])) / 1e6
                    when = f" ({gap:.2f} s before switch-root)"
                print(f"    {e['MESSAGE']}{when}")


def check_total(boot: SystemBoot) -> bool:
    """Both daemons' given-back total, and whether the kernel agrees with its parts."""
    after = boot.sections.get("modules_after")
    listing = boot.sections.get("btf_after")
    result = check_given_back(boot.journal_json, proc_modules=after.output if after else boot.proc_modules,
                              btf_listing=listing.output if listing else "", daemons=len(UNITS))
    print()
    info(f"given back for good, both daemons' summaries: {result.total:,} bytes "
         f"({result.total / 1024:,.0f} KiB), of which BTF {result.btf:,} bytes; "
         f"the modules' entries add up to {result.per_module:,}")
    info(f"the kernel agrees: {len(result.core_confirmed)} modules have the journal's core size in "
         f"/proc/modules, and the {len(result.btf_confirmed)} whose BTF was given back have no "
         "/sys/kernel/btf entry")
    if result.total <= 0:
        result.problems.append("nothing given back")
    for problem in result.problems:
        print(f"demo: {problem}", file=sys.stderr)
    return not result.problems


def parse_args(argv: list[str] | None = None) -> DebianRelease:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--debian", choices=sorted(RELEASES),
                        default=os.environ.get(RELEASE_ENV) or DEFAULT_DEBIAN,
                        help=f"the Debian release to boot (default: ${RELEASE_ENV}, else {DEFAULT_DEBIAN})")
    args = parser.parse_args(argv)
    # Everything in tests/testbed that picks a release by default (the kernel, its
    # root, apt) reads this.
    os.environ[RELEASE_ENV] = args.debian
    return debian_release(args.debian)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    release = parse_args(argv)
    try:
        step(f"fetching the Debian {release.version} ({release.suite}) kernel package "
             "(cached after the first run)")
        kernel = debian_kernel(release=release.version)
        info(f"kernel {kernel.kver} ({kernel.deb_version})")

        if rootfs_is_cached(kernel.kver):
            step(f"using the cached Debian {release.version} ({release.suite}) root filesystem")
        else:
            step(f"building the Debian {release.version} ({release.suite}) root filesystem "
                 "(first run only, a few minutes)")
        t = time.monotonic()
        rootfs: RootFS = debian_rootfs(kernel)
        info(f"{rootfs.path} ({time.monotonic() - t:.0f} s)")

        work = cache_dir() / "demo" / release.suite
        if work.exists():
            from tests.testbed.rootfs import remove_tree
            remove_tree(work)
        work.mkdir(parents=True)

        step("building initsplit's Debian package (make deb; cached by the tree's content)")
        t = time.monotonic()
        deb = initsplit_deb()
        info(f"{deb} ({time.monotonic() - t:.0f} s)")

        step("installing it into the image (dpkg -i), then building the initramfs with dracut "
             "(the initsplit module pre-splits its kernel modules)")
        t = time.monotonic()
        image = build_disk(rootfs, out=work,
                           prepare=[install_initsplit(conf_dropins={"50-demo.conf": DROPIN})],
                           report_commands={"wait_daemon": WAIT_DAEMON, "modules_after": "cat /proc/modules",
                                            "btf_after": "ls /sys/kernel/btf"})
        log = image.dracut_log.read_text()
        added = re.search(r"initsplit: .*MB added.*", log)
        info(f"{image.initrd.stat().st_size / 1e6:.1f} MB initramfs in {time.monotonic() - t:.0f} s; "
             f"{added.group(0) if added else 'initsplit module not included?'}")

        step("booting it in QEMU (TCG, root on a virtio ext4 disk; ~1 min)")
        boot = boot_system(image, timeout=420)
        # Kept for a look afterwards (the disk is not: it is ~1 GB).
        (work / "console.log").write_text(boot.console)
        (work / "report.log").write_text(boot.report_text)
        info(f"{boot.duration:.0f} s; system {boot.state or 'did not report'}; "
             f"{boot.analyze.strip().splitlines()[0] if boot.analyze.strip() else ''}")
        if not boot.reached_multi_user:
            print(boot.report(), file=sys.stderr)
            return 1
        image.disk.unlink(missing_ok=True)
        shutil.rmtree(work / "destdir", ignore_errors=True)

        step("what journalctl -b shows of initsplit")
        print_journal(boot)
        after = boot.sections.get("modules_after")
        left = sorted(line.split()[0] for line in (after.output if after else boot.proc_modules).splitlines()
                      if line.split() and line.split()[0].endswith("__init"))
        print()
        info(f"init modules left in /proc/modules: {', '.join(left) if left else 'none'}")
        if not check_total(boot):
            return 1
    except TestbedError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    print()
    step(f"Debian {release.version} ({release.suite}, Linux {kernel.kver}): done in "
         f"{time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
