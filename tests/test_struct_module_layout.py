"""The struct module offsets in tables.py are the test kernel's, read from its BTF.

->init and ->exit are also cross-checked by the splitter against each module's own
relocations; the export fields (syms, num_syms, ... which the init wrapper writes)
have no relocation anywhere, so the kernel's BTF is the independent witness.
"""

from __future__ import annotations

import dataclasses
import struct

from elftools.elf.elffile import ELFFile

from initsplit.split.tables import KNOWN_STRUCT_MODULE_LAYOUTS, MODVERSION_RECORD_SIZE
from initsplit.elf import read_elf
from tests.testbed import DebianKernel
from tests.testbed.btf import struct_layout
from tests.testbed.fixtures import kernel  # noqa: F401  (pytest fixture)


def module_layout_crc(ko: bytes) -> int:
    versions = read_elf(ko).section("__versions").data
    for at in range(0, len(versions), MODVERSION_RECORD_SIZE):
        if versions[at + 8:at + MODVERSION_RECORD_SIZE].split(b"\0", 1)[0] == b"module_layout":
            return struct.unpack_from("<Q", versions, at)[0]
    raise AssertionError("no module_layout in __versions")


def test_struct_module_layout_matches_kernel_btf(kernel: DebianKernel) -> None:  # noqa: F811
    crc = module_layout_crc(kernel.module("dummy").read_bytes())
    assert crc in KNOWN_STRUCT_MODULE_LAYOUTS, f"{kernel.kver}: module_layout {crc:#x} unknown"
    known = KNOWN_STRUCT_MODULE_LAYOUTS[crc]
    with kernel.vmlinux.open("rb") as f:
        btf = ELFFile(f).get_section_by_name(".BTF").data()
    size, members = struct_layout(btf, "module")
    assert known.size == size
    for field in dataclasses.fields(known):
        if field.name not in ("kernel", "size"):
            assert getattr(known, field.name) == members[field.name], field.name
