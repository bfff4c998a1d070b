"""Split modules against the real Debian kernels in QEMU (TCG): 6.1 and 6.12.

For each module: load the core module C, load the init module I (which runs the
original init), exercise the module, delete I, remove C, and check dmesg. All
Debian modules of one release share one boot (debian_boot, parametrised by
release: Debian 12's 6.1, Debian 13's 6.12 with its .ko.xz modules split by the
tree's own layout rules) and the out-of-tree test modules another (6.1 only:
they are built against Debian 12's headers); each test function then reads its
own section of the script output.

The releases differ in two modules: 6.12 has no test_user_copy (it became the
KUnit suite usercopy_kunit in 6.10), so its boot runs test_static_keys, another
self-test whose init fails when a check fails (lib/test_static_keys.c,
test_static_key_init()); and 6.12's 9pnet needs netfs.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from initsplit.layout.rules import LayoutRules, rules_for_tree
from initsplit.modfile import read_module
from initsplit.split import NothingToSplit, split_module
from initsplit.validate import validate_split
from tests.testbed import BootResult, DebianKernel, boot, debian_kernel, decode_taint, dmesg_problems
from tests.testbed import script_section as section
from tests.testbed.fixtures import kernel, kmods  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.vm

# Modules of the Debian kernel exercised two-stage, in load order (dependencies first).
DEBIAN_MODULES = (
    "dummy", "loop", "fat", "vfat", "nls_cp437", "nls_ascii", "minix",
    "crc16", "crc32c_generic", "mbcache", "jbd2", "ext4",
    "watchdog", "softdog", "raid6_pq",
)
# Per release (the module docstring says why): a self-test module whose init fails
# when a check fails, and what 9pnet needs, each in load order.
SELFTEST = {"12": ("test_user_copy",), "13": ("test_static_key_base", "test_static_keys")}
NINEP_DEPS = {"12": (), "13": ("netfs",)}
# How ftrace names I's exit stub (test_init_stubs_are_traced_until_the_init_modules_unload).
STUB_NAME = {"12": "__ftrace_invalid_address___4", "13": "initsplit_exit"}

# Guest helpers: load2 loads C then I; unload2 deletes I then C. Every step prints
# a line the host parses, so a failure names the step.
GUEST_LIB = r"""
load2() {
    m=$1; shift
    insmod /m/$m.ko "$@"; rc=$?
    if [ $rc -ne 0 ]; then echo "FAIL core $m rc=$rc"; return 1; fi
    if [ ! -f /m/${m}__init.ko ]; then echo "plain $m"; return 0; fi
    insmod /m/${m}__init.ko; rc=$?
    echo "init $m rc=$rc"
    grep -q "^$m " /proc/modules || echo "FAIL $m not listed"
    return $rc
}
unload_init() {
    [ -f /m/${1}__init.ko ] || return 0
    rmmod ${1}__init && echo "rm init $1 ok" || echo "FAIL rm init $1"
}
unload_core() {
    rmmod $1 && echo "rm core $1 ok" || echo "FAIL rm core $1"
}
modlist() { echo "modules: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"; }
"""

DEBIAN_SCRIPT = GUEST_LIB + r"""
echo "== dummy"
load2 dummy
ip link show dummy0 >/dev/null && echo "ok dummy0"
ip link add isp0 type dummy && ip link show isp0 >/dev/null && echo "ok isp0 added"
ip link del isp0 && echo "ok isp0 deleted"
unload_init dummy; unload_core dummy

