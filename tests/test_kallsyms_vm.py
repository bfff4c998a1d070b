"""What Discard=kallsyms-data gives back, as the Debian 6.1 kernel counts it, in QEMU (TCG).

One boot loads real modules (with their dependencies) rewritten as the daemon
loads them with the class on (elf/discard.py without_data_symbol_names), and:

* /proc/modules gives each exactly the core layout the model computes for the
  rewritten module: the original's less its data symbols' kallsyms, page-exact
  (tests/test_savings_vm.py checks the originals' figures the same way);
* /proc/kallsyms lists the modules' code symbols and none of their data;
* every module works.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from initsplit.elf.discard import without_data_symbol_names
from initsplit.layout import layout_of, rules_for_tree
from initsplit.split.decide import decide, module_name
from initsplit.split.policy import SplitOptions
from initsplit.elf import read_elf
from tests.testbed import DebianKernel, boot, dmesg_problems
from tests.testbed.fixtures import kernel  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.vm

# crc32c_generic first: libcrc32c asks the crypto API for "crc32c" from its init,
# which a guest without modprobe cannot load on demand.
TARGETS = ("crc32c_generic", "dummy", "loop", "bridge", "tun", "overlay", "configfs", "dm_mod",
           "nf_conntrack")
# nm(1)'s letters for data: initialised (d), bss (b), read-only (r); upper case global.
DATA_TYPES = set("dDbBrR")

GUEST = r"""
for m in $(cat /m/order); do insmod /m/$m.ko || echo "FAILED insmod $m"; done
echo "--- modules"
cat /proc/modules
echo "--- kallsyms"
grep '\[' /proc/kallsyms
echo "--- end"
check() { if eval "$2" >/dev/null 2>&1; then echo "works $1"; else echo "FAILED $1: $2"; fi; }
check dummy 'ip link add d0 type dummy && ip link set d0 up'
check bridge 'brctl addbr br0 && ip link set br0 up'
check tun 'tunctl -t tap0'
check loop 'test -b /dev/loop0 || grep -q loop /proc/devices'
check overlay 'mkdir -p /tmp/o/l /tmp/o/u /tmp/o/w /tmp/o/m && mount -t overlay o -o lowerdir=/tmp/o/l,upperdir=/tmp/o/u,workdir=/tmp/o/w /tmp/o/m && touch /tmp/o/m/f && umount /tmp/o/m'
check configfs 'mkdir -p /tmp/c && mount -t configfs none /tmp/c && umount /tmp/c'
check device-mapper 'grep -q device-mapper /proc/misc'
check conntrack 'test -e /proc/sys/net/netfilter/nf_conntrack_max'
"""


@pytest.fixture(scope="module")
def loaded(kernel: DebianKernel) -> tuple[dict[str, int], dict[str, int], str]:  # noqa: F811
    rules = rules_for_tree(kernel.modules_dir)
    options = SplitOptions(discard=frozenset({"kallsyms-data"}), rules=rules)
    order: list[str] = []
    files: dict[str, Path | bytes] = {}
    expected: dict[str, int] = {}
    given_back: dict[str, int] = {}
    for target in TARGETS:
        for ko in kernel.module_deps(target):
            data = ko.read_bytes()
            name = module_name(read_elf(data))
            if name in expected:
                continue
            rewritten = without_data_symbol_names(data)
            order.append(name)
            files[f"/m/{name}.ko"] = rewritten
            expected[name] = layout_of(rewritten, rules).core.size
            # What the daemon would report for it (split/decide.py), plain or two-stage.
            given_back[name] = decide(data, options).kallsyms_bytes
            assert given_back[name] == layout_of(data, rules).core.size - expected[name]
    files["/m/order"] = " ".join(order).encode()
    result = boot(kernel, script=GUEST, files=files, timeout=300)
    assert result.ok and result.exit_status == 0, result.report()
    assert "FAILED" not in result.script_output, result.report(80)
    problems = dmesg_problems(result.dmesg, tainted=result.tainted, allowed_taint="E")
    assert not problems, "\n".join(problems) + "\n" + result.report()
    return expected, given_back, result.script_output


def test_proc_modules_is_the_model_to_the_byte(loaded) -> None:
    expected, given_back, out = loaded
    section = out.split("--- modules\n", 1)[1].split("--- kallsyms\n", 1)[0]
    sizes = {line.split()[0]: int(line.split()[1]) for line in section.splitlines() if line.strip()}
    assert {name: sizes.get(name) for name in expected} == expected
    total = sum(given_back.values())
    print(f"\n{len(expected)} modules, data symbols' kallsyms given back: {total:,} bytes "
          f"({total // 4096} pages), confirmed by /proc/modules")
    assert total > 0


def test_kallsyms_lists_code_and_no_data(loaded) -> None:
    expected, _, out = loaded
    section = out.split("--- kallsyms\n", 1)[1].split("--- end\n", 1)[0]
    types: dict[str, set[str]] = {}
    for line in section.splitlines():
        found = re.match(r"^\S+ (\S) \S+\s+\[(\w+)\]", line)
        if found:
            types.setdefault(found.group(2), set()).add(found.group(1))
    for name in expected:
        assert types.get(name, set()) & set("tT"), (name, types.get(name))
        assert not types.get(name, set()) & DATA_TYPES, (name, types[name] & DATA_TYPES)
