"""Member offsets of a struct from a kernel's BTF (the .BTF section of vmlinux).

Debian's vmlinux carries BTF (CONFIG_DEBUG_INFO_BTF), so the struct module layout
that tables.py hard-codes can be checked against the kernel the tests boot, without
pahole. Format: include/uapi/linux/btf.h and Documentation/bpf/btf.rst of 6.1.
"""

from __future__ import annotations

import struct

from ._util import TestbedError

BTF_MAGIC = 0xEB9F
KIND_STRUCT = 4
# Bytes that follow struct btf_type for each kind, as (fixed, per vlen entry).
_TRAILER: dict[int, tuple[int, int]] = {
    1: (4, 0),    # INT: u32 encoding
    2: (0, 0),    # PTR
    3: (12, 0),   # ARRAY: struct btf_array
    4: (0, 12),   # STRUCT: struct btf_member[vlen]
    5: (0, 12),   # UNION
    6: (0, 8),    # ENUM: struct btf_enum[vlen]
    7: (0, 0),    # FWD
    8: (0, 0),    # TYPEDEF
    9: (0, 0),    # VOLATILE
    10: (0, 0),   # CONST
    11: (0, 0),   # RESTRICT
    12: (0, 0),   # FUNC
    13: (0, 8),   # FUNC_PROTO: struct btf_param[vlen]
    14: (4, 0),   # VAR: struct btf_var
    15: (0, 12),  # DATASEC: struct btf_var_secinfo[vlen]
    16: (0, 0),   # FLOAT
    17: (4, 0),   # DECL_TAG: struct btf_decl_tag
    18: (0, 0),   # TYPE_TAG
    19: (0, 12),  # ENUM64: struct btf_enum64[vlen]
}


def struct_layout(btf: bytes, name: str) -> tuple[int, dict[str, int]]:
    """(size, {member: byte offset}) of the first struct called *name* in *btf*."""
    magic, _version, _flags, hdr_len, type_off, type_len, str_off, _str_len = \
        struct.unpack_from("<HBBIIIII", btf, 0)
    if magic != BTF_MAGIC:
        raise TestbedError("not BTF (bad magic)")
    types = hdr_len + type_off
    strings = hdr_len + str_off

    def string(offset: int) -> str:
        start = strings + offset
        return btf[start:btf.index(b"\0", start)].decode()

    pos, end = types, types + type_len
    while pos < end:
        name_off, info, size = struct.unpack_from("<III", btf, pos)
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        if kind not in _TRAILER:
            raise TestbedError(f"unknown BTF kind {kind}")
        fixed, per = _TRAILER[kind]
        body = pos + 12
        if kind == KIND_STRUCT and string(name_off) == name:
            members = {}
            for n in range(vlen):
                m_name, _m_type, m_offset = struct.unpack_from("<III", btf, body + 12 * n)
                bits = m_offset & 0xFFFFFF if kflag else m_offset
                members[string(m_name)] = bits // 8
            return size, members
        pos = body + fixed + per * vlen
    raise TestbedError(f"struct {name} not in BTF")
