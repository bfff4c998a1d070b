"""Resolve a device MODALIAS to the modules to load, in order, exactly as modprobe does.

initsplitd loads every module itself (two stages), so it cannot let modprobe do the
loading. But which modules, in which order and with which options must stay what
``modprobe ALIAS`` would have done, or a device would come up differently under
initsplit. So the answer comes from libkmod itself, the way kmod 30's modprobe gets
it (tools/modprobe.c ``insmod()``):

* ``kmod_module_new_from_lookup()`` finds the modules for the alias;
* for each match, ``kmod_module_probe_insert_module()`` runs with
  ``KMOD_PROBE_DRY_RUN`` and a ``print_action`` callback. The match is skipped if it
  is already in the kernel, or if it is blacklisted and was found through an alias
  (``KMOD_PROBE_APPLY_BLACKLIST_ALIAS_ONLY``, as modprobe passes it). Otherwise the
  callback reports each module of its probe list in load order (softdeps,
  dependencies, install commands and their softdep quirk), with its options: the
  modprobe.d ``options`` lines for its name or for the alias it was found through,
  then the kernel command line's ``name.param=value`` words. This is the list
  ``modprobe --show-depends`` prints.

initsplit adds only what the callback does not say:

* ``requires`` versus ``after``: which earlier steps are required modules (the match
  and its modules.dep dependencies, from ``kmod_module_get_dependencies()``), and
  which are softdeps, whose failure libkmod ignores;
* a module without a file is a "builtin" step if ``kmod_module_get_initstate()`` says
  so, else it is dropped, as modprobe's print_action() does;
* each module at most once per answer, and a match that an earlier match already
  planned is skipped whole: real modprobe finds it in the kernel by then;
* errors for a modules.dep line libkmod could not read, and for a file that is
  missing.

For the running kernel, the result leaves out what is already loaded or built in, as
real modprobe does. For another module tree (``root``/``kver``) nothing on this
machine says what would be loaded. So ``KMOD_PROBE_IGNORE_LOADED`` is passed, as
``modprobe --show-depends`` does, and built-in modules appear as ``builtin=True``
steps.

**libkmod is not thread-safe**: a Resolver (its ``kmod_ctx``) must be used only from the
thread that created it; other threads get RuntimeError.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import threading
from collections.abc import Sequence
from ctypes import byref, c_char_p, c_void_p, create_string_buffer
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from . import _libkmod as k
from . import cmdline
from .errors import ModuleFileError, ModuleIndexError

_log = logging.getLogger(__name__)

# libkmod's compiled-in search path (libkmod.c default_config_paths, SYSCONFDIR=/etc),
# which modprobe uses when it gets no -C.
DEFAULT_CONFIG_DIRS = ("/etc/modprobe.d", "/run/modprobe.d",
                       "/usr/local/lib/modprobe.d", "/lib/modprobe.d")

# What modprobe's insmod() passes for --show-depends / -n, minus IGNORE_LOADED, which
# depends on the tree. DRY_RUN is what makes libkmod only report: never leave it out.
_PROBE_FLAGS = k.KMOD_PROBE_DRY_RUN | k.KMOD_PROBE_APPLY_BLACKLIST_ALIAS_ONLY


@dataclass(frozen=True)
class LoadStep:
    """One line of ``modprobe --show-depends``: a module to load, in order.

    ``install_command`` set: modprobe.d says to run that command instead of inserting
    the module, so the daemon must hand the module to plain modprobe (which substitutes
    ``$CMDLINE_OPTS`` with ``options``).  ``builtin``: part of the kernel image, nothing
    to load (only reported when resolving for another tree).
    """

    name: str
    path: Path | None
    options: str = ""
    install_command: str | None = None
    builtin: bool = False
    # Steps that modprobe loads ahead of this one for the same match, split the way
    # modprobe treats their failure: ``requires`` are required modules (the match
    # and its modules.dep dependencies), whose failure stops modprobe before this
    # one; ``after`` are softdeps and their dependencies, whose failure modprobe
    # ignores, so only their order counts.  Every name is that of an earlier, not
    # builtin step of the same answer.  Other matches of the same alias are
    # independent and may load in parallel.
    requires: tuple[str, ...] = dataclasses.field(default=(), compare=False)
    after: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    def show_depends_line(self) -> str:
        """The line ``modprobe --show-depends`` prints for this step, byte for byte.

        kmod's module_options_concat() always appends a space to non-empty options
        (and print_action() puts one before them), hence "insmod PATH opt=1 " and
        "insmod PATH " — the kernel ignores the extra blank; ``options`` leaves it out.
        """
        options = f"{self.options} " if self.options else ""
        if self.install_command is not None:
            return f"install {self.install_command} {options}"
        if self.builtin:
            return f"builtin {self.name}"
        return f"insmod {self.path} {options}"


@dataclass(frozen=True)
class _Action:
    """One print_action() call: what modprobe's print_action() would print for it."""

    name: str
    path: str | None
    options: str
    install_command: str | None  # set: libkmod would run the command
    builtin: bool


