"""What the kernel keeps for a module's life because of its .BTF section.

The module loader does not place .BTF in the module's layouts (it has no
SHF_ALLOC; kernel/module/main.c find_module_sections() finds it with
find_any_sec() in the temporary copy of the file). At MODULE_STATE_COMING,
kernel/bpf/btf.c btf_module_notify() -> btf_parse_module() copies it and keeps,
until the module is deleted, all in unreclaimable slab (SUnreclaim):

    btf->data      kvmalloc(.BTF size) copy of the section     K(btf_size)
    btf->types     kvcalloc(cap(n), 8): a pointer per type     K(8 * cap(n))
    struct btf     kzalloc                                     StructCosts.btf
    btf_module     kzalloc                                     StructCosts.btf_module
    bin_attribute  kzalloc, /sys/kernel/btf/NAME               StructCosts.bin_attribute
    kernfs_node    kernfs_node_cache, for that file            StructCosts.kernfs_node
    the name       kstrdup_const() in __kernfs_new_node()      K(len(name) + 1)

K() is the allocator's rounding on x86-64 SLUB (mm/slab_common.c kmalloc_info[]):
up to KMALLOC_MAX_CACHE_SIZE (8 KiB) the next kmalloc size class; above, whole
pages of the next power-of-two order from the page allocator
(__kmalloc_large_node(): PAGE_SIZE << get_order(size)), which both 6.1 and 6.12
count in NR_SLAB_UNRECLAIMABLE_B too. kvmalloc() falls back to vmalloc only when
that fails (fragmentation; then the bytes show in VmallocUsed instead).

The types array grows in btf_add_type() by max(size / 4, 16) entries from 0, and
module (split) BTF has no VOID entry: cap(n) is the first size of that sequence
at or above the module's own type count n (base types are vmlinux's, reached by
pointer).

Not modelled: a module that registers kfuncs (register_btf_kfunc_id_set(), only
modules with .BTF_ids, which keep their BTF anyway), the radix-tree slots of two
IDRs and a dentry/inode on lookup (SReclaimable), and 6.12's distilled
.BTF.base (out-of-tree modules only).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

PAGE_SIZE = 4096
# mm/slab_common.c kmalloc_info[] with KMALLOC_MIN_SIZE 8 (x86-64).
KMALLOC_CLASSES = (8, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096, 8192)
KMALLOC_MAX_CACHE_SIZE = 8192
# include/uapi/linux/btf.h
BTF_MAGIC = 0xEB9F
_BTF_HEADER = struct.Struct("<HBBIIIII")
_BTF_TYPE = struct.Struct("<III")
# Bytes after each struct btf_type by kind: (fixed, per vlen item); kernel/bpf/btf.c
# *_check_meta() of each kind in kind_ops[] (the same 19 kinds in 6.1 and 6.12).
_KIND_TRAILER = {
    1: (4, 0),    # INT: u32 encoding
    2: (0, 0),    # PTR
    3: (12, 0),   # ARRAY: struct btf_array
    4: (0, 12),   # STRUCT: struct btf_member
    5: (0, 12),   # UNION
    6: (0, 8),    # ENUM: struct btf_enum
    7: (0, 0),    # FWD
    8: (0, 0),    # TYPEDEF
    9: (0, 0),    # VOLATILE
    10: (0, 0),   # CONST
    11: (0, 0),   # RESTRICT
    12: (0, 0),   # FUNC
    13: (0, 8),   # FUNC_PROTO: struct btf_param
    14: (4, 0),   # VAR: struct btf_var
    15: (0, 12),  # DATASEC: struct btf_var_secinfo
    16: (0, 0),   # FLOAT
    17: (4, 0),   # DECL_TAG: struct btf_decl_tag
    18: (0, 0),   # TYPE_TAG
    19: (0, 12),  # ENUM64: struct btf_enum64
}


class StructCosts(NamedTuple):
    """The fixed allocations per module BTF, in bytes after slab rounding.

    Sizes from each kernel's own vmlinux BTF (x86-64, Debian's configuration).
    """

    btf: int
    """struct btf: 208 bytes in 6.1, 232 in 6.12; kmalloc-256 in both."""
    btf_module: int
    """struct btf_module: 48 bytes; kmalloc-64."""
    bin_attribute: int
    """struct bin_attribute: 64 bytes in 6.1 (kmalloc-64), 72 in 6.12 (kmalloc-96)."""
    kernfs_node: int
    """kernfs_node_cache objects: 128 bytes in 6.1, 136 in 6.12 (a cache of its own)."""

    @property
    def total(self) -> int:
        return self.btf + self.btf_module + self.bin_attribute + self.kernfs_node


STRUCT_COSTS = {
    "6.1": StructCosts(btf=256, btf_module=64, bin_attribute=64, kernfs_node=128),
    "6.12": StructCosts(btf=256, btf_module=64, bin_attribute=96, kernfs_node=136),
}


def kernel_model(release: str) -> str:
    """The STRUCT_COSTS key for a kernel release ("6.12.57+deb13-amd64" -> "6.12");
    6.1 for anything else, including an unknown release."""
    return "6.12" if release.startswith("6.12.") else "6.1"


class MalformedBtf(ValueError):
    """A .BTF section the kernel would not parse either (it then keeps none)."""


def kmalloc_bytes(size: int) -> int:
    """What kmalloc(size) (and a kvmalloc() that did not fall back) takes."""
    if size <= 0:
        return 0
    if size <= KMALLOC_MAX_CACHE_SIZE:
        return next(c for c in KMALLOC_CLASSES if c >= size)
    pages = -(-size // PAGE_SIZE)
    return PAGE_SIZE << (pages - 1).bit_length()


def types_capacity(count: int) -> int:
    """btf->types' final size for *count* types (kernel/bpf/btf.c btf_add_type())."""
    capacity = 0
    while capacity < count:
        capacity += max(capacity >> 2, 16)
    return capacity


