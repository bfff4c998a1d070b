"""`initsplit analyze`: the kernel's module layout model, and the command's output.

The expected sizes of real Debian modules below were read from the Debian 6.1
kernel in QEMU (tests/test_savings_vm.py): /proc/modules and
/sys/module/NAME/coresize for the core layouts, a kprobe on module_alloc() for
the init layouts. A synthetic module checks each layout rule on its own.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from xml.etree import ElementTree

import pytest

from initsplit import cli
from initsplit.analyze import analyze_module, histogram, render_svg
from initsplit.split.policy import SplitOptions
from initsplit.layout import CORE_GROUPS, INIT_GROUPS, LayoutRules, layout_of, rules_for_tree
from initsplit.elf import ObjectBuilder
from initsplit.elf.constants import (
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHF_WRITE,
    SHN_UNDEF,
    SHT_NOBITS,
    SHT_PROGBITS,
    STB_GLOBAL,
    STB_LOCAL,
    STT_FUNC,
    STT_NOTYPE,
    STT_OBJECT,
)
from initsplit.split import split_module
from tests.testbed.kernel import debian_kernel

REPO = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"
PAGE = 4096

# Measured in QEMU on Debian 6.1.0-56-amd64 (6.1.192), C and I again in the
# one-anchor format (tests/test_savings_vm.py loads these modules):
# module -> (plain core, plain init), (C core, C init), (I core, I init), in bytes.
MEASURED = {
    "kernel/drivers/net/dummy.ko": ((16384, 12288), (16384, 4096), (16384, 12288)),
    "kernel/fs/jbd2/jbd2.ko": ((167936, 57344), (167936, 53248), (16384, 12288)),
    "kernel/drivers/gpu/drm/drm.ko": ((618496, 188416), (618496, 188416), (16384, 16384)),
    "kernel/fs/nls/nls_cp857.ko": ((16384, 12288), (16384, 4096), (16384, 12288)),
    "kernel/fs/nls/nls_iso8859-2.ko": ((16384, 12288), (20480, 4096), (16384, 12288)),
    "kernel/drivers/net/phy/libphy.ko": ((180224, 90112), (180224, 86016), (16384, 12288)),
    "kernel/fs/configfs/configfs.ko": ((57344, 24576), (57344, 16384), (16384, 12288)),
    "kernel/drivers/md/raid1.ko": ((53248, 20480), (53248, 12288), (16384, 12288)),
    "kernel/drivers/scsi/scsi_common.ko": ((16384, 4096), None, None),  # nothing to split
}


@pytest.fixture(scope="module")
def modules_dir() -> Path:
    return debian_kernel().modules_dir


@pytest.fixture(scope="module")
def rules(modules_dir: Path) -> LayoutRules:
    return rules_for_tree(modules_dir)


# ------------------------------------------------------------- the rules

def test_rules_read_from_the_debian_config(modules_dir: Path, rules: LayoutRules) -> None:
    config = modules_dir.parent.parent.parent / "boot" / f"config-{modules_dir.name}"
    assert Path(rules.config).resolve() == config.resolve()
    assert (rules.strict_module_rwx, rules.kallsyms, rules.kallsyms_all, rules.module_unload) == (
        True, True, True, True)
    assert rules.kernel == modules_dir.name
    # A file or subdirectory of the tree finds the same configuration.
    assert rules_for_tree(modules_dir / "kernel/drivers/net/dummy.ko") == rules
    assert rules_for_tree(modules_dir / "kernel/fs") == rules
    text = "\n".join(rules.describe())
    assert "CONFIG_STRICT_MODULE_RWX=y" in text and "CONFIG_KALLSYMS_ALL=y" in text
    assert ".modinfo, __versions" in text and rules.config in text


def test_rules_default_without_a_config(tmp_path: Path) -> None:
    rules = rules_for_tree(tmp_path)
    assert rules.config == "" and rules.strict_module_rwx and rules.kallsyms_all
    assert "defaults assumed" in rules.describe()[-1]
    assert rules_for_tree(None) == LayoutRules()


def test_rules_follow_the_config(tmp_path: Path) -> None:
    root = tmp_path / "lib/modules/9.9.9"
    root.mkdir(parents=True)
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot/config-9.9.9").write_text(
        "CONFIG_KALLSYMS=y\n# CONFIG_KALLSYMS_ALL is not set\nCONFIG_MODULE_UNLOAD=y\n")
    rules = rules_for_tree(root)
    assert rules.kernel == "9.9.9" and rules.config == str(tmp_path / "boot/config-9.9.9")
    assert not rules.strict_module_rwx and rules.kallsyms and not rules.kallsyms_all


# ------------------------------------------------- real modules, measured

@pytest.mark.parametrize("relative", sorted(MEASURED))
def test_layouts_match_the_kernel(modules_dir: Path, rules: LayoutRules, relative: str) -> None:
    plain_sizes, core_sizes, init_sizes = MEASURED[relative]
    data = (modules_dir / relative).read_bytes()
    plain = layout_of(data, rules)
    assert (plain.core.size, plain.init.size) == plain_sizes
    if core_sizes is None:
        return
    split = split_module(data)
    core, init = layout_of(split.core, rules), layout_of(split.init, rules)
    assert (core.core.size, core.init.size) == core_sizes
    assert (init.core.size, init.init.size) == init_sizes


def test_groups_are_whole_pages_in_layout_order(modules_dir: Path, rules: LayoutRules) -> None:
    layout = layout_of((modules_dir / "kernel/fs/jbd2/jbd2.ko").read_bytes(), rules)
    assert [name for name, _ in layout.core.groups] == list(CORE_GROUPS)
    assert [name for name, _ in layout.init.groups] == list(INIT_GROUPS)
    assert dict(layout.core.groups) == {"text": 61440, "rodata": 36864, "ro_after_init": 4096,
                                        "data": 20480, "kallsyms": 45056}
    assert all(size % PAGE == 0 for _, size in layout.core.groups + layout.init.groups)
    assert layout.core.pages == 41 and layout.init.pages == 14
    # The raw bytes: 116,186 outside init, 549 of .init*, as size(1) would sum them.
    assert (layout.core_bytes, layout.init_bytes) == (116186, 549)


def test_the_core_module_keeps_the_original_kallsyms(modules_dir: Path, rules: LayoutRules) -> None:
    """C keeps the symbols of its rebuilt export tables (__ksymtab_NAME, __crc_NAME),
    so its kallsyms group is the original's: jbd2 gains and loses nothing there (an
    earlier splitter dropped them and seemed to "save" 2 pages)."""
    data = (modules_dir / "kernel/fs/jbd2/jbd2.ko").read_bytes()
    plain = layout_of(data, rules).core
    core = layout_of(split_module(data).core, rules).core
    saved = {g: (plain.group(g) - core.group(g)) // PAGE for g in CORE_GROUPS}
    assert saved == {"text": 0, "rodata": 0, "ro_after_init": 0, "data": 0, "kallsyms": 0}


def test_init_resident_merges_init_into_the_core_groups(modules_dir: Path, rules: LayoutRules) -> None:
    data = (modules_dir / "kernel/fs/configfs/configfs.ko").read_bytes()
    plain = layout_of(data, rules)
    resident = layout_of(data, rules, init_resident=True)
    assert resident.init_bytes == 0
    assert resident.core_bytes == plain.core_bytes + plain.init_bytes
    assert resident.init.groups == (("text", 0), ("rodata", 0), ("data", 0), ("kallsyms", 16384))
    assert resident.core.size == 61440  # one page more than the 57344 the kernel keeps


def test_analyze_module_savings(modules_dir: Path, rules: LayoutRules) -> None:
    always = SplitOptions(two_stage="always")
    jbd2 = analyze_module(modules_dir / "kernel/fs/jbd2/jbd2.ko", "kernel/fs/jbd2/jbd2.ko", rules,
                          always)
    assert jbd2.outcome == "split" and jbd2.name == "jbd2" and jbd2.init_name == "jbd2__init"
    assert (jbd2.saving_today, jbd2.saving_resident, jbd2.saving_flat_2002) == (0, 0, 0)
    # By default the init module's slab tips it: plain, and nothing saved by two-stage.
    default = analyze_module(modules_dir / "kernel/fs/jbd2/jbd2.ko", "jbd2.ko", rules)
    assert default.outcome == "plain" and default.twostage_slab == jbd2.twostage_slab > 4096
    assert default.saving_today == 0 and default.saving_if_split == 0
    # C's anchor pushes .rodata over a page boundary: by default it loads plain.
    iso8859_2 = analyze_module(modules_dir / "kernel/fs/nls/nls_iso8859-2.ko", "nls_iso8859-2.ko", rules)
    assert iso8859_2.outcome == "plain" and "TwoStage=when-not-worse" in iso8859_2.reason, iso8859_2
    assert iso8859_2.detail.startswith("core layout 5 pages two-stage, 4 plain, and ")
    assert iso8859_2.saving_today == 0 and iso8859_2.saving_if_split == -1
    forced = analyze_module(modules_dir / "kernel/fs/nls/nls_iso8859-2.ko", "nls_iso8859-2.ko", rules,
                            SplitOptions(two_stage="always"))
    assert forced.outcome == "split" and forced.saving_today == -1
    common = analyze_module(modules_dir / "kernel/drivers/scsi/scsi_common.ko", "x.ko", rules)
    assert common.outcome == "nothing" and common.saving_today == 0 and common.after_core.pages == 4
    assert json.loads(json.dumps(jbd2.as_dict()))["saving_pages"]["today"] == 0


def test_analyze_module_reports_bad_input(tmp_path: Path, rules: LayoutRules) -> None:
    bad = tmp_path / "bad.ko"
    bad.write_bytes(b"\x7fELF not really")
    result = analyze_module(bad, "bad.ko", rules)
    assert result.outcome == "error" and "MalformedElf" in result.reason
    assert result.saving_today == 0 and result.as_dict()["outcome"] == "error"


# ------------------------------------------------------ synthetic module

def synthetic_module() -> bytes:
    """One section per layout rule, with symbols of every kind."""
    b = ObjectBuilder()
    rw = SHF_ALLOC | SHF_WRITE
    text = b.add_section(".text", type=SHT_PROGBITS, flags=SHF_ALLOC | SHF_EXECINSTR,
                         data=bytes(100), addralign=16)
    init_text = b.add_section(".init.text", type=SHT_PROGBITS, flags=SHF_ALLOC | SHF_EXECINSTR,
                              data=bytes(50), addralign=16)
    rodata = b.add_section(".rodata", type=SHT_PROGBITS, flags=SHF_ALLOC, data=bytes(5000),
                           addralign=32)
    b.add_section("__jump_table", type=SHT_PROGBITS, flags=rw, data=bytes(32), addralign=8)
    b.add_section(".data..ro_after_init", type=SHT_PROGBITS, flags=rw, data=bytes(8), addralign=8)
    data = b.add_section(".data", type=SHT_PROGBITS, flags=rw, data=bytes(10), addralign=8)
    b.add_section(".bss", type=SHT_NOBITS, flags=rw, size=5000, addralign=32)
    modinfo = b.add_section(".modinfo", type=SHT_PROGBITS, flags=SHF_ALLOC,
                            data=b"name=synthetic\0", addralign=1)
    b.add_section("__versions", type=SHT_PROGBITS, flags=SHF_ALLOC, data=bytes(64), addralign=8)
    percpu = b.add_section(".data..percpu", type=SHT_PROGBITS, flags=rw, data=bytes(8), addralign=8)
    b.add_section(".init.data", type=SHT_PROGBITS, flags=rw, data=bytes(20), addralign=8)
    b.add_section(".gnu.linkonce.this_module", type=SHT_PROGBITS, flags=rw, data=bytes(896),
                  addralign=64)
    for name, shndx, kind in (("t", text, STT_FUNC), ("i", init_text, STT_FUNC),
                              ("r", rodata, STT_OBJECT), ("d", data, STT_OBJECT),
                              ("p", percpu, STT_OBJECT), ("m", modinfo, STT_OBJECT)):
        b.add_symbol(name, bind=STB_LOCAL, type=kind, shndx=shndx)
    b.section_symbol(text)  # no name: never a core symbol
    b.add_symbol("printk", bind=STB_GLOBAL, type=STT_NOTYPE, shndx=SHN_UNDEF)
    return b.build()


def _symtab_sizes(blob: bytes) -> tuple[int, int]:
    from initsplit.elf import read_elf

    obj = read_elf(blob)
    symtab = obj.sections[obj.symtab_index]
    return symtab.size, obj.sections[symtab.link].size


def test_synthetic_module_strict_rwx() -> None:
    blob = synthetic_module()
    layout = layout_of(blob, LayoutRules())
    # text: .text; rodata: .rodata (4096 + 5000 bytes, so two pages); ro_after_init:
    # __jump_table and .data..ro_after_init; data: .data, .bss, struct module.
    # .modinfo, __versions and .data..percpu are not in either layout.
    assert dict(layout.core.groups) == {"text": 4096, "rodata": 8192, "ro_after_init": 4096,
                                        "data": 8192, "kallsyms": 4096}
    assert layout.core_bytes == 100 + 5000 + 32 + 8 + 10 + 5000 + 896
    assert layout.init_bytes == 50 + 20
    symtab, strtab = _symtab_sizes(blob)
    nsrc = symtab // 24
    tail = ((4096 * 2 + symtab + strtab + 7) // 8 * 8 + 32 + nsrc)
    assert dict(layout.init.groups) == {"text": 4096, "rodata": 0, "data": 4096,
                                        "kallsyms": -(-tail // PAGE) * PAGE - 8192}
    # The 2002 rule: one run of sections with their own alignment only.
    assert layout.flat_core < layout.flat_all <= layout.flat_core + 50 + 20 + 16 + 8


def test_synthetic_module_without_strict_rwx() -> None:
    blob = synthetic_module()
    layout = layout_of(blob, LayoutRules(strict_module_rwx=False, kallsyms_all=True))
    core = dict(layout.core.groups)
    assert core["text"] == 100
    assert core["text"] + core["rodata"] == 128 + 5000  # .rodata aligned to 32
    # Core symbols: the null symbol, t, r, d and the per-cpu p (KALLSYMS_ALL);
    # not i (init), m (.modinfo is not loaded), printk (undefined) or the section symbol.
    assert core["kallsyms"] == 5 * 24 + (1 + 4 * 2) + 5 + (-sum(
        v for k, v in core.items() if k != "kallsyms") % 8)
    fewer = layout_of(blob, LayoutRules(strict_module_rwx=False, kallsyms_all=False))
    # Without KALLSYMS_ALL only code symbols stay: the null symbol and t.
    assert dict(fewer.core.groups)["kallsyms"] - core["kallsyms"] == (2 * 24 + 3 + 2) - (5 * 24 + 9 + 5)


def test_synthetic_module_without_kallsyms() -> None:
    layout = layout_of(synthetic_module(), LayoutRules(kallsyms=False))
    assert layout.core.group("kallsyms") == 0 and layout.init.group("kallsyms") == 0
    assert layout.core.size == 4096 * 6 and layout.init.size == 4096 * 2


def test_histogram_bins() -> None:
    assert histogram([0, 511, 512, 4095, 4096, 4097 + 1024, 8191]) == [3, 1, 1, 0, 0, 0, 0, 2]
    assert histogram([], bin_size=1024) == [0, 0, 0, 0]


# ------------------------------------------------------------------ CLI

TREE_MODULES = {
    "kernel/drivers/net/dummy.ko": "split",
    "kernel/fs/jbd2/jbd2.ko": "split",
    "kernel/fs/nls/nls_iso8859-2.ko": "split",
    "kernel/fs/configfs/configfs.ko": "split",
    "kernel/drivers/scsi/scsi_common.ko": "nothing",
    "kernel/drivers/pci/pci-stub.ko": "refused",
}


@pytest.fixture(scope="module")
def small_tree(modules_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree laid out like an extracted Debian package, config beside it."""
    base = tmp_path_factory.mktemp("pkg")
    root = base / "lib/modules" / modules_dir.name
    for relative in TREE_MODULES:
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(modules_dir / relative, target)
    (base / "boot").mkdir()
    config = f"config-{modules_dir.name}"
    shutil.copyfile(modules_dir.parent.parent.parent / "boot" / config, base / "boot" / config)
    return root