class Resolver:
    """modprobe's alias resolution for one module tree and configuration.

    ``root``: file system root holding ``lib/modules/<kver>`` and the modprobe.d
    directories (default ``/``).  ``kver``: kernel release (default: the running one).
    ``config_paths``: modprobe.d directories or files, as ``modprobe -C`` (default:
    libkmod's four directories, under ``root``; note that ``modprobe -d ROOT`` would
    still read the host's).  ``kernel_cmdline``: the command line whose
    ``mod.param=value`` and ``modprobe.blacklist=`` words apply (default: this
    machine's /proc/cmdline, which libkmod reads itself; ``""`` for none). A text
    that gives libkmod something else than /proc/cmdline does (``""`` too, where
    /proc/cmdline has such words) needs CAP_SYS_ADMIN, see cmdline.py.  ``ignore_loaded``: do not
    consult /sys/module (default: only consulted for the running kernel's own tree).

    Use as a context manager, or call :meth:`close`; only from the creating thread.
    """

    def __init__(self, *, root: Path | None = None, kver: str | None = None,
                 config_paths: Sequence[Path] | None = None,
                 kernel_cmdline: str | None = None,
                 ignore_loaded: bool | None = None) -> None:
        self._owner = threading.get_ident()
        self._ctx: Any = None
        running = os.uname().release
        self.kver = kver if kver is not None else running
        self.root = root
        self.dirname = Path(root if root is not None else "/", "lib", "modules", self.kver)
        if ignore_loaded is None:
            ignore_loaded = not (root is None and self.kver == running)
        self.ignore_loaded = ignore_loaded
        self._flags = _PROBE_FLAGS | (k.KMOD_PROBE_IGNORE_LOADED if ignore_loaded else 0)
        if not self.dirname.is_dir():
            raise FileNotFoundError(errno.ENOENT,
                                    f"no kernel module directory for {self.kver}",
                                    str(self.dirname))
        if config_paths is None and root is not None:
            config_paths = [Path(root, d.lstrip("/")) for d in DEFAULT_CONFIG_DIRS]

        lib = self._lib = k.libkmod()
        argv = None
        if config_paths is not None:
            encoded = [os.fsencode(os.fspath(p)) for p in config_paths]
            argv = (c_char_p * (len(encoded) + 1))(*encoded, None)

        def new_context() -> Any:
            return lib.kmod_new(os.fsencode(self.dirname), argv)

        self._errors: list[str] = []
        self._sink_key = _register_sink(self._errors)
        try:
            # kmod_new() is where libkmod reads the configuration, /proc/cmdline included.
            if kernel_cmdline is None or cmdline.libkmod_sees_the_same(kernel_cmdline):
                self._ctx = new_context()
            else:
                self._ctx = cmdline.call_seeing_cmdline(kernel_cmdline, new_context)
            _set_logging(lib, self._ctx, self._sink_key)
            # modprobe ignores a failure here and then finds nothing; a daemon that
            # silently resolves nothing is worse than one that says depmod is missing.
            ret = lib.kmod_load_resources(self._ctx)
            if ret < 0:
                raise ModuleIndexError(
                    f"{self.dirname}: cannot load the module indexes (modules.dep.bin,"
                    f" modules.alias.bin, ...): {os.strerror(-ret)}; was depmod run?")
        except BaseException:
            self.close()
            raise

    # -- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        """Release the libkmod context (idempotent)."""
        if self._ctx is None:
            _unregister_sink(self._sink_key)
            return
        self._check_thread()
        ctx, self._ctx = self._ctx, None
        # Every kmod_module holds a reference to its context: a context that survives
        # its last unref means module references leaked somewhere.
        if self._lib.kmod_unref(ctx):
            _log.warning("%s: libkmod context still referenced after close:"
                         " kmod_module references leaked", self.dirname)
        _unregister_sink(self._sink_key)

    def __enter__(self) -> Resolver:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._ctx is None else "open"
        return f"<Resolver {self.dirname} {state}>"

    def _check_thread(self) -> None:
        if threading.get_ident() != self._owner:
            raise RuntimeError("libkmod is not thread-safe: use a Resolver only from"
                               " the thread that created it")

    def _check_open(self) -> None:
        self._check_thread()
        if self._ctx is None:
            raise ValueError("operation on a closed Resolver")

    # -- resolution ----------------------------------------------------------------

    def resolve(self, alias: str) -> list[LoadStep]:
        """The modules ``modprobe ALIAS`` loads, in order; [] if nothing matches.

        An alias that is not even well-formed (an unbalanced ``[``) also gives [], as
        modprobe reports both as "not found".  Raises ModuleFileError when the indexes
        name a module file that cannot be read.
        """
        self._check_open()
        if "\0" in alias:
            raise ValueError("alias contains a NUL character")
        self._errors.clear()  # libkmod errors of earlier calls are not this call's
        lib = self._lib
        actions: list[_Action] = []
        failures: list[BaseException] = []

        def on_action(mod: Any, install: bool, options: bytes | None) -> None:
            # Called from C: an exception must not unwind into libkmod.
            try:
                actions.append(self._action(mod, install, options))
            except BaseException as exc:  # noqa: BLE001 - raised again below
                failures.append(exc)

        print_action = k.KMOD_PRINT_ACTION_FN(on_action)  # alive until we return
        no_install = k.KMOD_RUN_INSTALL_FN()  # NULL: never called in a dry run
        steps: list[LoadStep] = []
        planned: set[str] = set()  # names with a step in this answer
        loadable: set[str] = set()  # ... of which the daemon loads (not builtin)
        matches = self._lookup(alias)
        try:
            for mod in matches:
                name = k.decode(lib.kmod_module_get_name(mod)) or ""
                # modprobe probes each match in turn; a match loaded by an earlier one
                # is in the kernel by then and skipped whole.
                if name in planned:
                    continue
                actions.clear()
                seen_errors = len(self._errors)
                lib.kmod_module_probe_insert_module(mod, self._flags, None, no_install,
                                                    None, print_action)
                if failures:
                    raise failures[0]
                if not actions:  # in the kernel, or a blacklisted alias match
                    continue
                required = {name, *self._dependency_names(mod)}
                if len(self._errors) > seen_errors:
                    self._check_dependency_lines([a.name for a in actions])
                steps += self._match_steps(actions, required, planned, loadable)
            return steps
        finally:
            for mod in matches:
                lib.kmod_module_unref(mod)

    def _action(self, mod: Any, install: bool, options: bytes | None) -> _Action:
        lib = self._lib
        name = k.decode(lib.kmod_module_get_name(mod)) or ""
        path = k.decode(lib.kmod_module_get_path(mod))
        # module_options_concat() ends non-empty options with a blank (see LoadStep).
        text = k.decode(options) or ""
        if text.endswith(" "):
            text = text[:-1]
        command = k.decode(lib.kmod_module_get_install_commands(mod)) if install else None
        builtin = (not install and path is None
                   and lib.kmod_module_get_initstate(mod) == k.KMOD_MODULE_BUILTIN)
        return _Action(name, path, text, command, builtin)

    def _match_steps(self, actions: list[_Action], required: set[str], planned: set[str],
                     loadable: set[str]) -> list[LoadStep]:
        """The steps of one match's probe list, each with what must load before it.

        kmod_module_probe_insert_module() walks the list in order. It stops at the
        first *required* module that fails (the match and its modules.dep
        dependencies), but goes on past a softdep that fails (libkmod-module.c:
        "Ignore errors from softdeps"). So an earlier required module goes into
        ``requires`` (its failure means this one is not loaded), and any other
        earlier module goes into ``after`` (order only).

        Only modules that get a step the daemon loads are named. One already in the
        kernel (never reported) or built in is no requirement. One without a file (in
        modules.alias or a modprobe.d alias but not in modules.dep) has no step that
        could ever satisfy it, and a scheduler waiting for it would wait forever.
        libkmod's insert of such a module fails with ENOENT. As a softdep that is
        ignored, exactly as leaving it out does. As the match itself it would stop
        the probe before the match's post softdeps, which ``--show-depends`` still
        lists, and so does this answer.
        """
        hard: list[str] = []
        soft: list[str] = []
        out: list[LoadStep] = []
        for action in actions:
            name = action.name
            earlier = hard if name in required else soft
            if name in planned:  # libkmod lists a module again; modprobe loads it once
                if name in loadable and name not in hard and name not in soft:
                    earlier.append(name)
                continue
            step = self._step(action)
            if step is None:
                continue
            planned.add(name)
            out.append(dataclasses.replace(step, requires=tuple(hard), after=tuple(soft)))
            if not step.builtin:
                loadable.add(name)
                earlier.append(name)
        return out

    def _step(self, action: _Action) -> LoadStep | None:
        """The step for what modprobe's print_action() prints, if anything."""
        if action.install_command is not None:
            return LoadStep(action.name, Path(action.path) if action.path else None,
                            action.options, action.install_command)
        if action.builtin:
            return LoadStep(action.name, None, builtin=True)
        if action.path is None:
            # In modules.alias (or a modprobe.d alias) but neither in modules.dep nor
            # built in: modprobe prints nothing and its insert fails with ENOENT
            # (kmod_module_insert_module: "could not find module by name").
            _log.warning("%s: module %r has no file in modules.dep; skipped",
                         self.dirname, action.name)
            return None
        file = Path(action.path)
        if not file.is_file():
            raise ModuleFileError(f"{action.name}: {file} is listed in modules.dep but is"
                                  " not a file (stale depmod?)")
        return LoadStep(action.name, file, action.options)

    def modinfo(self, path: Path) -> list[tuple[str, str]]:
        """The ``.modinfo`` entries of a module file (and signature fields), as modinfo.

        FileNotFoundError if ``path`` does not exist; ModuleFileError if libkmod cannot
        read it as a kernel module.
        """
        self._check_open()
        lib = self._lib
        mod = k.kmod_module_p()
        lib.kmod_module_new_from_path(self._ctx, os.fsencode(path), byref(mod))
        try:
            head = k.kmod_list_p()
            try:
                lib.kmod_module_get_info(mod, byref(head))
            except OSError as exc:
                raise ModuleFileError(f"{path}: not a kernel module libkmod can read"
                                      f" ({exc.strerror})") from exc
            try:
                return [(k.decode(lib.kmod_module_info_get_key(entry)) or "",
                         k.decode(lib.kmod_module_info_get_value(entry)) or "")
                        for entry in k.iter_list(lib, head)]
            finally:
                lib.kmod_module_info_free_list(head)
        finally:
            lib.kmod_module_unref(mod)

    def _lookup(self, key: str) -> list[Any]:
        """kmod_module_new_from_lookup(): a reference to each match, for the caller to drop."""
        lib = self._lib
        head = k.kmod_list_p()
        try:
            lib.kmod_module_new_from_lookup(self._ctx, _encode(key), byref(head))
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # not a well-formed alias
                return []
            raise
        return _take_list(lib, head)

    def _dependency_names(self, mod: Any) -> list[str]:
        """modules.dep for ``mod`` (already parsed by the probe)."""
        lib = self._lib
        deps = _take_list(lib, lib.kmod_module_get_dependencies(mod))
        try:
            return [k.decode(lib.kmod_module_get_name(dep)) or "" for dep in deps]
        finally:
            for dep in deps:
                lib.kmod_module_unref(dep)

    def _check_dependency_lines(self, names: list[str]) -> None:
        """Raise ModuleFileError if one of ``names`` has a modules.dep line libkmod
        cannot read; called only after libkmod logged errors during a probe.

        When a file on a module's modules.dep line cannot be stat()ed, libkmod logs it
        and gives the module *no* dependencies at all. Loading the module alone would
        then fail in the kernel with unknown symbols, far from the cause. The probe does
        not say whose line it was, and this context's modules keep the failed parse.
        So each module is asked again, in a fresh context of the same tree (without
        configuration, which dependencies do not depend on). Errors of any other kind,
        such as a softdep name that is no valid alias, have been logged. modprobe goes
        on after them, and so does the resolver.
        """
        lib = self._lib
        errors: list[str] = []
        key = _register_sink(errors)
        ctx = lib.kmod_new(os.fsencode(self.dirname), (c_char_p * 1)(None))
        try:
            _set_logging(lib, ctx, key)
            if lib.kmod_load_resources(ctx) < 0:
                return
            for name in names:
                mod = k.kmod_module_p()
                lib.kmod_module_new_from_name(ctx, _encode(name), byref(mod))
                try:
                    lib.kmod_module_unref_list(lib.kmod_module_get_dependencies(mod))
                finally:
                    lib.kmod_module_unref(mod)
                if errors:
                    raise ModuleFileError(f"{name}: cannot read its modules.dep entry in"
                                          f" {self.dirname}: {'; '.join(errors)}")
        finally:
            lib.kmod_unref(ctx)
            _unregister_sink(key)


