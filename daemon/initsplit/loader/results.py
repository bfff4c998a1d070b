"""What a load or an unload did, as the daemon reports it (journal, status)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    seconds: float = 0.0
    errno: int | None = None


@dataclass(frozen=True, slots=True)
class UnloadBatch:
    """One batch of init-module deletions."""

    deleted: tuple[str, ...]
    # Sum of the deleted init modules' sizes in /proc/modules just before deletion.
    freed_bytes: int
    failed: tuple[tuple[str, str], ...] = ()
    trigger: Literal["quiet", "batch-size", "stop"] = "quiet"
    seconds: float = 0.0

    @property
    def freed_pages(self) -> int:
        return self.freed_bytes // 4096
