"""Test bed for initsplit: a real Debian kernel, QEMU (TCG) boots with a busybox
initramfs, and out-of-tree test modules built against Debian's headers.

Nothing here is mocked; every helper raises TestbedError with the reason when the
environment cannot provide what is asked, so tests fail loudly instead of skipping.
"""

from ._util import TestbedError
from .dmesg import decode_taint, dmesg_problems
from .kernel import DebianKernel, cache_dir, debian_kernel
from .kmodbuild import KMODS_DIR, build_module, build_test_modules, ensure_headers
from .qemu import HOST_ROOT_SETUP, BootResult, boot, build_initramfs, host_root_files, module_files, script_section
from .rootfs import RootFS, debian_rootfs
from .system import GuestFile, SystemBoot, SystemImage, boot_system, build_disk

__all__ = [
    "KMODS_DIR",
    "BootResult",
    "DebianKernel",
    "GuestFile",
    "RootFS",
    "SystemBoot",
    "SystemImage",
    "TestbedError",
    "boot",
    "boot_system",
    "build_disk",
    "build_initramfs",
    "build_module",
    "build_test_modules",
    "cache_dir",
    "debian_kernel",
    "debian_rootfs",
    "decode_taint",
    "dmesg_problems",
    "ensure_headers",
    "module_files",
    "script_section",
]