# -- helpers ---------------------------------------------------------------------------


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _take_list(lib: Any, head: Any) -> list[Any]:
    """Own a reference to each module of a list, then drop the list (and, if taking
    them fails part-way, the references already taken)."""
    taken: list[Any] = []
    try:
        for entry in k.iter_list(lib, head):
            taken.append(lib.kmod_module_get_module(entry))
        return taken
    except BaseException:
        for mod in taken:
            lib.kmod_module_unref(mod)
        raise
    finally:
        lib.kmod_module_unref_list(head)


def _set_logging(lib: Any, ctx: Any, sink_key: int) -> None:
    if k.LOG_FN_SUPPORTED:
        lib.kmod_set_log_fn(ctx, _LOG_CALLBACK, c_void_p(sink_key))
    lib.kmod_set_log_priority(
        ctx, k.LOG_DEBUG if _log.isEnabledFor(logging.DEBUG) else k.LOG_WARNING)


# -- libkmod log messages --------------------------------------------------------------
#
# One callback for the whole process, kept alive here: a ctypes callback collected while
# a kmod_ctx still points at it would crash.  The per-context ``data`` pointer is a key
# into _sinks, where a Resolver collects error messages it wants to react to.

_LEVELS = {k.LOG_ERR: logging.ERROR, k.LOG_WARNING: logging.WARNING,
           k.LOG_NOTICE: logging.INFO, k.LOG_INFO: logging.INFO, k.LOG_DEBUG: logging.DEBUG}
