"""What a load or an unload did, as the daemon reports it (journal, status)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

UnloadTrigger = Literal["quiet", "batch-size", "stop", "recovery"]
LoadMode = Literal["two-stage", "plain", "builtin", "already-loaded", "failed", "handed-to-modprobe"]


@dataclass(frozen=True, slots=True)
class ModuleLoad:
    """One module the daemon was asked to load (dependencies are loads of their own)."""

    module: str
    mode: LoadMode
    # Why the module was loaded plain, or the error text when it failed; "" otherwise.
    reason: str = ""
    init_module: str | None = None
    # Sizes as /proc/modules reports them (the kernel's page-rounded layouts).
    core_bytes: int | None = None
    init_bytes: int | None = None
    # Pages of the init module's own layouts, from its section headers with the
    # kernel's rounding; they go back to the kernel when the init module is deleted.
    init_pages: int | None = None
    # What the original's core layout would have taken loaded plain (section headers,
    # kernel rounding; checked against /proc/modules by tests/test_savings_vm.py):
    # core_bytes minus this is what the two-stage load saves for the module's life.
    plain_core_bytes: int | None = None
    seconds: float = 0.0
    errno: int | None = None
    # The load failed and left the inert core module in the kernel (it could not be
    # deleted): its crash marker must stay so that a later recovery removes it.
    core_left: bool = False
    # Unreclaimable slab the kernel would have kept for the module's BTF, which the
    # loaded module (C, or the rewritten original) did not have (layout/btf.py).
    btf_bytes: int | None = None
    # Core layout bytes the data symbols' kallsyms would have taken in a plain load
    # (Discard=kallsyms-data; layout/linux61.py).
    kallsyms_bytes: int | None = None
    # Two-stage only: the unreclaimable slab the load takes more than a plain one
    # (layout/twostage_slab.py), counted against what it saves.
    twostage_slab_bytes: int | None = None

    @property
    def saved_bytes(self) -> int | None:
        if self.core_bytes is None or self.plain_core_bytes is None:
            return None
        return self.plain_core_bytes - self.core_bytes


@dataclass(frozen=True, slots=True)
class UnloadBatch:
    """One batch of init-module deletions."""

    deleted: tuple[str, ...]
    # Sum of the deleted init modules' sizes in /proc/modules just before deletion.
    freed_bytes: int
    failed: tuple[tuple[str, str], ...] = ()
    trigger: UnloadTrigger = "quiet"
    seconds: float = 0.0
    # (core, init module) pairs of *failed* that a later batch may delete (EBUSY:
    # still initialising, or in use); their markers stay.
    busy: tuple[tuple[str, str], ...] = ()
    # Those of *busy* whose init module has not settled (COMING or GOING).
    unsettled: tuple[tuple[str, str], ...] = ()
    # Core modules found inert and deleted (their init module went away without
    # succeeding): their devices need the module loaded again.
    removed_cores: tuple[str, ...] = ()

    @property
    def freed_pages(self) -> int:
        return self.freed_bytes // 4096