def btf_type_count(btf: bytes) -> int:
    """The type records in a .BTF section (btf_check_all_metas() walks the same)."""
    if len(btf) < _BTF_HEADER.size:
        raise MalformedBtf("shorter than a BTF header")
    magic, version, _flags, hdr_len, type_off, type_len, _str_off, _str_len = _BTF_HEADER.unpack_from(btf)
    if magic != BTF_MAGIC or version != 1 or hdr_len < _BTF_HEADER.size:
        raise MalformedBtf(f"bad BTF header (magic {magic:#x}, version {version})")
    offset, end = hdr_len + type_off, hdr_len + type_off + type_len
    if end > len(btf):
        raise MalformedBtf("type section beyond the end of .BTF")
    count = 0
    while offset < end:
        if offset + _BTF_TYPE.size > end:
            raise MalformedBtf("truncated type record")
        _name, info, _size = _BTF_TYPE.unpack_from(btf, offset)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        if kind not in _KIND_TRAILER:
            raise MalformedBtf(f"type kind {kind}")
        fixed, per = _KIND_TRAILER[kind]
        offset += _BTF_TYPE.size + fixed + per * vlen
        count += 1
    if offset != end:
        raise MalformedBtf("last type record runs past the type section")
    return count


def btf_kept_bytes(btf: bytes, module_name: str, *, kernel: str = "6.1") -> int:
    """Bytes of unreclaimable slab a module keeps for its .BTF while it is loaded.

    0 for an empty section (btf_module_notify() returns early) and for one the
    kernel cannot parse (btf_parse_module() fails, and with
    CONFIG_MODULE_ALLOW_BTF_MISMATCH the module loads without BTF).
    """
    if not btf:
        return 0
    try:
        count = btf_type_count(btf)
    except MalformedBtf:
        return 0
    return (kmalloc_bytes(len(btf)) + kmalloc_bytes(8 * types_capacity(count))
            + STRUCT_COSTS[kernel].total + kmalloc_bytes(len(module_name) + 1))
