"""initsplitd's configuration: systemd-style INI files plus kernel command line switches.

Files, in the order they are applied (a later assignment overrides an earlier one):

1. the main file ``/etc/initsplit/initsplitd.conf`` (a missing file is not an error);
2. drop-ins ``*.conf`` from ``/etc/initsplit/initsplitd.conf.d/``,
   ``/run/initsplit/initsplitd.conf.d/`` and ``/usr/lib/initsplit/initsplitd.conf.d/``,
   sorted by file name across the three directories.

Drop-in rules follow systemd's ``conf_files_list()`` (systemd.syntax(7)): a file in
/etc replaces a file of the same name in /run or /usr/lib, and one in /run replaces
one in /usr/lib. A drop-in that is a symlink to /dev/null, or empty, masks the
same-named files below it. Entries that are not regular files (a directory named
``x.conf``, a dangling symlink) are skipped and do not mask anything.

Syntax as in systemd's parser: ``#`` and ``;`` start comment lines, a trailing
backslash continues a line (comment lines inside the continuation are skipped),
keys are case-sensitive, ``[X-...]`` sections are ignored silently. The daemon's
settings live in ``[Daemon]``; ``[Signing]`` is read where the pre-split cache is
built (the kernel hook and dracut module run ``initsplit split --sign-configured``),
never by the daemon at boot. An empty assignment (``Key=``) resets a setting to its default; for
the list setting ``Exclude=`` it empties the list, and non-empty ``Exclude=`` lines
accumulate. Unlike systemd, nothing here is fatal: every bad line (syntax error,
unknown section or key, invalid value) becomes a :class:`ConfigError` and the
setting keeps the value it had before that line; an unreadable file is one error.

Kernel command line (:func:`kernel_command_line_overrides`), applied after the files:

* ``initsplit=off`` (also ``0``, ``no``, ``false``, ...): the rescue switch, every
  module is loaded plain. ``initsplit=on`` or a bare ``initsplit`` turns it back on.
* ``initsplit.quiet=TIMESPAN``: overrides ``QuietPeriodSec=``.
* ``initsplit.exclude=MOD[,MOD...]``: adds to ``Exclude=`` (commas, because a space
  would end the parameter), so a module that misbehaves when split can be loaded
  plain without rebuilding the initramfs.
* ``initsplit.log_level=LEVEL``: overrides ``LogLevel=``, for debugging a boot.
* ``initsplit.btf=keep``: every module keeps its BTF (``Discard=`` without ``btf``), for
  BPF tracing against a module's types; ``initsplit.btf=discard`` undoes an earlier one.

Each also exists with an ``rd.`` prefix that is honoured only in the initramfs, and
``-``/``_`` are interchangeable in the names, both as with systemd's own switches.
Parameters after a lone ``--`` belong to init, not the kernel, and are ignored.

``CacheDir=`` and ``RuntimeDir=`` name where the daemon finds (and keeps) unsigned
kernel code. Here they only have to be absolute paths: they need not exist yet. The
daemon trusts them when it uses them (daemon/splits.py), and only if the directory
and every directory above it is owned by root (or the daemon's user) and not group-
or world-writable; a sticky /tmp-like directory does not qualify. Otherwise the
reason is logged once and modules are loaded plain.

``[Signing]`` (Secure Boot, signing.py): ``Sign=auto`` (the default) signs every
module the cache builders write with ``SignKey=``/``SignCert=`` when both are set,
else with DKMS's MOK (/var/lib/dkms/mok.key, mok.pub) when it exists, else with
initsplit's own pair (/var/lib/initsplit, ``initsplit key create``) when it exists,
else not at all (today's unsigned cache). ``Sign=yes`` is the same but a missing
key is an error; ``Sign=no`` never signs. Only paths are configured: the key stays
where it is, and the dracut module copies only ``*.conf`` files.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..layout.rules import LayoutRules
from ..modfile import canonical_name
from ..split.policy import DISCARD_CLASSES, TWO_STAGE_POLICIES, SplitOptions

MAIN_CONFIG = Path("etc/initsplit/initsplitd.conf")
# Highest priority first: an earlier directory's file masks a same-named later one.
DROPIN_DIRS = (
    Path("etc/initsplit/initsplitd.conf.d"),
    Path("run/initsplit/initsplitd.conf.d"),
    Path("usr/lib/initsplit/initsplitd.conf.d"),
)
SECTION = "Daemon"
SIGNING_SECTION = "Signing"
SIGN_MODES = ("auto", "yes", "no")
COMMAND_LINE = "kernel command line"

# syslog priorities, named as systemd's LogLevel= settings name them.
LOG_LEVELS = {
    "emerg": 0,
    "alert": 1,
    "crit": 2,
    "err": 3,
    "warning": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}
LOG_LEVEL_NAMES = {number: name for name, number in LOG_LEVELS.items()}

MAX_WORKERS = 16


@dataclass(frozen=True, slots=True)
class ConfigError:
    """One problem found in a configuration source; the daemon reports it and goes on."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.message}"


