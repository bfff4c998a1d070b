"""initsplitd: the entry point that wires configuration, kernel, udev, libkmod and the journal."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .. import faults
from ..layout.rules import rules_for_tree
from ..loader.kernel_state import KernelCapabilities, probe_capabilities
from ..loader.recovery import LoadMarkers, delete_init_modules
from ..loader.reprobe import reprobe_unbound
from .config import Config, kernel_command_line_overrides, load_config
from .journal import Reporter
from .notify import Notifier
from .service import LoadStuck, Service, Settings
from .splits import SplitProvider

# Fixed, because initsplit's udev rules test for it (udev/80-drivers.rules).
ACTIVE_FLAG = Path("/run/initsplit/active")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="initsplitd",
        description="Load kernel modules for udev's devices two-stage and give their init "
                    "memory back when boot goes quiet.")
    parser.add_argument("--source", choices=("auto", "udev", "kernel"), default="auto",
                        help="udev: events after systemd-udevd's rules; kernel: raw kernel "
                             "uevents (no udevd, e.g. a busybox initramfs); auto: udev if "
                             "systemd-udevd runs")
    parser.add_argument("--config-root", type=Path, default=Path("/"),
                        help="read configuration below this directory (for tests)")
    parser.add_argument("--kernel-cmdline", default=None,
                        help="use this instead of /proc/cmdline (for tests)")
    parser.add_argument("--modprobe", default="/sbin/modprobe",
                        help="modprobe for modules with an install command")
    parser.add_argument("--recover", action="store_true",
                        help="only clean up after an initsplitd that died: delete the inert "
                             "core modules and the pending init modules its load markers "
                             "name, then exit (initsplitd-handback runs this)")
    parser.add_argument("--no-udev-handover", action="store_true",
                        help=f"do not create {ACTIVE_FLAG}, which switches udev's own module "
                             "loading off through initsplit's 80-drivers.rules")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    config, errors = load_config(root=args.config_root)
    cmdline = args.kernel_cmdline
    if cmdline is None:
        try:
            cmdline = Path("/proc/cmdline").read_text()
        except OSError:
            cmdline = ""
    in_initrd = Path("/etc/initrd-release").exists()
    overrides, cmdline_errors = kernel_command_line_overrides(cmdline, in_initrd=in_initrd)
    config = overrides.apply(config)
    reporter = Reporter(max_priority=config.log_level)
    logging.basicConfig(level=logging.DEBUG if config.log_level >= 7 else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for error in errors + cmdline_errors:
        reporter.config_error(error)
    for bad in faults.install_from_environment(in_initrd=in_initrd):
        reporter.log(4, f"{faults.ENV}: ignoring {bad!r}")

    markers = LoadMarkers(config.runtime_dir / "loading")
    if args.recover:
        return recover_only(markers, reporter)

    kver = os.uname().release
    plain_only, signed_only = loading_policy(config, probe_capabilities(), kver=kver, reporter=reporter)
    settings = make_settings(config, in_initrd=in_initrd, plain_only=plain_only,
                             modprobe=args.modprobe, udev_handover=not args.no_udev_handover)
    provider = make_provider(config, kver=kver, reporter=reporter, signed_only=signed_only)
    leftovers = provider.remove_leftover_temps()
    if leftovers:
        reporter.log(5, f"removed {leftovers} temp files a killed initsplitd left in "
                        f"{provider.runtime_dir}")
    # pyudev and libkmod are imported here, after the cheap checks above.
    from ..kmod.resolver import Resolver
    from .udev_source import UdevSource

    try:
        # libkmod reads this machine's /proc/cmdline itself; only --kernel-cmdline
        # (tests) makes the resolver show it another (kmod/cmdline.py).
        with Resolver(kernel_cmdline=args.kernel_cmdline) as resolver, UdevSource(source=args.source, kernel_cmdline=cmdline) as source:
            source.start()
            reporter.log(6, f"initsplitd starting: kernel {kver}, events from {source.source}, "
                            f"{settings.workers} workers")
            service = Service(settings=settings, resolver=resolver, source=source,
                              provider=provider, reporter=reporter, notifier=Notifier(),
                              markers=markers)
            rc = service.run()
            report_splitter_use(reporter)
            return rc
    except LoadStuck as exc:
        report_splitter_use(reporter)
        # Service.run() has handed loading back to udev and given back what it
        # could. The stuck worker thread cannot be stopped, and Python's exit would
        # wait for it for ever: end the process here. systemd restarts the daemon.
        reporter.log(2, f"initsplitd gives up: {exc}; udev loads modules itself until "
                        "initsplitd runs again", INITSPLIT_STUCK=str(exc))
        sys.stderr.flush()
        os._exit(1)
    except Exception as exc:
        # Service.run() has already handed module loading back to udev (the active
        # flag is gone) and deleted the init modules it could; exit non-zero so that
        # systemd restarts us (Restart=on-failure) and the next daemon's recovery and
        # coldplug pick up whatever this one left.
        report_splitter_use(reporter)
        reporter.log(2, f"initsplitd failed: {type(exc).__name__}: {exc}; udev loads "
                        "modules itself until initsplitd runs again")
        return 1


def loading_policy(config: Config, capabilities: KernelCapabilities, *, kver: str,
                   reporter: Reporter) -> tuple[str, bool]:
    """(plain_only, signed_only) for this kernel, each said once in the journal.

    plain_only, why every module is loaded plain ("" if not): the rescue switch, or
    a kernel that cannot unload modules. signed_only: the kernel enforces module
    signatures, so only modules whose signed split is in the pre-split cache are
    loaded two-stage (daemon/splits.py), every other one plain as its original.
    The one place this is decided (also tests/testbed/load_set.py).
    """
    plain_only = ""
    if not config.enabled:
        plain_only = "initsplit=off on the kernel command line"
    elif not capabilities.two_stage:
        plain_only = capabilities.reason
    if plain_only:
        reporter.log(5, f"initsplitd: loading every module plain: {plain_only}")
        return plain_only, False
    if capabilities.signed_only:
        reporter.log(5, f"initsplitd: {capabilities.signatures}: only modules whose signed split "
                        f"is in the pre-split cache {config.cache_dir / kver} are loaded two-stage, "
                        "every other one plain (its original, as its distribution signed it)")
    return "", capabilities.signed_only


# Imported only when a module is split (or a decision's rewritten original made)
# on the fly, never on the path served by the pre-split cache (splits.py imports
# them in SplitProvider._split_now() and _rewritten()).
ON_THE_FLY_MODULES = ("initsplit.split.decide", "initsplit.split.discarding")


def report_splitter_use(reporter: Reporter) -> None:
    """Say at exit, a failed one's too, whether this daemon split anything itself:
    the import of the splitter is the proof, as it happens at the first split and
    at no other time.
    With a complete pre-split cache the answer is no (a "yes" costs the peak RSS
    that PERFORMANCE.md shows, pyelftools and the split modules in memory)."""
    used = [name for name in ON_THE_FLY_MODULES if name in sys.modules]
    if used:
        reporter.log(6, f"initsplitd split modules on the fly (imported {', '.join(used)})",
                     INITSPLIT_SPLIT_ON_THE_FLY="yes")
    else:
        reporter.log(6, "initsplitd split nothing on the fly: every module came from the "
                        "pre-split cache or was loaded as it is", INITSPLIT_SPLIT_ON_THE_FLY="no")


def make_settings(config: Config, *, in_initrd: bool, plain_only: str, modprobe: str,
                  udev_handover: bool = True) -> Settings:
    """The service's settings from the configuration (also tests/testbed/load_set.py)."""
    return Settings(
        quiet_period=config.quiet_period_sec,
        batch_size=config.batch_size,
        workers=config.workers,
        load_timeout=config.default_load_timeout(in_initrd=in_initrd),
        modprobe_timeout=config.install_command_timeout_sec,
        exit_after_quiet=config.exit_after_quiet_sec,
        exclude=frozenset(config.exclude),
        plain_only=plain_only,
        modprobe=modprobe,
        active_flag=ACTIVE_FLAG if udev_handover else None,
        settled_flag=ACTIVE_FLAG.with_name("settled"),
        udev_queue=Path("/run/udev/queue"),
        reprobe=reprobe_unbound,
    )


