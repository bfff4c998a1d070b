"""What the running kernel allows (module unloading, unsigned modules) and what it says about loaded modules."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .syscalls import delete_module

_PROC_MODULES_LINE = re.compile(r"^(\S+) (\d+) (\d+) (\S+) (\S+) ")


@dataclass(frozen=True, slots=True)
class KernelCapabilities:
    can_unload: bool
    accepts_unsigned: bool
    # What limits two-stage loading on this kernel ("; "-joined), or "" when nothing does.
    reason: str
    # Why the kernel loads signed modules only (sig_enforce, lockdown), or "".
    signatures: str = ""

    @property
    def two_stage(self) -> bool:
        """Whether any module can be loaded two-stage: only if its init module can be
        deleted again. Where the kernel enforces signatures, only signed splits can
        (signed_only)."""
        return self.can_unload

    @property
    def signed_only(self) -> bool:
        return not self.accepts_unsigned


def probe_capabilities(*, sys_root: Path = Path("/sys")) -> KernelCapabilities:
    """Decide once, up front, what two-stage loads can do here.

    A kernel without CONFIG_MODULE_UNLOAD could never give the init modules back:
    no two-stage loads at all. A kernel that enforces module signatures
    (module.sig_enforce, or lockdown integrity/confidentiality, which implies it:
    kernel/module/signing.c module_sig_check() refuses an unsigned module with
    EKEYREJECTED, or EPERM under lockdown) loads only splits signed with a key it
    trusts, which only a signed pre-split cache holds (daemon/splits.py).
    """
    can_unload = _probe_unload()
    sig_enforce = _read(sys_root / "module/module/parameters/sig_enforce") == "Y"
    lockdown = _read(sys_root / "kernel/security/lockdown") or ""
    level = next((lvl for lvl in ("integrity", "confidentiality") if f"[{lvl}]" in lockdown), None)
    reasons = []
    if not can_unload:
        reasons.append("kernel cannot unload modules")
    signatures = []
    if sig_enforce:
        signatures.append("kernel enforces module signatures")
    if level is not None:
        signatures.append(f"kernel lockdown is active ({level})")
    return KernelCapabilities(can_unload, not signatures, "; ".join(reasons + signatures),
                              "; ".join(signatures))


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
    return parse_proc_modules(path.read_text())


def parse_proc_modules(text: str) -> dict[str, int]:
    """proc_modules() of /proc/modules as read already (a guest's, for the tests)."""
    sizes: dict[str, int] = {}
    for line in text.splitlines():
        match = _PROC_MODULES_LINE.match(line + " ")
        if match:
            sizes[match.group(1)] = int(match.group(2))
    return sizes


def module_state(name: str, *, sys_root: Path = Path("/sys")) -> str | None:
    """"live", "coming", "going", or None when the module is not loaded (or built in)."""
    return _read(sys_root / "module" / name / "initstate")


def module_sections(name: str, *, sys_root: Path = Path("/sys")) -> frozenset[str] | None:
    """The module's sections as the kernel lists them, or None when it lists none.

    kernel/module/sysfs.c add_sect_attrs() (Debian 6.1) makes one entry in
    /sys/module/NAME/sections for every section that sect_empty() does not skip
    (kernel/module/internal.h: SHF_ALLOC and not empty) when the module is loaded,
    and only mod_sysfs_teardown() removes them, when the module is freed:
    do_init_module() frees the init layout but keeps the list, so a module
    loaded with .init.text lists it for its whole life. None without
    CONFIG_KALLSYMS, or when the kernel could not allocate the list.
    """
    try:
        return frozenset(os.listdir(sys_root / "module" / name / "sections"))
    except OSError:
        return None


def section_address(name: str, section: str, *, sys_root: Path = Path("/sys")) -> int | None:
    """Where the kernel put section *section* of module *name*, or None when it does
    not say (not listed, or shown as 0: module_sect_read() in kernel/module/sysfs.c
    prints the address only to a reader that kallsyms_show_value() admits, root
    with CAP_SYSLOG under kptr_restrict 0 or 1)."""
    if "/" in section or section in ("", ".", ".."):
        return None
    text = _read(sys_root / "module" / name / "sections" / section)
    try:
        address = int(text or "0", 16)
    except ValueError:
        return None
    return address or None


def placement_problem(name: str, expected: Sequence[tuple[str, int]], *,
                      from_anchors: Sequence[tuple[str, str, int]] = (),
                      sys_root: Path = Path("/sys")) -> str | None:
    """None when each (section, offset) of *expected* lies at that offset from the
    module's struct module as the kernel placed it, or each (section, anchor
    section, offset) of *from_anchors* at that offset from the anchor section;
    otherwise what differs.

    For a split's core module C: kernel/module/main.c move_module() puts each
    section at core_layout.base + sh_entsize (6.1), or at mem[type].base plus the
    offset in sh_entsize's low bits (6.12, one allocation per struct
    module_memory type: SplitModule.reached_from names each section's offset from
    the anchor of its memory), layout_sections() having chosen the sh_entsize;
    the splitter computed the same offsets (initsplit.layout) for every section
    of C that I reaches, so this compares the model with the kernel exactly,
    before anything of I is loaded.
    """
    if from_anchors:
        return _anchored_problem(name, from_anchors, sys_root)
    if not expected:
        return "no placement of C to check I's offsets against"
    base = section_address(name, ".gnu.linkonce.this_module", sys_root=sys_root)
    if base is None:
        return "the kernel does not show C's section addresses (kptr_restrict=2, or no CAP_SYSLOG)"
    for section, offset in expected:
        address = section_address(name, section, sys_root=sys_root)
        if address is None:
            return f"the kernel does not list C's {section}"
        if address - base != offset:
            return (f"C's {section} is at {address - base:+#x} from its struct module, "
                    f"not at {offset:+#x} as the layout model has it")
    return None


def _anchored_problem(name: str, expected: Sequence[tuple[str, str, int]], sys_root: Path) -> str | None:
    """placement_problem() of (section, anchor section, offset) triples."""
    if section_address(name, ".gnu.linkonce.this_module", sys_root=sys_root) is None:
        return "the kernel does not show C's section addresses (kptr_restrict=2, or no CAP_SYSLOG)"
    for section, anchor, offset in expected:
        base = section_address(name, anchor, sys_root=sys_root)
        address = section_address(name, section, sys_root=sys_root)
        if base is None or address is None:
            return f"the kernel does not list C's {anchor if base is None else section}"
        if address - base != offset:
            return (f"C's {section} is at {address - base:+#x} from its memory's anchor {anchor}, "
                    f"not at {offset:+#x} as the layout model has it")
    return None


def livepatch_targets(name: str, *, sys_root: Path = Path("/sys")) -> bool:
    """Whether an enabled or loaded live patch patches module *name*: the livepatch
    core lists each patched object as /sys/kernel/livepatch/PATCH/OBJECT
    (kernel/livepatch/core.c klp_init_object(), the object's name)."""
    try:
        patches = os.listdir(sys_root / "kernel" / "livepatch")
    except OSError:
        return False
    return any(os.path.isdir(sys_root / "kernel" / "livepatch" / patch / name) for patch in patches)


def module_address(name: str, *, sys_root: Path = Path("/sys")) -> int | None:
    """Where the module's struct module lives, or None when the kernel does not say.

    The section .gnu.linkonce.this_module is the struct module itself
    (kernel/module/main.c layout_and_allocate(): mod = sechdrs[index.mod].sh_addr).
    module_sect_read() shows 0 to a reader without kallsyms_show_value() (CAP_SYSLOG,
    kptr_restrict < 2): no address then.
    """
    return section_address(name, ".gnu.linkonce.this_module", sys_root=sys_root)
