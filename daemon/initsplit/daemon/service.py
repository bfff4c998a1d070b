"""initsplitd's main loop: requests in, loads out, init modules given back when boot goes quiet."""

from __future__ import annotations

import errno
import logging
import os
import resource
import select
import selectors
import signal
import subprocess
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .. import faults
from ..fsio import atomic_write
from ..loader.kernel_state import livepatch_targets
from ..loader.recovery import LoadMarkers, delete_init_modules
from ..loader.results import ModuleLoad, UnloadBatch, UnloadTrigger
from ..loader.twostage import load_plain, load_rewritten, load_two_stage
from ..modfile import loadable_here
from .scheduler import LoadScheduler
from .splits import NotSplit, SplitProvider

log = logging.getLogger(__name__)

# How many served aliases RequestFilter remembers (least recently requested
# forgotten first). Remembering is only an optimisation: a forgotten alias is
# resolved again, and the scheduler still loads each module once.
MAX_SERVED_ALIASES = 4096
# How many (device, alias) pairs RequestFilter remembers, in all (the devices least
# recently heard from forgotten first). A forgotten pair at worst lets a duplicate
# report of a device event through: an alias whose load failed is tried once more.
MAX_DEVICE_ALIASES = 1 << 16
# Batches that try an init module the kernel would not delete yet (EBUSY: its init
# still runs, say after a killed daemon's load): then it stays for the next daemon.
MAX_DELETE_TRIES = 3
# How long batches keep trying an init module that has not settled (still
# initialising, or on its way out) before leaving it to a later daemon.
UNSETTLED_WAIT_SEC = 120.0


class LoadStep(Protocol):
    name: str
    path: Path | None
    options: str
    install_command: str | None
    builtin: bool


class Resolver(Protocol):
    def resolve(self, alias: str) -> Sequence[LoadStep]: ...


class Request(Protocol):
    """A device event (udev_source.ModuleRequest) or one of the daemon's own."""

    aliases: tuple[str, ...]
    devpath: str  # "" for the daemon's own requests and an enumeration's end
    action: str  # "add" (asks for aliases), "remove" or "enumerated" (see RequestFilter)
    source: str  # "coldplug", a live event's "udev" or "kernel", or "daemon"


class Source(Protocol):
    def fileno(self) -> int: ...
    def coldplug(self) -> Iterable[Request]: ...
    def read_ready(self) -> list[Request]: ...


class Reporter(Protocol):
    def module_loaded(self, load: ModuleLoad) -> None: ...
    def batch_unloaded(self, batch: UnloadBatch) -> None: ...
    def summary(self, *, loads: Sequence[ModuleLoad], batches: Sequence[UnloadBatch],
                elapsed: float) -> None: ...
    def log(self, priority: int, message: str, **fields: Any) -> None: ...


class Notifier(Protocol):
    def ready(self, status: str = "") -> None: ...
    def status(self, text: str) -> None: ...
    def watchdog(self) -> None: ...
    def stopping(self) -> None: ...
    def watchdog_interval(self) -> float | None: ...


