"""initsplit.kmod.Resolver answers exactly what kmod's modprobe answers.

The proof: thousands of real MODALIAS strings, synthesised from the Debian 6.1 tree's
own modules.alias across every bus, plus module names, symbol:, builtin names and
aliases, config aliases and malformed input, are resolved both by the Resolver and by
``modprobe --show-depends`` (kmod 30, the same tree, the same modprobe.d directories)
and must give the same lines in the same order.  The configuration used exercises
blacklist, options, softdep (pre, post, alias, unresolvable, overriding
modules.softdep), install commands (with the softdep quirk) and modprobe.d aliases; the
kernel command line is compared twice: this machine's own /proc/cmdline, and a
hand-written one bind-mounted over /proc/cmdline in a private mount namespace for
modprobe and given to the Resolver as ``kernel_cmdline``.  A third pass compares the
running-kernel semantics (builtin and loaded modules skipped) with ``modprobe -n -v``.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from initsplit.kmod import Resolver
from initsplit.kmod.resolver import LoadStep
from tests.testbed.kernel import DebianKernel, debian_kernel

# Aliases and commands of the test configuration.  Every module named here must exist
# in the tree (checked below), or a line would test nothing.
TEST_CONF = """\
# blacklist applies to alias matches only: uas still pulls usb_storage in as a dependency
blacklist usb_storage
blacklist cdc-ether
options dummy numdummies=2
options snd-hda-intel model=generic
options snd_hda_codec power_save=1
options e1000e InterruptThrottleRate=3000
# pre/post softdeps, one post name that resolves to nothing
softdep i40e pre: dummy post: ifb initsplit-no-such-module
# a softdep through an alias (crypto-crc32c -> crc32c_intel, crc32c_generic)
softdep e1000e pre: crypto-crc32c
# 00- sorts before modules.softdep: this line, not depmod's, is ext4's first match
softdep ext4 pre: dummy
# install commands: plain, with $CMDLINE_OPTS, and on modules that have softdeps
install ifb /bin/true
install virtio_net /bin/echo virtio-net $CMDLINE_OPTS
# i40e has softdeps, so libkmod ignores this command and inserts i40e itself
install i40e /bin/false
# r8169's only softdep resolves to nothing: the command is NOT ignored
softdep r8169 pre: initsplit-no-such-module
install r8169 /bin/true r8169
# install command for a name that is no module at all
install initsplit-pseudo /bin/true pseudo
# modprobe.d aliases, and options given for the alias name
alias initsplit-test-alias dummy
options initsplit_test_alias from_alias=1
alias initsplit-two* ifb
alias initsplit-two-b dummy
# a pattern alias taking precedence over modules.alias for an r8169 id
alias pci:v000010ECd00008168sv*sd*bc*sc*i* e1000e
"""

# Debian's /lib/modprobe.d/aliases.conf (kmod 30+20221128-1), so that the second -C
# directory is the real distribution file's content.
DEBIAN_ALIASES_CONF = """\
options snd-pcsp index=-2
options cx88_alsa index=-2
options snd-atiixp-modem index=-2
options snd-intel8x0m index=-2
options snd-via82xx-modem index=-2
softdep uhci-hcd pre: ehci-hcd
softdep ohci-hcd pre: ehci-hcd
"""

# Concrete modaliases whose answers the tests spell out (and compare like all others).
EXPLICIT = {
    # matched by uas and usb_storage: the blacklisted usb_storage still comes as uas's dep
    "uas+usb_storage": "usb:v0000p0000d0000dc00dsc00dp00ic08isc06ip50in00",
    # matched by usb_storage alone: blacklisted, nothing to load
    "usb_storage": "usb:v0000p0000d0000dc00dsc00dp00ic08isc01ip50in00",
    "virtio_net": "virtio:d00000001v00000000",
    # an r8169 id that the modprobe.d pattern alias hands to e1000e
    "r8169-id": "pci:v000010ECd00008168sv00001043sd00008554bc02sc00i00",
    "e1000e": "pci:v00008086d0000550Dsv00000000sd00000000bc00sc00i00",
    "i40e": "pci:v00008086d00001572sv00000000sd00000000bc00sc00i00",
    "snd_hda_intel": "pci:v00008086d0000A170sv00000000sd00000000bc04sc03i00",
}

CONF_MODULES = ["usb_storage", "uas", "cdc_ether", "dummy", "snd_hda_intel", "snd_hda_codec",
                "e1000e", "i40e", "ifb", "ext4", "virtio_net", "r8169", "uhci_hcd",
                "ohci_hcd", "ehci_hcd", "crc32c_generic"]

# A command line like a bootloader's, with every shape libkmod's parser distinguishes.
FAKE_CMDLINE = (
    'BOOT_IMAGE=/boot/vmlinuz-6.1.0-56-amd64 root=UUID=0b1c ro quiet '
    'modprobe.blacklist=e1000e,snd-hda-intel,,i40e dummy.numdummies=3 '
    'snd-hda-codec.power_save=0 "virtio_net.napi_tx=1 x" ifb.numifbs '
    'nvme.a.b=1 a=b.c bad]mod.x=1 initsplit_test_alias.via_cmdline=1 '
    'usb-storage.quirks=0bda:0129:i -- init.arg=1\n'
)

# -- the test bed ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel() -> DebianKernel:
    return debian_kernel()


@pytest.fixture(scope="module")
def confdirs(tmp_path_factory: pytest.TempPathFactory, kernel: DebianKernel) -> list[Path]:
    names = set(_modules_dep(kernel))
    missing = [m for m in CONF_MODULES if m not in names]
    assert not missing, f"test configuration names modules absent from the tree: {missing}"
    base = tmp_path_factory.mktemp("modprobe.d")
    first, second = base / "a", base / "b"
    first.mkdir()
    second.mkdir()
    (first / "00-initsplit-test.conf").write_text(TEST_CONF)
    (first / "ignored.txt").write_text("blacklist dummy\n")  # not *.conf: libkmod skips it
    (second / "aliases.conf").write_text(DEBIAN_ALIASES_CONF)
    return [first, second]


@pytest.fixture(scope="module")
def keys(kernel: DebianKernel) -> list[str]:
    keys, n_modaliases, n_buses = sample_keys(kernel)
    print(f"\nsample: {len(keys)} lookups, of which {n_modaliases} modaliases from"
          f" {n_buses} alias prefixes (buses) of modules.alias", file=sys.stderr)
    return keys


def _modules_dep(kernel: DebianKernel) -> dict[str, str]:
    """module name -> relative path, from modules.dep."""
    out = {}
    for line in (kernel.modules_dir / "modules.dep").read_text().splitlines():
        rel = line.split(":", 1)[0]
        out[_name_of(rel)] = rel
    return out


def _name_of(path: str) -> str:
    return path.rsplit("/", 1)[-1].split(".", 1)[0].replace("-", "_")


def concrete(pattern: str, fill: str) -> str:
    """A string that the fnmatch pattern matches: '*' -> fill, [class] -> a member."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append(fill)
        elif c == "?":
            out.append("0")
        elif c == "[":
            end = pattern.index("]", i + 2)
            cls = pattern[i + 1:end]
            if cls[0] in "!^":
                out.append(next(ch for ch in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                if ch not in cls[1:]))
            else:
                out.append(cls[0])
            i = end
        else:
            out.append(c)
        i += 1
    return "".join(out)


