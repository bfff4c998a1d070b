"""Event source for initsplitd: which modules does each device ask for?

udev normally loads modules itself: its rule file 80-drivers.rules runs the
`kmod load` builtin for every "add" event. initsplitd takes that job over (the
integration switches udevd's kmod builtin off), so it must see exactly the
requests 80-drivers.rules would make, for devices that appear while it runs
(netlink) and for devices that were there before it started (coldplug).

Two event sources, chosen automatically unless forced:

* ``udev``: the udev netlink group, i.e. events after udevd has run its rules
  (properties imported by rules, such as MTD_FTL from mtd_probe, are there).
  Used when udevd is running (``/run/udev/control`` exists).
* ``kernel``: raw kernel uevents, as in a busybox initramfs without udevd.

Coldplug enumerates the devices already present. With the udev source it uses
libudev's enumerator (through pyudev), which merges udev's database; with the
kernel source it walks ``<sys_root>/devices`` itself, reading ``uevent`` files
and ``modalias`` attributes, so it works with no udev database at all. The
monitor is always opened before enumerating, so a device that appears in
between is seen twice rather than not at all. This module keeps no memory of
what it reported: it tags each request with its origin (coldplug or live) and
devpath, passes "remove" events on and ends each enumeration with an
"enumerated" marker, and the service drops the duplicates, its one
de-duplication point (``service.RequestFilter``).

Everything that arrives over netlink or is read from sysfs is treated as
untrusted text: aliases that are not short printable ASCII words are logged and
skipped, and no malformed event makes the source raise.
"""

from __future__ import annotations

import errno
import fnmatch
import itertools
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyudev

from .config import split_kernel_command_line

log = logging.getLogger(__name__)

Source = Literal["auto", "udev", "kernel"]
Origin = Literal["coldplug", "udev", "kernel"]
Action = Literal["add", "remove", "enumerated"]

# udevd creates its control socket when it starts; libudev itself uses the same
# test to decide whether a udev-group monitor can receive anything.
UDEV_CONTROL = Path("/run/udev/control")

# What systemd-udevd asks for on its own kernel socket (udevd.c, 128 MiB). Setting
# more than net.core.rmem_max needs CAP_NET_ADMIN (SO_RCVBUFFORCE).
RECEIVE_BUFFER_SIZE = 128 * 1024 * 1024

# A kernel uevent is at most UEVENT_BUFFER_SIZE (2048) bytes in all and a sysfs
# attribute at most a page, so no real alias is longer than this.
MAX_ALIAS_LEN = 4096
# Bounds on what is read from sysfs or kept per event, against absurd input.
MAX_UEVENT_FILE = 64 * 1024
MAX_DEVPATH_LEN = 4096
# Events handled per read_ready() call; the fd stays readable if more are queued.
MAX_EVENTS_PER_READ = 4096
# Garbage warnings per UdevSource before they are only counted.
MAX_GARBAGE_WARNINGS = 50

# The `kmod load` lines of Debian 12's udev 252 rules that initsplitd takes over,
# verbatim. 80-drivers.rules puts all of them behind
#     ACTION!="add", GOTO="drivers_end"
# so only "add" events request modules. tests/test_udev_source.py checks this
# list against the real rule files. requests_for_device() implements them.
MIRRORED_RULES: tuple[str, ...] = (
    # /usr/lib/udev/rules.d/80-drivers.rules
    'ENV{MODALIAS}=="?*", RUN{builtin}+="kmod load"',
    'SUBSYSTEM=="tifm", ENV{TIFM_CARD_TYPE}=="SD", RUN{builtin}+="kmod load tifm_sd"',
    'SUBSYSTEM=="tifm", ENV{TIFM_CARD_TYPE}=="MS", RUN{builtin}+="kmod load tifm_ms"',
    'SUBSYSTEM=="memstick", RUN{builtin}+="kmod load ms_block mspro_block"',
    'SUBSYSTEM=="i2o", RUN{builtin}+="kmod load i2o_block"',
    'SUBSYSTEM=="module", KERNEL=="parport_pc", RUN{builtin}+="kmod load ppdev"',
    'KERNEL=="mtd*ro", ENV{MTD_FTL}=="smartmedia", RUN{builtin}+="kmod load sm_ftl"',
    # /usr/lib/udev/rules.d/80-debian-compat.rules (also the kmod builtin)
    'SUBSYSTEM=="scsi", ENV{DEVTYPE}=="scsi_device", TEST!="[module/sg]", RUN{builtin}+="kmod load sg"',
)

