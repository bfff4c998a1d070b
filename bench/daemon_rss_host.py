#!/usr/bin/python3
"""Benchmark, on the host: where the real-root daemon's memory goes, without a boot.

    /usr/bin/python3 bench/daemon_rss_host.py [--release 12|13] [--in-root]

Runs the daemon's interpreter as bin/initsplitd does (`python3 -I`, `_hashlib`
blocked) and prints, each in a fresh process:

* imports: VmRSS after the daemon's imports (initsplit.daemon.main, udev_source,
  kmod.resolver), and after opening the libkmod context of the release's kernel;
* reads: the peak RSS (VmHWM) over the imports while two threads check five large modules of
  the release's tree (kvm, drm, kvm-intel, drm_kms_helper, e1000) the way the daemon
  did before (read_module(), whole) and does now (modfile.ModuleDigest);
* hashes: the same for fsio.sha256_fd() of the kernel hook's cache cores, with
  1 MiB and 64 KiB reads (needs --cache, bench/real_root_rss.py's).

MALLOC_MMAP_THRESHOLD_=131072, as the units set it. With --in-root it runs in the
release's cached debootstrap root (Debian 13: Python 3.13) through unshare and
chroot: a private mount namespace with a tmpfs on the root's /tmp, where a copy of
this checkout's daemon/ is byte-compiled by the root's own python3 (as the
package's postinst does); the cached root itself is not written. It prints figures.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LARGE = ("arch/x86/kvm/kvm.ko", "drivers/gpu/drm/drm.ko", "arch/x86/kvm/kvm-intel.ko",
         "drivers/gpu/drm/drm_kms_helper.ko", "drivers/net/ethernet/intel/e1000/e1000.ko")

CHILD = r'''
import sys
sys.modules["_hashlib"] = None  # as bin/initsplitd
import os, threading
sys.path.insert(0, sys.argv[1])
from initsplit.daemon.main import main  # noqa: F401
import initsplit.daemon.udev_source, initsplit.kmod.resolver  # noqa: F401
from pathlib import Path

def rss():
    with open("/proc/self/status") as f:
        d = {l.split(":")[0]: int(l.split()[1]) for l in f if l.startswith(("VmRSS", "RssAnon", "RssFile"))}
    return f"VmRSS {d['VmRSS'] / 1024:.1f} MiB (anon {d['RssAnon'] / 1024:.1f}, file {d['RssFile'] / 1024:.1f})"

def maxrss():
    # VmHWM, this process's own peak: ru_maxrss would start at the RSS of the
    # process that forked it (Linux keeps the larger across execve()).
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024

what, kver, root, files = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
if what == "imports":
    print(f"  after the daemon's imports: {rss()}, {len(sys.modules)} modules")
    from initsplit.kmod.resolver import Resolver
    Resolver(root=None if root == "/" else Path(root), kver=kver, ignore_loaded=True)
    print(f"  and libkmod's context for {kver}: {rss()}")
    sys.exit()
from initsplit import fsio, modfile
if what == "whole":
    check = lambda p: modfile.read_module(Path(p))
elif what == "digest":
    check = lambda p: modfile.ModuleDigest(Path(p))
else:
    fsio._HASH_CHUNK = int(what)
    def check(p):
        fd = os.open(p, os.O_RDONLY)
        try:
            fsio.sha256_fd(fd)
        finally:
            os.close(fd)
base = maxrss()
threads = [threading.Thread(target=lambda ps=files[i::2]: [check(p) for p in ps]) for i in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
print(f"  {what:>8}: peak RSS {base:.1f} MiB after the imports, {maxrss():.1f} MiB after {len(files)} files on 2 threads (+{maxrss() - base:.1f})")
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", default="13")
    ap.add_argument("--in-root", action="store_true", help="run in the release's cached root")
    ap.add_argument("--cache", type=Path, help="bench/real_root_rss.py's --cache DIR (for the hash figures)")
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    sys.path[:0] = [str(ROOT / "daemon"), str(ROOT)]
    from tests.testbed import debian_kernel
    from tests.testbed.rootfs import debian_rootfs

    kernel = debian_kernel(release=args.release)
    rootfs = debian_rootfs(kernel)
    suffix = ".xz" if args.release == "13" else ""
    guest_tree = Path("/lib/modules") / kernel.kver / "kernel"
    modules = [str((guest_tree if args.in_root else rootfs.path / guest_tree.relative_to("/")) / f"{m}{suffix}")
               for m in LARGE]
    cores = []
    if args.cache:
        cores = [str(args.cache / kernel.kver / "kernel" / m) for m in LARGE[:4]]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")

    def run(what: str, files: list[str]) -> None:
        if args.in_root:
            inner = ["/usr/bin/python3", "-I", "/tmp/isplit-bench/child.py", "/tmp/isplit-bench/daemon", what,
                     kernel.kver, "/"] + [f"/tmp/isplit-bench/cores/{i}" if f in cores else f
                                     for i, f in enumerate(files)]
            r = shlex.quote(str(rootfs.path))
            copy = " && ".join(f"cp {shlex.quote(c)} {r}/tmp/isplit-bench/cores/{i}" for i, c in enumerate(files)
                               if c in cores) or "true"
            script = (f"mount -t tmpfs tmpfs {r}/tmp && mkdir -p {r}/tmp/isplit-bench/cores && "
                      f"cp -r {shlex.quote(str(ROOT / 'daemon'))} {r}/tmp/isplit-bench/daemon && "
                      f"find {r}/tmp/isplit-bench/daemon -name __pycache__ -prune -exec rm -rf {{}} + && "
                      f"{copy} && mount -t proc proc {r}/proc && "
                      f"chroot {r} /usr/bin/python3 -I -m compileall -q /tmp/isplit-bench/daemon > /dev/null && "
                      f"cat > {r}/tmp/isplit-bench/child.py && chroot {r} {shlex.join(inner)}")
            argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
            subprocess.run(argv, input=CHILD, text=True, env=env, check=True)
        else:
            subprocess.run([sys.executable, "-I", "-c", CHILD, str(ROOT / "daemon"), what, kernel.kver,
                            str(rootfs.path), *files],
                           env=env, check=True, cwd="/")

    where = f"in {rootfs.path}" if args.in_root else "on the host"
    python = subprocess.run((["chroot", str(rootfs.path)] if args.in_root else []) +
                            ["/usr/bin/python3", "-c", "import sys; print(sys.version.split()[0])"],
                            capture_output=True, text=True).stdout.strip()
    print(f"Debian {args.release} modules ({kernel.kver}), Python {python} {where}")
    run("imports", [])
    for n in range(args.runs):
        for what in ("whole", "digest"):
            run(what, modules)
    if cores:
        print("  the cache's cores, fsio.sha256_fd() with 1 MiB and 64 KiB reads:")
        for n in range(args.runs):
            for chunk in (1 << 20, 1 << 16):
                run(str(chunk), cores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