echo "== fs"
load2 loop
load2 fat; load2 vfat; load2 nls_cp437; load2 nls_ascii; load2 minix
# I's traced exit stubs, while each I is loaded (test_init_stubs_are_traced...).
grep '__init]$' /sys/kernel/tracing/available_filter_functions | sed 's/^/ftrace: /'
for m in loop fat vfat nls_cp437 nls_ascii minix; do unload_init $m; done
modlist
echo "ftrace after unload: $(grep -c '__init]$' /sys/kernel/tracing/available_filter_functions)"
# busybox has no mkfs.vfat/mkfs.minix: the host made the filesystems (dosfstools, util-linux).
cp /img/fat.img /img/minix.img /tmp/
losetup /dev/loop0 /tmp/fat.img && echo "ok losetup loop0"
losetup /dev/loop1 /tmp/minix.img && echo "ok losetup loop1"
mkdir -p /mnt/f /mnt/m
mount -t vfat /dev/loop0 /mnt/f && echo "hello fat" > /mnt/f/Hello.txt && umount /mnt/f
mount -t vfat /dev/loop0 /mnt/f && echo "fat read: $(cat /mnt/f/Hello.txt)" && umount /mnt/f
mount -t minix /dev/loop1 /mnt/m && echo "hello minix" > /mnt/m/hello && umount /mnt/m
mount -t minix /dev/loop1 /mnt/m && echo "minix read: $(cat /mnt/m/hello)" && umount /mnt/m
losetup -d /dev/loop0; losetup -d /dev/loop1
for m in minix nls_ascii nls_cp437 vfat fat loop; do unload_core $m; done

echo "== jbd2"
# jbd2 does its work for ext4: journal a real filesystem on a loop device.
# crc32c_generic is ext4's softdep (ext4 asks the crypto API for crc32c at mount).
load2 loop; load2 crc16; load2 crc32c_generic; load2 mbcache
# jbd2's core module alone exports nothing but its anchors: an ext4 loaded by
# someone who ignores initsplit cannot link against its uninitialised code.
insmod /m/jbd2.ko && echo "core jbd2 ok"
insmod /m/plain/ext4.ko 2>/dev/null && echo "FAIL ext4 linked against an inert jbd2" || echo "ok ext4 refused before jbd2 init"
insmod /m/jbd2__init.ko && echo "init jbd2 rc=0"
load2 ext4
for m in loop crc16 crc32c_generic mbcache jbd2 ext4; do unload_init $m; done
cp /img/ext4.img /tmp/
losetup /dev/loop2 /tmp/ext4.img && echo "ok losetup loop2"
mkdir -p /mnt/e
mount -t ext4 /dev/loop2 /mnt/e && echo "hello ext4" > /mnt/e/hello && sync && umount /mnt/e
mount -t ext4 /dev/loop2 /mnt/e && echo "ext4 read: $(cat /mnt/e/hello)" && umount /mnt/e
grep -q 'jbd2' /proc/modules && echo "jbd2 in use by: $(grep '^jbd2 ' /proc/modules | cut -d' ' -f4)"
losetup -d /dev/loop2
for m in ext4 jbd2 mbcache crc32c_generic crc16 loop; do unload_core $m; done

echo "== softdog"
# watchdog's exports are GPL-only (__ksymtab_gpl): hidden the same way until its init ran.
insmod /m/watchdog.ko && echo "core watchdog ok"
insmod /m/plain/softdog.ko 2>/dev/null && echo "FAIL softdog linked against an inert watchdog" || echo "ok softdog refused before watchdog init"
insmod /m/watchdog__init.ko && echo "init watchdog rc=0"
load2 softdog
[ -c /dev/watchdog0 ] && echo "ok watchdog0"
printf V > /dev/watchdog0 && echo "ok watchdog magic close"
unload_init softdog; unload_init watchdog; unload_core softdog; unload_core watchdog

echo "== raid6_pq"
load2 raid6_pq
unload_init raid6_pq; unload_core raid6_pq

echo "== selftest"
for m in $(cat /m/selftest); do load2 $m; done
for m in $(cat /m/selftest); do unload_init $m; done
for m in $(cat /m/selftest.reverse); do unload_core $m; done

echo "== 9pnet"
for m in $(cat /m/9pdeps); do load2 $m; unload_init $m; done
insmod /m/plain/9pnet.ko && echo "plain 9pnet loaded"
# Event IDs are handed out afresh on every registration; everything else must match.
cat /sys/kernel/tracing/events/9p/*/format | grep -v '^ID:' > /tmp/fmt.plain
rmmod 9pnet && echo "plain 9pnet removed"
load2 9pnet
cat /sys/kernel/tracing/events/9p/*/format | grep -v '^ID:' > /tmp/fmt.split
unload_init 9pnet; unload_core 9pnet
cmp /tmp/fmt.plain /tmp/fmt.split && echo "ok 9p formats identical"
echo "format lines: $(wc -l < /tmp/fmt.plain)"
# With the eval maps applied the kernel prints the enum values as numbers.
grep -c '{ 6, "P9_TLERROR" }' /tmp/fmt.split | sed 's/^/split numeric P9_TLERROR: /'
for m in $(cat /m/9pdeps); do unload_core $m; done
echo "== end"
modlist
"""

TESTMOD_SCRIPT = GUEST_LIB + r"""
echo "== roinit"
load2 isplit_roinit param=9
echo "param: $(cat /sys/module/isplit_roinit/parameters/param)"
echo "state: $(cat /sys/module/isplit_roinit/parameters/state)"
unload_init isplit_roinit
echo "state after: $(cat /sys/module/isplit_roinit/parameters/state)"
unload_core isplit_roinit

