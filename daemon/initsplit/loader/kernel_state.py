"""What the running kernel allows: module unloading, unsigned modules, and its module sizes."""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass
from pathlib import Path

from .syscalls import delete_module

_PROC_MODULES_LINE = re.compile(r"^(\S+) (\d+) (\d+) (\S+) (\S+) ")


@dataclass(frozen=True, slots=True)
class KernelCapabilities:
    can_unload: bool
    accepts_unsigned: bool
    # Why two-stage loading is off on this kernel, or "" when it is on.
    reason: str

    @property
    def two_stage(self) -> bool:
        return self.can_unload and self.accepts_unsigned


def probe_capabilities(*, sys_root: Path = Path("/sys")) -> KernelCapabilities:
    """Decide once, up front, whether two-stage loads can work at all.

    Split modules are unsigned, so a kernel that enforces module signatures
    (module.sig_enforce, or lockdown, which implies it) would refuse every one;
    a kernel without CONFIG_MODULE_UNLOAD could never give the init modules back.
    """
    can_unload = _probe_unload()
    sig_enforce = _read(sys_root / "module/module/parameters/sig_enforce") == "Y"
    lockdown = _read(sys_root / "kernel/security/lockdown") or ""
    locked = "[integrity]" in lockdown or "[confidentiality]" in lockdown
    reasons = []
    if not can_unload:
        reasons.append("kernel cannot unload modules")
    if sig_enforce:
        reasons.append("kernel enforces module signatures")
    if locked:
        reasons.append("kernel lockdown is active")
    return KernelCapabilities(can_unload, not (sig_enforce or locked), "; ".join(reasons))


def _probe_unload() -> bool:
    # delete_module("") fails with ENOENT when unloading exists, ENOSYS when it does not.
    try:
        delete_module("")
    except OSError as exc:
        return exc.errno != errno.ENOSYS
    return True


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def proc_modules(path: Path = Path("/proc/modules")) -> dict[str, int]:
    """Module name -> size in bytes, as the kernel reports it (core layout, page-rounded)."""
    sizes: dict[str, int] = {}
    for line in path.read_text().splitlines():
        match = _PROC_MODULES_LINE.match(line + " ")
        if match:
            sizes[match.group(1)] = int(match.group(2))
    return sizes


def module_state(name: str, *, sys_root: Path = Path("/sys")) -> str | None:
    """"live", "coming", "going", or None when the module is not loaded (or built in)."""
    return _read(sys_root / "module" / name / "initstate")
