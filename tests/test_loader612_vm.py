"""The loader's per-memory checks on Debian 13's Linux 6.12, in QEMU (TCG).

tests/test_loader_vm.py's placement and layout cases, on 6.12, where C is one
allocation per struct module_memory type: the guest runs trixie's python3 on this
checkout (shared read-only) in the cached Debian 13 root, and loads dummy through
the daemon's own SplitProvider and load_two_stage():

1. as split (TwoStage=always): two-stage, C's placement checked from each
   memory's anchor section (SplitModule.reached_from) against
   /sys/module/dummy/sections; I deletes, then C;
2. the layout model wrong about C: one section's offset from its memory's anchor
   8 bytes off: I is never loaded, C is removed and the original loaded plain;
3. an I whose wrapper expects mem[MOD_TEXT].size one page off (made on the host):
   it refuses with ENOEXEC before running anything, and the original loads plain.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from initsplit.layout.rules import LayoutRules
from initsplit.modfile import read_module
from initsplit.split import split_module
from initsplit.split.tables import KNOWN_STRUCT_MODULE_MEMORY_LAYOUTS, MODULE_MEMORY_FIELDS
from tests.test_loader_vm import expect_another_size
from tests.testbed import HOST_ROOT_SETUP, BootResult, DebianKernel, boot, dmesg_problems, host_root_files
from tests.testbed.fixtures import kernel612, rules612, vmshare  # noqa: F401  (pytest fixtures)
from tests.testbed.rootfs import debian_rootfs

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parent.parent

GUEST_PROGRAM = r"""
import dataclasses, errno, json, os, sys
from dataclasses import asdict
from pathlib import Path
sys.path.insert(0, "/mnt/daemon")
from initsplit.daemon.splits import NotSplit, SplitProvider
from initsplit.fsio import sealed_memfd
from initsplit.loader.kernel_state import proc_modules
from initsplit.loader.syscalls import delete_module
from initsplit.loader.twostage import SplitPair, load_two_stage
from initsplit.split.policy import SplitOptions

moddir = Path("/usr/lib/modules") / os.uname().release
dummy = moddir / "kernel/drivers/net/dummy.ko.xz"
fresh = SplitProvider(modules_dir=moddir, cache_dir=Path("/nonexistent"), runtime_dir=Path("/run/rt"),
                      options=SplitOptions(two_stage="always"))
out = {}

def record(key, load):
    out[key] = asdict(load)
    out[key + "_modules"] = sorted(proc_modules())

def try_delete(name):
    try:
        delete_module(name)
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

good = fresh.get(dummy)
out["split"] = not isinstance(good, NotSplit)
out["reached"], out["reached_from"] = good.reached, good.reached_from
record("good", load_two_stage(good, original=dummy))
out["good_del"] = [try_delete("dummy__init"), try_delete("dummy")]

good = fresh.get(dummy)
at = next(i for i, (s, a, o) in enumerate(good.reached_from) if s != a)
moved = list(good.reached_from)
s, a, o = moved[at]
moved[at] = (s, a, o + 8)
out["moved"] = s
record("misplaced", load_two_stage(dataclasses.replace(good, reached_from=tuple(moved)), original=dummy))
out["misplaced_del"] = try_delete("dummy")

good = fresh.get(dummy)
good.init.close()
bad = sealed_memfd("badlayout__init.ko", Path("/srv/badlayout__init.ko").read_bytes())
record("bad_layout", load_two_stage(SplitPair("dummy", "dummy__init", good.core, bad,
                                              reached_from=good.reached_from), original=dummy))
out["bad_layout_del"] = try_delete("dummy")
print("@@RESULT@@" + json.dumps(out))
"""


def expect_another_text_size(init: bytes) -> bytes:
    """*init* with its wrapper's check of C's mem[MOD_TEXT].size one page off."""
    layout = next(iter(KNOWN_STRUCT_MODULE_MEMORY_LAYOUTS.values()))
    return expect_another_size(init, layout.mem + MODULE_MEMORY_FIELDS.size)  # MOD_TEXT = 0


@pytest.fixture(scope="module")
def result(kernel612: DebianKernel, rules612: LayoutRules, vmshare: Path) -> dict:  # noqa: F811
    dummy_init = split_module(read_module(kernel612.module("dummy")), rules612).init
    (vmshare / "badlayout__init.ko").write_bytes(expect_another_text_size(dummy_init))
    program = vmshare / "loader612_check.py"
    program.write_text(GUEST_PROGRAM)
    script = HOST_ROOT_SETUP + (
        "echo 1 > /proc/sys/kernel/kptr_restrict\n"
        "hostrun /usr/bin/env PYTHONDONTWRITEBYTECODE=1 /usr/bin/python3 /srv/loader612_check.py\n")
    booted = boot(kernel612, script=script, files=host_root_files(kernel612),
                  host_root=debian_rootfs(kernel612).path, shares={"/mnt": REPO, "/srv": vmshare},
                  timeout=600, memory_mb=1024)
    assert booted.ok, booted.report()
    problems = dmesg_problems(booted.dmesg, tainted=booted.tainted, allowed_taint="E")
    assert not problems, "\n".join(problems) + "\n" + booted.report()
    found = booted.result_json()
    assert found is not None, booted.report()
    return found


def test_two_stage_with_placement_checked_per_memory(result: dict) -> None:
    assert result["split"] and result["reached"] == [] and result["reached_from"], result
    load = result["good"]
    assert load["mode"] == "two-stage" and load["init_module"] == "dummy__init", load
    assert "dummy__init" in result["good_modules"], result["good_modules"]
    assert result["good_del"] == ["ok", "ok"]


def test_c_not_where_the_model_put_it_keeps_the_init_module_out(result: dict) -> None:
    load = result["misplaced"]
    assert load["mode"] == "plain", load
    assert re.fullmatch(rf"init module not loaded: C's {re.escape(result['moved'])} is at [-+]0x[0-9a-f]+ "
                        r"from its memory's anchor \S+, not at [-+]0x[0-9a-f]+ as the layout model has it",
                        load["reason"]), load
    assert "dummy__init" not in result["misplaced_modules"] and "dummy" in result["misplaced_modules"]
    assert result["misplaced_del"] == "ok"


def test_init_module_expecting_another_text_size_refuses_before_init(result: dict) -> None:
    load = result["bad_layout"]
    assert load["mode"] == "plain", load
    assert load["reason"] == "init module failed: Exec format error", load
    assert "dummy__init" not in result["bad_layout_modules"] and "dummy" in result["bad_layout_modules"]
    assert result["bad_layout_del"] == "ok"
