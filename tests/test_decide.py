"""split/decide.py on real Debian 6.1 modules: a module loads two-stage only where
the layout model says C and the init module's slab cost no more than the plain
load's core pages (on 6.1: nowhere), and never where C would keep
.data..ro_after_init writable (unless told to)."""

from __future__ import annotations

from pathlib import Path

import pytest

from initsplit.layout import layout_of
from initsplit.split.decide import decide, ro_after_init_bytes
from initsplit.split.policy import SplitOptions
from initsplit.elf import read_elf
from tests.testbed.kernel import debian_kernel

WIREGUARD = "kernel/drivers/net/wireguard/wireguard.ko"
ISO8859_2 = "kernel/fs/nls/nls_iso8859-2.ko"
DUMMY = "kernel/drivers/net/dummy.ko"
ALWAYS = SplitOptions(two_stage="always")


@pytest.fixture(scope="module")
def modules() -> Path:
    return debian_kernel().modules_dir


def test_ro_after_init_loads_plain_unless_allowed(modules: Path) -> None:
    data = (modules / WIREGUARD).read_bytes()
    # genl_family ops: written by the init, then read-only for the module's life.
    assert ro_after_init_bytes(read_elf(data)) == 168
    decision = decide(data)
    assert decision.outcome == "plain", decision.reason
    assert decision.reason == "two-stage would leave .data..ro_after_init writable (WritableRoAfterInit=no)"
    assert decision.detail == "168 bytes that a plain load makes read-only after init"
    allowed = decide(data, SplitOptions(two_stage="always", writable_ro_after_init=True))
    assert allowed.outcome == "split" and allowed.split is not None
    # The split would have renamed it: C holds no section of that name.
    core = read_elf(allowed.split.core)
    assert ro_after_init_bytes(core) == 0


def test_a_split_that_costs_pages_loads_plain(modules: Path) -> None:
    data = (modules / ISO8859_2).read_bytes()
    decision = decide(data)
    assert decision.outcome == "plain"
    assert (decision.split_core_pages, decision.plain_core_pages) == (5, 4)
    assert decision.reason == "two-stage would cost more than it frees (TwoStage=when-not-worse)"
    # The figures are the layout model's for the very bytes that would be loaded.
    assert layout_of(decision.split.core).core.pages == 5
    assert decide(data, SplitOptions(two_stage="always")).outcome == "split"


def test_the_slab_tips_a_split_that_breaks_even(modules: Path) -> None:
    data = (modules / DUMMY).read_bytes()
    # 4 core pages either way; the init module's slab (layout/twostage_slab.py) on top.
    default = decide(data)
    assert default.outcome == "plain" and (default.split_core_pages, default.plain_core_pages) == (4, 4)
    assert default.twostage_slab_bytes == 5288
    assert default.reason == "two-stage would cost more than it frees (TwoStage=when-not-worse)"
    assert default.detail == ("core layout 4 pages two-stage, 4 plain, "
                              "and 5288 bytes of slab for the init module")
    # Loaded plain without its BTF: the memory that does come back.
    assert default.rewritten is not None and default.btf_bytes == 1160
    saves = decide(data, SplitOptions(two_stage="when-it-saves"))
    assert saves.outcome == "plain" and saves.reason.startswith("two-stage would free less than a page")
    assert decide(data, ALWAYS).outcome == "split"


def test_refusals_and_nothing_come_before_the_policy(modules: Path) -> None:
    assert decide((modules / "kernel/lib/crc7.ko").read_bytes()).outcome == "nothing"
    refused = decide((modules / "kernel/drivers/pci/pci-stub.ko").read_bytes(),
                     SplitOptions(two_stage="always"))
    assert refused.outcome == "refused" and refused.reason == ".rodata points into init"


# ------------------------------------------------------------ Discard=btf

def test_btf_leaves_c_and_the_rewritten_original(modules: Path) -> None:
    from initsplit.elf.discard import sections, without_sections

    def btf_size(data: bytes) -> int:
        return next(s.size for s in sections(data) if s.name == ".BTF")

    split = decide((modules / DUMMY).read_bytes(), ALWAYS)
    assert split.outcome == "split" and split.discarded == ("btf",) and split.btf_bytes == 1160
    assert btf_size(split.split.core) == 0 and split.rewritten is None
    crc7 = (modules / "kernel/lib/crc7.ko").read_bytes()
    nothing = decide(crc7)
    assert nothing.outcome == "nothing" and nothing.discarded == ("btf",)
    assert nothing.rewritten == without_sections(crc7, {".BTF", ".BTF.base"})
    assert btf_size(nothing.rewritten) == 0 and nothing.btf_bytes > 0


def test_modules_with_btf_ids_or_named_keep_their_btf(modules: Path) -> None:
    conntrack = decide((modules / "kernel/net/netfilter/nf_conntrack.ko").read_bytes())
    assert conntrack.discarded == () and conntrack.btf_bytes == 0 and conntrack.rewritten is None
    data = (modules / DUMMY).read_bytes()
    for keep in (SplitOptions(two_stage="always", keep_btf=frozenset({"dummy"})),
                 SplitOptions(two_stage="always", discard=frozenset())):
        kept = decide(data, keep)
        assert kept.outcome == "split" and kept.discarded == () and kept.btf_bytes == 0
        assert kept.split.core == decide(data, SplitOptions(two_stage="always",
                                                            discard=frozenset())).split.core


def test_a_module_the_rewriter_cannot_handle_is_loaded_as_it_is(modules: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from initsplit.elf import MalformedElf
    from initsplit.split import decide as decide_module

    def refuse(data: bytes, names: object) -> bytes:
        raise MalformedElf("cannot rewrite")

    monkeypatch.setattr(decide_module, "without_sections", refuse)
    decision = decide((modules / "kernel/lib/crc7.ko").read_bytes())
    assert decision.outcome == "nothing" and decision.discarded == () and decision.rewritten is None
