"""`make demo`: real Debian modules loaded plain and two-stage in QEMU, with the kernel's figures.

Fetches the Debian 6.1 kernel package (cached in ~/.cache/initsplit), splits a
fixed set of real modules, then boots the kernel twice under QEMU (TCG):

* plain: every module loaded with insmod, as modprobe would;
* two-stage: each module's core, then its init module; when all are loaded the
  init modules are deleted in one batch, as initsplitd does when boot goes quiet.

It prints what the kernel itself reports (/proc/modules, VmallocUsed, MemFree)
for both boots. The daemon-driven demo (initsplitd in a dracut initramfs booting
a full Debian system) replaces this once the daemon lands.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from initsplit.split import NothingToSplit, SplitRefused, split_module  # noqa: E402
from initsplit.validate import validate_split  # noqa: E402
from tests.testbed import boot, debian_kernel  # noqa: E402

# Real modules that load without hardware, with their dependencies pulled in below.
MODULES = (
    "dummy", "loop", "vfat", "minix", "nls_cp437", "nls_ascii", "ext4", "crc32c_generic",
    "softdog", "raid6_pq", "xor", "9pnet", "tun", "veth", "8021q", "bridge", "bonding",
    "zram", "brd", "isofs", "udf", "squashfs", "fuse", "overlay", "btrfs",
)


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def snapshot_script(tag: str) -> str:
    return (
        f'echo "--- {tag}"\n'
        "cat /proc/modules\n"
        "grep -E '^(MemFree|VmallocUsed):' /proc/meminfo\n"
    )


def parse_snapshot(output: str, tag: str) -> tuple[dict[str, int], dict[str, int]]:
    start = output.index(f"--- {tag}\n")
    end = output.find("\n--- ", start + 1)
    block = output[start:end if end >= 0 else None]
    modules = {m.group(1): int(m.group(2))
               for m in re.finditer(r"^(\S+) (\d+) \d+ ", block, re.M)}
    meminfo = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+):\s+(\d+) kB", block, re.M)}
    return modules, meminfo


def main() -> int:
    started = time.monotonic()
    step("fetching the Debian kernel package (cached after the first run)")
    kernel = debian_kernel()
    print(f"    kernel {kernel.kver} ({kernel.deb_version})")

    order: list[Path] = []
    for name in MODULES:
        for ko in kernel.module_deps(name):
            if ko not in order:
                order.append(ko)
    step(f"splitting {len(order)} modules (validated statically)")
    files: dict[str, Path | bytes] = {}
    plain_lines, split_lines, unload_lines = [], [], []
    split_names: list[str] = []
    for ko in order:
        data = ko.read_bytes()
        name = ko.name.removesuffix(".ko").replace("-", "_")
        files[f"/plain/{name}.ko"] = ko
        plain_lines.append(f"insmod /plain/{name}.ko || echo 'FAILED {name}'")
        try:
            result = split_module(data)
            validate_split(data, result.core, result.init)
        except (NothingToSplit, SplitRefused) as outcome:
            why = "nothing to split" if isinstance(outcome, NothingToSplit) else f"refused: {outcome}"
            print(f"    {name:<20} plain load ({why})")
            files[f"/split/{name}.ko"] = ko
            split_lines.append(f"insmod /split/{name}.ko || echo 'FAILED {name}'")
            continue
        files[f"/split/{name}.ko"] = result.core
        files[f"/split/{result.init_name}.ko"] = result.init
        split_lines.append(f"insmod /split/{name}.ko && insmod /split/{result.init_name}.ko "
                           f"|| echo 'FAILED {name}'")
        unload_lines.append(f"rmmod {result.init_name} || echo 'FAILED rmmod {result.init_name}'")
        split_names.append(name)

    step("booting plain (insmod of the original modules)")
    plain = boot(kernel, script="\n".join(plain_lines) + "\n" + snapshot_script("plain"),
                 files={k: v for k, v in files.items() if k.startswith("/plain/")}, timeout=600,
                 memory_mb=1024)
    if not plain.ok or "FAILED" in plain.script_output:
        print(plain.report())
        return 1
    step("booting two-stage (core, then init module; init modules deleted in one batch)")
    script = ("\n".join(split_lines) + "\n" + snapshot_script("loaded") + "\n".join(unload_lines)
              + "\n" + snapshot_script("after-batch"))
    two = boot(kernel, script=script, files={k: v for k, v in files.items()
                                             if k.startswith("/split/")}, timeout=600,
               memory_mb=1024)
    if not two.ok or "FAILED" in two.script_output:
        print(two.report())
        return 1

    plain_mods, plain_mem = parse_snapshot(plain.script_output, "plain")
    loaded_mods, _ = parse_snapshot(two.script_output, "loaded")
    after_mods, after_mem = parse_snapshot(two.script_output, "after-batch")
    print()
    print(f"{'module':<20} {'plain':>9} {'core':>9} {'init mod':>9} {'delta':>8}")
    for name in sorted(plain_mods):
        init_name = f"{name}__init"
        core = after_mods.get(name, 0)
        print(f"{name:<20} {plain_mods[name]:>9} {core:>9} {loaded_mods.get(init_name, 0):>9} "
              f"{plain_mods[name] - core:>8}")
    leftover = [m for m in after_mods if m.endswith("__init")]
    total_plain = sum(plain_mods.values())
    total_core = sum(v for k, v in after_mods.items() if not k.endswith("__init"))
    print()
    print(f"modules loaded: {len(plain_mods)} ({len(split_names)} two-stage)")
    print(f"/proc/modules total: plain {total_plain} bytes, two-stage after batch unload "
          f"{total_core} bytes, difference {total_plain - total_core} bytes "
          f"({(total_plain - total_core) // 4096} pages)")
    print(f"VmallocUsed: plain {plain_mem['VmallocUsed']} kB, two-stage {after_mem['VmallocUsed']} kB")
    print(f"init modules left after the batch: {len(leftover)}")
    print(f"(demo took {time.monotonic() - started:.0f} s)")
    return 0 if not leftover else 1


if __name__ == "__main__":
    sys.exit(main())
