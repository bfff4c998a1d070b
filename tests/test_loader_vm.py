"""The loader (finit_module/delete_module through ctypes, two-stage with fallback) on a real kernel.

The guest runs Debian's python3 and this checkout from the host's root, shared
read-only over virtio-9p, so the code under test is exactly the code in the tree.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import struct
from pathlib import Path

import pytest

from initsplit import signing
from initsplit.cache import write_entry
from initsplit.split.policy import SplitOptions
from initsplit.elf import read_elf
from initsplit.elf.constants import SHN_UNDEF
from initsplit.split import split_module
from initsplit.split.splitter import WRAPPER_SECTION
from initsplit.split.tables import KNOWN_STRUCT_MODULE_LAYOUTS, MODULE_LAYOUT_FIELDS, MODVERSION_RECORD_SIZE
from tests.testbed import (
    HOST_ROOT_SETUP,
    BootResult,
    DebianKernel,
    boot,
    dmesg_problems,
    host_root_files,
)
from tests.testbed.fixtures import kernel, kmods, vmshare  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parent.parent

GUEST_PROGRAM = r"""
import errno, json, os, sys
from dataclasses import asdict
from pathlib import Path
sys.path.insert(0, os.environ["ISPLIT_REPO"] + "/daemon")
from initsplit.daemon.splits import NotSplit, SplitProvider
from initsplit.split.policy import SplitOptions
# Every split two-stage: the machinery is what is tested (the default loads plain on 6.1).
ALWAYS = SplitOptions(two_stage="always")
from initsplit.fsio import sealed_memfd
from initsplit.loader.kernel_state import probe_capabilities, proc_modules
from initsplit.loader.syscalls import delete_module
from initsplit.loader.twostage import SplitPair, load_two_stage

moddir = Path(os.environ["ISPLIT_MODDIR"])
kmoddir = Path(os.environ["ISPLIT_KMODDIR"])
out = {"caps": asdict(probe_capabilities()), "fds_before": sorted(os.listdir("/proc/self/fd"))}
fresh = SplitProvider(modules_dir=moddir, cache_dir=Path("/nonexistent"), runtime_dir=Path("/run/rt"),
                      options=ALWAYS)
cached = SplitProvider(modules_dir=moddir, cache_dir=Path(os.environ["ISPLIT_CACHE"]),
                       runtime_dir=Path("/run/rt2"), options=ALWAYS)
tests = SplitProvider(modules_dir=kmoddir, cache_dir=Path("/nonexistent"), runtime_dir=Path("/run/rt3"),
                      options=ALWAYS)

def record(key, load):
    out[key] = asdict(load)
    out[key + "_modules"] = sorted(proc_modules())

def fd_target(f):
    return os.readlink(f"/proc/self/fd/{f.fileno()}")

def try_delete(name):
    try:
        delete_module(name)
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

# 1. dummy from a split made now, with a parameter passed to the core module.
dummy = moddir / "kernel/drivers/net/dummy.ko"
pair = fresh.get(dummy)
out["dummy_split"] = not isinstance(pair, NotSplit)
# A split made now is loaded from the validated bytes, in sealed memory files.
out["dummy_fds"] = [fd_target(pair.core), fd_target(pair.init)]
record("dummy", load_two_stage(pair, original=dummy, params="numdummies=2"))
out["dummy_links"] = sorted(os.listdir("/sys/class/net"))
out["dummy_del_init"] = try_delete("dummy__init")
out["dummy_after_init_deleted"] = sorted(proc_modules())
out["dummy_del_core"] = try_delete("dummy")

# 2. loop from the pre-split cache (built on the host), and a tampered cache entry ignored.
loop = moddir / "kernel/drivers/block/loop.ko"
pair = cached.get(loop)
out["loop_from_cache"] = fd_target(pair.core).startswith(os.environ["ISPLIT_CACHE"])
record("loop", load_two_stage(pair, original=loop))
out["loop_del"] = [try_delete("loop__init"), try_delete("loop")]
softdog = moddir / "kernel/drivers/watchdog/softdog.ko"
pair = cached.get(softdog)
out["softdog_tampered"] = pair.reason if isinstance(pair, NotSplit) else fd_target(pair.core)
if not isinstance(pair, NotSplit):
    pair.close()