@dataclass(frozen=True, slots=True)
class Config:
    """The daemon's settings after files and kernel command line are applied."""

    # False only by the kernel command line rescue switch: load every module plain.
    enabled: bool = True
    # No load for this long: delete the pending init modules.
    quiet_period_sec: float = 2.0
    # This many init modules pending: delete them without waiting for quiet.
    batch_size: int = 32
    workers: int = 2
    # Exit once nothing has happened for this long; 0 = stay until stopped.
    exit_after_quiet_sec: float = 30.0
    # A load still running after this long is stuck: the daemon hands loading back
    # to udev and exits so that systemd starts it afresh; 0 = never. None (not
    # configured): the stage's default, default_load_timeout().
    load_timeout_sec: float | None = None
    # modprobe running a modprobe.d "install" command is killed after this long.
    install_command_timeout_sec: float = 30.0
    # Module names (with "_", as the kernel spells them) always loaded plain.
    exclude: tuple[str, ...] = ()
    # Pre-split modules, and where splits made at boot are kept; both must be
    # trusted directories when used (see the module docstring).
    cache_dir: Path = Path("/usr/lib/initsplit/cache")
    runtime_dir: Path = Path("/run/initsplit")
    # Highest syslog priority number still reported (6 = info).
    log_level: int = LOG_LEVELS["info"]
    # Which modules that split are loaded two-stage (split/decide.py):
    # when-not-worse, when-it-saves or always.
    two_stage: str = "when-not-worse"
    # Split modules with .data..ro_after_init too, leaving that data writable for
    # the module's life (a plain load makes it read-only after init).
    writable_ro_after_init: bool = False
    # What is dropped from every module loaded (split/policy.py DISCARD_CLASSES).
    discard: tuple[str, ...] = ("btf",)
    # Modules that keep their BTF anyway.
    keep_btf: tuple[str, ...] = ()
    # [Signing], for the cache builders only (signing.configured_key()): auto,
    # yes (a key is required) or no; the key and certificate, both or neither.
    sign: str = "auto"
    sign_key: Path | None = None
    sign_cert: Path | None = None

    def default_load_timeout(self, *, in_initrd: bool) -> float:
        """LoadTimeoutSec= as configured, or the stage's default.

        In the initramfs 30 s: the root device must appear well within systemd's
        DefaultDeviceTimeoutSec= (90 s), after which sysroot.mount fails and the
        boot ends in the emergency shell; a load stuck longer is given up, udev
        loads that driver, and the restarted daemon serves the rest. Every module
        there is split ahead of time (dracut), so no split at boot counts against
        it. On the real root 10 minutes, a backstop: it includes splitting a large
        module at boot on a slow machine.
        """
        if self.load_timeout_sec is not None:
            return self.load_timeout_sec
        return 30.0 if in_initrd else 600.0

    def excluded(self, module: str) -> bool:
        """Whether ``module`` (either spelling, ``-`` or ``_``) must be loaded plain."""
        return canonical_name(module) in self.exclude

    @property
    def log_level_name(self) -> str:
        return LOG_LEVEL_NAMES[self.log_level]

    def split_options(self, rules: LayoutRules) -> SplitOptions:
        """TwoStage= and WritableRoAfterInit= for the kernel with these layout rules."""
        two_stage = self.two_stage if self.two_stage in TWO_STAGE_POLICIES else "when-not-worse"
        return SplitOptions(two_stage=two_stage,  # type: ignore[arg-type]  # checked above
                            writable_ro_after_init=self.writable_ro_after_init, rules=rules,
                            discard=frozenset(self.discard), keep_btf=frozenset(self.keep_btf))


