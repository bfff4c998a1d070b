"""Tests of the test bed itself, against the real Debian kernel in QEMU.

They also pin down how the *unsplit* test modules behave, which is the reference the
split-module tests compare against. All plain-module checks share one VM boot (a
boot costs ~2-3 s under TCG); each test function then looks at its own section of
the script output. Nothing is skipped: if the kernel, headers or QEMU cannot be
had, the fixtures raise TestbedError with the reason.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.testbed import (
    KMODS_DIR,
    BootResult,
    DebianKernel,
    boot,
    build_initramfs,
    build_module,
    debian_kernel,
    decode_taint,
    dmesg_problems,
    module_files,
)
from tests.testbed.fixtures import kernel, kmods  # noqa: F401  (pytest fixtures)

EXPECTED_WARNING = "isplit_roinit: expected warning"

PLAIN_SCRIPT = r"""
echo "== dummy"
insmod /m/dummy.ko; echo "insmod rc=$?"
ip link show
rmmod dummy; echo "rmmod rc=$?"
ip link show
echo "tainted=$(cat /proc/sys/kernel/tainted)"
echo "== roinit"
insmod /m/isplit_roinit.ko param=9; echo "insmod rc=$?"
echo "state: $(cat /sys/module/isplit_roinit/parameters/state)"
echo "param: $(cat /sys/module/isplit_roinit/parameters/param)"
rmmod isplit_roinit; echo "rmmod rc=$?"
echo "== initfail"
insmod /m/isplit_initfail.ko; echo "insmod rc=$?"
echo "modules: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
echo "== noexit"
insmod /m/isplit_noexit.ko; echo "insmod rc=$?"
rmmod isplit_noexit; echo "rmmod rc=$?"
echo "modules: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
echo "== modprobe"
modprobe 8021q; echo "modprobe rc=$?"
echo "modules: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
echo "== end"
"""


def test_all_test_modules_built(kmods: dict[str, Path]) -> None:
    assert sorted(kmods) == ["isplit_initfail", "isplit_noexit", "isplit_roinit"]


@pytest.fixture(scope="module")
def plain_vm(kernel: DebianKernel, kmods: dict[str, Path]) -> BootResult:
    files: dict[str, Path | bytes] = {f"/m/{ko.name}": ko for ko in kmods.values()}
    files["/m/dummy.ko"] = kernel.module("dummy")
    files.update(module_files(kernel, ["8021q"]))
    result = boot(kernel, script=PLAIN_SCRIPT, files=files)
    print(f"plain-module VM run: {result.duration:.2f}s")
    assert result.ok and result.exit_status == 0, result.report()
    return result


def section(result: BootResult, name: str) -> str:
    match = re.search(rf"^== {name}\n(.*?)^== ", result.script_output, re.S | re.M)
    assert match, f"no section {name!r}\n{result.report()}"
    return match.group(1)


# --- kernel and module build -------------------------------------------------------


def test_debian_kernel_is_complete(kernel: DebianKernel) -> None:
    assert kernel.vmlinuz.is_file() and kernel.vmlinux.is_file()
    assert kernel.vmlinux.read_bytes()[:4] == b"\x7fELF"
    assert kernel.modules_dir == kernel.root / "lib" / "modules" / kernel.kver
    assert (kernel.modules_dir / "modules.dep").stat().st_size > 0
    assert kernel.module("dummy").name == "dummy.ko"
    # Dependencies come first, in load order.
    deps = [p.name for p in kernel.module_deps("nf_tables")]
    assert deps[-1] == "nf_tables.ko" and "nfnetlink.ko" in deps[:-1]
    # Second call: served from the in-process cache / marker file.
    assert debian_kernel() == kernel


def _vermagic(ko: Path) -> str:
    return subprocess.run(
        ["modinfo", "-F", "vermagic", str(ko)], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_built_modules_match_kernel(kernel: DebianKernel, kmods: dict[str, Path]) -> None:
    want = _vermagic(kernel.module("dummy"))
    assert want.startswith(kernel.kver + " ")
    for name, ko in kmods.items():
        assert _vermagic(ko) == want, name


def test_build_is_cached(kernel: DebianKernel, kmods: dict[str, Path], tmp_path: Path) -> None:
    (ko,) = build_module(KMODS_DIR / "isplit_noexit", tmp_path, kernel=kernel)
    assert ko.read_bytes() == kmods["isplit_noexit"].read_bytes()


# --- plain (unsplit) modules in one VM ----------------------------------------------


@pytest.mark.vm
def test_vm_script_ran(plain_vm: BootResult) -> None:
    assert plain_vm.ok and plain_vm.exit_status == 0 and not plain_vm.timed_out
    assert "Linux version" in plain_vm.dmesg and plain_vm.tainted is not None


@pytest.mark.vm
def test_dummy_loads_and_unloads(plain_vm: BootResult) -> None:
    out = section(plain_vm, "dummy")
    links = out.split("rmmod rc=")
    assert "insmod rc=0" in out and "rmmod rc=0" in out, plain_vm.report()
    assert "dummy0:" in links[0], plain_vm.report()
    assert "dummy0:" not in links[1], plain_vm.report()
    # Debian's modules are signed with a key built into the kernel: loading one
    # taints nothing (an unsigned module would set E).
    tainted = int(re.search(r"tainted=(\d+)", out).group(1))  # type: ignore[union-attr]
    assert decode_taint(tainted) == "", plain_vm.report()


@pytest.mark.vm
def test_roinit_plain(plain_vm: BootResult) -> None:
    out = section(plain_vm, "roinit")
    dmesg = plain_vm.dmesg
    assert "insmod rc=0" in out and "rmmod rc=0" in out, plain_vm.report()
    assert "isplit_roinit: param=9" in dmesg
    assert "isplit_roinit: value=42 key=1" in dmesg  # init: ro_after_init + key from init text
    assert "state: value=42 key=1" in out  # after init: key seen from core text
    assert "param: 9" in out
    assert "isplit_roinit: cleanup value=42 key=1" in dmesg
    assert dmesg.count(EXPECTED_WARNING) == 1
    assert len(re.findall(r"WARNING: .*isplit_roinit_init", dmesg)) == 1


@pytest.mark.vm
def test_initfail_plain(plain_vm: BootResult) -> None:
    out = section(plain_vm, "initfail")
    assert re.search(r"insmod rc=[1-9]", out), plain_vm.report()
    assert "No such device" in out, plain_vm.report()
    assert "isplit_initfail: init called" in plain_vm.dmesg
    assert "cleanup called" not in plain_vm.dmesg
    assert "isplit_initfail" not in out.split("modules:")[1]


@pytest.mark.vm
def test_noexit_plain(plain_vm: BootResult) -> None:
    out = section(plain_vm, "noexit")
    assert "insmod rc=0" in out, plain_vm.report()
    assert re.search(r"rmmod rc=[1-9]", out), plain_vm.report()
    assert "can't unload module 'isplit_noexit'" in out, plain_vm.report()
    assert "isplit_noexit" in out.split("modules:")[1]
    assert "isplit_noexit: init called" in plain_vm.dmesg


@pytest.mark.vm
def test_modprobe_with_dependencies(plain_vm: BootResult) -> None:
    out = section(plain_vm, "modprobe")
    assert "modprobe rc=0" in out, plain_vm.report()
    loaded = out.split("modules:")[1].split()
    for name in ("8021q", "garp", "mrp", "stp", "llc"):
        assert name in loaded, plain_vm.report()


@pytest.mark.vm
def test_plain_dmesg_clean(plain_vm: BootResult) -> None:
    problems = dmesg_problems(
        plain_vm.dmesg, allow=[EXPECTED_WARNING], tainted=plain_vm.tainted, allowed_taint="WOE"
    )
    assert problems == [], "\n".join(problems)
    # Without the allowance the expected WARN is reported, with its call trace.
    unallowed = dmesg_problems(plain_vm.dmesg)
    assert any("WARNING:" in p for p in unallowed) and any("Call Trace" in p for p in unallowed)
    # Test modules are out-of-tree and unsigned; the WARN sets W.
    assert decode_taint(plain_vm.tainted or 0) == "WOE"
    # loglevel=5 keeps the console short but still shows the WARN splat.
    assert EXPECTED_WARNING in plain_vm.console and "Call Trace" in plain_vm.console


# --- harness contract: failures are reported, not hidden ----------------------------


@pytest.mark.vm
def test_boot_timeout_returns_partial_output(kernel: DebianKernel) -> None:
    result = boot(kernel, script="echo started; sleep 600", timeout=8)
    assert result.timed_out and not result.ok and result.exit_status is None
    assert "started" in result.script_output, result.report()
    assert "timed out" in result.report()


@pytest.mark.vm
def test_panic_ends_vm_and_shows_in_console(kernel: DebianKernel) -> None:
    data = b"payload\n"
    result = boot(
        kernel,
        script="cat /x/data.txt; echo c > /proc/sysrq-trigger; echo survived",
        files={"/x/data.txt": data},
        timeout=60,
    )
    # panic=-1 and -no-reboot: QEMU exits right away instead of hanging until timeout.
    assert not result.timed_out and not result.ok, result.report()
    assert "payload" in result.script_output and "survived" not in result.script_output
    assert "Kernel panic" in result.console, result.report()
    assert any("Kernel panic" in p for p in dmesg_problems(result.console))


# --- pure helpers --------------------------------------------------------------------


def test_decode_taint() -> None:
    assert decode_taint(0) == ""
    assert decode_taint(1 << 13) == "E"
    assert decode_taint((1 << 9) | (1 << 12) | (1 << 13)) == "WOE"
    assert decode_taint(1) == "P"


def test_dmesg_problems_blocks() -> None:
    text = "\n".join(
        [
            "[ 1.0] ------------[ cut here ]------------",
            "[ 1.0] mymod: expected",
            "[ 1.0] WARNING: CPU: 0 PID: 1 at x.c:1 f+0x1/0x2 [mymod]",
            "[ 1.0] Call Trace:",
            "[ 1.0] ---[ end trace 0000000000000000 ]---",
            "[ 2.0] mymod: Unknown symbol foo (err -2)",
        ]
    )
    assert dmesg_problems(text, allow=["mymod: expected"]) == ["[ 2.0] mymod: Unknown symbol foo (err -2)"]
    assert len(dmesg_problems(text)) == 3
    assert dmesg_problems(text, allow=[re.compile(r"expected|Unknown symbol")]) == []
    assert dmesg_problems("", tainted=1 << 9, allowed_taint="E") == [
        "tainted: 512 = 'W', unexpected 'W' (allowed 'E')"
    ]


def test_initramfs_is_valid_cpio(tmp_path: Path) -> None:
    image = build_initramfs("echo hi", {"/a/b/c.txt": b"data"})
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], input=image, capture_output=True, check=True
    ).stdout.decode().split()
    for path in ("init", "bin/busybox", "sbin/insmod", "dev/console", "a/b", "a/b/c.txt", "isplit/script.sh"):
        assert path in listing, path


def test_prune_debs_keeps_the_current_the_newest_the_young_and_the_locked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.testbed.install as install
    from tests.testbed._util import file_lock

    monkeypatch.setattr(install, "cache_dir", lambda: tmp_path)
    now = 1_000_000_000.0
    day = 24 * 3600.0
    ages = {"current": 9 * day, "locked": 8 * day, "young": day / 2,
            **{f"old{i}": (2 + i) * day for i in range(5)}}
    for key, age in ages.items():
        build = tmp_path / "deb" / key
        build.mkdir(parents=True)
        (build / "initsplit_0_all.deb").write_bytes(b"!<arch>\n")
        os.utime(build, (now - age, now - age))
    with file_lock(tmp_path / "locks" / "deb-locked.lock"):
        removed = install.prune_debs(tmp_path / "deb", keep="current", newest=2, now=now)
    # Newest by use: young, old0 | old1, old2, old3, old4, locked, current.
    assert sorted(removed) == ["old1", "old2", "old3", "old4"]
    assert sorted(p.name for p in (tmp_path / "deb").iterdir()) == ["current", "locked", "old0", "young"]
