"""What Discard=btf gives back, as Debian's kernels count it, in QEMU (TCG).

On each Debian release (12: Linux 6.1 and bookworm's Python; 13: Linux 6.12,
modules .ko.xz, trixie's Python 3.13 and python3-* packages), a server's set of
real modules (with their dependencies) is loaded on fresh one-CPU boots in three
configurations, three boots each:

* plain: every original with insmod, as modprobe would (udev alone);
* daemon: initsplitd's own service, loader and policy with the defaults
  (tests/testbed/load_set.py, run from the Debian root over 9p), asked for each
  target as a device asks for its driver. The defaults load every module of the
  set plain without its BTF (on 6.1 the two-stage slab outweighs the core pages a
  split wins, split/decide.py; 6.12 has no two-stage loads yet), BTF kept where
  the module has BTF ids;
* daemon-keep: the same with Discard= empty, so the daemon loads every original
  as it is. Against the daemon configuration it isolates what the BTF class gives
  back from what running a Python daemon leaves in the slab caches (its threads'
  task structs, its memory files' and runtime files' inodes, 9p's: freed, but in
  slabs that stay partly used), which the plain configuration does not have.

The set is what libkmod resolves the targets to in the Debian root, as the
daemon resolves them, less the modules the guest's 9p mount needs (loaded plain
in both configurations, before the figures are read).

Each boot reads SUnreclaim and free memory (MemFree plus the pages parked on the
per-cpu lists, which /proc/zoneinfo counts under "pagesets" and MemFree leaves
out) before and after loading, once the loads have settled and the page cache
and dentries (the daemon's files over 9p) are dropped. What the two daemon
configurations differ by is what the BTF class gave back; it must equal the
retention model (layout/btf.py) and the daemon's journal total to within 5 %,
averaged over the boots, and each configuration's boots must agree among
themselves within twice that (they do within 2 to 6 %). Against the plain
configuration the daemon must leave more memory free and less slab, its own
leftovers counted. /sys/kernel/btf lists the modules that kept
their BTF, and no other; every module works (exercised below).

Run with -s to see the figures.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from initsplit.elf.discard import sections
from initsplit.layout.btf import btf_kept_bytes, kernel_model
from initsplit.modfile import read_module
from initsplit.split.decide import decide, module_name
from initsplit.daemon.journal import MESSAGE_ID_LOADED_PLAIN, MESSAGE_ID_LOADED_TWO_STAGE, MESSAGE_ID_SUMMARY
from initsplit.elf import read_elf
from initsplit.kmod.resolver import Resolver
from initsplit.layout import module_layout
from initsplit.layout.rules import rules_for_tree
from tests.testbed import (HOST_ROOT_SETUP, BootResult, DebianKernel, boot, debian_kernel, debian_rootfs,
                           dmesg_problems, host_root_files)
from tests.testbed.qemu import HOST_ROOT_MODULES

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parent.parent

BOOTS = 3
TOLERANCE = 0.05
# How far the boots of one configuration may disagree before the bed is too noisy
# to judge the model at TOLERANCE: free memory moves by a few pages between fresh
# boots (measured 44 to 136 kB, 2.0 to 6.1 % of the model, over the fresh-clone CI
# runs), and the mean of three boots is within half the spread of the truth.
NOISE_LIMIT = 2 * TOLERANCE
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
    # Let RCU callbacks and the init-layout frees (a workqueue) run first, and
    # drop what reading files left (page cache; dentries, which hold 9p fids).
    sleep 2
    sync; echo 3 > /proc/sys/vm/drop_caches; sleep 1
    echo "--- $1 free_kb=$(free_kb) sunreclaim_kb=$(sed -n 's/^SUnreclaim: *\([0-9]*\) kB/\1/p' /proc/meminfo)"
    echo "meminfo $1: $(grep -E '^(Cached|Shmem|SReclaimable|KernelStack|PageTables|VmallocUsed|Percpu):' /proc/meminfo | tr -s ' ' | tr '\n' ' ')"
}
daemon() {
    hostrun /usr/bin/env PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/mnt/daemon \
        /usr/bin/python3 /mnt/tests/testbed/load_set.py /run/conf "$@"
}
check() { if eval "$2" >/dev/null 2>&1; then echo "works $1"; else echo "FAILED $1: $2"; fi; }
# The daemon's configuration (in every configuration: the same tmpfs page).
mkdir -p /host/run/conf/etc/initsplit
cp /m/initsplitd.conf /host/run/conf/etc/initsplit/initsplitd.conf
# The daemon once with nothing to load, in both configurations: what its first run
# leaves in the kernel for good (9p inodes of its files, libkmod's indexes) is
# then in the figures before loading.
daemon > /dev/null || echo "FAILED daemon with nothing to load"
snapshot before
if [ "$(cat /m/how)" != plain ]; then
    # One worker: libcrc32c and ext4 ask the crypto API for crc32c from their init,
    # which the guest cannot load on demand, so crc32c_generic must be in first.
    # What it leaves in /run after a clean exit counts against it (it removes the
    # splits and decisions it made; its marker directory stays).
    daemon $(cat /m/targets) | sed 's/^/journal: /' || echo "FAILED load_set"
    echo "left in /run/initsplit: $(find /host/run/initsplit -type f | wc -l) files"
else
    for m in $(cat /m/order); do insmod /m/$m.ko || echo "FAILED insmod $m"; done
fi
snapshot after
echo "btf: $(ls /sys/kernel/btf | tr '\n' ' ')"
echo "coresize: $(awk '{print $1 "=" $2}' /proc/modules | tr '\n' ' ')"
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
    # The daemon's journal entries (daemon configurations only).
    journal: tuple[dict[str, str], ...] = ()
    # Module -> its core layout in /proc/modules once loaded.
    core: dict[str, int] = dataclasses.field(default_factory=dict)
    # Files the daemon left in its runtime directory (daemon configurations only).
    left_in_run: int = 0


@pytest.fixture(scope="module", params=["12", "13"], ids=["debian12", "debian13"])
def kernel(request: pytest.FixtureRequest) -> DebianKernel:
    """Each Debian release's kernel, with its own release's root (debian_rootfs())."""
    return debian_kernel(release=request.param)


@pytest.fixture(scope="module")
def modules(kernel: DebianKernel) -> list[Module]:
    # The 9p mount's modules are in before the figures are read, in both configurations.
    host_root = {module_name(read_elf(read_module(ko))) for name in HOST_ROOT_MODULES
                 for ko in kernel.module_deps(name)}
    out: list[Module] = []
    rootfs = debian_rootfs(kernel)
    with Resolver(root=rootfs.path, kver=kernel.kver) as resolver:
        steps = [step for target in TARGETS for step in resolver.resolve(target)]
    for step in steps:
        if step.builtin:
            continue  # built into this kernel (6.12 builds in some of 6.1's modules)
        assert step.path is not None and not step.install_command, step
        if step.name in host_root or any(m.name == step.name for m in out):
            continue
        # The kernel package's file: the Debian root holds the same one (under
        # /usr/lib/modules on trixie, which /lib/modules leads to).
        ko = kernel.modules_dir / str(step.path).split(f"/modules/{kernel.kver}/", 1)[1]
        assert ko.read_bytes() == step.path.read_bytes(), ko
        data = read_module(ko)
        name = module_name(read_elf(data))
        btf = next(s for s in sections(data) if s.name == ".BTF")
        # What the daemon does with it (split/decide.py, the defaults).
        decision = decide(data)
        assert decision.outcome in ("split", "plain", "nothing", "refused"), (ko, decision)
        out.append(Module(name, ko, "btf" not in decision.discarded,
                          btf_kept_bytes(data[btf.offset:btf.offset + btf.size], name,
                                         kernel=kernel_model(kernel.kver))))
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


def run(kernel: DebianKernel, modules: list[Module], ext4_image: Path, *,
        how: str) -> BootResult:
    # One worker: see GUEST. Quiet soon, so that the boot does not wait.
    conf = "[Daemon]\nQuietPeriodSec=1\nExitAfterQuietSec=2\nWorkers=1\n"
    if how == "daemon-keep":
        conf += "Discard=\n"
    files: dict[str, Path | bytes] = {"/m/order": " ".join(m.name for m in modules).encode(),
                                      "/m/targets": " ".join(TARGETS).encode(),
                                      "/m/how": how.encode(), "/m/initsplitd.conf": conf.encode(),
                                      "/img/ext4.img": ext4_image, **host_root_files(kernel)}
    if how == "plain":
        # busybox's insmod gets Debian 13's NAME.ko.xz decompressed.
        files.update({f"/m/{m.name}.ko": read_module(m.path) for m in modules})
    return boot(kernel, script=HOST_ROOT_SETUP + GUEST, files=files, host_root=debian_rootfs(kernel).path,
                shares={"/mnt": REPO}, timeout=900, memory_mb=1024, smp=1)


def figures(result: BootResult) -> Figures:
    assert result.ok and result.exit_status == 0, result.report()
    # (The journal's JSON lines name a field ..._FAILED: the daemon's failures are
    # test_the_journal_total_is_what_the_kernel_lost's.)
    failed = [line for line in result.script_output.splitlines()
              if "FAILED" in line and not line.startswith("journal: ")]
    assert not failed, "\n".join(failed) + "\n" + result.report(80)
    problems = dmesg_problems(result.dmesg, tainted=result.tainted, allowed_taint="E")
    assert not problems, "\n".join(problems) + "\n" + result.report()
    snap = dict(re.findall(r"^--- (\w+) (free_kb=\d+ sunreclaim_kb=\d+)$", result.script_output, re.M))
    before = dict(kv.split("=") for kv in snap["before"].split())
    after = dict(kv.split("=") for kv in snap["after"].split())
    btf = re.search(r"^btf: (.*)$", result.script_output, re.M).group(1).split()
    journal = tuple(json.loads(line) for line in re.findall(r"^journal: (.*)$", result.script_output, re.M))
    core = dict(kv.split("=") for kv in re.search(r"^coresize: (.*)$", result.script_output, re.M).group(1).split())
    left = re.search(r"^left in /run/initsplit: (\d+) files$", result.script_output, re.M)
    return Figures(int(before["free_kb"]) - int(after["free_kb"]),
                   int(after["sunreclaim_kb"]) - int(before["sunreclaim_kb"]), frozenset(btf), journal,
                   {name: int(size) for name, size in core.items()}, int(left.group(1)) if left else -1)


@pytest.fixture(scope="module")
def plain(kernel: DebianKernel, modules: list[Module], ext4_image: Path) -> list[Figures]:
    return [figures(run(kernel, modules, ext4_image, how="plain")) for _ in range(BOOTS)]


@pytest.fixture(scope="module")
def daemon_keep(kernel: DebianKernel, modules: list[Module], ext4_image: Path) -> list[Figures]:
    return [figures(run(kernel, modules, ext4_image, how="daemon-keep")) for _ in range(BOOTS)]


@pytest.fixture(scope="module")
def daemon(kernel: DebianKernel, modules: list[Module], ext4_image: Path) -> list[Figures]:
    return [figures(run(kernel, modules, ext4_image, how="daemon")) for _ in range(BOOTS)]


def test_btf_files_say_who_kept_it(modules: list[Module], plain: list[Figures],
                                   daemon_keep: list[Figures], daemon: list[Figures]) -> None:
    names = {m.name for m in modules}
    for boot_figures in plain + daemon_keep:
        assert names <= boot_figures.btf, sorted(names - boot_figures.btf)
    kept = {m.name for m in modules if m.keeps_btf}
    assert kept, "the set holds modules with BTF ids (nf_conntrack, nf_nat): they keep their BTF"
    for boot_figures in daemon:
        assert boot_figures.btf & names == kept, sorted(boot_figures.btf & names)


def measured_kb(base: list[Figures], other: list[Figures], what: str) -> tuple[float, int]:
    """What *other* lost less than *base* on average, and the spread of their boots."""
    a = [getattr(f, what) for f in base]
    b = [getattr(f, what) for f in other]
    return statistics.mean(a) - statistics.mean(b), max(max(a) - min(a), max(b) - min(b))


def test_what_btf_costs_is_what_the_model_says(modules: list[Module], daemon_keep: list[Figures],
                                               daemon: list[Figures]) -> None:
    model_kb = sum(m.model_bytes for m in modules if not m.keeps_btf) / 1024
    print(f"\n{len(modules)} modules, BTF dropped from {sum(not m.keeps_btf for m in modules)}: "
          f"model {model_kb:,.0f} kB")
    for what in ("sunreclaim_kb", "free_kb"):
        measured, noise = measured_kb(daemon_keep, daemon, what)
        print(f"  {what}: daemon with BTF {[getattr(f, what) for f in daemon_keep]}, "
              f"without {[getattr(f, what) for f in daemon]}: {measured:,.0f} kB given back "
              f"({measured / model_kb - 1:+.1%} against the model), boots within {noise} kB")
        assert abs(measured - model_kb) <= TOLERANCE * model_kb, (what, measured, model_kb)
        # The boots of one configuration agree well enough that the mean resolves the
        # model at TOLERANCE (see NOISE_LIMIT).
        assert noise <= NOISE_LIMIT * model_kb, (what, noise)


def journal_total(modules: list[Module], daemon: list[Figures]) -> int:
    """The daemon's summary total, the same on every boot, once its entries are checked:
    it loaded the set and nothing else, none failed, each with the model's BTF figure."""
    names = {m.name for m in modules}
    model = {m.name: 0 if m.keeps_btf else m.model_bytes for m in modules}
    totals = []
    for boot_figures in daemon:
        loads = {e["INITSPLIT_MODULE"]: e for e in boot_figures.journal
                 if e.get("MESSAGE_ID") in (MESSAGE_ID_LOADED_PLAIN, MESSAGE_ID_LOADED_TWO_STAGE)}
        failed = [e["MESSAGE"] for e in boot_figures.journal if e.get("PRIORITY") in ("0", "1", "2", "3")]
        assert not failed, failed
        assert set(loads) == names, (sorted(set(loads) - names), sorted(names - set(loads)))
        wrong = {n: (e.get("INITSPLIT_BTF_BYTES"), model[n]) for n, e in loads.items()
                 if int(e.get("INITSPLIT_BTF_BYTES") or 0) != model[n]}
        assert not wrong, wrong
        summaries = [e for e in boot_figures.journal if e.get("MESSAGE_ID") == MESSAGE_ID_SUMMARY]
        assert len(summaries) == 1, summaries
        totals.append(int(summaries[0]["INITSPLIT_TOTAL_GIVEN_BACK_BYTES"]))
    assert len(set(totals)) == 1, totals  # the same decisions on every boot
    return totals[0]


