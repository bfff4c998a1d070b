"""What Discard=btf gives back, as the Debian 6.1 kernel counts it, in QEMU (TCG).

A server's set of real modules (with their dependencies) is loaded on fresh
one-CPU boots in two configurations, three boots each:

* plain: every original with insmod, as modprobe would;
* without BTF: every original as the daemon's plain loads rewrite it
  (elf/discard.py), BTF dropped where decide() drops it (not for BTF ids). The
  core modules lose exactly the same section, so what the class gives back does
  not depend on how the module is loaded; loading plain keeps the two-stage
  loads' own slab (see PERFORMANCE.md) out of the comparison.

Each boot reads SUnreclaim and free memory (MemFree plus the pages parked on the
per-cpu lists, which /proc/zoneinfo counts under "pagesets" and MemFree leaves
out) before and after loading, once the loads have settled. What the two
configurations differ by is what the BTF cost; it must equal the retention model
(layout/btf.py) to within 5 %, averaged over the boots, and each configuration's
boots must agree among themselves far better than that. /sys/kernel/btf lists the
modules that kept their BTF, and no other; every module works (exercised below).

Run with -s to see the figures.
"""

from __future__ import annotations

import re
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from initsplit.elf.discard import sections, without_sections
from initsplit.layout.btf import btf_kept_bytes
from initsplit.split.decide import decide, module_name
from initsplit.split.policy import DISCARD_SECTIONS
from initsplit.elf import read_elf
from tests.testbed import BootResult, DebianKernel, boot, dmesg_problems
from tests.testbed.fixtures import kernel  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.vm

BOOTS = 3
TOLERANCE = 0.05
# A server: virtio and SCSI/ATA disks, ext4, xfs, btrfs, nf_tables with conntrack
# and NAT, bridge and VLANs, loop, device mapper, fuse, overlay, tun, bonding.
TARGETS = (
    # First: libcrc32c and ext4 ask the crypto API for "crc32c" from their init,
    # which a guest without modprobe cannot load on demand.
    "crc32c_generic",
    "virtio_net", "virtio_blk", "virtio_scsi", "sd_mod", "ahci", "ext4", "xfs", "btrfs",
    "nf_tables", "nf_conntrack", "nf_nat", "nft_chain_nat", "nft_ct", "bridge", "br_netfilter",
    "loop", "dm_mod", "dm_crypt", "fuse", "overlay", "tun", "bonding", "vxlan", "8021q",
    "iptable_filter", "raid1",
)

GUEST = r"""
free_kb() {
    # MemFree leaves out the free pages on the per-cpu lists.
    mf=$(sed -n 's/^MemFree: *\([0-9]*\) kB/\1/p' /proc/meminfo)
    pcp=$(awk '/pagesets/ {p = 1} p && $1 == "count:" {s += $2} END {print s + 0}' /proc/zoneinfo)
    echo $((mf + pcp * 4))
}
snapshot() {
    # Let RCU callbacks and the init-layout frees (a workqueue) run first.
    sleep 2
    echo "--- $1 free_kb=$(free_kb) sunreclaim_kb=$(sed -n 's/^SUnreclaim: *\([0-9]*\) kB/\1/p' /proc/meminfo)"
}
check() { if eval "$2" >/dev/null 2>&1; then echo "works $1"; else echo "FAILED $1: $2"; fi; }
snapshot before
for m in $(cat /m/order); do insmod /m/$m.ko || echo "FAILED insmod $m"; done
snapshot after
echo "btf: $(ls /sys/kernel/btf | tr '\n' ' ')"
# Every module of the set at work.
check ext4-on-loop 'cp /img/ext4.img /tmp/img && losetup /dev/loop0 /tmp/img && mkdir -p /mnt/e && mount -t ext4 /dev/loop0 /mnt/e && echo x > /mnt/e/f && umount /mnt/e && losetup -d /dev/loop0'
check overlay 'mkdir -p /tmp/o/l /tmp/o/u /tmp/o/w /tmp/o/m && mount -t overlay o -o lowerdir=/tmp/o/l,upperdir=/tmp/o/u,workdir=/tmp/o/w /tmp/o/m && touch /tmp/o/m/f && umount /tmp/o/m'
check filesystems 'grep -q xfs /proc/filesystems && grep -q btrfs /proc/filesystems && grep -q fuse /proc/filesystems'
check bridge 'brctl addbr br0 && ip link set br0 up'
check vlan 'ip link add link br0 name br0.5 type vlan id 5'
check bonding 'echo +bond1 > /sys/class/net/bonding_masters && test -d /sys/class/net/bond1'
check tun 'tunctl -t tap0'
check conntrack 'test -e /proc/sys/net/netfilter/nf_conntrack_max'
check device-mapper 'test -c /dev/mapper/control || grep -q device-mapper /proc/misc'
check fuse-device 'grep -q fuse /proc/misc'
check md 'test -e /proc/mdstat && grep -q raid1 /proc/mdstat'
"""


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    keeps_btf: bool  # BTF ids: Discard=btf leaves it
    model_bytes: int  # what the kernel keeps for its BTF (layout/btf.py)


