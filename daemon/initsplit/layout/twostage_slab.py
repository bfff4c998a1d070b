"""What a two-stage load costs in unreclaimable slab: the init module's kernel objects.

A module the kernel loads gets, besides its layouts, a set of small slab objects:
its /sys/module/NAME directory and files, the section attributes, the kobject and
module_use records, and the vmalloc bookkeeping of its two allocations. The init
module I of a two-stage load gets them too, and they are freed when the batch
deletes I. But I lives while the original init runs, and that init allocates the
driver's long-lived objects of the same sizes (device kernfs nodes, kmalloc-512 and
-1k structures) into the same slabs. After the batch delete, I's freed objects are
holes in slabs that still hold live ones: SUnreclaim counts slab pages, not
objects, and keeps them. bench/twostage_slab.py measured it on Debian 6.1.0-57
(QEMU, one CPU, slab_nomerge): the same objects in use as a plain load, and
kernfs_node_cache, kmalloc-1k, -32, -16, -8 holding 19, 14, 2.5, 2, 1 pages more:
158 kB for the 29 modules of tests/test_savings_vm.py that the default loads
two-stage, 5.4 kB a module (this model: 157 kB), while their core layouts gave
back 2 pages.

Whether a hole is filled later depends on what the machine allocates after boot,
so this model charges a two-stage load the whole footprint of I's objects, and
the difference between C's section attributes and the original's, which stay for
the module's life: what a decision that must never be worse than a plain load has
to weigh. Linux 6.1 sources, kernel/module/sysfs.c:

    mod_sysfs_setup()          kobject NAME__init, its name and kernfs dir,
                               holders/ (kobject_create), 6 modinfo attributes
                               (uevent initstate coresize initsize taint refcnt;
                               I has no version or srcversion), mod->modinfo_attrs
    add_sect_attrs()           one kzalloc of 56 + 80 n (struct module_sect_attrs
                               and n bin_attributes), a kstrdup of each section
                               name, a kernfs node per section under sections/
                               whose name kernfs copies again (kstrdup_const: the
                               names are not kernel rodata)
    add_usage_links()          the holders/NAME__init link in C's directory
    ref_module()               struct module_use, I uses C (kernel/module/main.c)
    module_alloc() x 2         vm_struct, vmap_area and the pages array of I's
                               core and init allocations (mm/vmalloc.c)
    load_module()              mod->args (an empty string, kmalloc-8)

n counts the sections add_sect_attrs() lists: SHF_ALLOC and not empty
(sect_empty()), after the loader has taken SHF_ALLOC from .modinfo and __versions
(main.c rewrite_section_headers()) and given it to .symtab and .strtab
(kallsyms.c layout_symtab(), under CONFIG_KALLSYMS). Every kernfs node is a
128-byte kernfs_node_cache object; kmalloc rounds each other object up to its
bucket (mm/slab_common.c kmalloc_info, 8 bytes to 8 KiB).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from .records import PAGE_SIZE

if TYPE_CHECKING:
    from ..elf import ElfObject

KERNFS_NODE = 128  # sizeof(struct kernfs_node) in Debian 6.1's kernfs_node_cache
# kmalloc caches of x86-64 SLUB (mm/slab_common.c kmalloc_info), bytes.
KMALLOC_BUCKETS = (8, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096, 8192)
# /sys/module/NAME__init: the directory, its six modinfo attributes
# (kernel/module/main.c modinfo_attrs, without version and srcversion), holders/
# and sections/ (I has no notes/ nor parameters/): 9 nodes, and the link
# holders/NAME__init in C's directory.
FIXED_NODES = 10
MODINFO_ATTRS = 9  # modinfo_attrs_count + 1: the kzalloc'd copy of the table
MODULE_ATTRIBUTE = 56  # sizeof(struct module_attribute)
SECT_ATTRS_HEADER = 56  # struct module_sect_attrs, before its bin_attribute array
SECT_ATTR = 80  # struct module_sect_attr (a bin_attribute and the address)
SMALL_RECORDS = 64 * 6  # holders kobject, module_use, vm_struct x 2, vmap_area x 2
NOT_LISTED = frozenset({".modinfo", "__versions"})
KALLSYMS_SECTIONS = (".symtab", ".strtab")


def kmalloc_bucket(size: int) -> int:
    """The object size kmalloc() hands out for a request of size bytes."""
    for bucket in KMALLOC_BUCKETS:
        if size <= bucket:
            return bucket
    # Above 8 KiB kmalloc() takes whole pages from the page allocator.
    return -(-size // PAGE_SIZE) * PAGE_SIZE


def listed_sections(module: ElfObject, *, kallsyms: bool = True) -> list[str]:
    """The section names /sys/module/NAME/sections lists for this module."""
    names = [s.name for s in module.sections
             if s.is_alloc and s.size and s.name not in NOT_LISTED]
    if kallsyms:
        names += [name for name in KALLSYMS_SECTIONS
                  if module.section(name) is not None and name not in names]
    return names


def sections_slab_bytes(module: ElfObject, *, kallsyms: bool = True) -> int:
    """Slab that /sys/module/NAME/sections takes for this module (add_sect_attrs()):
    the attribute block, a kernfs node a section, and each name copied twice (the
    kstrdup in add_sect_attrs() and kernfs's own copy)."""
    sections = listed_sections(module, kallsyms=kallsyms)
    return (kmalloc_bucket(SECT_ATTRS_HEADER + SECT_ATTR * len(sections))
            + KERNFS_NODE * len(sections)
            + sum(2 * kmalloc_bucket(len(s) + 1) for s in sections))


def init_module_slab_bytes(init: ElfObject, name: str, *, kallsyms: bool = True,
                           layout_pages: Iterable[int] = (1, 1)) -> int:
    """Unreclaimable slab a two-stage load's init module I takes (see the module doc).

    name is I's module name (NAME__init); layout_pages the pages of I's core and
    init allocations, whose vmalloc pages arrays (8 bytes a page) are counted.
    """
    directory = KERNFS_NODE * FIXED_NODES
    modinfo = kmalloc_bucket(MODULE_ATTRIBUTE * MODINFO_ATTRS)
    # The kobject's name, its kernfs directory's name, the holders/ link's name.
    own_name = 3 * kmalloc_bucket(len(name) + 1)
    pages_arrays = sum(kmalloc_bucket(8 * pages) for pages in layout_pages if pages)
    args = kmalloc_bucket(1)
    return (directory + sections_slab_bytes(init, kallsyms=kallsyms) + modinfo + own_name
            + SMALL_RECORDS + pages_arrays + args)


def twostage_slab_bytes(original: ElfObject, core: ElfObject, init: ElfObject, init_name: str,
                        *, kallsyms: bool = True, init_pages: Iterable[int] = (1, 1)) -> int:
    """What loading C and I costs in slab more than loading the original plain: all of
    I's objects (whose pages the batch delete leaves behind), and the difference
    between C's section attributes and the original's, which stay for the module's
    life (C lists its anchor's export tables but none of the .init sections; the
    attribute block can cross a kmalloc bucket either way)."""
    return (init_module_slab_bytes(init, init_name, kallsyms=kallsyms, layout_pages=init_pages)
            + sections_slab_bytes(core, kallsyms=kallsyms)
            - sections_slab_bytes(original, kallsyms=kallsyms))