def test_the_journal_total_is_what_the_kernel_lost(modules: list[Module], daemon_keep: list[Figures],
                                                  daemon: list[Figures]) -> None:
    """The daemon's summary says what it gave back for good; the kernel's counters
    lost that much less than with the same daemon keeping every module whole, to
    within 5 %."""
    total = journal_total(modules, daemon)
    journal_kb = total / 1024
    print(f"\njournal: given back for good {total:,} bytes ({journal_kb:,.0f} kB)")
    for what in ("sunreclaim_kb", "free_kb"):
        measured, _ = measured_kb(daemon_keep, daemon, what)
        print(f"  {what}: the kernel lost {measured:,.0f} kB less "
              f"({measured / journal_kb - 1:+.1%} against the journal)")
        assert abs(measured - journal_kb) <= TOLERANCE * journal_kb, (what, measured, journal_kb)


def test_never_worse_than_udev_alone(modules: list[Module], plain: list[Figures],
                                     daemon_keep: list[Figures], daemon: list[Figures]) -> None:
    """Against the plain loads (udev alone), the daemon with its defaults leaves more
    memory free and less unreclaimable slab, its own process's leftovers included:
    those are what daemon-keep loses more than plain."""
    total_kb = journal_total(modules, daemon) / 1024
    print("\nagainst udev alone (plain loads):")
    for what in ("sunreclaim_kb", "free_kb"):
        net, noise = measured_kb(plain, daemon, what)
        own, _ = measured_kb(daemon_keep, plain, what)
        print(f"  {what}: the daemon with its defaults {net:,.0f} kB less ({net / total_kb:.0%} of "
              f"the journal's {total_kb:,.0f} kB); its own process leaves {own:,.0f} kB "
              f"(boots within {noise} kB)")
        assert net > 2 * noise, (what, net, noise)