def test_cli_text(small_tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["analyze", str(small_tree), "-j", "1"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "layout rules applied:" in out and "CONFIG_STRICT_MODULE_RWX=y" in out
    assert f"kernel configuration: {small_tree.parent.parent.parent}/boot/config-" in out
    assert "modules: 6; with init sections: 5; non-init size above one page (4096 bytes): 3" in out
    assert ("splitter: two-stage 0, plain by policy 4, nothing to split 1, refused 1, invalid 0, "
            "errors 0 (TwoStage=when-not-worse, WritableRoAfterInit=no)") in out
    assert "  plain       4  two-stage would cost more than it frees (TwoStage=when-not-worse)" in out
    bins = [line for line in out.splitlines() if line.startswith("  0") or line.startswith("  1")
            or line.startswith("  2") or line.startswith("  3")]
    assert len(bins) == 8 and bins[0].startswith("  0000...0511")
    # dummy 0, jbd2 0, configfs 0, nls_iso8859_2 -1 (its anchor pushes .rodata over a page),
    # and each init module's slab on top: by default all four load plain.
    assert "(b) against today's kernel" in out
    assert "0 pages = 0 bytes over 0 split modules (0 save pages, 0 need more)" in out
    assert ("every module that splits loaded two-stage (TwoStage=always): -1 pages over 4 "
            "modules (0 save pages, 1 need more)") in out
    slab = re.search(r"and the slab it would take \(layout/twostage_slab.py\): ([\d,]+) bytes; with the "
                     r"core pages, two-stage would give back (-[\d,]+) bytes net \(0 modules free more "
                     r"than they take\)", out)
    assert slab, out
    assert int(slab.group(2).replace(",", "")) == -int(slab.group(1).replace(",", "")) - PAGE
    assert "(a) against init kept resident" in out
    assert "dummy" not in out  # no per-module table unless asked


def test_cli_per_module(small_tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["analyze", str(small_tree), "--per-module", "-j", "2"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in ("jbd2", "pci_stub", "nls_iso8859_2")}
    assert rows["jbd2"][1] == "plain" and rows["jbd2"][-1] == "0"
    assert rows["nls_iso8859_2"][1] == "plain" and rows["nls_iso8859_2"][-1] == "0"
    assert rows["pci_stub"][1] == "refused"
    assert cli.main(["analyze", str(small_tree), "--per-module", "--two-stage", "always"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in ("jbd2", "nls_iso8859_2")}
    assert rows["jbd2"][1:] == ["split", "116186", "549", "41", "14", "41", "4", "0", "0"]
    assert rows["nls_iso8859_2"][1] == "split" and rows["nls_iso8859_2"][-1] == "-1"


def test_cli_json(small_tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["analyze", str(small_tree), "--json"]) == cli.EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["modules"] == 6 and doc["kernel"] == small_tree.name
    assert doc["outcomes"] == {"split": 0, "plain": 4, "nothing": 1, "refused": 1, "invalid": 0,
                               "error": 0}
    assert doc["options"] == {"two_stage": "when-not-worse", "writable_ro_after_init": False,
                              "discard": ["btf"], "keep_btf": []}
    btf = doc["savings"]["btf"]
    # Every module of the small tree has BTF, none BTF ids: all of it is given back.
    assert btf["modules_dropped"] == 6 and btf["modules_kept"] == 0
    assert btf["given_back_bytes"] == btf["cost_bytes"] == sum(
        m["btf_bytes"]["cost"] for m in doc["per_module"]) > 0
    assert doc["rules"]["strict_module_rwx"] and doc["rules"]["applied"]
    per = {m["name"]: m for m in doc["per_module"]}
    assert per["jbd2"]["plain_core"]["size"] == 167936
    assert per["jbd2"]["split_core"]["size"] == 167936
    assert per["jbd2"]["init_module_core"]["size"] == 16384
    today = doc["savings"]["today"]
    assert today["pages"] == sum(m["saving_pages"]["today"] for m in doc["per_module"]) == 0
    assert today["bytes"] == 0 and today["modules_costing"] == 0
    assert sum(g["saving"] for g in today["by_group"].values()) == 0
    assert per["nls_iso8859_2"]["saving_pages"]["if_split"] == -1
    assert per["nls_iso8859_2"]["detail"].startswith("core layout 5 pages two-stage, 4 plain, and ")
    slab = doc["savings"]["twostage_slab"]
    assert slab["modules"] == 4 and slab["modules_freeing_more"] == 0
    assert slab["bytes"] == sum(m["twostage_slab_bytes"] for m in doc["per_module"]
                                if "twostage_slab_bytes" in m) > 4 * PAGE
    every = doc["savings"]["every_split"]
    assert (every["pages"], every["modules"], every["modules_costing"]) == (-1, 4, 1)
    assert doc["histogram"]["over_one_page"] == [
        sum(1 for m in doc["per_module"] if m["non_init_bytes"] > PAGE
            and m["non_init_bytes"] % PAGE // 512 == n) for n in range(8)]
    assert sum(doc["histogram"]["all"]) == 6


def _svg_bars(svg: str) -> tuple[list[float], list[str], list[str]]:
    """(bar heights, count labels, bin labels) of a plot, in bin order."""
    root = ElementTree.fromstring(svg)
    ns = {"svg": "http://www.w3.org/2000/svg"}
    bars = [r for r in root.iterfind(".//svg:rect", ns) if r.get("class") == "bar"]
    texts = list(root.iterfind(".//svg:text", ns))
    return ([float(b.get("height")) for b in bars],
            [t.text for t in texts if t.get("class") == "count"],
            [t.text for t in texts if t.get("class") == "bin"])


def _assert_bars_show(svg: str, counts: list[int], bin_bytes: int) -> None:
    heights, count_labels, bin_labels = _svg_bars(svg)
    assert len(heights) == len(counts)  # one bar per bin, empty bins too
    assert count_labels == [str(c) for c in counts]
    assert bin_labels == [f"{n * bin_bytes}-{(n + 1) * bin_bytes - 1}" for n in range(len(counts))]
    peak = max(counts)
    unit = max(heights) / peak
    for height, count in zip(heights, counts):
        assert height == pytest.approx(count * unit, abs=0.01)  # proportional, 2-decimal output


def test_render_svg_figures() -> None:
    counts = [3, 0, 17, 8, 1, 40, 0, 12]
    summary = {"histogram": {"bin_bytes": 512, "over_one_page": counts},
               "savings": {"init_resident": {"pages": 123}, "today": {"pages": -4}},
               "rules": {"page_size": 4096}, "over_one_page": sum(counts), "modules": 99}
    svg = render_svg(summary)
    _assert_bars_show(svg, counts, 512)
    root = ElementTree.fromstring(svg)
    text = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    assert "123 pages" in text and "-4 pages" in text and "(99 modules)" in text
    assert f"({sum(counts)} modules above one page)" in text


def test_cli_plot(small_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    svg = tmp_path / "hist.svg"
    assert cli.main(["analyze", str(small_tree), "--json", "--plot", str(svg)]) == cli.EXIT_OK
    hist = json.loads(capsys.readouterr().out)["histogram"]
    counts = hist["over_one_page"]
    heights, labels, _ = _svg_bars(svg.read_text())
    assert labels == [str(c) for c in counts]
    if max(counts):
        _assert_bars_show(svg.read_text(), counts, hist["bin_bytes"])
    else:
        assert heights == [0.0] * len(counts)


@pytest.mark.parametrize("name", ["hist.png", "hist", "hist.svg.gz"])
def test_cli_plot_wants_svg(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # argparse's usage error (main() returns its exit code), before any module is read.
    assert cli.main(["analyze", str(tmp_path), "--plot", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert "argument --plot" in err and "name a .svg file" in err
    assert not (tmp_path / name).exists()


def test_cli_missing_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["analyze", str(tmp_path / "nowhere")]) == cli.EXIT_USAGE
    assert "no such file or directory" in capsys.readouterr().err
    assert cli.main(["analyze", str(tmp_path)]) == cli.EXIT_USAGE  # no .ko in it


def test_cli_error_module_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "broken.ko").write_bytes(b"\x7fELF\x02\x01\x01" + bytes(100))
    assert cli.main(["analyze", str(tmp_path)]) == cli.EXIT_FAILED
    captured = capsys.readouterr()
    assert "error: broken.ko" in captured.err and "errors 1" in captured.out


def test_cli_as_a_program(small_tree: Path) -> None:
    done = subprocess.run([PYTHON, "-m", "initsplit", "analyze", str(small_tree / "kernel/fs"),
                           "--json"], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO / "daemon"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert {m["name"] for m in doc["per_module"]} == {"jbd2", "nls_iso8859_2", "configfs"}
    assert doc["rules"]["config"]  # found from a subdirectory of the tree


def test_loaded_modules_are_found_in_the_tree(small_tree: Path, tmp_path: Path) -> None:
    from initsplit.analyze import loaded_jobs
    from initsplit.tree import find_modules

    proc = tmp_path / "modules"
    proc.write_text("jbd2 167936 1 ext4, Live 0x0000000000000000\n"
                    "dummy__init 16384 0 - Live 0x0000000000000000\n"
                    "nls_iso8859_2 16384 0 - Live 0x0000000000000000\n"
                    "e1000 163840 0 - Live 0x0000000000000000\n")
    jobs, missing = loaded_jobs(find_modules([small_tree]), proc_modules=proc)
    assert sorted(j.source.name for j in jobs) == ["jbd2.ko", "nls_iso8859-2.ko"]
    assert missing == ["e1000"]  # not in this tree; an init module is not counted