@dataclass(frozen=True)
class Figures:
    free_kb: int  # free memory lost by loading the set
    sunreclaim_kb: int  # unreclaimable slab gained by loading it
    btf: frozenset[str]


@pytest.fixture(scope="module")
def modules(kernel: DebianKernel) -> list[Module]:  # noqa: F811
    out: list[Module] = []
    for target in TARGETS:
        for ko in kernel.module_deps(target):
            if any(m.path == ko for m in out):
                continue
            data = ko.read_bytes()
            name = module_name(read_elf(data))
            btf = next(s for s in sections(data) if s.name == ".BTF")
            # What the daemon does with it (split/decide.py, the defaults).
            decision = decide(data)
            assert decision.outcome in ("split", "plain", "nothing", "refused"), (ko, decision)
            out.append(Module(name, ko, "btf" not in decision.discarded,
                              btf_kept_bytes(data[btf.offset:btf.offset + btf.size], name)))
            assert decision.btf_bytes == (0 if out[-1].keeps_btf else out[-1].model_bytes)
    assert 40 <= len(out) <= 70, len(out)
    return out


@pytest.fixture(scope="module")
def ext4_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # busybox has no mke2fs: the host makes the file system (e2fsprogs).
    image = tmp_path_factory.mktemp("img") / "ext4.img"
    with image.open("wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    return image


def run(kernel: DebianKernel, modules: list[Module], ext4_image: Path, *,  # noqa: F811
        drop_btf: bool) -> BootResult:
    files: dict[str, Path | bytes] = {"/m/order": " ".join(m.name for m in modules).encode(),
                                      "/img/ext4.img": ext4_image}
    for m in modules:
        data = m.path.read_bytes()
        files[f"/m/{m.name}.ko"] = (without_sections(data, DISCARD_SECTIONS["btf"])
                                    if drop_btf and not m.keeps_btf else data)
    return boot(kernel, script=GUEST, files=files, timeout=600, memory_mb=1024, smp=1)


def figures(result: BootResult) -> Figures:
    assert result.ok and result.exit_status == 0, result.report()
    assert "FAILED" not in result.script_output, result.report(80)
    problems = dmesg_problems(result.dmesg, tainted=result.tainted, allowed_taint="E")
    assert not problems, "\n".join(problems) + "\n" + result.report()
    snap = dict(re.findall(r"^--- (\w+) (free_kb=\d+ sunreclaim_kb=\d+)$", result.script_output, re.M))
    before = dict(kv.split("=") for kv in snap["before"].split())
    after = dict(kv.split("=") for kv in snap["after"].split())
    btf = re.search(r"^btf: (.*)$", result.script_output, re.M).group(1).split()
    return Figures(int(before["free_kb"]) - int(after["free_kb"]),
                   int(after["sunreclaim_kb"]) - int(before["sunreclaim_kb"]), frozenset(btf))


@pytest.fixture(scope="module")
def plain(kernel: DebianKernel, modules: list[Module], ext4_image: Path) -> list[Figures]:  # noqa: F811
    return [figures(run(kernel, modules, ext4_image, drop_btf=False)) for _ in range(BOOTS)]


@pytest.fixture(scope="module")
def without_btf(kernel: DebianKernel, modules: list[Module], ext4_image: Path) -> list[Figures]:  # noqa: F811
    return [figures(run(kernel, modules, ext4_image, drop_btf=True)) for _ in range(BOOTS)]


def test_btf_files_say_who_kept_it(modules: list[Module], plain: list[Figures],
                                   without_btf: list[Figures]) -> None:
    names = {m.name for m in modules}
    for boot_figures in plain:
        assert names <= boot_figures.btf, sorted(names - boot_figures.btf)
    kept = {m.name for m in modules if m.keeps_btf}
    assert kept, "the set holds modules with BTF ids (nf_conntrack, nf_nat): they keep their BTF"
    for boot_figures in without_btf:
        assert boot_figures.btf & names == kept, sorted(boot_figures.btf & names)


def test_what_btf_costs_is_what_the_model_says(modules: list[Module], plain: list[Figures],
                                               without_btf: list[Figures]) -> None:
    model_kb = sum(m.model_bytes for m in modules if not m.keeps_btf) / 1024
    rows = {}
    for what in ("sunreclaim_kb", "free_kb"):
        a = [getattr(f, what) for f in plain]
        b = [getattr(f, what) for f in without_btf]
        measured = statistics.mean(a) - statistics.mean(b)
        noise = max(max(a) - min(a), max(b) - min(b))
        rows[what] = (measured, noise, a, b)
    print(f"\n{len(modules)} modules, BTF dropped from {sum(not m.keeps_btf for m in modules)}: "
          f"model {model_kb:,.0f} kB")
    for what, (measured, noise, a, b) in rows.items():
        print(f"  {what}: plain {a}, without BTF {b}: {measured:,.0f} kB given back "
              f"({measured / model_kb - 1:+.1%} against the model), boots within {noise} kB")
    for what, (measured, noise, _, _) in rows.items():
        assert abs(measured - model_kb) <= TOLERANCE * model_kb, (what, measured, model_kb)
        assert noise <= TOLERANCE * model_kb / 2, (what, noise)