def test_core_layouts_are_the_models(kernel: DebianKernel, modules: list[Module],
                                     plain: list[Figures], daemon_keep: list[Figures],
                                     daemon: list[Figures]) -> None:
    """Each module's core layout in /proc/modules, page-exact: what the layout model
    says for the original (BTF is not loaded, so dropping it changes no page), the
    same in every configuration, and the journal's figure the kernel's. After its
    clean exit the daemon left no file in its runtime directory."""
    rules = rules_for_tree(kernel.modules_dir)
    model = {m.name: module_layout(read_elf(read_module(m.path)), rules).core.size for m in modules}
    wrong = []
    for how, boots in (("plain", plain), ("daemon-keep", daemon_keep), ("daemon", daemon)):
        for boot_figures in boots:
            wrong += [f"{how} {n}: /proc/modules {boot_figures.core.get(n)}, model {size}"
                      for n, size in model.items() if boot_figures.core.get(n) != size]
            for e in boot_figures.journal:
                if e.get("MESSAGE_ID") in (MESSAGE_ID_LOADED_PLAIN, MESSAGE_ID_LOADED_TWO_STAGE):
                    if int(e["INITSPLIT_CORE_BYTES"]) != boot_figures.core[e["INITSPLIT_MODULE"]]:
                        wrong.append(f"{how} journal {e['INITSPLIT_MODULE']}: {e['INITSPLIT_CORE_BYTES']}")
            if how != "plain" and boot_figures.left_in_run != 0:
                wrong.append(f"{how}: {boot_figures.left_in_run} files left in /run/initsplit")
    assert not wrong, "\n".join(wrong)
    print(f"\ncore layouts: {len(model)} modules, {sum(model.values()):,} bytes, as the model says "
          "in every configuration")
