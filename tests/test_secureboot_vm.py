"""Split modules under UEFI Secure Boot (tests/testbed/secureboot.py): OVMF with
Microsoft's keys, shim, grub and Debian's signed 6.1 kernel, locked down, with a
MOK made here and enrolled through MokList.

One boot (firmware to power-off takes 15-21 s under TCG) for every check: the
guest is locked down, the MOK is in .machine, C and I made by the splitter and
signed by initsplit/signing.py with the MOK load core-then-init with taint 0 and
work, and the kernel refuses an unsigned C and a C signed with a key it does not
know.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from initsplit import signing
from initsplit.split import split_module
from initsplit.validate import validate_split
from tests.testbed import BootResult, DebianKernel, dmesg_problems, script_section as section
from tests.testbed.fixtures import kernel  # noqa: F401  (pytest fixture)
from tests.testbed.secureboot import secureboot_boot

pytestmark = pytest.mark.vm

SPLIT = ("dummy", "loop")
# What the kernel says to the two refusals the script asks for (busybox's insmod
# tries finit_module() and then init_module(): each is said twice).
REFUSALS = ("Loading of unsigned module is rejected", "Loading of module with unavailable key is rejected")

SCRIPT = r"""
load2() {
    m=$1
    insmod /m/$m.ko; rc=$?
    if [ $rc -ne 0 ]; then echo "FAIL core $m rc=$rc"; return 1; fi
    insmod /m/${m}__init.ko; rc=$?
    echo "init $m rc=$rc"
    grep -q "^$m " /proc/modules && echo "listed $m"
    rmmod ${m}__init && echo "rm init $m ok"
}
echo "== state"
mount -t securityfs securityfs /sys/kernel/security
echo "lockdown: $(cat /sys/kernel/security/lockdown)"
echo "keys:"; grep -E '\.machine|initsplit' /proc/keys
echo "== rejected"
insmod /bad/unsigned/dummy.ko && echo "FAIL unsigned loaded" || echo "unsigned refused"
insmod /bad/otherkey/dummy.ko && echo "FAIL other key loaded" || echo "other key refused"
grep -q "^dummy " /proc/modules && echo "FAIL dummy listed after refusals"
echo "tainted after refusals: $(cat /proc/sys/kernel/tainted)"
echo "== dummy"
load2 dummy
ip link add isp0 type dummy && ip link show isp0 >/dev/null && echo "ok isp0 added"
ip link del isp0 && echo "ok isp0 deleted"
echo "== loop"
load2 loop
dd if=/dev/zero of=/tmp/l.img bs=1024 count=1024 2>/dev/null
losetup /dev/loop0 /tmp/l.img && echo "ok losetup loop0"
losetup -d /dev/loop0
echo "== end"
"""


@pytest.fixture(scope="module")
def sb_boot(kernel: DebianKernel, tmp_path_factory: pytest.TempPathFactory) -> BootResult:  # noqa: F811
    tmp = tmp_path_factory.mktemp("sb")
    mok = signing.create_key(tmp / "mok")
    other = signing.create_key(tmp / "other", subject="/CN=not enrolled")
    files: dict[str, Path | bytes] = {}
    for name in SPLIT:
        original = kernel.module(name).read_bytes()
        pair = split_module(original)
        validate_split(original, pair.core, pair.init)
        files[f"/m/{pair.name}.ko"] = signing.sign_module(pair.core, mok)
        files[f"/m/{pair.init_name}.ko"] = signing.sign_module(pair.init, mok)
        if name == "dummy":
            files["/bad/unsigned/dummy.ko"] = pair.core
            files["/bad/otherkey/dummy.ko"] = signing.sign_module(pair.core, other)
    return secureboot_boot(kernel, script=SCRIPT, files=files, mok_cert_der=mok.cert.read_bytes(),
                           timeout=150)


def test_secure_boot_and_lockdown(sb_boot: BootResult) -> None:
    assert sb_boot.ok, sb_boot.report()
    assert "Secure boot enabled" in sb_boot.dmesg, sb_boot.report()
    assert "Kernel is locked down from EFI Secure Boot" in sb_boot.dmesg, sb_boot.report()
    assert "lockdown: none [integrity] confidentiality" in section(sb_boot, "state"), sb_boot.report()


def test_mok_is_in_machine_keyring(sb_boot: BootResult) -> None:
    """shim hands MokList to the kernel as MokListRT (through the MOKvar table); its
    certificates go into .machine: shim's own vendor certificate (Debian Secure Boot
    CA) and the MOK."""
    dmesg = sb_boot.dmesg
    mok = dmesg.find("Loaded X.509 cert 'initsplit module signing key")
    assert mok >= 0, sb_boot.report()
    assert dmesg.rfind("integrity: Loading X.509 certificate: UEFI:MokListRT", 0, mok) >= 0, dmesg
    keys = section(sb_boot, "state")
    assert "keyring   .machine: 2" in keys, keys
    assert "asymmetri initsplit module signing key:" in keys, keys


def test_unsigned_and_unknown_key_are_rejected(sb_boot: BootResult) -> None:
    out = section(sb_boot, "rejected")
    assert "unsigned refused" in out and "other key refused" in out, out
    assert "FAIL" not in out, out
    assert "tainted after refusals: 0" in out, out
    assert "Loading of unsigned module is rejected" in sb_boot.dmesg, sb_boot.report()
    assert "Loading of module with unavailable key is rejected" in sb_boot.dmesg, sb_boot.report()


@pytest.mark.parametrize("name,works", [("dummy", ("ok isp0 added", "ok isp0 deleted")),
                                        ("loop", ("ok losetup loop0",))])
def test_signed_pair_loads_core_then_init_and_works(sb_boot: BootResult, name: str,
                                                     works: tuple[str, ...]) -> None:
    out = section(sb_boot, name)
    for line in (f"init {name} rc=0", f"listed {name}", f"rm init {name} ok", *works):
        assert line in out, out + "\n" + sb_boot.report()
    assert "FAIL" not in out, out


def test_taint_zero_and_dmesg_clean(sb_boot: BootResult) -> None:
    assert sb_boot.tainted == 0, sb_boot.report()
    problems = dmesg_problems(sb_boot.dmesg, tainted=sb_boot.tainted, allow=REFUSALS)
    assert not problems, "\n".join(problems) + "\n" + sb_boot.report()