# 3. An init module the kernel rejects before init: C removed, original loaded plain.
good = fresh.get(dummy)
bad = sealed_memfd("bad__init.ko", os.pread(good.init.fileno(), 200, 0))
good.init.close()
record("bad_init", load_two_stage(SplitPair("dummy", "dummy__init", good.core, bad,
                                            reached=good.reached), original=dummy))
out["bad_init_del"] = try_delete("dummy")

# 4. A core module the kernel rejects: original loaded plain.
good = fresh.get(dummy)
good.core.close()
badcore = sealed_memfd("badcore.ko", b"not an ELF file")
record("bad_core", load_two_stage(SplitPair("dummy", "dummy__init", badcore, good.init), original=dummy))
out["bad_core_del"] = try_delete("dummy")

# 3b. An init module whose import CRC the kernel refuses (EINVAL): plain load.
good = fresh.get(dummy)
good.init.close()
badcrc = sealed_memfd("badcrc__init.ko", Path(os.environ["ISPLIT_BADCRC"]).read_bytes())
record("bad_crc", load_two_stage(SplitPair("dummy", "dummy__init", good.core, badcrc,
                                           reached=good.reached), original=dummy))
out["bad_crc_del"] = try_delete("dummy")

# 3c. An init module whose wrapper expects C laid out otherwise (one of its
# core_layout checks one page off): it refuses with ENOEXEC before running
# anything, so C is removed and the original loaded plain.
good = fresh.get(dummy)
good.init.close()
badlayout = sealed_memfd("badlayout__init.ko", Path(os.environ["ISPLIT_BADLAYOUT"]).read_bytes())
record("bad_layout", load_two_stage(SplitPair("dummy", "dummy__init", good.core, badlayout,
                                              reached=good.reached), original=dummy))
out["bad_layout_del"] = try_delete("dummy")

# 3d. The layout model wrong about C: one section I reaches expected 8 bytes off.
# The daemon compares /sys/module/dummy/sections with the model before it loads I:
# I is never loaded, C is removed, and the original loaded plain.
import dataclasses
good = fresh.get(dummy)
assert any(n == ".text" for n, _ in good.reached), good.reached
moved = dataclasses.replace(good, reached=tuple((n, o + 8 if n == ".text" else o) for n, o in good.reached))
record("misplaced", load_two_stage(moved, original=dummy))
out["misplaced_del"] = try_delete("dummy")

# 5. A genuine init failure: reported like modprobe (ENODEV), nothing left loaded,
# and the original init ran once (the kernel log counts its printk).
def init_calls():
    # /dev/kmsg hands out one record per read, from the oldest; EAGAIN at the end.
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    count = 0
    try:
        while True:
            try:
                count += b"isplit_initfail: init called" in os.read(fd, 8192)
            except BlockingIOError:
                return count
            except BrokenPipeError:  # records overwritten while reading: go on
                continue
    finally:
        os.close(fd)

initfail = kmoddir / "isplit_initfail.ko"
out["initfail_calls_before"] = init_calls()
record("initfail", load_two_stage(tests.get(initfail), original=initfail))
out["initfail_calls"] = init_calls()

# 5b. initcall_blacklist=ifb_init_module is on this boot's command line: the kernel
# refuses the init module (EPERM) as it refuses the original, and nothing runs.
ifb = moddir / "kernel/drivers/net/ifb.ko"
record("blacklisted", load_two_stage(fresh.get(ifb), original=ifb))
out["blacklisted_links"] = sorted(os.listdir("/sys/class/net"))