@dataclass(slots=True)
class Settings:
    quiet_period: float = 2.0
    batch_size: int = 32
    workers: int = 2
    exit_after_quiet: float = 30.0
    exclude: frozenset[str] = frozenset()
    # Why every load is plain ("initsplit=off", "kernel enforces module signatures"), or "".
    plain_only: str = ""
    modprobe: str = "/sbin/modprobe"
    # Seconds a modprobe run for a module with an install command may take. The
    # command is an arbitrary shell program; one that hangs would hold a worker
    # (and settle, and the daemon's exit) for ever. On timeout modprobe and
    # everything it started are killed and the module is reported failed.
    # systemd-udevd gives its whole event, `kmod load` included, 180 s
    # (--event-timeout); a boot that waits that long for one module is lost anyway.
    modprobe_timeout: float = 30.0
    # A load still running after this long is stuck (a worker that never returns,
    # a read from a dead disk): the daemon gives up, hands module loading back to
    # udev and exits non-zero, so systemd starts a fresh one (see LoadStuck); 0:
    # never. A backstop, generous because it includes splitting a large module at
    # boot. A load stuck inside the kernel cannot be helped: the process cannot
    # even exit before the syscall returns.
    load_timeout: float = 600.0
    # While this file exists udev's module loading is switched off by initsplit's
    # 80-drivers.rules; None leaves udev alone (tests, busybox initramfs).
    active_flag: Path | None = None
    # Written in answer to SIGUSR1 once every event received until then has been
    # served and its loads have finished (initsplitd-settle waits for it before the
    # root file system is mounted); None: SIGUSR1 still settles, nothing is written.
    settled_flag: Path | None = None
    # systemd-udevd's queue file: it exists while any event is queued or running
    # and goes once the last one is done (src/udev/udevd.c, event_queue_insert()
    # and on_post(); what `udevadm settle` waits for). A stopping daemon waits for
    # it (at most udev_queue_wait seconds) after removing the active flag: an event
    # whose rules saw the flag (udev skipped its load) reaches us only when udevd
    # broadcasts it, after its rules ran and before the event counts as done.
    udev_queue: Path | None = None
    udev_queue_wait: float = 3.0
    # After a daemon that died (its load markers, or its active flag left dangling):
    # probe again the devices its death may have left unbound (loader/reprobe.py);
    # returns the devices bound then. None: not done (tests).
    reprobe: Callable[[], list[str]] | None = None


@dataclass(frozen=True, slots=True)
class _Reload:
    """A request of the daemon's own: load this module again."""

    aliases: tuple[str, ...]
    devpath: str = ""
    action: str = "add"
    source: str = "daemon"


@dataclass(slots=True)
class _Device:
    # alias -> True while coldplug's report of it awaits its live echo
    aliases: dict[str, bool] = field(default_factory=dict)
    # The enumeration whose coldplug last reported the device (None: only live events).
    enumeration: int | None = None


class RequestFilter:
    """The daemon's one de-duplication point: what of a request is resolved and queued.

    Two things make a request redundant, and both are decided here, nowhere else
    (the event source only parses events and tags their origin and devpath):

    * The same device event reported twice. The source opens its monitor before
      enumerating, so a device that appears in between, or that udevd's own
      coldplug trigger re-announces, comes from coldplug and then live: per
      (devpath, alias), coldplug's report absorbs the next live "add" (its echo),
      and a coldplug report of a pair already reported (live, or by an earlier
      enumeration, as after a netlink overflow) is dropped. Any further live
      "add" is a new request, as udev runs `kmod load` again for it. A "remove"
      forgets the device, so its next "add" is new; so does an enumeration that
      no longer reports it (its "remove" may have been lost in an overflow),
      which the source marks with an "enumerated" request at its end. Pairs, not
      devices: udevd's event can carry an alias its database did not have at
      coldplug (an fs-TYPE once blkid ran), and that alias is new.
    * An alias served already (served_already): while none of the modules it
      resolved to failed (the scheduler's state; a module the scheduler forgot
      counts as failed), it costs neither a lookup nor a load. One whose
      resolution or load failed is tried again by the next new request for it,
      from any device; never on a timer.

    So a failed module is tried once per new device event, and a coldplug report
    and its echo count once. The memory is bounded (MAX_SERVED_ALIASES aliases,
    MAX_DEVICE_ALIASES device pairs, least recently used forgotten first);
    forgetting only ever lets a redundant request through.
    """

    def __init__(self, state: Mapping[str, str]) -> None:
        self._state = state  # LoadScheduler.state: module name -> "done", "failed", ...
        # alias -> the modules it resolved to, for aliases served already.
        self._served: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        # devpath -> what was reported for the device since it was added.
        self._devices: OrderedDict[str, _Device] = OrderedDict()
        self._pairs = 0  # sum of len(d.aliases) over _devices
        self._enumeration = 0  # the one in progress (counts "enumerated" markers)

    def new_aliases(self, request: Request) -> tuple[str, ...]:
        """The aliases this request asks for as a new device event (see above); ()
        for a duplicate report, a "remove" and an enumeration's end, which only
        update what is remembered. The daemon's own requests (no devpath) are
        always new."""
        if request.action == "remove":
            self._forget(request.devpath)
            return ()
        if request.action == "enumerated":
            gone = [p for p, d in self._devices.items() if d.enumeration != self._enumeration]
            for devpath in gone:
                self._forget(devpath)
            self._enumeration += 1
            return ()
        if request.action != "add":
            return ()
        if not request.devpath:
            return tuple(request.aliases)
        device = self._devices.get(request.devpath)
        if device is None:
            device = self._devices[request.devpath] = _Device()
        self._devices.move_to_end(request.devpath)
        coldplug = request.source == "coldplug"
        if coldplug:
            device.enumeration = self._enumeration
        fresh = []
        for alias in request.aliases:
            echo_pending = device.aliases.get(alias)
            if echo_pending is None:
                device.aliases[alias] = coldplug
                self._pairs += 1
                fresh.append(alias)
            elif coldplug:
                pass  # reported for this device already
            elif echo_pending:
                device.aliases[alias] = False  # coldplug reported it: this is its echo
            else:
                fresh.append(alias)
        while self._pairs > MAX_DEVICE_ALIASES and self._devices:
            _, oldest = self._devices.popitem(last=False)
            self._pairs -= len(oldest.aliases)
        return tuple(fresh)

    def _forget(self, devpath: str) -> None:
        device = self._devices.pop(devpath, None)
        if device is not None:
            self._pairs -= len(device.aliases)

    def served_already(self, alias: str) -> bool:
        """Is `alias` served: resolved, and none of its modules failed?"""
        modules = self._served.get(alias)
        if modules is None:
            return False
        if any(self._state.get(name, "failed") == "failed" for name in modules):
            del self._served[alias]
            return False
        self._served.move_to_end(alias)
        return True

    def served(self, alias: str, modules: tuple[str, ...]) -> None:
        """`alias` resolved to `modules` (builtin ones left out), now queued or loaded."""
        self._served[alias] = modules
        self._served.move_to_end(alias)
        while len(self._served) > MAX_SERVED_ALIASES:
            self._served.popitem(last=False)