DEFAULTS = Config()


# --- value parsers: (text, current value) -> new value, ValueError with a reason ---

_TIME_UNITS = {
    # As systemd's parse_sec() spells them; "m" is minutes and "M" months there too.
    "us": 1e-6, "usec": 1e-6, "µs": 1e-6, "μs": 1e-6,
    "ms": 1e-3, "msec": 1e-3,
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
    "w": 604800.0, "week": 604800.0, "weeks": 604800.0,
    "M": 2629800.0, "month": 2629800.0, "months": 2629800.0,
    "y": 31557600.0, "year": 31557600.0, "years": 31557600.0,
}
_TIME_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([^\d\s.]*)")


def parse_timespan(text: str) -> float:
    """Seconds in ``text``: a plain number of seconds or a systemd time span ("1min 30s")."""
    text = text.strip()
    if text == "infinity":
        return math.inf
    if not text:
        raise ValueError("empty time span")
    total = 0.0
    pos = 0
    while pos < len(text):
        match = _TIME_PART.match(text, pos)
        if match is None:
            raise ValueError(f"invalid time span {text!r}")
        number, unit = match.groups()
        if unit and unit not in _TIME_UNITS:
            raise ValueError(f"unknown time unit {unit!r}")
        if not unit and match.end() < len(text) and not text[match.end()].isspace():
            raise ValueError(f"invalid time span {text!r}")  # "1.2.3": numbers run together
        total += float(number) * _TIME_UNITS[unit or "s"]
        pos = match.end()
        # Trailing blanks are fine, anything else must start a new number.
        if text[pos:].strip() == "":
            break
    return total


def _quiet_period(text: str, _current: Any) -> float:
    seconds = parse_timespan(text)
    if math.isinf(seconds):
        raise ValueError("must be finite")
    return seconds


def _exit_after(text: str, _current: Any) -> float:
    seconds = parse_timespan(text)
    # "infinity" reads naturally as "never exit"; 0 is the documented spelling of that.
    return 0.0 if math.isinf(seconds) else seconds


def _positive_timespan(text: str, _current: Any) -> float:
    seconds = parse_timespan(text)
    if not 0 < seconds < math.inf:
        raise ValueError("must be a finite time span greater than 0")
    return seconds


def _int_parser(low: int, high: int | None) -> Callable[[str, Any], int]:
    def parse(text: str, _current: Any) -> int:
        if not re.fullmatch(r"\d+", text):
            raise ValueError("not a non-negative integer")
        value = int(text)
        if value < low or (high is not None and value > high):
            limit = f"{low}..{high}" if high is not None else f">= {low}"
            raise ValueError(f"out of range ({limit})")
        return value

    return parse


_MODULE_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _module_names(text: str, separators: str) -> list[str]:
    names = [name for name in re.split(f"[{separators}]+", text) if name]
    for name in names:
        if not _MODULE_NAME.fullmatch(name):
            raise ValueError(f"invalid module name {name!r}")
    return [canonical_name(name) for name in names]


def _exclude(text: str, current: Any) -> tuple[str, ...]:
    # A list setting: each line adds (the empty line that resets is handled by the caller).
    merged = dict.fromkeys(current)
    merged.update(dict.fromkeys(_module_names(text, r"\s")))
    return tuple(merged)


def _directory(text: str, _current: Any) -> Path:
    path = Path(text)
    if not path.is_absolute():
        raise ValueError("not an absolute path")
    if ".." in path.parts:
        raise ValueError("must not contain '..'")
    return path