# 6. No cleanup routine: after the init module is gone the core refuses removal.
noexit = kmoddir / "isplit_noexit.ko"
record("noexit", load_two_stage(tests.get(noexit), original=noexit))
out["noexit_del"] = [try_delete("isplit_noexit__init"), try_delete("isplit_noexit")]

# 7. Recovery after a killed daemon: a stale marker never costs a live module.
import signal
from initsplit.loader import twostage
from initsplit.loader.kernel_state import module_address, module_sections
from initsplit.loader.recovery import LoadMarkers
from initsplit.loader.syscalls import finit_module_path
marks = LoadMarkers(Path("/run/initsplit/loading"))
marker = Path("/run/initsplit/loading/dummy")

def recover(key):
    rec = marks.recover()
    out[key] = {"removed": rec.removed_cores, "pending": rec.pending_init, "problems": rec.problems,
                "dummy_loaded": "dummy" in proc_modules(), "marker_left": marker.exists()}

def init_sections(name):
    return sorted(s for s in module_sections(name) or () if s.startswith(".init"))

# 7a. The original loaded plain (as modprobe would) while a stale "core" marker names it.
finit_module_path(dummy)
out["plain_init_sections"] = init_sections("dummy")
out["plain_address"] = module_address("dummy")
marks.core("dummy", "dummy__init")
recover("stale_core")
# 7b. Worse: a "core-loaded" marker recording the very address the original now has.
marks.core_loaded("dummy", "dummy__init")
out["stale_core_loaded_marker"] = marker.read_text()
recover("stale_core_loaded")
out["plain_del"] = try_delete("dummy")

# 7c/7d. A daemon SIGKILLed mid-load (a forked child doing a real two-stage load):
# between C and I ("core-loaded" written), and before "core-loaded" was written.
def killed(key, patch):
    pair = fresh.get(dummy)
    pid = os.fork()
    if pid == 0:
        patch(pair)
        load_two_stage(pair, original=dummy, markers=marks)
        os._exit(0)
    pair.close()
    _, status = os.waitpid(pid, 0)
    out[key + "_signal"] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    out[key + "_marker"] = marker.read_text() if marker.exists() else None
    out[key + "_modules"] = sorted(m for m in proc_modules() if m.startswith("dummy"))
    out[key + "_core_init_sections"] = init_sections("dummy")
    out[key + "_core_address"] = module_address("dummy")
    recover(key)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def kill_before_init_module(pair):
    real = twostage.finit_module
    twostage.finit_module = lambda fd, params="", **kw: die() if fd == pair.init.fileno() \
        else real(fd, params, **kw)

def kill_before_core_loaded(pair):
    LoadMarkers.core_loaded = lambda self, name, init_name: die()