@dataclass(slots=True)
class _Stats:
    loads: list[ModuleLoad] = field(default_factory=list)
    batches: list[UnloadBatch] = field(default_factory=list)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the process group ``proc`` leads and reap ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is gone already
    # With the whole group dead nobody holds the pipes open any more; the timeout
    # only guards against a child that left the group (setsid) and kept them.
    try:
        proc.communicate(timeout=5.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


class LoadStuck(RuntimeError):
    """A load ran past Settings.load_timeout. A worker thread cannot be stopped, so
    the daemon's only way out is to end the process (main.py: os._exit)."""


class Service:
    def __init__(self, *, settings: Settings, resolver: Resolver, source: Source,
                 provider: SplitProvider, reporter: Reporter, notifier: Notifier,
                 markers: LoadMarkers, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.resolver = resolver
        self.source = source
        self.provider = provider
        self.reporter = reporter
        self.notifier = notifier
        self.markers = markers
        self.clock = clock
        self.scheduler = LoadScheduler(workers=settings.workers, load=self._load)
        self.stats = _Stats()
        # (core module, init module) whose init succeeded: init modules to delete.
        self.pending_init: list[tuple[str, str]] = []
        # Pairs a batch could not delete yet, tried again after the next quiet period.
        self._busy_init: list[tuple[str, str]] = []
        self._delete_tries: dict[str, int] = {}
        self._unsettled_since: dict[str, float] = {}
        self.last_activity = clock()
        self.stop_requested = False
        self.settle_requested = False
        self.requests = RequestFilter(self.scheduler.state)
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Seconds between WATCHDOG=1 pings (None: no watchdog), and when the next is due.
        self._watchdog = notifier.watchdog_interval()
        self._next_watchdog = clock()

    # ------------------------------------------------------------ loading
    def _load(self, step: LoadStep) -> ModuleLoad:
        """Runs on a worker thread."""
        if step.install_command:
            return self._modprobe(step)
        if step.path is None:
            return ModuleLoad(step.name, "builtin")
        if not loadable_here(step.path):
            return self._modprobe(step, reason=f"{step.path.name}: compressed in a format neither "
                                  "the kernel nor this Python decompresses")
        if self.settings.plain_only:
            return load_plain(step.name, step.path, params=step.options,
                              reason=self.settings.plain_only)
        if step.name in self.settings.exclude:
            return load_plain(step.name, step.path, params=step.options, reason="excluded by configuration")
        try:
            return self._load_split(step.name, step.path, step.options)
        except Exception as exc:
            # The two-stage path's one catch-all. load_two_stage() lets an error out
            # only while the kernel holds nothing of the module (it deletes C itself
            # otherwise), so the original can go in plain: a disk driver that is not
            # loaded at all means no boot, and a crash marker that cannot be written
            # (ENOSPC on /run) means a two-stage load would not be crash-safe.
            reason = f"two-stage load not possible: {type(exc).__name__}: {exc}"
            log.warning("%s: %s; loading it plain", step.name, reason)
            return load_plain(step.name, step.path, params=step.options, reason=reason)

    def _load_split(self, name: str, path: Path, options: str) -> ModuleLoad:
        faults.hit("worker", name)
        split = self.provider.get(path)
        if split.kallsyms_bytes and livepatch_targets(name):
            # A live patch resolves its references to this module's variables through
            # the module's kallsyms (kernel/livepatch/core.c klp_find_object_symbol()),
            # which Discard=kallsyms-data would have emptied of them: the kernel would
            # refuse the module. The original, then.
            split.close()
            return load_plain(name, path, params=options,
                              reason="a live patch refers to it: loaded with its data symbols")
        if isinstance(split, NotSplit):
            if split.rewritten is not None:
                return load_rewritten(name, split.rewritten, original=path, params=options,
                                      reason=split.reason, btf_bytes=split.btf_bytes,
                                      kallsyms_bytes=split.kallsyms_bytes)
            return load_plain(name, path, params=options, reason=split.reason)
        return load_two_stage(split, original=path, params=options, markers=self.markers)

    def _modprobe(self, step: LoadStep, *, reason: str = "install command") -> ModuleLoad:
        # modprobe.d "install" commands are shell programs; only modprobe runs them right.
        # (And libkmod decompresses every format kmod was built with.)
        started = time.monotonic()
        timeout = self.settings.modprobe_timeout
        try:
            # A session of its own, so that on timeout the whole process group goes:
            # killing modprobe alone would leave the command's children holding the
            # output pipes open, and the wait for them would hang as well.
            proc = subprocess.Popen([self.settings.modprobe, step.name], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
        except OSError as exc:
            return ModuleLoad(step.name, "failed", errno=exc.errno,
                              reason=f"cannot run {self.settings.modprobe}: {exc.strerror}",
                              seconds=time.monotonic() - started)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return ModuleLoad(step.name, "failed", errno=errno.ETIMEDOUT,
                              reason=f"modprobe {step.name} (install command) did not finish within "
                                     f"{timeout:g} s; killed it and its process group",
                              seconds=time.monotonic() - started)
        if proc.returncode != 0:
            return ModuleLoad(step.name, "failed", reason=stderr.strip() or "modprobe failed",
                              seconds=time.monotonic() - started)
        return ModuleLoad(step.name, "handed-to-modprobe", reason=reason,
                          seconds=time.monotonic() - started)

    def handle_request(self, request: Request) -> None:
        """Resolve and queue each alias this request asks for anew, unless it has
        been served and nothing failed (both decided by RequestFilter).

        udev runs `kmod load` for every event; an alias whose resolution or load
        failed is therefore tried again by a later new request (the scheduler
        retries the failed module), while one whose modules are queued or loaded
        costs no lookup. Retries happen only here, once per request, never on a
        timer. A duplicate report, a "remove" or an enumeration's end is no
        activity: it neither delays the quiet period nor hits a fault point.
        """
        aliases = self.requests.new_aliases(request)
        if not aliases:
            return
        faults.hit("request", aliases[0])
        self.last_activity = self.clock()
        for alias in aliases:
            if self.requests.served_already(alias):
                continue
            try:
                steps = self.resolver.resolve(alias)
            except Exception as exc:  # a bad alias or index must not stop the daemon
                # Not remembered: a later event tries again (after a depmod, say).
                self.reporter.log(4, f"cannot resolve {alias!r}: {exc}", INITSPLIT_ALIAS=alias)
                continue
            steps = [s for s in steps if not s.builtin]
            self.requests.served(alias, tuple(s.name for s in steps))
            for load in self.scheduler.submit(steps):
                self._finished(load)

    def _finished(self, load: ModuleLoad) -> None:
        self.stats.loads.append(load)
        self.reporter.module_loaded(load)
        if load.mode == "two-stage" and load.init_module:
            self.pending_init.append((load.module, load.init_module))
        self.last_activity = self.clock()

    # ------------------------------------------------------------ unloading
    def unload_batch(self, trigger: UnloadTrigger, *, reload: bool = True) -> UnloadBatch | None:
        if not self.pending_init and not self._busy_init:
            return None
        pending = self.pending_init + self._busy_init
        self.pending_init, self._busy_init = [], []
        batch = delete_init_modules(pending, self.markers, trigger=trigger)
        self.stats.batches.append(batch)
        self.reporter.batch_unloaded(batch)
        now = self.clock()
        for core, init in batch.busy:
            if (core, init) in batch.unsettled:
                # Still loading or unloading: tried again for a while, not a number
                # of times (its init may take long; if it fails, the batch removes
                # the inert core then).
                since = self._unsettled_since.setdefault(init, now)
                if now - since < UNSETTLED_WAIT_SEC:
                    self._busy_init.append((core, init))
                continue
            tries = self._delete_tries[init] = self._delete_tries.get(init, 0) + 1
            if tries < MAX_DELETE_TRIES:
                self._busy_init.append((core, init))
        if self._busy_init:
            self.last_activity = self.clock()  # again after a quiet period, not at once
        for name in batch.removed_cores:
            # Its init module went away without its init succeeding (a killed
            # daemon's load whose init then failed): the inert core is gone, and the
            # module is loaded again, as its device's event would have it.
            self.reporter.log(4, f"{name}: removed the inert core module its failed init "
                                 "left; loading it again", INITSPLIT_MODULE=name)
            self.scheduler.forget(name)
            if reload:
                self.handle_request(_Reload((name,)))
        return batch

    # ------------------------------------------------------------ main loop
    def request_stop(self, *_: object) -> None:
        self.stop_requested = True
        self._wake()

    def request_settle(self, *_: object) -> None:
        self.settle_requested = True
        self._wake()

    def _wake(self) -> None:
        """Make the main loop's select() return (safe from a signal handler)."""
        try:
            os.write(self._signal_w, b"\0")
        except BlockingIOError:
            pass  # a wake-up is pending already

    def settle(self) -> None:
        """Serve every event queued so far, wait for the loads, then say so.

        A module whose core is loaded but whose init module has not run yet looks
        loaded to modprobe: a mount that makes the kernel ask for its file system
        driver right then would find none. initsplitd-settle (run before the root
        is mounted, after `udevadm settle`) sends SIGUSR1 and waits for the flag.

        The flag says "PID LOADS": how many loads this settle waited for. A load
        can add devices (a disk driver's probe adds the disk) whose events udev
        only then processes, the root disk's request for its file system's driver
        among them: initsplitd-settle settles udev and asks again until a settle
        made no load.
        """
        before = len(self.stats.loads)
        for request in self.source.read_ready():
            self.handle_request(request)
        self._drain()
        flag = self.settings.settled_flag
        if flag is None:
            return
        loads = len(self.stats.loads) - before
        try:
            atomic_write(flag, f"{os.getpid()} {loads}\n".encode(), make_parents=True)
        except OSError as exc:
            self.reporter.log(4, f"cannot create {flag}: {exc.strerror}")

    def status_text(self) -> str:
        loads = self.stats.loads
        two = sum(1 for l in loads if l.mode == "two-stage")
        freed = sum(b.freed_bytes for b in self.stats.batches)
        return (f"{len(loads)} modules, {two} two-stage, {len(self.pending_init)} init modules "
                f"pending, {freed} bytes given back")

    def run(self) -> int:
        """Serve until stopped or quiet; udev's own loading is back on whatever happens."""
        try:
            with selectors.DefaultSelector() as selector:
                return self._run(selector)
        except BaseException:
            # Whatever broke, give back what can safely be given back: init modules
            # whose init succeeded. Their markers go with them; anything else stays
            # marked for the next daemon's recovery.
            try:
                # No reloads here: the daemon exits non-zero, and the handback
                # replays every device for udev.
                self.unload_batch("stop", reload=False)
            except BaseException as exc:  # never mask the original error
                log.error("final batch after a failure failed: %s", exc)
            raise
        finally:
            self._set_active(False)

    def _run(self, selector: selectors.BaseSelector) -> int:
        started = self.clock()
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        # Installed before the active flag (which names our pid) exists: SIGUSR1
        # would otherwise kill us.
        signal.signal(signal.SIGUSR1, self.request_settle)
        selector.register(self.source.fileno(), selectors.EVENT_READ, "source")
        selector.register(self.scheduler.fileno(), selectors.EVENT_READ, "loads")
        selector.register(self._signal_r, selectors.EVENT_READ, "signal")

        self.recover()
        self._set_active(True)
        for request in self.source.coldplug():
            self.handle_request(request)
        faults.hit("before-ready")
        self.notifier.ready(self.status_text())
        exit_reason = "stop requested"
        while not self.stop_requested:
            now = self.clock()
            timeout = self._next_deadline(now)
            for key, _ in selector.select(timeout):
                if key.data == "source":
                    for request in self.source.read_ready():
                        self.handle_request(request)
                elif key.data == "loads":
                    for load in self.scheduler.collect():
                        self._finished(load)
                elif key.data == "signal":
                    try:
                        os.read(self._signal_r, 64)
                    except BlockingIOError:
                        pass
            if self.settle_requested and not self.stop_requested:
                self.settle_requested = False
                self.settle()
            self._check_stuck()
            self._ping_watchdog()
            now = self.clock()
            quiet = now - self.last_activity
            if len(self.pending_init) >= self.settings.batch_size:
                self.unload_batch("batch-size")
            elif (self.scheduler.idle and (self.pending_init or self._busy_init)
                  and quiet >= self.settings.quiet_period):
                self.unload_batch("quiet")
            self.notifier.status(self.status_text())
            if (self.settings.exit_after_quiet > 0 and self.scheduler.idle
                    and quiet >= self.settings.exit_after_quiet):
                exit_reason = "boot quiet"
                break
        self.notifier.stopping()
        faults.hit("stop")
        # Hand module loading back to udev first, then serve what udev already
        # skipped for us: those events are in our queue once udev is done with them.
        self._set_active(False)
        self._wait_for_udev_queue()
        for request in self.source.read_ready():
            self.handle_request(request)
        self._drain()
        batch = self.unload_batch("stop")
        if batch is not None and batch.removed_cores:
            # Inert cores removed: their modules were requested again; load them
            # before exiting (nobody replays the devices after a clean exit).
            self._drain()
            self.unload_batch("stop", reload=False)
        self.reporter.summary(loads=self.stats.loads, batches=self.stats.batches,
                              elapsed=self.clock() - started)
        # A clean exit: no restarted daemon needs the splits and decisions made at
        # boot (/run is memory).
        released = self.provider.release_runtime_splits()
        if released:
            self.reporter.log(6, f"removed the splits and decisions made at boot from {self.provider.runtime_dir}: "
                                 f"{released} bytes of memory back", INITSPLIT_RUNTIME_FREED_BYTES=released)
        # The daemon's own cost, as the kernel counted it (ru_maxrss is in KiB on Linux).
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.reporter.log(6, f"initsplitd exiting: {exit_reason} (peak RSS {peak_kib / 1024:.1f} MiB)",
                          INITSPLIT_PEAK_RSS_KIB=peak_kib)
        self.scheduler.shutdown()
        return 0

    def _wait_for_udev_queue(self) -> None:
        queue = self.settings.udev_queue
        if queue is None or self.settings.active_flag is None:
            return
        # Real time (not self.clock, which tests may freeze). Bounded: udevd may be
        # stopping too (switch-root), and a queue that never empties must not hold
        # the stop; events seen after the flag went are udev's own to load.
        deadline = time.monotonic() + self.settings.udev_queue_wait
        while queue.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._ping_watchdog()

    def _set_active(self, active: bool) -> None:
        flag = self.settings.active_flag
        if flag is None:
            return
        try:
            if active:
                flag.parent.mkdir(parents=True, exist_ok=True)
                # A symlink to our /proc entry, not a file: udev's TEST== follows it
                # (stat), so once this process is gone, SIGKILL included, the link
                # dangles and udev loads modules itself again at once.
                tmp = flag.with_name(f".{flag.name}.{os.getpid()}")
                tmp.unlink(missing_ok=True)
                os.symlink(f"/proc/{os.getpid()}", tmp)
                os.replace(tmp, flag)
            elif flag.is_symlink() and os.readlink(flag) == f"/proc/{os.getpid()}":
                flag.unlink()
        except OSError as exc:
            self.reporter.log(4, f"cannot {'create' if active else 'remove'} {flag}: {exc.strerror}")

    def recover(self) -> None:
        """Clean up after a daemon that was killed mid-load (see loader/recovery.py)."""
        flag = self.settings.active_flag
        # A killed daemon's flag names its /proc entry, gone now (or, reused, another).
        dead_flag = flag is not None and flag.is_symlink() and not flag.exists()
        recovery = self.markers.recover()
        self.pending_init.extend(recovery.pending_init)
        for name in recovery.removed_cores:
            self.reporter.log(4, f"{name}: removed the inert core module a killed initsplitd "
                                 "left behind; it will be loaded again", INITSPLIT_MODULE=name)
        for problem in recovery.problems:
            self.reporter.log(3, f"recovery: {problem}")
        if recovery.pending_init:
            self.reporter.log(6, f"recovered {len(recovery.pending_init)} init modules pending "
                                 "deletion")
        if (recovery.found_markers or dead_flag) and self.settings.reprobe is not None:
            bound = self.settings.reprobe()
            if bound:
                self.reporter.log(4, f"probed {len(bound)} devices again that a killed initsplitd "
                                     f"left without a driver: {', '.join(bound)}")

    def _next_deadline(self, now: float) -> float:
        deadlines = [now + 3600.0]
        # Both quiet deadlines act only once no load runs; while one does, a past
        # deadline would make select() return at once, again and again (a busy
        # loop beside a worker splitting a module). The scheduler's descriptor
        # wakes the loop when a load ends.
        if self.scheduler.idle:
            if self.pending_init or self._busy_init:
                deadlines.append(self.last_activity + self.settings.quiet_period)
            if self.settings.exit_after_quiet > 0:
                deadlines.append(self.last_activity + self.settings.exit_after_quiet)
        if self._watchdog:
            deadlines.append(self._next_watchdog)
        if self.settings.load_timeout > 0 and not self.scheduler.idle:
            deadlines.append(now + 1.0)  # look for a stuck load once a second
        return max(0.0, min(deadlines) - now)

    def _ping_watchdog(self) -> None:
        """Send WATCHDOG=1 if one is due. Every loop that waits calls this: with
        WatchdogSec= set, systemd kills a daemon that is silent for that long, and
        the interval is half of it (sd_watchdog_enabled(3))."""
        if not self._watchdog:
            return
        now = self.clock()
        if now >= self._next_watchdog:
            self.notifier.watchdog()
            self._next_watchdog = now + self._watchdog

    def _check_stuck(self) -> None:
        limit = self.settings.load_timeout
        if limit <= 0:
            return
        stuck = self.scheduler.stuck(now=time.monotonic(), limit=limit)
        if stuck:
            raise LoadStuck(f"load of {', '.join(stuck)} still running after {limit:g} s")

    def _drain(self) -> None:
        """Wait for loads in flight (settle, stop: the final batch sees their init
        modules), pinging the watchdog meanwhile: a slow load must not get the
        daemon killed, but a stuck one ends it (LoadStuck)."""
        while not self.scheduler.idle:
            self._check_stuck()
            self._ping_watchdog()
            wait = 1.0
            if self._watchdog:
                wait = min(wait, max(0.0, self._next_watchdog - self.clock()))
            select.select([self.scheduler.fileno()], [], [], wait)
            for load in self.scheduler.collect():
                self._finished(load)
        self._ping_watchdog()