def parse_log_level(text: str) -> int:
    """A syslog priority from its systemd name ("warning") or number ("4")."""
    if text in LOG_LEVELS:
        return LOG_LEVELS[text]
    if re.fullmatch(r"[0-7]", text):
        return int(text)
    raise ValueError(f"unknown log level (one of {', '.join(LOG_LEVELS)} or 0..7)")


def _log_level(text: str, _current: Any) -> int:
    return parse_log_level(text)


def _two_stage(text: str, _current: Any) -> str:
    if text not in TWO_STAGE_POLICIES:
        raise ValueError(f"not one of {', '.join(TWO_STAGE_POLICIES)}")
    return text


def _boolean(text: str, _current: Any) -> bool:
    return parse_boolean(text)


def _discard(text: str, current: Any) -> tuple[str, ...]:
    # A list setting, as Exclude=: each line adds.
    names = text.split()
    for name in names:
        if name not in DISCARD_CLASSES:
            raise ValueError(f"unknown class {name!r} (known: {', '.join(DISCARD_CLASSES)})")
    return tuple(dict.fromkeys((*current, *names)))


def _file(text: str, _current: Any) -> Path:
    path = _directory(text, _current)  # the same rules: absolute, no ".."
    if text.endswith("/"):
        raise ValueError("names a directory, not a file")
    return path


def _sign_mode(text: str, _current: Any) -> str:
    if text == "auto":
        return text
    try:
        return "yes" if parse_boolean(text) else "no"
    except ValueError:
        raise ValueError("not auto or a boolean") from None


# key -> (Config field, parser), per section
_KEYS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "QuietPeriodSec": ("quiet_period_sec", _quiet_period),
    "BatchSize": ("batch_size", _int_parser(1, None)),
    "Workers": ("workers", _int_parser(1, MAX_WORKERS)),
    "ExitAfterQuietSec": ("exit_after_quiet_sec", _exit_after),
    "LoadTimeoutSec": ("load_timeout_sec", _exit_after),
    "InstallCommandTimeoutSec": ("install_command_timeout_sec", _positive_timespan),
    "Exclude": ("exclude", _exclude),
    "CacheDir": ("cache_dir", _directory),
    "RuntimeDir": ("runtime_dir", _directory),
    "LogLevel": ("log_level", _log_level),
    "TwoStage": ("two_stage", _two_stage),
    "WritableRoAfterInit": ("writable_ro_after_init", _boolean),
    "Discard": ("discard", _discard),
    "KeepBTF": ("keep_btf", _exclude),
}
_SIGNING_KEYS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "Sign": ("sign", _sign_mode),
    "SignKey": ("sign_key", _file),
    "SignCert": ("sign_cert", _file),
}
_SECTION_KEYS = {SECTION: _KEYS, SIGNING_SECTION: _SIGNING_KEYS}
# Settings whose lines accumulate; "Key=" empties them.
_LIST_FIELDS = {"exclude", "discard", "keep_btf"}


# --- files ---


def _is_mask(path: Path, info: os.stat_result) -> bool:
    # systemd's null_or_empty(): /dev/null (symlink or device node) or an empty file.
    if stat.S_ISCHR(info.st_mode) and info.st_rdev == os.makedev(1, 3):
        return True
    if stat.S_ISREG(info.st_mode) and info.st_size == 0:
        return True
    # Under a root other than "/" an absolute symlink would resolve on the host;
    # "/dev/null" means masking wherever the tree is mounted.
    return path.is_symlink() and os.readlink(path) == "/dev/null"


def config_files(*, root: Path = Path("/")) -> tuple[list[Path], list[ConfigError]]:
    """The files :func:`load_config` reads, in order: main file, then drop-ins."""
    errors: list[ConfigError] = []
    files: list[Path] = []
    main = root / MAIN_CONFIG
    # A missing main file (or a dangling symlink, as systemd treats ENOENT) is no error.
    if main.exists():
        files.append(main)

    chosen: dict[str, Path | None] = {}  # None: masked
    for directory in DROPIN_DIRS:
        dirpath = root / directory
        try:
            names = sorted(os.listdir(dirpath))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            errors.append(ConfigError(str(dirpath), None, f"cannot list directory: {exc.strerror}"))
            continue
        for name in names:
            if not name.endswith(".conf") or name in chosen:
                continue
            path = dirpath / name
            try:
                info = path.stat()
            except FileNotFoundError:
                continue  # dangling symlink
            except OSError as exc:
                errors.append(ConfigError(str(path), None, f"cannot read: {exc.strerror}"))
                continue
            if _is_mask(path, info):
                chosen[name] = None
            elif stat.S_ISREG(info.st_mode):
                chosen[name] = path
    files.extend(path for _, path in sorted(chosen.items()) if path is not None)
    return files, errors


