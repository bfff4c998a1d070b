"""Split modules against Debian 13's Linux 6.12 in QEMU (TCG): one anchor per memory.

tests/test_kernel_split.py's two-stage loads, on 6.12, where each struct
module_memory type of C is an allocation of its own: dummy, loop and ext4 with
its dependencies are split (the splitter's 6.12 path) and validated, then loaded by busybox's insmod, C
then I, in one boot. The modules must work (a dummy link added and deleted, a
loop device, an ext4 image written and read back), each I must delete, and the
kernel must place C where the model says: every section of C that I reaches
lies at the offset SplitModule.reached_from gives from its memory's anchor
section, read from /sys/module/NAME/sections; and every section of one memory
at one base plus the model's offset (linux612.core_placement()).

The guest helpers are test_kernel_split.py's (GUEST_LIB). Unsigned modules taint
E, as on 6.1; nothing else may.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from initsplit.elf import read_elf
from initsplit.elf.constants import SHF_ALLOC
from initsplit.layout import linux612
from initsplit.layout.rules import LayoutRules
from initsplit.modfile import read_module
from initsplit.split import NothingToSplit, SplitModule, split_module
from initsplit.validate import validate_split
from tests.test_kernel_split import GUEST_LIB, make_filesystem
from tests.testbed import BootResult, DebianKernel, boot, decode_taint, dmesg_problems
from tests.testbed import script_section as section
from tests.testbed.fixtures import kernel612, rules612  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.vm

# crc32c_generic before ext4: ext4 asks the crypto API for crc32c when it mounts,
# which a guest without modprobe cannot load on demand.
TARGETS = ("dummy", "loop", "crc32c_generic", "ext4")

GUEST = GUEST_LIB + r"""
# Real addresses in sysfs (root has CAP_SYSLOG).
echo 1 > /proc/sys/kernel/kptr_restrict
echo "== dummy"
load2 dummy
ip link add isp0 type dummy && ip link show isp0 >/dev/null && echo "ok isp0 added"
ip link del isp0 && echo "ok isp0 deleted"
echo "== loop"
load2 loop
echo "== ext4"
for m in $(cat /m/ext4deps); do load2 $m; done
echo "== sections"
for m in $(cat /m/split); do grep -r . /sys/module/$m/sections/; done
echo "== ftrace"
grep initsplit_exit /sys/kernel/tracing/available_filter_functions
echo "== work"
for m in $(cat /m/split); do unload_init $m; done
modlist
echo "ftrace after unload: $(grep -c initsplit_exit /sys/kernel/tracing/available_filter_functions)"
cp /img/ext4.img /tmp/
losetup /dev/loop0 /tmp/ext4.img && echo "ok losetup loop0"
mkdir -p /mnt/e
mount -t ext4 /dev/loop0 /mnt/e && echo "hello ext4" > /mnt/e/hello && sync && umount /mnt/e
mount -t ext4 /dev/loop0 /mnt/e && echo "ext4 read: $(cat /mnt/e/hello)" && umount /mnt/e
losetup -d /dev/loop0
echo "taint: $(cat /proc/sys/kernel/tainted)"
echo "== end"
"""


@pytest.fixture(scope="module")
def splits(kernel612: DebianKernel, rules612: LayoutRules) -> dict[str, tuple[bytes, SplitModule | None]]:  # noqa: F811
    """Module name -> (original, its split or None when it has nothing to split), in load order."""
    out: dict[str, tuple[bytes, SplitModule | None]] = {}
    for target in TARGETS:
        for ko in kernel612.module_deps(target):
            data = read_module(ko)
            name = ko.name.split(".ko")[0].replace("-", "_")
            if name in out:
                continue
            try:
                split = split_module(data, rules612)
            except NothingToSplit:
                out[name] = (data, None)
                continue
            report = validate_split(data, split.core, split.init, rules612)
            assert report.reached_from == split.reached_from, name
            out[name] = (data, split)
    assert {"dummy", "loop", "ext4", "jbd2", "mbcache"} <= {n for n, (_, s) in out.items() if s}, list(out)
    return out


@pytest.fixture(scope="module")
def result(kernel612: DebianKernel, splits: dict[str, tuple[bytes, SplitModule | None]],  # noqa: F811
           tmp_path_factory: pytest.TempPathFactory) -> BootResult:
    tmp = tmp_path_factory.mktemp("fs612")
    files: dict[str, Path | bytes] = {
        # No metadata_csum: it would make ext4 request crc32c through modprobe.
        "/img/ext4.img": make_filesystem(tmp, "ext4", ["mkfs.ext4", "-q", "-O", "^metadata_csum"]),
    }
    for name, (data, split) in splits.items():
        if split is None:
            files[f"/m/{name}.ko"] = data
        else:
            files[f"/m/{split.name}.ko"] = split.core
            files[f"/m/{split.init_name}.ko"] = split.init
    later = [n for n in splits if n not in ("dummy", "loop")]
    files["/m/ext4deps"] = " ".join(later).encode()
    files["/m/split"] = " ".join(n for n, (_, s) in splits.items() if s).encode()
    got = boot(kernel612, script=GUEST, files=files, timeout=600, memory_mb=1024)
    assert got.ok, got.report()
    return got


def sysfs_sections(result: BootResult) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for m in re.finditer(r"^/sys/module/([^/]+)/sections/([^:]+):0x([0-9a-f]+)$",
                         section(result, "sections"), re.M):
        out.setdefault(m.group(1), {})[m.group(2)] = int(m.group(3), 16)
    return out


def test_boot_clean(result: BootResult) -> None:
    assert "FAIL" not in result.script_output, result.report()
    problems = dmesg_problems(result.dmesg, tainted=result.tainted, allowed_taint="E")
    assert not problems, "\n".join(problems) + "\n" + result.report()
    assert decode_taint(result.tainted or 0) == "E", result.tainted


def test_modules_work_and_init_modules_delete(result: BootResult,
                                              splits: dict[str, tuple[bytes, SplitModule | None]]) -> None:
    out = result.script_output
    for name, (_, split) in splits.items():
        if split is not None:
            assert f"init {name} rc=0" in out, out
            assert f"rm init {name} ok" in out, out
    for line in ("ok isp0 added", "ok isp0 deleted", "ok losetup loop0", "ext4 read: hello ext4"):
        assert line in out, out
    modules_line = next(line for line in section(result, "work").splitlines() if line.startswith("modules:"))
    assert "__init" not in modules_line and "ext4" in modules_line, modules_line
    assert "EXT4-fs (loop0): mounted filesystem" in result.dmesg, result.dmesg[-3000:]


def test_kernel_places_c_as_the_model(result: BootResult, rules612: LayoutRules,  # noqa: F811
                                      splits: dict[str, tuple[bytes, SplitModule | None]]) -> None:
    sections = sysfs_sections(result)
    checked = 0
    for name, (_, split) in splits.items():
        if split is None:
            continue
        got = sections.get(name)
        assert got, (name, sorted(sections))
        # What I reaches, from the anchor of each memory.
        for sec, anchor, offset in split.reached_from:
            assert got[sec] - got[anchor] == offset, (name, sec, anchor, hex(got[sec] - got[anchor]))
            checked += 1
        # Every section of C: one base per memory plus the model's offset.
        core = read_elf(split.core)
        unique = Counter(s.name for s in core.sections if s.flags & SHF_ALLOC)
        bases: dict[str, set[int]] = {}
        for index, (memory, offset) in linux612.core_placement(core, rules612).items():
            sec = core.sections[index]
            if unique[sec.name] == 1 and sec.size and sec.name in got:
                bases.setdefault(memory, set()).add(got[sec.name] - offset)
        for memory, found in bases.items():
            assert len(found) == 1, (name, memory, sorted(map(hex, found)))
    assert checked > 20, checked


def test_each_init_modules_stub_is_in_ftraces_list_until_it_unloads(
        result: BootResult, splits: dict[str, tuple[bytes, SplitModule | None]]) -> None:
    """I's exit stub is a traced function (split/codegen.py exit_stub()): while
    I is loaded, after its init layout was freed, the kernel still lists the
    stub's ftrace record, so ftrace_free_mem() found I's page non-empty
    (kernel/trace/ftrace.c); after the batch unload, ftrace_release_mod() has
    dropped it. A wrong record would have been a WARN in dmesg (test_boot_clean)."""
    listed = re.findall(r"^initsplit_exit \[(\S+)\]$", section(result, "ftrace"), re.M)
    want = sorted(s.init_name for _, s in splits.values() if s is not None)
    assert sorted(listed) == want, section(result, "ftrace")
    assert "ftrace after unload: 0" in result.script_output, result.report()