# What RootDevice.matches() compares root= with: the device node and its udev
# symlinks, MAJOR/MINOR, and what udev's blkid builtin found (file system UUID and
# label, GPT partition UUID and name; *_ENC and ID_PART_ENTRY_NAME are \xNN-encoded).
ROOT_DEVICE_PROPERTIES = ("DEVNAME", "DEVLINKS", "MAJOR", "MINOR", "ID_FS_UUID", "ID_FS_UUID_ENC",
                          "ID_FS_LABEL", "ID_FS_LABEL_ENC", "ID_PART_ENTRY_UUID", "ID_PART_ENTRY_NAME")

# The properties the rules above look at, plus what every request records.
# Stands for a property value that is not valid UTF-8; never a valid alias.
UNDECODABLE = "\ufffd(undecodable)"
RELEVANT_PROPERTIES = ("ACTION", "DEVPATH", "SUBSYSTEM", "MODALIAS", "TIFM_CARD_TYPE", "DEVTYPE", "MTD_FTL",
                       "ID_FS_TYPE", "ID_FS_USAGE", *ROOT_DEVICE_PROPERTIES)


@dataclass(frozen=True)
class ModuleRequest:
    """One device event as the service needs it.

    An "add" asks: load whatever these names resolve to. `aliases` are module
    names or modaliases exactly as `kmod load` would get them (kmod resolves both
    the same way), in rule order, already validated, never empty. A "remove"
    (no aliases) says the device is gone. "enumerated" (no aliases, no devpath,
    source "coldplug") ends a coldplug enumeration: a device it did not report is
    gone too. Duplicates are the service's to drop (service.RequestFilter).
    """

    aliases: tuple[str, ...]
    devpath: str  # "/devices/pci0000:00/0000:00:03.0", relative to /sys; "" if "enumerated"
    subsystem: str | None
    action: Action  # coldplug requests are "add" too
    source: Origin


ENUMERATED = ModuleRequest(aliases=(), devpath="", subsystem=None, action="enumerated", source="coldplug")


def valid_alias(alias: object) -> bool:
    """Is `alias` something we may hand to kmod: 1..MAX_ALIAS_LEN printable ASCII
    characters, no space, not starting with '-' or '/', no ".."?

    Real modaliases never contain whitespace (the kernel replaces it, see
    of_modalias()), and a leading '-' could read as an option to a tool. A '/'
    does occur: the DMI modalias carries the BIOS date ("dmi:...:bd04/01/2014:..."),
    and udev hands it to `kmod load` like any other; what looks like a path is
    refused.
    """
    if not isinstance(alias, str) or not 0 < len(alias) <= MAX_ALIAS_LEN:
        return False
    if alias[0] in "-/" or ".." in alias:
        return False
    return all("\x21" <= c <= "\x7e" for c in alias)


def _kernel_name(devpath: str | None) -> str:
    return devpath.rstrip("/").rsplit("/", 1)[-1] if devpath else ""


RootKind = Literal["node", "UUID", "PARTUUID", "LABEL", "PARTLABEL", "devnum"]


