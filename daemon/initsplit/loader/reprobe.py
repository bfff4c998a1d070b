"""Probe again the devices a killed loader may have left without a driver.

A module's init usually registers a driver, and registering it probes the devices
there are (drivers/base/dd.c driver_attach()) in the loading task, the daemon's
thread. When that task is being killed (SIGKILL, or SIGTERM it does not handle),
every kthread_create() in the probe fails at once: kernel/kthread.c
__kthread_create_on_node() waits with wait_for_completion_killable() and returns
-EINTR. ahci's probe creates its SCSI hosts' error-handler threads
(drivers/scsi/hosts.c scsi_host_alloc()), fails with -ENOMEM, and the driver core
swallows it: __driver_attach() always returns 0, only -EPROBE_DEFER is retried,
so pci_register_driver() and the module's init return 0, the module is LIVE and
its device stays unbound for good. Loading the module again does nothing (it is
loaded), nor does replaying the device's uevent.

What repairs it is what the driver core offers for this: writing a device's name
to /sys/bus/BUS/drivers_probe (drivers/base/bus.c drivers_probe_store() ->
bus_rescan_devices_helper()) runs device_attach() for a device without a driver,
and does nothing for one that has a driver. It is done after a loader died, for
every unbound device of every bus (a few hundred writes): a device no driver
matches stays as it was. (One that an administrator unbound by hand before would
be bound again; a killed daemon is rare enough for that.)
"""

from __future__ import annotations

import os
from pathlib import Path


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def reprobe_unbound(*, sys_root: Path = Path("/sys")) -> list[str]:
    """Ask every bus to probe its devices that have no driver; returns the
    devices ("BUS/NAME") that have one afterwards."""
    bound: list[str] = []
    try:
        buses = sorted(os.listdir(sys_root / "bus"))
    except OSError:
        return bound
    for bus in buses:
        probe = sys_root / "bus" / bus / "drivers_probe"
        devices = sys_root / "bus" / bus / "devices"
        try:
            names = sorted(os.listdir(devices))
        except OSError:
            continue
        if not probe.exists():
            continue
        for name in names:
            if os.path.lexists(devices / name / "driver"):
                continue
            try:
                _write(probe, name)
            except OSError:
                continue  # gone meanwhile, or a bus that refuses: nothing to repair
            if os.path.lexists(devices / name / "driver"):
                bound.append(f"{bus}/{name}")
    return bound