killed("killed_core_loaded", kill_before_init_module)
killed("killed_core", kill_before_core_loaded)
out["fds_after"] = sorted(os.listdir("/proc/self/fd"))
print("@@RESULT@@" + json.dumps(out))
"""


def corrupt_import_crc(init: bytes) -> bytes:
    """*init* with the __versions CRC of __fentry__, a vmlinux symbol it imports, changed.

    check_version() (kernel/module/version.c) then fails in resolve_symbol(), so
    the kernel refuses the module with EINVAL before its init can run.
    """
    obj = read_elf(init)
    imported = {s.name for s in obj.symbols if s.shndx == SHN_UNDEF and s.name}
    versions = obj.section("__versions").data
    # __fentry__: every function of a Debian module starts with a call to it (ftrace).
    assert "__fentry__" in imported
    for at in range(0, len(versions), MODVERSION_RECORD_SIZE):
        if versions[at + 8:at + MODVERSION_RECORD_SIZE].split(b"\0", 1)[0] == b"__fentry__":
            break
    else:
        raise AssertionError("I has no version for __fentry__")
    record = versions[at:at + MODVERSION_RECORD_SIZE]
    assert init.count(record) == 1
    crc = struct.unpack_from("<Q", record)[0] ^ 0x5A5A5A5A
    return init.replace(record, struct.pack("<Q", crc) + record[8:])


def expect_another_layout(init: bytes) -> bytes:
    """*init* with its wrapper's check of C's core_layout.size one page off."""
    layout = next(iter(KNOWN_STRUCT_MODULE_LAYOUTS.values()))
    return expect_another_size(init, layout.core_layout + MODULE_LAYOUT_FIELDS.size)


def expect_another_size(init: bytes, size_field: int) -> bytes:
    """*init* with its wrapper's check of the struct module field at *size_field*
    (a layout's size: 6.1's core_layout.size, 6.12's mem[type].size) one page off."""
    obj = read_elf(init)
    wrapper = obj.section(WRAPPER_SECTION).data
    # cmpl $imm32,disp32(%rip): 81 3d, the displacement (relocated), the immediate.
    relocs = obj.relocations_for(obj.section(WRAPPER_SECTION))
    at = next(r.offset - 2 for r in relocs if r.addend == size_field - 8)
    assert wrapper[at:at + 2] == b"\x81\x3d", wrapper[at:at + 2].hex()
    value = struct.unpack_from("<I", wrapper, at + 6)[0]
    patched = bytearray(wrapper)
    patched[at + 6:at + 10] = struct.pack("<I", value + 4096)
    assert init.count(wrapper) == 1
    return init.replace(wrapper, bytes(patched))


@pytest.fixture(scope="module")
def loader_boot(kernel: DebianKernel, kmods: dict[str, Path], vmshare: Path) -> BootResult:  # noqa: F811
    shared = vmshare
    # A pre-split cache for loop and softdog, made on the host like `initsplit split` does;
    # softdog's core module is then tampered with, so its entry must not be used.
    cache = shared / "presplit"
    for rel in ("kernel/drivers/block/loop.ko", "kernel/drivers/watchdog/softdog.ko"):
        source = (kernel.modules_dir / rel).read_bytes()
        result = split_module(source)
        write_entry(cache, Path(rel), source=source, decision="split", name=result.name,
                    init_name=result.init_name, core=result.core, init=result.init,
                    reached=result.reached, options=SplitOptions(two_stage="always").tag)
    tampered = cache / "kernel/drivers/watchdog/softdog.ko"
    tampered.write_bytes(tampered.read_bytes()[:-1] + b"\x01")
    badcrc = shared / "badcrc__init.ko"
    dummy_init = split_module(kernel.module("dummy").read_bytes()).init
    badcrc.write_bytes(corrupt_import_crc(dummy_init))
    badlayout = shared / "badlayout__init.ko"
    badlayout.write_bytes(expect_another_layout(dummy_init))
    kmoddir = shared / "kmods"
    kmoddir.mkdir()
    for name, path in kmods.items():
        shutil.copy(path, kmoddir / f"{name}.ko")
    program = shared / "loader_check.py"
    program.write_text(GUEST_PROGRAM)
    script = HOST_ROOT_SETUP + (
        f"ISPLIT_REPO={REPO} ISPLIT_MODDIR={kernel.modules_dir} ISPLIT_KMODDIR={kmoddir} "
        f"ISPLIT_CACHE={cache} ISPLIT_BADCRC={badcrc} ISPLIT_BADLAYOUT={badlayout} "
        f"PYTHONDONTWRITEBYTECODE=1 "
        f"hostrun /usr/bin/python3 {program}\n")
    # ifb's init is blacklisted (case 5b); ifb is not loaded otherwise here.
    return boot(kernel, script=script, files=host_root_files(kernel), host_root=True, timeout=300,
                append="initcall_blacklist=ifb_init_module")


@pytest.fixture(scope="module")
def result(loader_boot: BootResult) -> dict:
    assert loader_boot.ok, loader_boot.report()
    found = loader_boot.result_json()
    assert found is not None, loader_boot.report()
    return found


def test_kernel_capabilities(result: dict) -> None:
    assert result["caps"] == {"can_unload": True, "accepts_unsigned": True, "reason": "", "signatures": ""}


def test_two_stage_load_with_parameter(result: dict) -> None:
    assert result["dummy_split"]
    load = result["dummy"]
    assert load["mode"] == "two-stage" and load["init_module"] == "dummy__init", load
    assert load["core_bytes"] and load["init_bytes"], load
    assert {"dummy", "dummy__init"} <= set(result["dummy_modules"])
    assert {"dummy0", "dummy1"} <= set(result["dummy_links"])  # numdummies=2 reached C
    # finit_module(2) accepts a sealed memfd (kernel_read_file() needs S_ISREG and
    # deny_write_access(); a memfd is a shmem regular file with no writer).
    assert all(t.startswith("/memfd:") for t in result["dummy_fds"]), result["dummy_fds"]
    assert result["dummy_del_init"] == "ok" and result["dummy_del_core"] == "ok"
    assert "dummy__init" not in result["dummy_after_init_deleted"]


def test_presplit_cache_used_and_tampered_entry_ignored(result: dict) -> None:
    assert result["loop_from_cache"]
    assert result["loop"]["mode"] == "two-stage", result["loop"]
    assert result["loop_del"] == ["ok", "ok"]
    # A tampered entry is never loaded, nor silently replaced by a split made now.
    assert "softdog.ko does not match its manifest" in result["softdog_tampered"], result


def test_rejected_init_module_falls_back_to_plain(result: dict) -> None:
    load = result["bad_init"]
    assert load["mode"] == "plain" and "init module failed" in load["reason"], load
    assert "dummy__init" not in result["bad_init_modules"] and "dummy" in result["bad_init_modules"]
    assert result["bad_init_del"] == "ok"


def test_init_module_with_a_bad_import_crc_falls_back_to_plain(result: dict, loader_boot: BootResult) -> None:
    load = result["bad_crc"]
    assert load["mode"] == "plain", load
    assert load["reason"] == "init module failed: Invalid argument", load
    assert "dummy__init: disagrees about version of symbol __fentry__" in loader_boot.dmesg
    assert "dummy__init" not in result["bad_crc_modules"] and "dummy" in result["bad_crc_modules"]
    assert result["bad_crc_del"] == "ok"


def test_init_module_expecting_another_layout_refuses_before_init(result: dict) -> None:
    # -ENOEXEC is in the kernel's error range: the original init did not run
    # (initresult.py), and the daemon loaded the original plain.
    load = result["bad_layout"]
    assert load["mode"] == "plain", load
    assert load["reason"] == "init module failed: Exec format error", load
    assert "dummy__init" not in result["bad_layout_modules"] and "dummy" in result["bad_layout_modules"]
    assert result["bad_layout_del"] == "ok"


def test_c_not_where_the_model_put_it_keeps_the_init_module_out(result: dict,
                                                                 loader_boot: BootResult) -> None:
    load = result["misplaced"]
    assert load["mode"] == "plain", load
    assert re.fullmatch(r"init module not loaded: C's \.text is at [-+]0x[0-9a-f]+ from its struct "
                        r"module, not at [-+]0x[0-9a-f]+ as the layout model has it", load["reason"]), load
    assert "dummy__init" not in result["misplaced_modules"] and "dummy" in result["misplaced_modules"]
    assert result["misplaced_del"] == "ok"
    # Every other two-stage load of this boot passed the same check against the
    # kernel's own section addresses (case 1 among them).
    assert result["dummy"]["mode"] == "two-stage", result["dummy"]


def test_rejected_core_module_falls_back_to_plain(result: dict) -> None:
    load = result["bad_core"]
    assert load["mode"] == "plain" and "core module refused" in load["reason"], load
    assert result["bad_core_del"] == "ok"


def test_genuine_init_failure_reported_like_modprobe(result: dict, loader_boot: BootResult) -> None:
    load = result["initfail"]
    assert load["mode"] == "failed" and load["errno"] == 19, load  # ENODEV
    # modprobe's words, and no plain retry behind them.
    assert load["reason"] == "could not insert 'isplit_initfail': No such device", load
    assert not any(m.startswith("isplit_initfail") for m in result["initfail_modules"])
    # The original init ran exactly once, and its cleanup never.
    assert (result["initfail_calls_before"], result["initfail_calls"]) == (0, 1), result
    assert loader_boot.dmesg.count("isplit_initfail: init called") == 1
    assert "isplit_initfail: cleanup called" not in loader_boot.dmesg


def test_blacklisted_initcall_is_refused_as_for_the_original(result: dict) -> None:
    # initcall_blacklist= names the original's init routine; the two-stage load
    # must not bypass it (the wrapper carries that name, splitter._initcall_name).
    load = result["blacklisted"]
    assert load["mode"] == "failed" and load["errno"] == 1, load["reason"]  # EPERM, as for modprobe
    assert "could not insert 'ifb': Operation not permitted" in load["reason"], load
    assert not [m for m in result["blacklisted_modules"] if m.startswith("ifb")], result
    assert not [link for link in result["blacklisted_links"] if link.startswith("ifb")], result


def test_no_cleanup_core_stays(result: dict) -> None:
    assert result["noexit"]["mode"] == "two-stage", result["noexit"]
    assert result["noexit_del"] == ["ok", "EBUSY"]


def test_plain_original_lists_its_init_sections_and_our_core_none(result: dict) -> None:
    # The identity test recovery relies on (kernel/module/sysfs.c add_sect_attrs()):
    # the list survives the freeing of the init layout for the module's whole life.
    assert ".init.text" in result["plain_init_sections"], result["plain_init_sections"]
    assert result["killed_core_loaded_core_init_sections"] == []
    assert result["plain_address"] and result["killed_core_loaded_core_address"]


def test_recovery_leaves_a_plain_original_under_a_stale_marker(result: dict) -> None:
    for key in ("stale_core", "stale_core_loaded"):
        rec = result[key]
        assert rec["dummy_loaded"] and rec["removed"] == [], (key, rec)
        assert "it is the original, loaded plain by someone else" in rec["problems"][0], (key, rec)
        assert not rec["marker_left"], (key, rec)
    assert result["stale_core_loaded_marker"] == f"core-loaded dummy__init {result['plain_address']:#x}\n"
    assert result["plain_del"] == "ok"


def test_recovery_removes_our_inert_core_after_a_kill(result: dict) -> None:
    address = result["killed_core_loaded_core_address"]
    assert result["killed_core_loaded_signal"] == 9
    assert result["killed_core_loaded_marker"] == f"core-loaded dummy__init {address:#x}\n"
    assert result["killed_core_signal"] == 9
    assert result["killed_core_marker"] == "core dummy__init\n"
    for key in ("killed_core_loaded", "killed_core"):
        assert result[key + "_modules"] == ["dummy"], (key, result[key + "_modules"])  # C only
        rec = result[key]
        assert rec["removed"] == ["dummy"] and rec["problems"] == [], (key, rec)
        assert not rec["dummy_loaded"] and not rec["marker_left"], (key, rec)


def test_no_descriptor_left_open(result: dict) -> None:
    assert result["fds_after"] == result["fds_before"]


def test_loader_boot_clean(loader_boot: BootResult) -> None:
    # The refused import CRC is the test's own doing (bad_crc above).
    problems = dmesg_problems(loader_boot.dmesg, tainted=loader_boot.tainted, allowed_taint="OE",
                              allow=(re.compile(r"dummy__init: (disagrees about version of symbol|"
                                                r"Unknown symbol) __fentry__\b"),))
    assert not problems, "\n".join(problems)


SIG_ENFORCE_PROGRAM = r"""
import json, os, sys
from dataclasses import asdict
from pathlib import Path
sys.path.insert(0, os.environ["ISPLIT_REPO"] + "/daemon")
from initsplit.daemon.splits import SplitProvider
from initsplit.split.policy import SplitOptions
from initsplit.loader.kernel_state import probe_capabilities
from initsplit.loader.twostage import load_two_stage

moddir = Path(os.environ["ISPLIT_MODDIR"])
dummy = moddir / "kernel/drivers/net/dummy.ko"
pair = SplitProvider(modules_dir=moddir, cache_dir=Path("/nonexistent"),
                     runtime_dir=Path("/run/rt"),
                     options=SplitOptions(two_stage="always")).get(dummy)
out = {"caps": asdict(probe_capabilities()),
       # Even if a caller ignored the capability check, nothing is left half-loaded:
       # the unsigned core is rejected and the signed original goes in plain.
       "load": asdict(load_two_stage(pair, original=dummy))}

# A signed pre-split cache entry, as the daemon there uses it (signed_only), but
# signed with a key the kernel does not trust (not enrolled): C is refused and the
# original goes in plain again.
from initsplit.cache import write_entry
from initsplit.loader.syscalls import delete_module
from initsplit.signing import SigningKey, sign_module
from initsplit.split.decide import decide
delete_module("dummy")
key = SigningKey(Path(os.environ["ISPLIT_KEY"]), Path(os.environ["ISPLIT_CERT"])).described()
source = dummy.read_bytes()
decision = decide(source, SplitOptions(two_stage="always"))
split = decision.split
cache = Path("/run/signed-cache")
write_entry(cache, dummy.relative_to(moddir), source=source, decision="split", name=split.name,
            init_name=split.init_name, core=sign_module(split.core, key),
            init=sign_module(split.init, key), reached=split.reached, discarded="btf",
            options=SplitOptions(two_stage="always").tag, signer=key.signer)
signed = SplitProvider(modules_dir=moddir, cache_dir=cache, runtime_dir=Path("/run/rt2"),
                       options=SplitOptions(two_stage="always"), signed_only=True).get(dummy)
out["signed_pair"] = type(signed).__name__
out["signed_load"] = asdict(load_two_stage(signed, original=dummy))
out["dummy_listed"] = any(line.startswith("dummy ") for line in open("/proc/modules"))
print("@@RESULT@@" + json.dumps(out))
"""


def test_signature_enforcing_kernel_gets_plain_loads(kernel: DebianKernel, vmshare: Path) -> None:  # noqa: F811
    program = vmshare / "sig_enforce_check.py"
    program.write_text(SIG_ENFORCE_PROGRAM)
    key = signing.create_key(vmshare / "untrusted-key")
    script = HOST_ROOT_SETUP + (
        f"ISPLIT_KEY={key.key} ISPLIT_CERT={key.cert} "
        f"ISPLIT_REPO={REPO} ISPLIT_MODDIR={kernel.modules_dir} PYTHONDONTWRITEBYTECODE=1 "
        f"hostrun /usr/bin/python3 {program}\n")
    result = boot(kernel, script=script, files=host_root_files(kernel), host_root=True,
                  append="module.sig_enforce=1", timeout=300)
    assert result.ok, result.report()
    out = result.result_json()
    assert out is not None, result.report()
    assert out["caps"]["accepts_unsigned"] is False, out
    assert "enforces module signatures" in out["caps"]["reason"], out
    assert out["caps"]["signatures"] == "kernel enforces module signatures", out
    load = out["load"]
    assert load["mode"] == "plain" and "core module refused" in load["reason"], load
    # kernel/module/signing.c module_sig_check(): "Loading of module with unavailable
    # key is rejected", EKEYREJECTED under sig_enforce.
    assert out["signed_pair"] == "SplitPair", out
    load = out["signed_load"]
    assert load["mode"] == "plain", load
    assert load["reason"] == f"core module refused: {os.strerror(errno.EKEYREJECTED)}", load
    assert out["dummy_listed"] is True, out
    assert "Loading of module with unavailable key is rejected" in result.dmesg, result.dmesg[-3000:]