@dataclass(frozen=True)
class RootDevice:
    """The block device that ``root=`` on the kernel command line names.

    Forms: what the kernel's own name_to_dev_t() takes (init/do_mounts.c, 6.1:
    ``/dev/NAME``, ``PARTUUID=``, ``PARTLABEL=``, ``MAJOR:MINOR`` and a hexadecimal
    device number) and what the initramfs adds (systemd-fstab-generator and
    dracut: ``UUID=``, ``LABEL=``, any ``/dev/disk/by-*/...`` or other udev
    symlink). The last ``root=`` counts, as with both; parameters after ``--``
    are init's. Anything else (``nfs``, ``live:...``, ``PARTUUID=.../PARTNROFF=``)
    names no device here: :meth:`from_cmdline` returns None.
    """

    kind: RootKind
    value: str

    @classmethod
    def from_cmdline(cls, cmdline: str) -> RootDevice | None:
        root: str | None = None
        for word in split_kernel_command_line(cmdline):
            if word == "--":
                break
            if word.startswith("root="):
                root = word[len("root="):]
        return None if root is None else cls.parse(root)

    @classmethod
    def parse(cls, root: str) -> RootDevice | None:
        """One root= value; None if it names no block device this can recognise."""
        root = root.removeprefix("block:")  # dracut's explicit form, root=block:/dev/...
        prefixes: tuple[RootKind, ...] = ("UUID", "PARTUUID", "LABEL", "PARTLABEL")
        for kind in prefixes:
            if root.startswith(kind + "="):
                value = root[len(kind) + 1:]
                if not value or (kind == "PARTUUID" and "/" in value):
                    return None
                # The kernel compares PARTUUID case-insensitively (match_dev_by_uuid:
                # strncasecmp); UUIDs are hex as well, so UUID= is read the same way.
                return cls(kind, value.lower() if kind.endswith("UUID") else value)
        if root.startswith("/dev/") and len(root) > len("/dev/"):
            return cls("node", root)
        major_minor = re.fullmatch(r"(\d+):(\d+)", root)
        if major_minor:
            return cls("devnum", f"{int(major_minor[1])}:{int(major_minor[2])}")
        if re.fullmatch(r"[0-9a-fA-F]+", root):
            # new_decode_dev(): the old 16-bit and the new 32-bit encodings in one.
            dev = int(root, 16)
            major, minor = (dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
            return cls("devnum", f"{major}:{minor}")
        return None

    def matches(self, properties: Mapping[str, str]) -> bool:
        """Is the device of this udev event (its properties) the one root= names?"""
        get = properties.get
        if self.kind == "node":
            devname = get("DEVNAME") or ""
            if devname and not devname.startswith("/"):
                devname = "/dev/" + devname  # raw kernel uevents carry the bare name
            return self.value == devname or self.value in (get("DEVLINKS") or "").split()
        if self.kind == "devnum":
            return self.value == f"{get('MAJOR')}:{get('MINOR')}"
        if self.kind == "UUID":
            candidates = [get("ID_FS_UUID"), _udev_decode(get("ID_FS_UUID_ENC"))]
            return self.value in [c.lower() for c in candidates if c]
        if self.kind == "PARTUUID":
            return self.value == (get("ID_PART_ENTRY_UUID") or "").lower()
        if self.kind == "LABEL":
            return self.value in (get("ID_FS_LABEL"), _udev_decode(get("ID_FS_LABEL_ENC")))
        return self.value == _udev_decode(get("ID_PART_ENTRY_NAME"))


def _udev_decode(value: str | None) -> str | None:
    """Undo udev's \\xNN encoding (blkid_encode_string, as in ID_FS_LABEL_ENC)."""
    if value is None:
        return None
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m[1], 16)), value)


