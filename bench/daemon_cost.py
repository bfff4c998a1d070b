#!/usr/bin/python3
"""Benchmark: what initsplitd itself costs, start-up time to READY and peak RSS, in QEMU.

    /usr/bin/python3 bench/daemon_cost.py [--runs N]

Boots the Debian 6.1 kernel under QEMU (TCG) with the cached debootstrap root
(Debian's python3 and libraries) and this checkout shared over 9p, as
tests/test_daemon_vm.py does, with an e1000 NIC and a virtio RNG whose drivers
are modules. A harness in the guest starts the daemon with NOTIFY_SOCKET pointing
at its own datagram socket and times the READY=1 message; os.wait4() gives the
daemon's peak RSS (ru_maxrss). The first run coldplugs every device of the q35
machine (some 40 modules: kvm, aesni_intel, ahci, e1000, ...), splitting each on
the fly in the daemon's own threads (no pre-split cache); later runs find
nothing left to load. Baselines measured in
the same guest: `python3 -c pass`, and python3 importing the daemon's modules.
The goal is a peak RSS under 30 MB. It prints figures; it does not pass or fail.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "daemon"), str(ROOT)]

from tests.testbed import HOST_ROOT_SETUP, boot, cache_dir, debian_kernel, host_root_files  # noqa: E402
from tests.testbed.rootfs import debian_rootfs  # noqa: E402

GOAL_RSS_MB = 30
CONFIG = """[Daemon]
QuietPeriodSec=1
ExitAfterQuietSec=2
Workers=2
RuntimeDir=/run/initsplit
"""

HARNESS = r"""
import json, os, socket, subprocess, sys, time
runs = int(sys.argv[1])
env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH="/mnt/daemon")

def measure(argv, notify=False):
    sock = None
    if notify:
        path = "/run/isplit-notify.sock"
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(0.05)
        env["NOTIFY_SOCKET"] = path
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ready = None
    messages = []
    # os.wait4() rather than Popen.poll(): it reaps the child with its rusage.
    pid = 0
    while pid == 0:
        if sock is None:
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        try:
            data = sock.recv(4096).decode()
            messages.append(data)
            if ready is None and "READY=1" in data.split("\n"):
                ready = time.perf_counter() - start
        except socket.timeout:
            pass
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    elapsed = time.perf_counter() - start
    proc.returncode = status
    env.pop("NOTIFY_SOCKET", None)
    if sock is not None:
        sock.close()
    err = proc.stderr.read().decode(errors="replace")
    return {"ready": ready, "elapsed": elapsed, "maxrss_kb": usage.ru_maxrss,
            "status": status, "messages": messages, "stderr_tail": err[-2000:]}

out = {"pass": [measure(["/usr/bin/python3", "-c", "pass"]) for _ in range(3)],
       "import": [measure(["/usr/bin/python3", "-c",
                           "import initsplit.daemon.main, initsplit.split, initsplit.validate"])
                  for _ in range(3)],
       "daemon": []}
daemon = ["/usr/bin/python3", "-m", "initsplit.daemon", "--source", "kernel",
          "--config-root", "/srv/conf"]
def modules():
    return sorted(line.split()[0] for line in open("/proc/modules"))

for n in range(runs):
    before = modules()
    out["daemon"].append(measure(daemon, notify=True))
    out["daemon"][-1]["new_modules"] = sorted(set(modules()) - set(before))
print("@@RESULT@@" + json.dumps(out))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="daemon runs in the guest (default 3)")
    args = parser.parse_args()

    kernel = debian_kernel()
    rootfs = debian_rootfs(kernel)
    base = cache_dir() / "vmshare"
    base.mkdir(parents=True, exist_ok=True)
    share = Path(tempfile.mkdtemp(dir=base, prefix="daemon-cost-"))
    try:
        conf = share / "conf/etc/initsplit"
        conf.mkdir(parents=True)
        (conf / "initsplitd.conf").write_text(CONFIG)
        (share / "harness.py").write_text(HARNESS)
        script = HOST_ROOT_SETUP + f"hostrun /usr/bin/python3 /srv/harness.py {args.runs}\n"
        devices = ["-device", "e1000", "-device", "virtio-rng-pci"]
        result = boot(kernel, script=script, files=host_root_files(kernel), host_root=rootfs.path,
                      shares={"/mnt": ROOT, "/srv": share}, qemu_args=devices, timeout=900,
                      memory_mb=1024)
    finally:
        shutil.rmtree(share, ignore_errors=True)
    data = result.result_json() if result.ok else None
    if data is None:
        print(result.report(80))
        return 1
    report(data)
    return 0


def report(data: dict) -> None:
    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.0f} ms"

    def mb(kb: int) -> str:
        return f"{kb / 1024:.1f} MB"

    print("QEMU TCG -smp 2, Debian 12 root over 9p, e1000 + virtio-rng")
    base, imports = data["pass"], data["import"]
    print(f"baseline python3 -c pass: {ms([r['elapsed'] for r in base])}, "
          f"peak RSS {mb(max(r['maxrss_kb'] for r in base))}")
    print(f"python3 importing the daemon, splitter and validator: "
          f"{ms([r['elapsed'] for r in imports])}, peak RSS {mb(max(r['maxrss_kb'] for r in imports))}")
    for n, run in enumerate(data["daemon"], 1):
        ready = f"{run['ready'] * 1000:.0f} ms" if run["ready"] is not None else "never"
        status = run["status"] >> 8 if run["status"] & 0x7F == 0 else f"signal {run['status'] & 0x7F}"
        summary = next((line.split(">", 1)[-1] for line in run["stderr_tail"].splitlines()
                        if "two-stage," in line and "modules," in line), "nothing loaded")
        print(f"daemon run {n}: READY after {ready}, exited {status} after {run['elapsed']:.1f} s, "
              f"peak RSS {mb(run['maxrss_kb'])}; {len(run['new_modules'])} modules new "
              f"({summary.strip()})")
        if run["ready"] is None or run["status"]:
            print("  stderr: " + run["stderr_tail"].replace("\n", "\n  "))
    peak = max(run["maxrss_kb"] for run in data["daemon"])
    base_pass = statistics.median(r["elapsed"] for r in base)
    readies = [r["ready"] for r in data["daemon"] if r["ready"] is not None]
    if readies:
        print(f"start-up to READY: median {ms(readies)} ({statistics.median(readies) / base_pass:.1f}x "
              f"the bare interpreter's start-up)")
    print(f"goal: peak RSS under {GOAL_RSS_MB} MB: {'met' if peak < GOAL_RSS_MB * 1024 else 'NOT met'} "
          f"({mb(peak)}; bare python3 {mb(max(r['maxrss_kb'] for r in base))})")


if __name__ == "__main__":
    sys.exit(main())
