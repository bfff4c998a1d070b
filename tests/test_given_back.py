"""tests/testbed/given_back.py, on journal entries the Reporter itself writes."""

from __future__ import annotations

from initsplit.daemon.journal import Reporter
from initsplit.loader.results import ModuleLoad
from tests.testbed.given_back import check_given_back

PROC_MODULES = "a 16384 0 - Live 0x0\nb 65536 0 - Live 0x0\n"


def journal(loads: list[ModuleLoad]) -> list[dict[str, str]]:
    entries: list[dict[str, str]] = []
    reporter = Reporter(sink=entries.append)
    for load in loads:
        reporter.module_loaded(load)
    reporter.summary(loads=loads, batches=[], elapsed=1.0)
    return entries


LOADS = [ModuleLoad("a", "two-stage", init_module="a__init", core_bytes=16384, init_bytes=8192,
                    plain_core_bytes=20480, btf_bytes=9000, twostage_slab_bytes=5288),
         ModuleLoad("b", "plain", core_bytes=65536, btf_bytes=41488)]


def test_a_journal_the_kernel_agrees_with() -> None:
    result = check_given_back(journal(LOADS), proc_modules=PROC_MODULES, btf_listing="vmlinux\n",
                              daemons=1)
    assert not result.problems, result.problems
    assert result.total == result.per_module == 9000 + 41488 + 4096 - 5288
    assert result.core_confirmed == ["a", "b"] and result.btf_confirmed == ["a", "b"]


def test_what_the_kernel_contradicts() -> None:
    result = check_given_back(journal(LOADS), proc_modules=PROC_MODULES.replace("65536", "69632"),
                              btf_listing="vmlinux b", daemons=2)
    assert result.problems == ["1 summaries in the journal, not 2",
                               "b: core 65536 bytes in the journal, 69632 in /proc/modules",
                               "b: its BTF was given back, but /sys/kernel/btf/b exists"]


def test_a_summary_that_does_not_add_up() -> None:
    entries = journal(LOADS)
    entries[0] = dict(entries[0], INITSPLIT_TWOSTAGE_SLAB_BYTES="1")
    result = check_given_back(entries, proc_modules=PROC_MODULES, btf_listing="vmlinux", daemons=1)
    assert result.problems == [f"the modules' entries add up to {result.total + 5287} bytes given "
                               f"back, the summaries to {result.total}"]