def requests_for_device(
    properties: Mapping[str, str],
    attributes: Callable[[str], str | None],
    *,
    root: RootDevice | None = None,
) -> list[str]:
    """The `kmod load` arguments 80-drivers.rules (and Debian's sg rule) produce for
    one device event, validated, duplicates removed, in rule order.

    `properties` are the event's environment (ACTION, DEVPATH, SUBSYSTEM, MODALIAS,
    ...) or, for coldplug, the uevent file plus DEVPATH/SUBSYSTEM. A missing ACTION
    counts as "add". KERNEL is the last component of DEVPATH. `attributes(name)`
    reads a sysfs attribute of the device (None if absent); it is consulted only
    for ``modalias`` when the properties carry no MODALIAS, a superset of the
    rules that makes coldplug see every device with a modalias attribute (on real
    devices the two agree).

    Deliberate differences from udev:
    * TEST!="[module/sg]" is not evaluated: "sg" is requested for every SCSI
      device, and the daemon skips modules already loaded.
    * MTD_FTL is set by udev's mtd_probe; raw kernel events never carry it, so
      sm_ftl is only requested with the udev source.
    * Not a udev rule: the block device that `root` (root= on the kernel
      command line) names, if it holds a file system (udev's blkid builtin set
      ID_FS_USAGE=filesystem and ID_FS_TYPE), also requests "fs-TYPE", the alias
      mount(2) has the kernel load through modprobe. The root file system's
      driver is then loaded here, two-stage, before the initramfs mounts it;
      otherwise it would always come from the kernel's own modprobe call. udev
      itself never loads a file system driver because a device carries that file
      system, so no other device requests one: a USB stick with an exotic file
      system does not get its driver preloaded, and the file systems of
      /etc/fstab get theirs at mount time from the kernel, as without initsplit.
      On the real root the same rule applies (its driver is in by then). udev
      source only (raw kernel events carry no ID_FS_*).

    Invalid aliases (see valid_alias) are logged and left out; never raises for
    any string values.
    """
    if properties.get("ACTION", "add") != "add":
        return []
    subsystem = properties.get("SUBSYSTEM")
    kernel = _kernel_name(properties.get("DEVPATH"))
    wanted: list[str] = []

    # ENV{MODALIAS}=="?*", RUN{builtin}+="kmod load"   (no argument: $env{MODALIAS})
    modalias = properties.get("MODALIAS")
    if not modalias:
        try:
            modalias = attributes("modalias")
        except Exception as e:  # a reader must not take the source down
            log.debug("reading modalias of %r failed: %s", properties.get("DEVPATH"), e)
            modalias = None
        if modalias is not None:
            # sysfs attribute files end in a newline; a uevent value cannot.
            modalias = modalias[:-1] if modalias.endswith("\n") else modalias
    if modalias:
        wanted.append(modalias)

    if subsystem == "tifm":
        card = properties.get("TIFM_CARD_TYPE")
        if card == "SD":
            wanted.append("tifm_sd")
        elif card == "MS":
            wanted.append("tifm_ms")
    elif subsystem == "memstick":
        wanted += ["ms_block", "mspro_block"]
    elif subsystem == "i2o":
        wanted.append("i2o_block")
    elif subsystem == "module" and kernel == "parport_pc":
        wanted.append("ppdev")
    elif subsystem == "scsi" and properties.get("DEVTYPE") == "scsi_device":
        wanted.append("sg")
    if fnmatch.fnmatchcase(kernel, "mtd*ro") and properties.get("MTD_FTL") == "smartmedia":
        wanted.append("sm_ftl")
    if (subsystem == "block" and properties.get("ID_FS_USAGE") == "filesystem" and properties.get("ID_FS_TYPE")
            and root is not None and root.matches(properties)):
        wanted.append(f"fs-{properties['ID_FS_TYPE']}")

    out: list[str] = []
    for alias in wanted:
        if not valid_alias(alias):
            log.warning(
                "ignoring invalid module alias %s from %s", _shorten(alias), _shorten(properties.get("DEVPATH"))
            )
        elif alias not in out:
            out.append(alias)
    return out