def make_provider(config: Config, *, kver: str, reporter: Reporter,
                  signed_only: bool = False) -> SplitProvider:
    """Where the service gets each module's split, under the configured options
    (*signed_only*: signed pre-split cache entries only, loading_policy())."""
    modules_dir = Path("/lib/modules") / kver
    return SplitProvider(modules_dir=modules_dir, cache_dir=config.cache_dir / kver,
                         runtime_dir=config.runtime_dir / kver,
                         report=lambda message: reporter.log(4, message),
                         options=config.split_options(rules_for_tree(modules_dir)),
                         signed_only=signed_only)


def recover_only(markers: LoadMarkers, reporter: Reporter) -> int:
    """What a daemon that died left half-done, undone at once (ExecStopPost=).

    An inert core module looks loaded to modprobe and to udev's kmod builtin, so
    until it is gone neither would load the real driver: a mount of the root in
    that moment would fail. This runs before udev replays the devices.
    """
    try:
        recovery = markers.recover()
    except OSError as exc:
        reporter.log(3, f"recovery: cannot read the load markers: {exc.strerror}")
        return 1
    for name in recovery.removed_cores:
        reporter.log(4, f"{name}: removed the inert core module a killed initsplitd "
                        "left behind", INITSPLIT_MODULE=name)
    for problem in recovery.problems:
        reporter.log(3, f"recovery: {problem}")
    # Only run after an unclean end: a probe in the dying daemon's thread may have
    # failed and left its device unbound (loader/reprobe.py); before udev's replay.
    bound = reprobe_unbound()
    if bound:
        reporter.log(4, f"probed {len(bound)} devices again that the dead initsplitd "
                        f"left without a driver: {', '.join(bound)}")
    if recovery.pending_init:
        batch = delete_init_modules(recovery.pending_init, markers, trigger="recovery")
        reporter.batch_unloaded(batch)
        for name in batch.removed_cores:  # initsplitd-handback's replay loads them again
            reporter.log(4, f"{name}: removed the inert core module its failed init left",
                         INITSPLIT_MODULE=name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
