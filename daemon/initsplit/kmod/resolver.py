"""Resolve a device MODALIAS to the modules to load, in order, exactly as modprobe does.

initsplitd loads every module itself (two stages), so it cannot let modprobe do the
loading; but which modules, in which order and with which options must stay what
``modprobe ALIAS`` would have done, or a device would come up differently under
initsplit.  This is a re-statement, on top of libkmod's primitives, of kmod 30's
``insmod()`` in tools/modprobe.c and ``kmod_module_probe_insert_module()`` /
``__kmod_module_get_probe_list()`` in libkmod/libkmod-module.c:

* ``kmod_module_new_from_lookup`` finds the modules for the alias: modprobe.d aliases,
  else a module of that name, else ``symbol:``, install/remove commands, modules.alias,
  modules.builtin, modules.builtin.alias — the first source with a match wins;
* each match is skipped if it is already in the kernel (or already planned by an earlier
  match), or if it is blacklisted *and was found through an alias*
  (``KMOD_PROBE_APPLY_BLACKLIST_ALIAS_ONLY``: ``modprobe NAME`` ignores the blacklist,
  and so do dependencies and softdeps);
* its probe list is: for each dependency (modules.dep, deepest first) its pre softdeps,
  itself, its post softdeps; then the module's pre softdeps, the module, its post
  softdeps — softdeps resolved recursively, each object visited once per match;
* a module with an ``install`` command is handed to that command, unless it has
  softdeps (then libkmod sets ``ignorecmd`` and inserts it itself: a kmod quirk kept
  here); a module without a file is "builtin" if modules.builtin says so, else dropped;
* options are every modprobe.d ``options`` line for the module's name — or for the
  alias it was found through — followed by ``name.param=value`` words of the kernel
  command line.

The result for the running kernel leaves out what is already loaded or built in, as
real modprobe does.  For another module tree (``root``/``kver``) nothing on this
machine says what would be loaded, so, like ``modprobe --show-depends``, builtin
modules appear as ``builtin=True`` steps and nothing is skipped.  Either way a module
appears at most once.

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
from .cmdline import parse_kernel_cmdline, read_proc_cmdline
from .errors import KmodError, ModuleFileError, ModuleIndexError

_log = logging.getLogger(__name__)

# libkmod's compiled-in search path (libkmod.c default_config_paths, SYSCONFDIR=/etc),
# which modprobe uses when it gets no -C.
DEFAULT_CONFIG_DIRS = ("/etc/modprobe.d", "/run/modprobe.d",
                       "/usr/local/lib/modprobe.d", "/lib/modprobe.d")


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


@dataclass(frozen=True, eq=False)
class _Mod:
    """A ``struct kmod_module *`` we hold a reference to, with what we need of it.

    libkmod keeps one object per "name" and one per "name\\alias" (a module found
    through an alias is a separate object remembering that alias); ``addr`` is that
    identity, which modprobe's visited flags and option matching go by.
    """

    ptr: Any
    addr: int
    name: str
    alias: str | None


class _Held:
    """Module references taken during one call, all dropped when it ends.

    Holding them for the whole call also keeps every object alive, so an address seen
    once cannot be reused by another object while we compare identities.
    """

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self._refs: list[Any] = []

    def take(self, ptr: Any) -> Any:
        self._refs.append(ptr)
        return ptr

    def release(self) -> None:
        while self._refs:
            self._lib.kmod_module_unref(self._refs.pop())


class Resolver:
    """modprobe's alias resolution for one module tree and configuration.

    ``root``: file system root holding ``lib/modules/<kver>`` and the modprobe.d
    directories (default ``/``).  ``kver``: kernel release (default: the running one).
    ``config_paths``: modprobe.d directories or files, as ``modprobe -C`` (default:
    libkmod's four directories, under ``root``; note that ``modprobe -d ROOT`` would
    still read the host's).  ``kernel_cmdline``: the command line whose
    ``mod.param=value`` and ``modprobe.blacklist=`` words apply (default: this
    machine's /proc/cmdline, which libkmod reads itself; pass ``""`` for none).
    ``ignore_loaded``: do not consult /sys/module (default: only consulted for the
    running kernel's own tree).

    Use as a context manager, or call :meth:`close`; only from the creating thread.
    """

    def __init__(self, *, root: Path | None = None, kver: str | None = None,
                 config_paths: Sequence[Path] | None = None,
                 kernel_cmdline: str | None = None,
                 ignore_loaded: bool | None = None) -> None:
        self._owner = threading.get_ident()
        running = os.uname().release
        self.kver = kver if kver is not None else running
        self.root = root
        self.dirname = Path(root if root is not None else "/", "lib", "modules", self.kver)
        if ignore_loaded is None:
            ignore_loaded = not (root is None and self.kver == running)
        self.ignore_loaded = ignore_loaded
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
        self._errors: list[str] = []
        self._ctx: Any = lib.kmod_new(os.fsencode(self.dirname), argv)
        try:
            self._sink_key = _register_sink(self._errors)
            if k.LOG_FN_SUPPORTED:
                lib.kmod_set_log_fn(self._ctx, _LOG_CALLBACK, c_void_p(self._sink_key))
            lib.kmod_set_log_priority(
                self._ctx, k.LOG_DEBUG if _log.isEnabledFor(logging.DEBUG) else k.LOG_WARNING)
            # modprobe ignores a failure here and then finds nothing; a daemon that
            # silently resolves nothing is worse than one that says depmod is missing.
            ret = lib.kmod_load_resources(self._ctx)
            if ret < 0:
                raise ModuleIndexError(
                    f"{self.dirname}: cannot load the module indexes (modules.dep.bin,"
                    f" modules.alias.bin, ...): {os.strerror(-ret)}; was depmod run?")
            self._read_config(kernel_cmdline)
        except BaseException:
            self.close()
            raise

    # -- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        """Release the libkmod context (idempotent)."""
        if self._ctx is None:
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

    # -- configuration --------------------------------------------------------------

    def _read_config(self, kernel_cmdline: str | None) -> None:
        """Snapshot the parsed configuration (libkmod does not reread it either)."""
        lib, ctx = self._lib, self._ctx
        blacklist = [key for key, _ in k.iter_config(lib, lib.kmod_config_get_blacklists(ctx))]
        options = [(key, value or "")
                   for key, value in k.iter_config(lib, lib.kmod_config_get_options(ctx))]
        self._alias_lines = [(key, value or "")
                         for key, value in k.iter_config(lib, lib.kmod_config_get_aliases(ctx))]
        self._softdep_lines = [(key, value or "")
                          for key, value in k.iter_config(lib, lib.kmod_config_get_softdeps(ctx))]
        if kernel_cmdline is not None:
            # libkmod has appended what /proc/cmdline says to both lists and cannot be
            # told otherwise; take those entries off the end again and put the given
            # command line's in their place.  Requiring the tail to be exactly what our
            # parser finds in /proc/cmdline checks that parser against libkmod's.
            proc = parse_kernel_cmdline(read_proc_cmdline())
            options = _strip_tail(options, list(proc.options), "options")
            blacklist = _strip_tail(blacklist, list(proc.blacklist), "blacklist")
            given = parse_kernel_cmdline(kernel_cmdline)
            options += given.options
            blacklist += given.blacklist
        self._options = tuple(options)
        self._blacklist = frozenset(blacklist)

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
        held = _Held(self._lib)
        try:
            steps: list[LoadStep] = []
            planned: set[str] = set()  # names with a step in this answer
            loadable: set[str] = set()  # ... of which the daemon loads (not builtin)
            for mod in self._lookup(held, alias):
                # modprobe calls kmod_module_probe_insert_module() per match; a match
                # loaded by an earlier one is "in the kernel" by then and skipped whole.
                if mod.name in planned or self._in_kernel(mod):
                    continue
                if mod.alias is not None and mod.name in self._blacklist:
                    continue
                steps += self._match_steps(held, mod, planned, loadable)
            return steps
        finally:
            held.release()

    def _match_steps(self, held: _Held, mod: _Mod, planned: set[str],
                     loadable: set[str]) -> list[LoadStep]:
        """The steps of one match's probe list, each with what must load before it.

        kmod_module_probe_insert_module() walks the list in order and stops at the
        first *required* module (the match and its modules.dep dependencies) that
        fails, but goes on past a softdep that fails (libkmod-module.c: "Ignore
        errors from softdeps").  So an earlier required module goes into
        ``requires`` (its failure means this one is not loaded) and any other
        earlier module into ``after`` (order only).

        Only modules that get a step the daemon loads are named: one already in the
        kernel or built in is no requirement, and one without a file (in
        modules.alias or a modprobe.d alias but not in modules.dep) has no step that
        could ever satisfy it; a scheduler waiting for it would wait forever.
        libkmod's insert of such a module fails with ENOENT: as a softdep that is
        ignored, exactly as leaving it out does; as the match itself it would stop
        the probe before the match's post softdeps, which ``--show-depends`` still
        lists, and so does this answer.
        """
        probe, required = self._probe_list(held, mod)
        hard: list[str] = []
        soft: list[str] = []
        out: list[LoadStep] = []
        for m, ignorecmd in probe:
            earlier = hard if m.name in required else soft
            if m.name in planned or self._in_kernel(m):
                if m.name in loadable and m.name not in hard and m.name not in soft:
                    earlier.append(m.name)
                continue
            step = self._step(m, ignorecmd)
            if step is None:
                continue
            planned.add(m.name)
            out.append(dataclasses.replace(step, requires=tuple(hard), after=tuple(soft)))
            if not step.builtin:
                loadable.add(m.name)
                earlier.append(m.name)
        return out

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

    def _lookup(self, held: _Held, key: str) -> list[_Mod]:
        """kmod_module_new_from_lookup(), with the alias each result was found by."""
        lib = self._lib
        normalized = _alias_normalize(key)
        if normalized is None:
            return []
        head = k.kmod_list_p()
        try:
            lib.kmod_module_new_from_lookup(self._ctx, _encode(key), byref(head))
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return []
            raise
        ptrs = self._take_list(held, head)
        # Which alias string libkmod stored: for a modprobe.d alias the pattern of the
        # alias line (one result per matching line, in order); for the index lookups the
        # normalised key.  That string decides which "options ALIAS ..." lines apply.
        patterns = [pattern for pattern, _ in self._alias_lines if k.fnmatch(pattern, normalized)]
        if patterns and len(patterns) != len(ptrs):
            raise KmodError(f"{key}: {len(patterns)} modprobe.d aliases match but libkmod"
                            f" returned {len(ptrs)} modules")
        mods = []
        for i, ptr in enumerate(ptrs):
            name = k.decode(lib.kmod_module_get_name(ptr)) or ""
            alias = None
            if self._is_alias_object(ptr, name):
                alias = patterns[i] if patterns else normalized
            mods.append(_Mod(ptr, k.address(ptr), name, alias))
        return mods

    def _is_alias_object(self, ptr: Any, name: str) -> bool:
        # libkmod pools modules by key, "name" or "name\alias": asking for the plain
        # name gives back the very same object unless this one was made for an alias.
        # (That is how libkmod decides KMOD_PROBE_APPLY_BLACKLIST_ALIAS_ONLY: mod->alias.)
        lib = self._lib
        plain = k.kmod_module_p()
        lib.kmod_module_new_from_name(self._ctx, _encode(name), byref(plain))
        try:
            return k.address(plain) != k.address(ptr)
        finally:
            lib.kmod_module_unref(plain)

    def _take_list(self, held: _Held, head: Any) -> list[Any]:
        """Own a reference to each module of a list, then drop the list."""
        lib = self._lib
        try:
            return [held.take(lib.kmod_module_get_module(entry))
                    for entry in k.iter_list(lib, head)]
        finally:
            lib.kmod_module_unref_list(head)

    def _in_kernel(self, mod: _Mod) -> bool:
        # libkmod's module_is_inkernel(): live or builtin; "coming" is not (modprobe
        # then tries to insert and the kernel answers EEXIST).
        if self.ignore_loaded:
            return False
        state = self._lib.kmod_module_get_initstate(mod.ptr)
        return state in (k.KMOD_MODULE_LIVE, k.KMOD_MODULE_BUILTIN)

    def _probe_list(self, held: _Held, top: _Mod) -> tuple[list[tuple[_Mod, bool]], set[str]]:
        """__kmod_module_get_probe_list(top, required=true, ignorecmd=false).

        Returns (module, ignorecmd) in load order; a module may appear twice (libkmod
        appends dependencies without checking), the caller keeps the first.  Also the
        names libkmod marks ``required``: ``top`` and its modules.dep dependencies
        (softdeps are probed with required=false, and so are their dependencies).
        """
        visited: set[int] = set()
        out: list[tuple[_Mod, bool]] = []
        required = {top.name}

        def probe(mod: _Mod) -> None:
            if mod.addr in visited:
                return
            visited.add(mod.addr)
            deps = self._dependencies(held, mod)
            if mod is top:
                required.update(dep.name for dep in deps)
            for dep in deps:
                fill_softdep(dep)
            fill_softdep(mod)

        def fill_softdep(mod: _Mod) -> None:
            pre, post = self._softdeps(held, mod)
            for soft in pre:
                probe(soft)
            # libkmod sets mod->ignorecmd here: a module with softdeps is inserted
            # directly even if it also has an install command.
            out.append((mod, bool(pre or post)))
            for soft in post:
                probe(soft)

        probe(top)
        return out, required

    def _dependencies(self, held: _Held, mod: _Mod) -> list[_Mod]:
        """modules.dep for ``mod``, deepest first (libkmod prepends as it parses)."""
        lib = self._lib
        seen_errors = len(self._errors)
        ptrs = self._take_list(held, lib.kmod_module_get_dependencies(mod.ptr))
        # When a file on the modules.dep line cannot be stat()ed libkmod logs it and
        # returns *no* dependencies at all; loading the module alone would then fail in
        # the kernel with unknown symbols, far from the cause.
        if len(self._errors) > seen_errors:
            raise ModuleFileError(f"{mod.name}: cannot read its modules.dep entry in"
                                  f" {self.dirname}: {'; '.join(self._errors[seen_errors:])}")
        # Dependencies are made from their paths, i.e. plain-name objects: no alias.
        return [_Mod(ptr, k.address(ptr), k.decode(lib.kmod_module_get_name(ptr)) or "", None)
                for ptr in ptrs]

    def _softdeps(self, held: _Held, mod: _Mod) -> tuple[list[_Mod], list[_Mod]]:
        """kmod_module_get_softdeps(): the first softdep line whose pattern matches."""
        lib = self._lib
        pre_names: list[str] = []
        post_names: list[str] = []
        for pattern, plain in self._softdep_lines:
            if k.fnmatch(pattern, mod.name):
                pre_names, post_names = _split_softdep(plain)
                break
        # Resolve the names ourselves to know the alias each object carries ...
        pre = [m for name in pre_names for m in self._lookup(held, name)]
        post = [m for name in post_names for m in self._lookup(held, name)]
        # ... and insist on getting exactly libkmod's objects.
        lib_pre, lib_post = k.kmod_list_p(), k.kmod_list_p()
        lib.kmod_module_get_softdeps(mod.ptr, byref(lib_pre), byref(lib_post))
        expect_pre = [k.address(p) for p in self._take_list(held, lib_pre)]
        expect_post = [k.address(p) for p in self._take_list(held, lib_post)]
        if [m.addr for m in pre] != expect_pre or [m.addr for m in post] != expect_post:
            raise KmodError(f"{mod.name}: softdeps {pre_names} / {post_names} resolved"
                            " differently from libkmod")
        return pre, post

    def _step(self, mod: _Mod, ignorecmd: bool) -> LoadStep | None:
        """modprobe's print_action() for one module of the probe list."""
        lib = self._lib
        path = k.decode(lib.kmod_module_get_path(mod.ptr))
        command = k.decode(lib.kmod_module_get_install_commands(mod.ptr))
        if command is not None and not ignorecmd:
            return LoadStep(mod.name, Path(path) if path else None, self._options_for(mod),
                            command)
        if path is None:
            if lib.kmod_module_get_initstate(mod.ptr) == k.KMOD_MODULE_BUILTIN:
                return LoadStep(mod.name, None, builtin=True)
            # In modules.alias (or a modprobe.d alias) but neither in modules.dep nor
            # built in: modprobe prints nothing and its insert fails with ENOENT
            # (kmod_module_insert_module: "could not find module by name").
            _log.warning("%s: module %r has no file in modules.dep; skipped",
                         self.dirname, mod.name)
            return None
        file = Path(path)
        if not file.is_file():
            raise ModuleFileError(f"{mod.name}: {file} is listed in modules.dep but is not"
                                  " a file (stale depmod?)")
        return LoadStep(mod.name, file, self._options_for(mod))

    def _options_for(self, mod: _Mod) -> str:
        # kmod_module_get_options(): non-empty option strings of every entry for the
        # module's name or the alias it was found by, in configuration order.
        return " ".join(opts for name, opts in self._options
                        if opts and (name == mod.name or name == mod.alias))


# -- helpers ---------------------------------------------------------------------------


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _alias_normalize(alias: str) -> str | None:
    """shared/util.c alias_normalize(): '-' -> '_' outside [...]; None for -EINVAL."""
    out: list[str] = []
    i = 0
    while i < len(alias):
        c = alias[i]
        if c == "-":
            out.append("_")
        elif c == "]":
            return None
        elif c == "[":
            close = alias.find("]", i)
            if close < 0:
                return None
            out.append(alias[i:close + 1])
            i = close
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _split_softdep(plain: str) -> tuple[list[str], list[str]]:
    """Split kmod_config_iter_get_value() of a softdep: "pre: a b" / "post: c" parts.

    kmod 30's softdep_to_char() writes no space between the two parts
    ("pre: a bpost: c"), so a pre name ending in "post:" is where post starts.  The
    caller compares the result with libkmod's own lists, so a name that itself ends in
    "post:" would be caught, not silently mis-split.
    """
    pre: list[str] = []
    post: list[str] = []
    words = plain.split()
    target: list[str] | None = None
    for word in words:
        if target is None and word == "pre:":
            target = pre
        elif word == "post:":
            target = post
        elif target is pre and word.endswith("post:"):
            pre.append(word[: -len("post:")])
            target = post
        elif target is not None:
            target.append(word)
    return pre, post


def _strip_tail(entries: list[Any], tail: list[Any], what: str) -> list[Any]:
    if not tail:
        return entries
    if entries[-len(tail):] != tail:
        raise KmodError(f"libkmod read /proc/cmdline {what} as {entries[-len(tail):]!r},"
                        f" initsplit's parser as {tail!r}")
    return entries[: -len(tail)]


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