def _logical_lines(data: bytes, file: str, errors: list[ConfigError]) -> Iterator[tuple[int, str]]:
    """(first line number, text) per logical line, continuations joined."""
    pending: str | None = None
    start = 0
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            errors.append(ConfigError(file, number, "not valid UTF-8, line ignored"))
            continue
        line = line.rstrip()
        stripped = line.lstrip()
        if pending is not None and stripped[:1] in ("#", ";"):
            continue
        if pending is None and (not stripped or stripped[0] in "#;"):
            continue
        if pending is None:
            start = number
        text = line if pending is None else pending + line
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = None
        yield start, text
    if pending is not None:
        yield start, pending


# A configuration file is a few hundred bytes; anything this large is not one.
MAX_CONFIG_BYTES = 1 << 20


def _read_config_file(path: Path) -> bytes:
    """The file's bytes; OSError (with a reason) for anything but a regular file of sane size.

    Opened non-blocking and checked with fstat() first: a FIFO in the file's place
    would block the read, and a symlink to /dev/zero never end, both before the
    daemon is ready, so that systemd's start timeout, not the configuration,
    would decide the boot. Symlinks to regular files are fine (drop-ins often are).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_CONFIG_BYTES:
                raise OSError(errno.EFBIG, f"larger than {MAX_CONFIG_BYTES} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _apply_file(path: Path, values: dict[str, Any], errors: list[ConfigError]) -> None:
    file = str(path)
    try:
        data = _read_config_file(path)
    except OSError as exc:
        errors.append(ConfigError(file, None, f"cannot read: {exc.strerror or exc}"))
        return

    section: str | None = None
    ignore_section = False
    for number, text in _logical_lines(data, file, errors):
        text = text.strip()
        if text.startswith("["):
            if not text.endswith("]") or len(text) < 3:
                errors.append(ConfigError(file, number, f"invalid section header {text!r}"))
                # Settings below a broken header belong to no known section.
                section, ignore_section = None, True
                continue
            section = text[1:-1]
            ignore_section = section not in _SECTION_KEYS
            if ignore_section and not section.startswith("X-"):
                errors.append(ConfigError(file, number, f"unknown section [{section}], ignoring its settings"))
            continue
        if ignore_section:
            continue
        if section is None:
            errors.append(ConfigError(file, number, "assignment outside of a section, ignoring"))
            continue
        key, equals, value = text.partition("=")
        key, value = key.strip(), value.strip()
        if not equals:
            errors.append(ConfigError(file, number, f"missing '=' in {text!r}, ignoring"))
            continue
        keys = _SECTION_KEYS[section]
        if key not in keys:
            errors.append(ConfigError(file, number, f"unknown key {key!r} in [{section}], ignoring"))
            continue
        field, parse = keys[key]
        if value == "":
            # systemd's rule: an empty assignment resets a setting, and empties a list.
            values[field] = () if field in _LIST_FIELDS else getattr(DEFAULTS, field)
            continue
        try:
            values[field] = parse(value, values[field])
        except ValueError as exc:
            errors.append(ConfigError(file, number, f"invalid {key}={value}: {exc}, ignoring"))


def load_config(
    *, root: Path = Path("/"), paths: Sequence[Path] | None = None
) -> tuple[Config, list[ConfigError]]:
    """Read the configuration; never raises for bad content.

    ``paths`` replaces the search (main file and drop-in directories) with exactly
    these files, in this order; ``root`` prefixes the search paths (image builds, tests).
    """
    errors: list[ConfigError] = []
    if paths is None:
        files, errors = config_files(root=root)
    else:
        files = list(paths)
    values = {field.name: getattr(DEFAULTS, field.name) for field in dataclasses.fields(Config)}
    for path in files:
        _apply_file(path, values, errors)
    return Config(**values), errors


# --- kernel command line ---


@dataclass(frozen=True, slots=True)
class CommandLineOverrides:
    """What the kernel command line changes; None / () = not given."""

    enabled: bool | None = None
    quiet_period_sec: float | None = None
    exclude: tuple[str, ...] = ()
    log_level: int | None = None
    # initsplit.btf=keep: no module loses its BTF (Discard= without "btf").
    keep_btf: bool = False

    def apply(self, config: Config) -> Config:
        changes: dict[str, Any] = {}
        if self.keep_btf:
            changes["discard"] = tuple(c for c in config.discard if c != "btf")
        if self.enabled is not None:
            changes["enabled"] = self.enabled
        if self.quiet_period_sec is not None:
            changes["quiet_period_sec"] = self.quiet_period_sec
        if self.exclude:
            changes["exclude"] = tuple(dict.fromkeys(config.exclude + self.exclude))
        if self.log_level is not None:
            changes["log_level"] = self.log_level
        return dataclasses.replace(config, **changes)


_TRUE = {"1", "yes", "y", "true", "t", "on"}
_FALSE = {"0", "no", "n", "false", "f", "off"}


def parse_boolean(text: str) -> bool:
    """A boolean as systemd's parse_boolean() spells it."""
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def split_kernel_command_line(cmdline: str) -> list[str]:
    """Parameters as the kernel splits them: on blanks outside double quotes, quotes dropped."""
    words: list[str] = []
    word: list[str] = []
    quoted = False
    started = False
    for char in cmdline:
        if char == '"':
            quoted = not quoted
            started = True
        elif char.isspace() and not quoted:
            if started:
                words.append("".join(word))
            word, started = [], False
        else:
            word.append(char)
            started = True
    if started:
        words.append("".join(word))
    return words