def sample_keys(kernel: DebianKernel) -> tuple[list[str], int, int]:
    """The deterministic set of lookups compared: >= 3000 modaliases plus special keys."""
    rng = random.Random(20240611)
    by_bus: dict[str, list[str]] = defaultdict(list)
    for line in (kernel.modules_dir / "modules.alias").read_text().splitlines():
        if not line.startswith("alias "):
            continue
        pattern = line.split()[1]
        bus = pattern.split(":", 1)[0].rstrip("*") if ":" in pattern else pattern.split("-")[0]
        by_bus[bus].append(pattern)
    # Every bus: all of a small one's patterns, a seventh (at least 80) of a big one's.
    # Each '*' becomes one of a few fillers, so some strings match several patterns
    # (and modules), as real ones do.
    modaliases: list[str] = []
    fills = ["", "0", "00000000", "FF", "1AF4"]
    for bus in sorted(by_bus):
        patterns = sorted(set(by_bus[bus]))
        take = (patterns if len(patterns) <= 80
                else rng.sample(patterns, max(80, len(patterns) // 7)))
        for pattern in take:
            modaliases.append(concrete(pattern, rng.choice(fills)))
    modaliases = list(dict.fromkeys(modaliases))
    n_modaliases = len(modaliases)
    keys = list(modaliases)
    # a few raw patterns too: modprobe accepts wildcards in its argument
    keys += rng.sample(sorted(p for ps in by_bus.values() for p in ps), 60)

    names = sorted(_modules_dep(kernel))
    for name in rng.sample(names, 300):
        keys.append(name)
        keys.append(name.replace("_", "-"))
    builtin = [_name_of(line) for line in
               (kernel.modules_dir / "modules.builtin").read_text().splitlines()]
    keys += rng.sample(builtin, 40)
    modinfo = (kernel.modules_dir / "modules.builtin.modinfo").read_bytes().split(b"\0")
    keys += sorted({e.split(b"=", 1)[1].decode() for e in modinfo if b".alias=" in e})
    symbols = [line.split()[1] for line in
               (kernel.modules_dir / "modules.symbols").read_text().splitlines()
               if line.startswith("alias ")]
    keys += rng.sample(symbols, 100)
    keys += CONF_MODULES + [
        "initsplit-test-alias", "initsplit_test_alias", "initsplit-two-b", "initsplit-twox",
        "initsplit-pseudo", "initsplit-no-such-module", "uhci-hcd", "ohci_pci", "ehci-pci",
        "fs-ext4", "crypto-crc32c", "pci:v000010ECd00008168sv00001043sd00008554bc02sc00i00",
        "pci:v0000FFFFd0000FFFFsv0000FFFFsd0000FFFFbc00sc00i00", "usb:v0000p0000d0000dc00",
        "foo]bar", "[unclosed", "snd-hda-intel", "usb-storage", "fs-debugfs", "rtnl-link-dummy",
        "symbol:no_such_symbol",
        "", *EXPLICIT.values(),
    ]
    assert n_modaliases >= 3000, n_modaliases
    # Stable order, no duplicates (the same concrete string can come from two patterns).
    return list(dict.fromkeys(keys)), n_modaliases, len(by_bus)


# -- running modprobe --------------------------------------------------------------------


def modprobe_lines(kernel: DebianKernel, confdirs: list[Path], keys: list[str], *,
                   mode: str = "--show-depends", cmdline_file: Path | None = None,
                   ) -> dict[str, list[str]]:
    """modprobe's stdout lines for each key; [] for "not found"."""
    argv = ["modprobe", "-d", str(kernel.root), "-S", kernel.kver]
    for d in confdirs:
        argv += ["-C", str(d)]
    argv += mode.split()
    if cmdline_file is not None:
        # A private mount namespace in which /proc/cmdline is our file: libkmod reads
        # nothing else for the kernel command line.
        argv = ["unshare", "-m", "sh", "-c",
                f"mount --bind {cmdline_file} /proc/cmdline && exec \"$@\"", "sh", *argv]

    def run(key: str) -> tuple[str, list[str]]:
        proc = subprocess.run([*argv, "--", key], capture_output=True, text=True)
        if proc.returncode != 0:
            assert "not found" in proc.stderr, (key, proc.returncode, proc.stderr)
            assert proc.stdout == "", (key, proc.stdout)
            return key, []
        return key, proc.stdout.splitlines()

    with ThreadPoolExecutor(max_workers=(os.cpu_count() or 2) * 2) as pool:
        return dict(pool.map(run, keys))


def first_occurrences(lines: list[str]) -> list[str]:
    """What real modprobe does with a repeated module: the second time it is loaded."""
    seen: set[str] = set()
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        ident = {"insmod": rest.split(" ", 1)[0], "builtin": rest}.get(word, line)
        if ident not in seen:
            seen.add(ident)
            out.append(line)
    return out


def unsatisfiable_requirements(steps: list[LoadStep]) -> list[str]:
    """Requirements that name no earlier step the daemon loads: a scheduler given these
    steps would wait for them forever."""
    loaded: set[str] = set()
    bad = []
    for step in steps:
        bad += [f"{step.name} requires {name}" for name in step.requires if name not in loaded]
        bad += [f"{step.name} comes after {name}" for name in step.after if name not in loaded]
        if not step.builtin:
            loaded.add(step.name)
    return bad


def compare(resolver: Resolver, expected: dict[str, list[str]]) -> tuple[int, list[str]]:
    """(keys the resolver found modules for, mismatch descriptions)."""
    mismatches = []
    nonempty = repeated = 0
    for key, lines in expected.items():
        want = first_occurrences(lines)
        repeated += len(want) != len(lines)
        steps = resolver.resolve(key)
        got = [step.show_depends_line() for step in steps]
        nonempty += bool(got)
        if got != want:
            mismatches.append(f"{key!r}:\n  modprobe: {want}\n  resolver: {got}")
        if bad := unsatisfiable_requirements(steps):
            mismatches.append(f"{key!r}: {bad}")
    print(f"\n({repeated} of modprobe's answers named a module twice)", file=sys.stderr)
    return nonempty, mismatches


def briefly(lines: list[str]) -> list[str]:
    """modprobe lines shortened for assertions: "insmod /…/dummy.ko n=2 " -> "dummy n=2"."""
    out = []
    for line in first_occurrences(lines):
        word, _, rest = line.partition(" ")
        if word == "insmod":
            path, _, options = rest.partition(" ")
            line = f"{_name_of(path)} {options}"
        out.append(line.strip())
    return out


def report(what: str, count: int, nonempty: int, mismatches: list[str], seconds: float) -> None:
    print(f"\n{what}: {count} lookups compared ({nonempty} resolving to modules),"
          f" {len(mismatches)} mismatches, {seconds:.1f}s", file=sys.stderr)
    for m in mismatches[:20]:
        print(m, file=sys.stderr)


# -- the comparisons ------------------------------------------------------------------


def test_show_depends_matches_modprobe(kernel: DebianKernel, confdirs: list[Path],
                                       keys: list[str]) -> None:
    """This machine's /proc/cmdline, as both read it themselves."""
    start = time.monotonic()
    expected = modprobe_lines(kernel, confdirs, keys)
    with Resolver(root=kernel.root, kver=kernel.kver, config_paths=confdirs) as resolver:
        nonempty, mismatches = compare(resolver, expected)
    report("modprobe --show-depends", len(keys), nonempty, mismatches, time.monotonic() - start)
    assert not mismatches
    assert nonempty > 3000
    # The configuration really was exercised: modprobe's answers (now known to be the
    # resolver's too) for the keys that each modprobe.d line is about.
    assert briefly(expected[EXPLICIT["uas+usb_storage"]])[-2:] == ["usb_storage", "uas"]
    assert briefly(expected[EXPLICIT["usb_storage"]]) == []
    assert briefly(expected["usb-storage"])[-1] == "usb_storage"  # by name: no blacklist
    assert briefly(expected["initsplit-test-alias"]) == ["dummy numdummies=2 from_alias=1"]
    assert briefly(expected["initsplit-two-b"]) == ["install /bin/true", "dummy numdummies=2"]
    # i40e has softdeps, so its install command is ignored; ifb's is not
    assert briefly(expected["i40e"]) == ["dummy numdummies=2", "i40e", "install /bin/true"]
    # r8169's softdep resolves to nothing: its command runs, after its dependencies
    assert briefly(expected["r8169"]) == ["libphy", "mdio_devres", "install /bin/true r8169"]
    assert briefly(expected[EXPLICIT["virtio_net"]])[-1] == \
        "install /bin/echo virtio-net $CMDLINE_OPTS"
    assert briefly(expected[EXPLICIT["r8169-id"]])[-1] == "e1000e InterruptThrottleRate=3000"
    assert briefly(expected["ext4"])[-2:] == ["dummy numdummies=2", "ext4"]
    assert briefly(expected["uhci-hcd"])[-2:] == ["ehci_hcd", "uhci_hcd"]
    assert briefly(expected["initsplit-pseudo"]) == ["install /bin/true pseudo"]
    assert briefly(expected["fs-debugfs"]) == ["builtin debugfs"]
    assert briefly(expected[EXPLICIT["snd_hda_intel"]])[-1] == "snd_hda_intel model=generic"


def test_kernel_cmdline_matches_modprobe(kernel: DebianKernel, confdirs: list[Path],
                                         keys: list[str], tmp_path: Path) -> None:
    """A given command line, against modprobe reading it as /proc/cmdline."""
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(FAKE_CMDLINE)
    # Every key that touches the command line's modules, plus a spread of the rest.
    touched = ("e1000e", "snd", "i40e", "dummy", "virtio", "ifb", "usb", "nvme", "initsplit")
    subset = [key for i, key in enumerate(keys) if i % 4 == 0 or any(t in key for t in touched)
              or key in EXPLICIT.values()]
    start = time.monotonic()
    expected = modprobe_lines(kernel, confdirs, subset, cmdline_file=cmdline)
    with Resolver(root=kernel.root, kver=kernel.kver, config_paths=confdirs,
                  kernel_cmdline=FAKE_CMDLINE) as resolver:
        nonempty, mismatches = compare(resolver, expected)
    report("modprobe --show-depends, given cmdline", len(subset), nonempty, mismatches,
           time.monotonic() - start)
    assert not mismatches
    assert briefly(expected["dummy"]) == ["dummy numdummies=2 numdummies=3"]
    assert briefly(expected["initsplit-test-alias"]) == [
        "dummy numdummies=2 from_alias=1 numdummies=3 via_cmdline=1"]
    # modprobe.blacklist= hides alias matches only, and its names are not normalised:
    # "snd-hda-intel" does not blacklist snd_hda_intel
    assert briefly(expected[EXPLICIT["e1000e"]]) == []
    assert briefly(expected[EXPLICIT["r8169-id"]]) == []
    assert briefly(expected[EXPLICIT["i40e"]]) == []
    assert briefly(expected["e1000e"])[-1] == "e1000e InterruptThrottleRate=3000"
    assert briefly(expected[EXPLICIT["snd_hda_intel"]])[-1] == "snd_hda_intel model=generic"
    # a bootloader-quoted word keeps its spaces; a parameter without '=' is kept as is
    assert briefly(expected[EXPLICIT["virtio_net"]])[-1] == \
        'install /bin/echo virtio-net $CMDLINE_OPTS napi_tx="1 x"'
    assert briefly(expected["ifb"]) == ["install /bin/true numifbs"]
    assert "snd_hda_codec power_save=1 power_save=0" in briefly(expected["snd-hda-intel"])


def test_running_kernel_semantics_match_modprobe_dry_run(
        kernel: DebianKernel, confdirs: list[Path], keys: list[str]) -> None:
    """ignore_loaded=False: what ``modprobe -n -v`` would insert, judged by /sys/module."""
    subset = keys[::3]
    start = time.monotonic()
    expected = modprobe_lines(kernel, confdirs, subset, mode="-n -v")
    with Resolver(root=kernel.root, kver=kernel.kver, config_paths=confdirs,
                  ignore_loaded=False) as resolver:
        nonempty, mismatches = compare(resolver, expected)
    report("modprobe -n -v", len(subset), nonempty, mismatches, time.monotonic() - start)
    assert not mismatches
    flat = [line for lines in expected.values() for line in lines]
    assert not any(line.startswith("builtin ") for line in flat)
    assert expected.get("fs-debugfs", []) == []


GHOST_CONF = """\
# modprobe.d aliases naming modules that have no file (in no modules.dep line),
# used as softdeps of a real module with dependencies
alias initsplit-ghost initsplit_ghost
alias initsplit-ghost-post initsplit_ghost_post
softdep virtio_blk pre: initsplit-ghost post: initsplit-ghost-post
"""


def test_module_without_a_file_is_no_requirement(kernel: DebianKernel, tmp_path: Path) -> None:
    """modprobe prints nothing for a module without a file (inserting it would fail
    with ENOENT, ignored for a softdep); no step may require it, or the daemon's
    scheduler would wait for a load that is never submitted."""
    conf = tmp_path / "modprobe.d"
    conf.mkdir()
    (conf / "ghost.conf").write_text(GHOST_CONF)
    keys = ["virtio_blk", "initsplit-ghost"]
    expected = modprobe_lines(kernel, [conf], keys)
    with Resolver(root=kernel.root, kver=kernel.kver, config_paths=[conf]) as resolver:
        nonempty, mismatches = compare(resolver, expected)
        steps = resolver.resolve("virtio_blk")
    assert not mismatches
    assert briefly(expected["virtio_blk"]) == ["virtio_ring", "virtio", "virtio_blk"]
    assert expected["initsplit-ghost"] == []
    assert [(s.name, s.requires) for s in steps] == [
        ("virtio_ring", ()), ("virtio", ("virtio_ring",)), ("virtio_blk", ("virtio_ring", "virtio"))]


def test_softdeps_order_the_load_but_are_not_required(kernel: DebianKernel) -> None:
    """libkmod stops a probe at a required module that fails (the match and its
    modules.dep dependencies) and goes on past a softdep that fails: ext4 needs jbd2,
    mbcache and crc16, but only loads after jbd2's softdep crc32c (crc32c_intel
    refuses a CPU without SSE4.2)."""
    with Resolver(root=kernel.root, kver=kernel.kver, config_paths=[]) as resolver:
        steps = {s.name: s for s in resolver.resolve("fs-ext4")}
    assert list(steps) == ["crc32c_intel", "crc32c_generic", "jbd2", "mbcache", "crc16", "ext4"]
    assert (steps["ext4"].requires, steps["ext4"].after) == (
        ("jbd2", "mbcache", "crc16"), ("crc32c_intel", "crc32c_generic"))
    assert (steps["jbd2"].requires, steps["jbd2"].after) == ((), ("crc32c_intel", "crc32c_generic"))
    assert (steps["crc32c_generic"].requires, steps["crc32c_generic"].after) == ((), ("crc32c_intel",))
