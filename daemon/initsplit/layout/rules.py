"""The kernel configuration a module's layout depends on, read from the tree's kernel."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .records import PAGE_SIZE


# "module: replace module_layout with module_memory" (ac3b43283923, v6.4): from
# here on a module is one allocation per memory type (layout/linux612.py).
MODULE_MEMORY_SINCE = (6, 4)


def kernel_version(release: str) -> tuple[int, int] | None:
    """(major, minor) of a vermagic or uname -r ("6.12.117+deb13-amd64 SMP ..."), or None."""
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else None


@dataclass(frozen=True, slots=True)
class LayoutRules:
    """The kernel configuration the layout depends on (Debian 6.1 amd64 by default)."""

    page_size: int = PAGE_SIZE
    strict_module_rwx: bool = True  # CONFIG_STRICT_MODULE_RWX: groups page-aligned
    kallsyms: bool = True  # CONFIG_KALLSYMS: layout_symtab() adds the symbol tables
    kallsyms_all: bool = True  # CONFIG_KALLSYMS_ALL: data symbols kept in core too
    module_unload: bool = True  # CONFIG_MODULE_UNLOAD: .exit* sections stay in core
    config: str = ""  # the config file read, "" when the defaults were assumed
    kernel: str = ""  # uname -r of the tree, when known

    def describe(self) -> list[str]:
        """One line per rule applied, for people (and kept in --json)."""
        page = self.page_size
        version = kernel_version(self.kernel)
        if version is not None and version >= MODULE_MEMORY_SINCE:
            return self._describe_module_memory()
        aligned = (f"each group page-aligned ({page}-byte pages, CONFIG_STRICT_MODULE_RWX=y)"
                   if self.strict_module_rwx else
                   "groups not page-aligned (CONFIG_STRICT_MODULE_RWX unset)")
        lines = [
            "model: Linux 6.1 kernel/module/main.c layout_sections() + kallsyms.c layout_symtab(),"
            " x86-64 (ARCH_SHF_SMALL = 0, core and data in one allocation)",
            "core layout = text | rodata | ro_after_init (.data..ro_after_init, __jump_table)"
            f" | data+bss, {aligned}",
        ]
        if self.kallsyms:
            which = ("every named symbol of a core section, data ones too (CONFIG_KALLSYMS_ALL=y)"
                     if self.kallsyms_all else "the named symbols of core code")
            lines.append("core layout += kallsyms: Elf_Sym + name + type byte for "
                         f"{which}, after the data group, rounded to a page")
            lines.append("init layout = .init* text | rodata | data, then the full .symtab, "
                         ".strtab, struct mod_kallsyms and one type byte per symbol")
        else:
            lines.append("init layout = .init* text | rodata | data (CONFIG_KALLSYMS unset)")
        if not self.module_unload:
            lines.append(".exit* sections go to the init layout (CONFIG_MODULE_UNLOAD unset)")
        lines.append("not loaded: .modinfo, __versions; .data..percpu is allocated per cpu,"
                     " outside both layouts")
        lines.append("/proc/modules and /sys/module/NAME/coresize print core_layout.size once"
                     " the module is live; module_alloc() adds one guard page of address"
                     " space, not memory")
        lines.append(self._source())
        return lines

    def _describe_module_memory(self) -> list[str]:
        """describe() for 6.4+ kernels (layout/linux612.py)."""
        lines = [
            "model: Linux 6.12 kernel/module/main.c __layout_sections() + kallsyms.c layout_symtab(),"
            " x86-64: one execmem allocation per struct module_memory type, each page-rounded",
            "core = MOD_TEXT | MOD_RODATA | MOD_RO_AFTER_INIT (.data..ro_after_init, __jump_table)"
            " | MOD_DATA (data+bss, then the core kallsyms)",
            "init = MOD_INIT_TEXT | MOD_INIT_RODATA | MOD_INIT_DATA (.init* data, then .symtab,"
            " .strtab, struct mod_kallsyms and one type byte per symbol)",
        ]
        if self.kallsyms:
            which = ("every named symbol of a core section, data ones too (CONFIG_KALLSYMS_ALL=y)"
                     if self.kallsyms_all else "the named symbols of core code")
            lines.append(f"core kallsyms: Elf_Sym + name + type byte for {which}, in MOD_DATA's "
                         "last pages")
        if not self.module_unload:
            lines.append(".exit* sections go to the init types (CONFIG_MODULE_UNLOAD unset)")
        lines.append("not loaded: .modinfo, __versions; .data..percpu is allocated per cpu")
        lines.append("/proc/modules and /sys/module/NAME/coresize print the core types' sizes"
                     " summed once the module is live")
        lines.append(self._source())
        return lines

    def _source(self) -> str:
        return (f"kernel configuration: {self.config}" if self.config else
                "kernel configuration: not found, Debian 6.1 amd64 defaults assumed")


def rules_for_tree(tree: Path | None) -> LayoutRules:
    """The layout rules for a module tree, from its kernel's config when it can be found.

    Looks for TREE/build/.config, then boot/config-KVER beside the tree (an
    extracted Debian package: ROOT/lib/modules/KVER and ROOT/boot), then
    /boot/config-KVER. Without one, Debian 6.1 amd64's settings are assumed.
    """
    if tree is None or not tree.exists():
        return LayoutRules()
    tree = tree.resolve()
    # The tree root is the directory right under .../lib/modules; a file or a
    # subdirectory given instead finds it among its ancestors.
    root = next((p for p in (tree, *tree.parents)
                 if p.parent.name == "modules" and p.parent.parent.name == "lib"), None)
    if root is None:
        if not tree.is_dir():
            return LayoutRules()
        root = tree
    kver = root.name
    candidates = [root / "build" / ".config"]
    if root.parent.name == "modules" and root.parent.parent.name == "lib":
        system = root.parent.parent.parent
        # A merged-/usr tree (Debian 13's packages: ROOT/usr/lib/modules) keeps
        # the configuration in ROOT/boot all the same.
        if system.name == "usr":
            system = system.parent
        candidates.append(system / "boot" / f"config-{kver}")
    candidates.append(Path("/boot") / f"config-{kver}")
    for path in candidates:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        config = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.startswith("CONFIG_"):
                config[key] = value.strip()
        return LayoutRules(
            strict_module_rwx=config.get("CONFIG_STRICT_MODULE_RWX") == "y",
            kallsyms=config.get("CONFIG_KALLSYMS") == "y",
            kallsyms_all=config.get("CONFIG_KALLSYMS_ALL") == "y",
            module_unload=config.get("CONFIG_MODULE_UNLOAD") == "y",
            config=str(path),
            kernel=kver,
        )
    return LayoutRules(kernel=kver)