def _shorten(value: object, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _valid_devpath(devpath: object) -> bool:
    """A devpath we may join to sys_root and log: absolute, bounded, printable, no
    '.' or '..' components."""
    if not isinstance(devpath, str) or not devpath.startswith("/") or len(devpath) > MAX_DEVPATH_LEN:
        return False
    if not devpath.isprintable():  # control characters, NUL, undecodable bytes
        return False
    return all(part not in (".", "..") for part in devpath.split("/"))


def _read_text(path: Path, limit: int) -> str | None:
    """Contents of a sysfs file, or None if it cannot be read. Bytes that are not
    UTF-8 survive as surrogates, so validation sees (and rejects) them."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError:  # absent, gone, EIO/ENODEV from the driver, a directory...
        return None
    if len(data) > limit:
        log.warning("ignoring oversized sysfs file %s", path)
        return None
    return data.decode("utf-8", "surrogateescape")


def parse_uevent(text: str) -> dict[str, str]:
    """KEY=VALUE lines of a sysfs uevent file; lines without '=' are ignored."""
    props: dict[str, str] = {}
    for line in text.split("\n"):
        key, sep, value = line.partition("=")
        if sep and key:
            props[key] = value
    return props


class UdevSource:
    """Module requests from udev or kernel uevents, plus coldplug.

    Usage by the daemon::

        src = UdevSource()
        src.start()                     # open the monitor first ...
        for req in src.coldplug(): ...  # ... then enumerate
        selector.register(src.fileno(), EVENT_READ)
        on readable: for req in src.read_ready(): ...

    Every "add" that requests something is reported, and every "remove", as the
    kernel or udevd sent it: a device that appears between opening the monitor
    and enumerating is reported twice (coldplug, then live), and a re-enumeration
    after an overflow reports every device again. The service tells such
    duplicates from new requests (service.RequestFilter); this class remembers
    nothing about the requests it made.
    """

    def __init__(self, *, source: Source = "auto", sys_root: Path = Path("/sys"),
                 kernel_cmdline: str | None = None) -> None:
        if source not in ("auto", "udev", "kernel"):
            raise ValueError(f"source must be 'auto', 'udev' or 'kernel', not {source!r}")
        self.requested_source: Source = source
        self.sys_root = Path(sys_root)
        # Whose file system driver is requested (see requests_for_device); from
        # /proc/cmdline unless a command line is given.
        if kernel_cmdline is None:
            kernel_cmdline = _read_text(Path("/proc/cmdline"), MAX_UEVENT_FILE) or ""
        self.root = RootDevice.from_cmdline(kernel_cmdline)
        self._context: pyudev.Context | None = None
        self._monitor: pyudev.Monitor | None = None
        self._source: Literal["udev", "kernel"] | None = None
        self._garbage = 0

    # -- lifecycle ---------------------------------------------------------------

    @property
    def source(self) -> Literal["udev", "kernel"]:
        """The source in use; for "auto", decided by start()."""
        if self._source is None:
            return self._resolve()
        return self._source

    def _resolve(self) -> Literal["udev", "kernel"]:
        if self.requested_source != "auto":
            return self.requested_source
        return "udev" if UDEV_CONTROL.exists() else "kernel"

    def start(self) -> None:
        """Open and start the netlink monitor. Call before coldplug()."""
        if self._monitor is not None:
            return
        self._source = self._resolve()
        if self._source == "udev" and not UDEV_CONTROL.exists():
            log.warning(
                "udev source forced but %s does not exist: udevd is not running, no events will arrive",
                UDEV_CONTROL,
            )
        self._context = pyudev.Context()
        monitor = pyudev.Monitor.from_netlink(self._context, source=self._source)
        try:
            monitor.set_receive_buffer_size(RECEIVE_BUFFER_SIZE)
        except OSError as e:
            log.info(
                "could not set a %d MiB netlink receive buffer (%s; needs CAP_NET_ADMIN); "
                "keeping the default, a burst of events may overflow it and force a re-enumeration",
                RECEIVE_BUFFER_SIZE >> 20,
                e,
            )
        monitor.start()  # binds the socket and makes it non-blocking
        self._monitor = monitor
        log.info("listening to %s uevents", self._source)

    def fileno(self) -> int:
        """The monitor's socket, for the daemon's selector."""
        return self._require_monitor().fileno()

    def close(self) -> None:
        """Close the monitor socket. Idempotent."""
        monitor, self._monitor = self._monitor, None
        # pyudev has no close(): the socket goes with the last reference
        # (udev_monitor_unref in Monitor.__del__), which is this one.
        del monitor
        self._context = None

    def __enter__(self) -> UdevSource:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_monitor(self) -> pyudev.Monitor:
        if self._monitor is None:
            raise RuntimeError("UdevSource.start() has not been called (or close() has)")
        return self._monitor

    # -- coldplug ----------------------------------------------------------------

    def coldplug(self) -> Iterator[ModuleRequest]:
        """Requests of the devices present now, then ENUMERATED. The monitor must
        already be open, so nothing that appears during the enumeration is lost."""
        self._require_monitor()
        # libudev always reads /sys; another sys_root is walked by hand.
        if self._source == "udev" and self.sys_root == Path("/sys"):
            devices = self._enumerate_libudev()
        else:
            devices = self._walk_sysfs()
        for props in itertools.chain(devices, self._walk_modules()):
            try:
                req = self._request(props, "coldplug")
            except Exception as e:  # never let one device stop the enumeration
                log.warning("ignoring %s during coldplug: %s", _shorten(props.get("DEVPATH")), _shorten(e))
                continue
            if req is not None:
                yield req
        # A full enumeration knows which devices are gone, even if their "remove"
        # was lost in a netlink overflow: those it did not report.
        yield ENUMERATED

    def _walk_sysfs(self) -> Iterator[dict[str, str]]:
        """Every kobject under <sys_root>/devices that can send uevents (it has a
        subsystem) with its uevent properties, DEVPATH and SUBSYSTEM."""
        top = self.sys_root / "devices"
        stack = [top]
        while stack:
            directory = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            names = set()
            for entry in entries:
                names.add(entry.name)
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                except OSError:
                    continue
            if "uevent" not in names or "subsystem" not in names:
                continue
            try:
                subsystem = os.path.basename(os.readlink(directory / "subsystem"))
            except OSError:
                continue
            text = _read_text(directory / "uevent", MAX_UEVENT_FILE)
            if text is None:
                continue
            props = parse_uevent(text)
            props["DEVPATH"] = "/" + directory.relative_to(self.sys_root).as_posix()
            props["SUBSYSTEM"] = subsystem
            props.pop("ACTION", None)
            yield props

    def _walk_modules(self) -> Iterator[dict[str, str]]:
        """Loaded modules, as the "module" subsystem (udev's coldplug triggers
        them too: `udevadm trigger --type=subsystems`)."""
        try:
            names = sorted(e.name for e in os.scandir(self.sys_root / "module"))
        except OSError:
            return
        for name in names:
            yield {"DEVPATH": f"/module/{name}", "SUBSYSTEM": "module"}

    def _enumerate_libudev(self) -> Iterator[dict[str, str]]:
        assert self._context is not None
        try:
            devices = iter(self._context.list_devices())
        except Exception as e:
            log.error("libudev enumeration failed (%s); walking %s instead", e, self.sys_root)
            yield from self._walk_sysfs()
            return
        while True:
            try:
                device = next(devices)
            except StopIteration:
                return
            except Exception as e:  # a device vanished mid-way, undecodable path...
                log.debug("skipping a device during enumeration: %s", e)
                continue
            try:
                props = self._device_properties(device)
            except Exception as e:
                log.warning("skipping a device during enumeration: %s", _shorten(e))
                continue
            if props is not None:
                props.pop("ACTION", None)
                yield props

    # -- live events -------------------------------------------------------------

    def read_ready(self) -> list[ModuleRequest]:
        """Requests from the events queued on the monitor, without blocking.

        If the kernel reports that the socket's buffer overflowed (ENOBUFS),
        events were lost: log it and add a fresh coldplug() to the result."""
        monitor = self._require_monitor()
        out: list[ModuleRequest] = []
        overflowed = False
        for _ in range(MAX_EVENTS_PER_READ):
            try:
                device = monitor.poll(timeout=0)
            except OSError as e:
                err = e.errno
                if err is None:
                    # pyudev's poll() reports POLLERR without an errno; the socket's
                    # pending error says what it was (and reading it clears it).
                    err = self._socket_error()
                if err == errno.ENOBUFS:
                    overflowed = True
                    continue
                if err in (errno.EAGAIN, errno.EINTR):
                    continue
                log.warning("receiving a uevent failed: %s", e)
                break
            if device is None:
                break
            try:
                props = self._device_properties(device)
                if props is not None:
                    req = self._request(props, self._source or "kernel")
                    if req is not None:
                        out.append(req)
            except Exception as e:  # never let one event kill the daemon
                log.warning("ignoring a uevent that could not be handled: %s", _shorten(e))
        if overflowed:
            log.warning("netlink receive buffer overflowed (ENOBUFS): uevents were lost, re-enumerating devices")
            out.extend(self.coldplug())
        return out

    def _socket_error(self) -> int | None:
        try:
            sock = socket.socket(fileno=os.dup(self._require_monitor().fileno()))
        except OSError:
            return None
        try:
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            return None
        finally:
            sock.close()

    # -- shared ------------------------------------------------------------------

    def _device_properties(self, device: pyudev.Device) -> dict[str, str] | None:
        """The properties the rules need, as str; None (logged) if the event is unusable."""
        props: dict[str, str] = {}
        for key in RELEVANT_PROPERTIES:
            try:
                value = device.properties.get(key)
            except ValueError:  # UnicodeDecodeError: pyudev decodes strictly
                if key in ("DEVPATH", "ACTION"):
                    self._garbage_event(f"undecodable {key}", device)
                    return None
                # Keep it present but unusable: an undecodable MODALIAS must be
                # rejected (and logged) as such, not replaced by the attribute.
                value = UNDECODABLE
            if value is not None:
                props[key] = value
        if "DEVPATH" not in props:
            self._garbage_event("no DEVPATH", device)
            return None
        return props

    def _garbage_event(self, what: str, detail: object) -> None:
        self._garbage += 1
        if self._garbage <= MAX_GARBAGE_WARNINGS:
            log.warning("ignoring uevent data (%s): %s", what, _shorten(detail))
        elif self._garbage == MAX_GARBAGE_WARNINGS + 1:
            log.warning("further bad uevent data will not be logged")

    def _attribute_reader(self, devpath: str) -> Callable[[str], str | None]:
        base = self.sys_root / devpath.lstrip("/")

        def read(name: str) -> str | None:
            if "/" in name or name in ("", ".", ".."):
                return None
            return _read_text(base / name, MAX_ALIAS_LEN + 1)

        return read

    def _request(self, props: dict[str, str], origin: Origin) -> ModuleRequest | None:
        devpath = props.get("DEVPATH")
        if not _valid_devpath(devpath):
            self._garbage_event("bad DEVPATH", devpath)
            return None
        assert devpath is not None
        action = props.get("ACTION", "add")
        if action == "remove":
            return ModuleRequest(aliases=(), devpath=devpath, subsystem=props.get("SUBSYSTEM"),
                                 action="remove", source=origin)
        if action != "add":
            return None
        aliases = requests_for_device(props, self._attribute_reader(devpath), root=self.root)
        if not aliases:
            return None
        return ModuleRequest(
            aliases=tuple(aliases),
            devpath=devpath,
            subsystem=props.get("SUBSYSTEM"),
            action="add",
            source=origin,
        )
