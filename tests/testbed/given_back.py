"""What initsplitd's journal says it gave back for good, held against the kernel.

Used by `make demo` (demo/boot_demo.py) and tests/test_boot_integration.py on a
booted system's journal (journalctl -o json), /proc/modules and the listing of
/sys/kernel/btf, read once both daemons are done.

The summary's total (INITSPLIT_TOTAL_GIVEN_BACK_BYTES) must be the sum of the
modules' own entries: BTF and data symbols' names given back, plus for two-stage
loads the core layout won less the slab the init module costs. The kernel shows
the parts it can: each module's core size (/proc/modules, byte for byte) and,
for each module whose BTF was dropped, no /sys/kernel/btf entry. The bytes a
module's BTF would have kept are the retention model's (layout/btf.py), which
tests/test_btf_vm.py checks against the kernel's slab counters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from initsplit.daemon.journal import (
    MESSAGE_ID_LOADED_PLAIN,
    MESSAGE_ID_LOADED_TWO_STAGE,
    MESSAGE_ID_SUMMARY,
    SYSLOG_IDENTIFIER,
)
from initsplit.loader.kernel_state import parse_proc_modules


@dataclass
class GivenBack:
    """The journal's figures and what the kernel made of them."""

    # Sum of the summaries' INITSPLIT_TOTAL_GIVEN_BACK_BYTES.
    total: int = 0
    # Of which BTF (INITSPLIT_TOTAL_BTF_BYTES).
    btf: int = 0
    # The same total, added up from the modules' load entries.
    per_module: int = 0
    summaries: int = 0
    # Modules still loaded whose journal core size /proc/modules shows.
    core_confirmed: list[str] = field(default_factory=list)
    # Modules whose BTF was given back and which /sys/kernel/btf does not list.
    btf_confirmed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _int(entry: Mapping[str, str], key: str) -> int:
    return int(entry.get(key) or 0)


def entry_given_back(entry: Mapping[str, str]) -> int:
    """What one load entry says it gave back for good (journal.Reporter.summary's sum)."""
    given = _int(entry, "INITSPLIT_BTF_BYTES") + _int(entry, "INITSPLIT_KALLSYMS_BYTES")
    if entry.get("INITSPLIT_MODE") == "two-stage":
        given += (_int(entry, "INITSPLIT_PLAIN_CORE_BYTES") - _int(entry, "INITSPLIT_CORE_BYTES")
                  - _int(entry, "INITSPLIT_TWOSTAGE_SLAB_BYTES"))
    return given


def check_given_back(journal: Iterable[Mapping[str, str]], *, proc_modules: str, btf_listing: str,
                     daemons: int) -> GivenBack:
    """The figures of *daemons* initsplitd runs in *journal*, checked as the module
    docstring says; GivenBack.problems lists what does not hold."""
    entries = [e for e in journal if e.get("SYSLOG_IDENTIFIER") == SYSLOG_IDENTIFIER]
    summaries = [e for e in entries if e.get("MESSAGE_ID") == MESSAGE_ID_SUMMARY]
    loads = [e for e in entries if e.get("MESSAGE_ID") in (MESSAGE_ID_LOADED_TWO_STAGE,
                                                            MESSAGE_ID_LOADED_PLAIN)]
    sizes = parse_proc_modules(proc_modules)
    btf_files = set(btf_listing.split())
    result = GivenBack(total=sum(_int(e, "INITSPLIT_TOTAL_GIVEN_BACK_BYTES") for e in summaries),
                       btf=sum(_int(e, "INITSPLIT_TOTAL_BTF_BYTES") for e in summaries),
                       per_module=sum(entry_given_back(e) for e in loads), summaries=len(summaries))
    if len(summaries) != daemons:
        result.problems.append(f"{len(summaries)} summaries in the journal, not {daemons}")
    if result.per_module != result.total:
        result.problems.append(f"the modules' entries add up to {result.per_module} bytes given "
                               f"back, the summaries to {result.total}")
    if "vmlinux" not in btf_files:
        result.problems.append(f"/sys/kernel/btf lists no vmlinux: {btf_listing!r}")
    for e in loads:
        module = e["INITSPLIT_MODULE"]
        if module not in sizes:
            continue  # unloaded since (a device went away): nothing to hold it against
        if _int(e, "INITSPLIT_CORE_BYTES") == sizes[module]:
            result.core_confirmed.append(module)
        else:
            result.problems.append(f"{module}: core {e.get('INITSPLIT_CORE_BYTES')} bytes in the "
                                   f"journal, {sizes[module]} in /proc/modules")
        if _int(e, "INITSPLIT_BTF_BYTES"):
            if module in btf_files:
                result.problems.append(f"{module}: its BTF was given back, but /sys/kernel/btf/{module} exists")
            else:
                result.btf_confirmed.append(module)
    return result