echo "== noexit"
load2 isplit_noexit
unload_init isplit_noexit
rmmod isplit_noexit 2>&1; echo "rmmod core rc=$?"
modlist
echo "== end"
"""


def make_filesystem(tmp: Path, name: str, mkfs: list[str]) -> Path:
    image = tmp / f"{name}.img"
    with image.open("wb") as f:
        f.truncate(4 * 1024 * 1024)
    subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
    return image


# Modules of DEBIAN_MODULES that have no init sections and load plain.
NOTHING_TO_SPLIT = {"crc16"}


def split_into(files: dict[str, Path | bytes], ko: Path, rules: LayoutRules = LayoutRules()) -> None:
    original = read_module(ko)
    name = ko.name.split(".ko")[0]
    try:
        result = split_module(original, rules)
    except NothingToSplit:
        assert name in NOTHING_TO_SPLIT, ko
        files[f"/m/{name}.ko"] = original
        return
    validate_split(original, result.core, result.init, rules)
    files[f"/m/{result.name}.ko"] = result.core
    files[f"/m/{result.init_name}.ko"] = result.init


def assert_clean(result: BootResult, *, allow: tuple[str, ...] = (), taint: str = "E") -> None:
    assert result.ok, result.report()
    problems = dmesg_problems(result.dmesg, allow=allow, tainted=result.tainted, allowed_taint=taint)
    assert not problems, "\n".join(problems) + "\n" + result.report()


@pytest.fixture(scope="module", params=["12", "13"], ids=["debian12", "debian13"])
def release(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def debian_boot(release: str, tmp_path_factory: pytest.TempPathFactory) -> BootResult:
    kernel = debian_kernel(release=release)
    # 6.1's splits as before (the built-in rules); 6.12's by its tree's own config.
    rules = rules_for_tree(kernel.modules_dir) if release == "13" else LayoutRules()
    tmp = tmp_path_factory.mktemp(f"fs{release}")
    files: dict[str, Path | bytes] = {
        "/img/fat.img": make_filesystem(tmp, "fat", ["mkfs.vfat"]),
        "/img/minix.img": make_filesystem(tmp, "minix", ["mkfs.minix"]),
        # No metadata_csum: it would make ext4 request crc32c through modprobe.
        "/img/ext4.img": make_filesystem(tmp, "ext4", ["mkfs.ext4", "-q", "-O", "^metadata_csum"]),
    }
    for name in (*DEBIAN_MODULES, *SELFTEST[release], *NINEP_DEPS[release], "9pnet"):
        split_into(files, kernel.module(name), rules)
    for name in ("9pnet", "ext4", "softdog"):
        files[f"/m/plain/{name}.ko"] = read_module(kernel.module(name))
    files["/m/selftest"] = " ".join(SELFTEST[release]).encode()
    files["/m/selftest.reverse"] = " ".join(reversed(SELFTEST[release])).encode()
    files["/m/9pdeps"] = " ".join(NINEP_DEPS[release]).encode()
    return boot(kernel, script=DEBIAN_SCRIPT, files=files, timeout=600,
                memory_mb=1024 if release == "13" else 512)


# What the kernel says when a module that needs C's exports is loaded before I's
# init (kernel/module/main.c, simplify_symbols: "Unknown symbol %s (err %d)").
REFUSED_BEFORE_INIT = re.compile(r"(ext4|softdog): Unknown symbol \w+ \(err -2\)")


@pytest.fixture(scope="module")
def testmod_boot(kernel: DebianKernel, kmods: dict[str, Path]) -> BootResult:  # noqa: F811
    files: dict[str, Path | bytes] = {}
    # isplit_initfail is loaded by tests/test_loader_vm.py through the daemon's loader:
    # busybox's insmod retries a failed finit_module() with init_module(), which would
    # run a failing init a second time, whatever the module.
    for name in ("isplit_roinit", "isplit_noexit"):
        split_into(files, kmods[name])
    return boot(kernel, script=TESTMOD_SCRIPT, files=files, timeout=300)


def test_debian_boot_clean(debian_boot: BootResult) -> None:
    # Unsigned modules taint E; nothing else may show up but the refusals the test provokes.
    assert_clean(debian_boot, allow=(REFUSED_BEFORE_INIT,))
    assert "FAIL" not in debian_boot.script_output, debian_boot.report()
    assert decode_taint(debian_boot.tainted or 0) == "E"
    final = section(debian_boot, "end")
    assert re.search(r"modules: *$", final, re.M), final


def test_dummy(debian_boot: BootResult) -> None:
    out = section(debian_boot, "dummy")
    for line in ("init dummy rc=0", "ok dummy0", "ok isp0 added", "ok isp0 deleted",
                 "rm init dummy ok", "rm core dummy ok"):
        assert line in out, out


def test_loop_fat_vfat_minix(debian_boot: BootResult) -> None:
    out = section(debian_boot, "fs")
    for m in ("loop", "fat", "vfat", "nls_cp437", "nls_ascii", "minix"):
        assert f"init {m} rc=0" in out, out
        assert f"rm init {m} ok" in out and f"rm core {m} ok" in out, out
    # The init modules were gone before the filesystems were used.
    modules_line = next(line for line in out.splitlines() if line.startswith("modules:"))
    assert "__init" not in modules_line, out
    for line in ("ok losetup loop0", "ok losetup loop1", "fat read: hello fat",
                 "minix read: hello minix"):
        assert line in out, out


def test_init_stubs_are_traced_until_the_init_modules_unload(debian_boot: BootResult, release: str) -> None:
    """Each I's exit stub has an ftrace record (split/codegen.py exit_stub()):
    after I's init layout was freed, the kernel still lists one record of each
    I, so ftrace_free_mem() (kernel/trace/ftrace.c) found I's ftrace page
    non-empty and did not wait in synchronize_rcu() to free it; once the init
    modules are deleted, ftrace_release_mod() has dropped every record. A record
    ftrace_make_nop() refused would be a WARN (test_debian_boot_clean).

    Debian 12's kernel has no IBT: FTRACE_MCOUNT_MAX_OFFSET is 0
    (arch/x86/include/asm/ftrace.h), so test_for_valid_rec() disables a record
    4 bytes into its function, after the stub's endbr64, as it does for weak
    functions, and t_show() names it __ftrace_invalid_address___4. It stays in
    the page all the same (Debian 13's, with IBT, lists initsplit_exit)."""
    out = section(debian_boot, "fs")
    stub = re.escape(STUB_NAME[release])
    listed = sorted(re.findall(rf"^ftrace: {stub} \[(\S+)\]$", out, re.M))
    assert listed == sorted(f"{m}__init" for m in ("loop", "fat", "vfat", "nls_cp437",
                                                    "nls_ascii", "minix")), out
    assert len(re.findall(r"^ftrace: ", out, re.M)) == len(listed), out
    assert "ftrace after unload: 0" in out, out


def test_core_module_exports_nothing_before_init(debian_boot: BootResult) -> None:
    jbd2, softdog = section(debian_boot, "jbd2"), section(debian_boot, "softdog")
    assert "core jbd2 ok" in jbd2 and "ok ext4 refused before jbd2 init" in jbd2, jbd2
    assert "core watchdog ok" in softdog and "ok softdog refused before watchdog init" in softdog, softdog
    refused = {m.group(1) for m in REFUSED_BEFORE_INIT.finditer(debian_boot.dmesg)}
    assert refused == {"ext4", "softdog"}, debian_boot.dmesg[-3000:]
    # The symbols named are jbd2's (EXPORT_SYMBOL) and watchdog's (EXPORT_SYMBOL_GPL) own.
    assert re.search(r"ext4: Unknown symbol jbd2_\w+ \(err -2\)", debian_boot.dmesg)
    assert re.search(r"softdog: Unknown symbol watchdog_\w+ \(err -2\)", debian_boot.dmesg)
    # After I's init the same modules link and work (test_jbd2, test_softdog).
    assert "init jbd2 rc=0" in jbd2 and "init ext4 rc=0" in jbd2, jbd2
    assert "init watchdog rc=0" in softdog and "init softdog rc=0" in softdog, softdog


def test_jbd2(debian_boot: BootResult) -> None:
    out = section(debian_boot, "jbd2")
    assert "plain crc16" in out and "rm core crc16 ok" in out, out
    for m in ("crc32c_generic", "mbcache", "jbd2", "ext4"):
        assert f"init {m} rc=0" in out and f"rm core {m} ok" in out, out
    assert "rm init jbd2 ok" in out, out
    assert "ext4 read: hello ext4" in out, out
    assert "jbd2 in use by: ext4," in out, out
    assert "EXT4-fs (loop2): mounted filesystem" in debian_boot.dmesg, debian_boot.dmesg[-3000:]


def test_softdog(debian_boot: BootResult) -> None:
    out = section(debian_boot, "softdog")
    for line in ("init watchdog rc=0", "init softdog rc=0", "ok watchdog0",
                 "ok watchdog magic close", "rm core softdog ok", "rm core watchdog ok"):
        assert line in out, out


def test_raid6_pq(debian_boot: BootResult) -> None:
    out = section(debian_boot, "raid6_pq")
    assert "init raid6_pq rc=0" in out and "rm core raid6_pq ok" in out, out
    assert re.search(r"raid6: using .*recovery algorithm", debian_boot.dmesg), debian_boot.dmesg[-3000:]


def test_self_test_module_passes(debian_boot: BootResult, release: str) -> None:
    """The self-test's init ran its checks in I and returned 0 (it fails the load
    when a check fails); C and I then unload."""
    out = section(debian_boot, "selftest")
    for m in SELFTEST[release]:
        assert f"init {m} rc=0" in out and f"rm init {m} ok" in out and f"rm core {m} ok" in out, out
    if release == "12":
        assert "test_user_copy: tests passed" in debian_boot.dmesg


def test_9pnet_trace_format_matches_plain_load(debian_boot: BootResult, release: str) -> None:
    out = section(debian_boot, "9pnet")
    assert "plain 9pnet loaded" in out and "init 9pnet rc=0" in out, out
    assert "ok 9p formats identical" in out, out
    assert "rm core 9pnet ok" in out, out
    for m in NINEP_DEPS[release]:
        assert f"init {m} rc=0" in out and f"rm core {m} ok" in out, out
    lines = int(re.search(r"format lines: (\d+)", out).group(1))
    assert lines > 20, out
    assert re.search(r"split numeric P9_TLERROR: [1-9]", out), out


def test_ro_after_init_static_key_warn_and_param(testmod_boot: BootResult) -> None:
    out = section(testmod_boot, "roinit")
    assert "init isplit_roinit rc=0" in out, out
    assert "param: 9" in out, out
    dmesg = testmod_boot.dmesg
    assert "isplit_roinit: param=9" in dmesg
    assert "isplit_roinit: value=42 key=1" in dmesg
    assert "isplit_roinit: expected warning" in dmesg
    assert "rm init isplit_roinit ok" in out and "rm core isplit_roinit ok" in out, out
    assert "isplit_roinit: cleanup value=42 key=1" in dmesg


def test_no_cleanup_refuses_removal(testmod_boot: BootResult) -> None:
    out = section(testmod_boot, "noexit")
    assert "init isplit_noexit rc=0" in out and "rm init isplit_noexit ok" in out, out
    assert "Device or resource busy" in out or "Resource busy" in out, out
    assert "rmmod core rc=0" not in out, out
    final = [line for line in out.splitlines() if line.startswith("modules:")][-1]
    assert "isplit_noexit" in final and "__init" not in final, out


def test_testmod_boot_clean(testmod_boot: BootResult) -> None:
    # The WARN in isplit_roinit's init is intended; out-of-tree modules taint O, the WARN W.
    assert_clean(testmod_boot, allow=("isplit_roinit: expected warning",), taint="EOW")
    assert "FAIL" not in testmod_boot.script_output, testmod_boot.report()
