"""Guest program: load a set of modules the way initsplitd does, and print its journal.

    PYTHONPATH=/mnt/daemon python3 load_set.py CONFIG_ROOT [MODULE...]

Runs initsplitd's own Service (daemon/service.py) with its loader, split
provider and policy under the configuration below CONFIG_ROOT, as
daemon/main.py wires them; only the source differs: instead of udev's devices,
one request per MODULE (resolved by libkmod with its dependencies, as a device's
modalias is). A server's file systems, netfilter and bridge have no device that
would ask for them. Every journal entry the daemon writes is printed as one JSON
object per line; the exit status is the service's.

Used by tests/test_btf_vm.py, which compares the summary's total with what the
kernel's memory counters lost. Imports nothing of the tests: it runs in the
guest's chroot of the Debian root, with the daemon's code alone.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from initsplit.daemon.config import load_config
from initsplit.daemon.journal import Reporter
from initsplit.daemon.main import loading_policy, make_provider, make_settings
from initsplit.daemon.notify import Notifier
from initsplit.daemon.service import Service
from initsplit.daemon.udev_source import ModuleRequest
from initsplit.kmod.resolver import Resolver
from initsplit.loader.kernel_state import probe_capabilities
from initsplit.loader.recovery import LoadMarkers


class ModuleListSource:
    """A request per module name at coldplug, and no events after it."""

    def __init__(self, names: Sequence[str]) -> None:
        self._names = tuple(names)
        # Never readable: the service selects on it with its other descriptors.
        self._read, self._write = os.pipe()

    def fileno(self) -> int:
        return self._read

    def coldplug(self) -> list[ModuleRequest]:
        return [ModuleRequest((name,), f"/load-set/{name}", None, "add", "coldplug")
                for name in self._names]

    def read_ready(self) -> list[ModuleRequest]:
        return []


def main(argv: Sequence[str]) -> int:
    if not argv:
        print("usage: load_set.py CONFIG_ROOT [MODULE...]", file=sys.stderr)
        return 2
    config, errors = load_config(root=Path(argv[0]))
    if errors:
        print("\n".join(str(e) for e in errors), file=sys.stderr)
        return 2
    reporter = Reporter(sink=lambda fields: print(json.dumps(fields), flush=True))
    kver = os.uname().release
    plain_only, signed_only = loading_policy(config, probe_capabilities(), kver=kver, reporter=reporter)
    settings = make_settings(config, in_initrd=False, modprobe="/sbin/modprobe", plain_only=plain_only,
                             udev_handover=False)
    provider = make_provider(config, kver=kver, reporter=reporter, signed_only=signed_only)
    with Resolver(kernel_cmdline="") as resolver:
        service = Service(settings=settings, resolver=resolver, source=ModuleListSource(argv[1:]),
                          provider=provider, reporter=reporter, notifier=Notifier(),
                          markers=LoadMarkers(config.runtime_dir / "loading"))
        return service.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