_sinks: dict[int, list[str]] = {}
_sink_lock = threading.Lock()  # Resolvers in different threads register concurrently
_next_sink = 0


def _register_sink(sink: list[str]) -> int:
    global _next_sink
    with _sink_lock:
        _next_sink += 1
        _sinks[_next_sink] = sink
        return _next_sink


def _unregister_sink(key: int) -> None:
    with _sink_lock:
        _sinks.pop(key, None)


def _on_log(data: int | None, priority: int, file: bytes | None, line: int,
            fn: bytes | None, fmt: bytes | None, args: int | None) -> None:
    try:
        buf = create_string_buffer(2048)
        k.libc().vsnprintf(buf, len(buf), fmt, args)
        message = buf.value.decode("utf-8", "replace").rstrip("\n")
        _log.log(_LEVELS.get(priority, logging.ERROR if priority < k.LOG_ERR else logging.DEBUG),
                 "libkmod %s: %s", (fn or b"?").decode("utf-8", "replace"), message)
        if priority <= k.LOG_ERR:
            sink = _sinks.get(data or 0)
            if sink is not None:
                sink.append(message)
    except Exception:  # noqa: BLE001 - an exception must never unwind into C
        pass


_LOG_CALLBACK = k.KMOD_LOG_FN(_on_log)
