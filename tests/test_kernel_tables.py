"""The splitter and the validator take their per-kernel tables from split/tables.py,
by the module_layout CRC the module was built against (KERNEL_TABLES).

* each known build has one KernelTables record, whose section lookups are its own
  record tables (6.1's with .parainstructions, 6.12's with .call_sites);
* a module of a build we do not know (its module_layout CRC rewritten) is refused
  by the splitter and by the validator, although its bytes are otherwise the
  ones a good split was made from;
* a 6.12 module reaches the 6.12 tables, splits and validates (one anchor per
  struct module_memory type of C that I reaches).
"""

from __future__ import annotations

import struct

import pytest

from initsplit.modfile import read_module
from initsplit.split.errors import SplitRefused
from initsplit.split.splitter import split_module
from initsplit.split.tables import (
    KERNEL_TABLES,
    KNOWN_STRUCT_MODULE_LAYOUTS,
    KNOWN_STRUCT_MODULE_MEMORY_LAYOUTS,
    MODULE_NAME_LEN,
    ORC_TYPE_CALL,
    ORC_TYPE_CALL_612,
    RECORD_TABLES,
    RECORD_TABLES_612,
    kernel_tables,
)
from initsplit.validate import ValidationError, validate_split
from tests.testbed.fixtures import kernel, kernel612  # noqa: F401  (pytest fixtures)
from tests.testbed.kernel import DebianKernel

DUMMY = "kernel/drivers/net/dummy.ko"


def test_one_record_per_known_build() -> None:
    assert set(KERNEL_TABLES) == set(KNOWN_STRUCT_MODULE_LAYOUTS) | set(KNOWN_STRUCT_MODULE_MEMORY_LAYOUTS)
    for crc, layout in KNOWN_STRUCT_MODULE_LAYOUTS.items():
        tables = kernel_tables(crc)
        assert tables is not None and tables.struct_module is layout and not tables.has_module_memory
        assert tables.records == RECORD_TABLES and tables.orc_type_call == ORC_TYPE_CALL
        assert tables.by_section[".altinstructions"].record_size == 12
        assert ".parainstructions" in tables.by_section and ".call_sites" not in tables.by_section
    for crc, layout in KNOWN_STRUCT_MODULE_MEMORY_LAYOUTS.items():
        tables = kernel_tables(crc)
        assert tables is not None and tables.struct_module is layout and tables.has_module_memory
        assert tables.records == RECORD_TABLES_612 and tables.orc_type_call == ORC_TYPE_CALL_612
        assert tables.by_section[".altinstructions"].record_size == 14
        assert ".parainstructions" not in tables.by_section and ".call_sites" in tables.by_section
    for tables in KERNEL_TABLES.values():
        assert tables.parallel == {".orc_unwind": tables.by_section[".orc_unwind_ip"]}
    assert kernel_tables(None) is None and kernel_tables(0) is None


def _with_module_layout_crc(data: bytes, old: int, new: int) -> bytes:
    """*data* with the module_layout entry of __versions (struct modversion_info)
    naming CRC *new* instead of *old*."""
    name = b"module_layout".ljust(MODULE_NAME_LEN, b"\0")
    entry = struct.pack("<Q", old) + name
    assert data.count(entry) == 1
    return data.replace(entry, struct.pack("<Q", new) + name)


def test_unknown_build_refused_by_splitter_and_validator(kernel: DebianKernel) -> None:  # noqa: F811
    original = read_module(kernel.modules_dir / DUMMY)
    split = split_module(original)
    validate_split(original, split.core, split.init)  # the guard: the pair is good
    crc = next(iter(KNOWN_STRUCT_MODULE_LAYOUTS))
    unknown = _with_module_layout_crc(original, crc, crc ^ 1)
    with pytest.raises(SplitRefused) as refused:
        split_module(unknown)
    assert refused.value.reason == "struct module layout unknown (kernel build not known)"
    with pytest.raises(ValidationError, match="kernel build unknown"):
        validate_split(unknown, split.core, split.init)


def test_612_finds_its_tables(kernel612: DebianKernel) -> None:  # noqa: F811
    original = read_module(kernel612.modules_dir / (DUMMY + ".xz"))
    # The module_layout CRC finds 6.12's tables, the splitter anchors each memory
    # of C (tests/test_split612.py) and the validator checks that
    # (tests/test_validate612.py).
    split = split_module(original)
    assert len(split.anchors) > 1 and not split.reached and split.reached_from
    assert validate_split(original, split.core, split.init).reached_from == split.reached_from
