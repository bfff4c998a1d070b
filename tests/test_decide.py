"""split/decide.py on real Debian 6.1 modules: a module loads two-stage only where
the layout model says C costs no more core pages than the plain load, and never
where C would keep .data..ro_after_init writable (unless told to)."""

from __future__ import annotations

from pathlib import Path

import pytest

from initsplit.layout import layout_of
from initsplit.split.decide import decide, ro_after_init_bytes
from initsplit.split.policy import SplitOptions
from initsplit.elf import read_elf
from tests.testbed.kernel import debian_kernel

WIREGUARD = "kernel/drivers/net/wireguard/wireguard.ko"
CP857 = "kernel/fs/nls/nls_cp857.ko"
DUMMY = "kernel/drivers/net/dummy.ko"


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
    allowed = decide(data, SplitOptions(writable_ro_after_init=True))
    assert allowed.outcome == "split" and allowed.split is not None
    # The split would have renamed it: C holds no section of that name.
    core = read_elf(allowed.split.core)
    assert ro_after_init_bytes(core) == 0


def test_a_split_that_costs_pages_loads_plain(modules: Path) -> None:
    data = (modules / CP857).read_bytes()
    decision = decide(data)
    assert decision.outcome == "plain"
    assert (decision.split_core_pages, decision.plain_core_pages) == (5, 4)
    assert decision.reason == "two-stage would take more core pages (TwoStage=when-not-worse)"
    # The figures are the layout model's for the very bytes that would be loaded.
    assert layout_of(decision.split.core).core.pages == 5
    assert decide(data, SplitOptions(two_stage="always")).outcome == "split"


def test_policies_on_a_split_that_breaks_even(modules: Path) -> None:
    data = (modules / DUMMY).read_bytes()
    assert decide(data).outcome == "split"  # 4 pages either way: not worse
    saves = decide(data, SplitOptions(two_stage="when-it-saves"))
    assert saves.outcome == "plain" and (saves.split_core_pages, saves.plain_core_pages) == (4, 4)
    assert decide(data, SplitOptions(two_stage="always")).outcome == "split"


def test_refusals_and_nothing_come_before_the_policy(modules: Path) -> None:
    assert decide((modules / "kernel/lib/crc7.ko").read_bytes()).outcome == "nothing"
    refused = decide((modules / "kernel/drivers/pci/pci-stub.ko").read_bytes(),
                     SplitOptions(two_stage="always"))
    assert refused.outcome == "refused" and refused.reason == ".rodata points into init"