def kernel_command_line_overrides(
    cmdline: str, *, in_initrd: bool = False
) -> tuple[CommandLineOverrides, list[ConfigError]]:
    """initsplit's switches on a kernel command line (the text of /proc/cmdline).

    ``in_initrd`` says whether ``rd.``-prefixed switches apply (systemd decides that
    by the existence of /etc/initrd-release). Later parameters override earlier ones;
    ``initsplit.exclude`` accumulates.
    """
    errors: list[ConfigError] = []
    enabled: bool | None = None
    quiet: float | None = None
    exclude: dict[str, None] = {}
    log_level: int | None = None
    keep_btf = False

    for word in split_kernel_command_line(cmdline):
        if word == "--":
            break
        key, equals, value = word.partition("=")
        # systemd's proc_cmdline_key_streq(): "-" and "_" are the same in names.
        key = key.replace("-", "_")
        if key.startswith("rd."):
            if not in_initrd:
                continue
            key = key[3:]
        if key != "initsplit" and not key.startswith("initsplit."):
            continue
        try:
            if key == "initsplit":
                enabled = True if not equals else parse_boolean(value)
            elif key == "initsplit.quiet":
                quiet = _quiet_period(value, None)
            elif key == "initsplit.exclude":
                exclude.update(dict.fromkeys(_module_names(value, r",\s")))
            elif key == "initsplit.log_level":
                log_level = parse_log_level(value)
            elif key == "initsplit.btf":
                if value not in ("keep", "discard"):
                    raise ValueError("must be keep or discard")
                keep_btf = value == "keep"
            else:
                errors.append(ConfigError(COMMAND_LINE, None, f"unknown parameter {word!r}, ignoring"))
        except ValueError as exc:
            errors.append(ConfigError(COMMAND_LINE, None, f"invalid {word!r}: {exc}, ignoring"))
    overrides = CommandLineOverrides(
        enabled=enabled, quiet_period_sec=quiet, exclude=tuple(exclude), log_level=log_level,
        keep_btf=keep_btf,
    )
    return overrides, errors
