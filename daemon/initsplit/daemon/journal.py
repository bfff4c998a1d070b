"""Structured journal entries for what initsplitd does.

Every entry carries a fixed MESSAGE_ID (explained in conf/initsplit.catalog, so
``journalctl -x`` shows the explanation) and INITSPLIT_* fields, so the figures can
be read back exactly: ``journalctl -o json MESSAGE_ID=<id>`` or
``journalctl INITSPLIT_MODULE=dummy``.

Entries go to journald's native socket through python3-systemd. When that module is
missing or the socket does not exist (journald not started yet, no systemd at all),
each message becomes a ``<N>text`` line on stderr: journald's stream transport and
the kernel console both understand that sd-daemon(3) priority prefix, so the text
still arrives, without the fields. libsystemd itself drops entries silently when
the socket is missing, which is why the socket is checked here before each send.
"""

from __future__ import annotations

import errno as errno_module
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from initsplit.daemon.config import ConfigError
from initsplit.loader.results import ModuleLoad, UnloadBatch

try:
    from systemd import journal as _systemd_journal
except ImportError:  # python3-systemd not installed: stderr only
    _systemd_journal = None

# syslog priorities (the PRIORITY= field)
LOG_EMERG, LOG_ALERT, LOG_CRIT, LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO, LOG_DEBUG = range(8)

SYSLOG_IDENTIFIER = "initsplitd"
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")

# Fixed for good: journalctl filters and the catalog refer to them.
MESSAGE_ID_LOADED_TWO_STAGE = "a411c5ba231145c49abb7bedf2c4b5d9"
MESSAGE_ID_LOADED_PLAIN = "8715af6d67a345fe9f51cdd6b88b8430"
# Built in, already loaded or handed to modprobe: initsplitd did not load it itself.
MESSAGE_ID_NOT_LOADED = "24d4df5b62064e41917fc1e9fa021abf"
MESSAGE_ID_LOAD_FAILED = "015eafcdf68c46baaf94d37b3cb2a41a"
MESSAGE_ID_BATCH_UNLOADED = "712a0afda11f48368cf1e703ee2e0604"
MESSAGE_ID_SUMMARY = "b83b3d0483b04aab9eccb20718352c75"
MESSAGE_ID_CONFIG_ERROR = "d9d07be6cff64b5793f84a86385b25b2"

Sink = Callable[[Mapping[str, str]], None]

# Journal field names: upper case, digits, underscore, not starting with "_" (those
# are trusted fields journald sets itself) or a digit; journald drops anything else.
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*")

_LOADED = ("two-stage", "plain", "failed")


def _usec(seconds: float) -> int:
    return round(seconds * 1_000_000)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


class Reporter:
    """Writes initsplitd's journal entries.

    ``max_priority``: entries less important than this (a higher number) are dropped,
    as LogLevel= says. ``sink``: receives each entry's field dict instead of the
    journal (tests). ``journal_socket`` and ``stream`` exist so the fallback can be
    exercised.
    """

    def __init__(
        self,
        *,
        max_priority: int = LOG_INFO,
        sink: Sink | None = None,
        journal_socket: Path = JOURNAL_SOCKET,
        stream: TextIO | None = None,
    ) -> None:
        self.max_priority = max_priority
        self._sink = sink
        self._journal_socket = journal_socket
        self._stream = stream

    # --- the entries ---

    def module_loaded(self, load: ModuleLoad) -> None:
        """One module load, whatever its outcome."""
        two_stage = load.mode == "two-stage"
        fields: dict[str, object] = {
            "INITSPLIT_MODULE": load.module,
            "INITSPLIT_MODE": load.mode,
            # The catalog text of the other outcomes quotes the reason, so it is
            # always there (if empty) rather than shown as a bare field name.
            "INITSPLIT_REASON": (load.reason or None) if two_stage else load.reason,
            # Same for the init module's name; it is NAME__init by construction.
            "INITSPLIT_INIT_MODULE": load.init_module or (f"{load.module}__init" if two_stage else None),
            "INITSPLIT_CORE_BYTES": load.core_bytes,
            "INITSPLIT_INIT_BYTES": load.init_bytes,
            "INITSPLIT_INIT_PAGES": load.init_pages,
            "INITSPLIT_PLAIN_CORE_BYTES": load.plain_core_bytes,
            "INITSPLIT_SAVED_BYTES": load.saved_bytes,
            # Unreclaimable slab the module's BTF would have kept (Discard=btf).
            "INITSPLIT_BTF_BYTES": load.btf_bytes,
            # Core layout bytes its data symbols' kallsyms would have kept
            # (Discard=kallsyms-data), page-exact as /proc/modules counts them.
            "INITSPLIT_KALLSYMS_BYTES": load.kallsyms_bytes,
            # Unreclaimable slab the two-stage load takes more than a plain one
            # (layout/twostage_slab.py): counted against what it gives back.
            "INITSPLIT_TWOSTAGE_SLAB_BYTES": load.twostage_slab_bytes,
            "INITSPLIT_LOAD_USEC": _usec(load.seconds),
            # ERRNO= is the journal's standard field for an errno (systemd.journal-fields(7)).
            "ERRNO": load.errno,
        }
        name = load.module
        if two_stage:
            sizes = []
            if load.core_bytes is not None:
                sizes.append(f"core {load.core_bytes} bytes")
            if load.init_bytes is not None:
                sizes.append(f"init module {load.init_bytes} bytes")
            if load.saved_bytes is not None:
                sizes.append(f"{load.saved_bytes // 4096:+d} pages against a plain load")
            if load.twostage_slab_bytes:
                sizes.append(f"{load.twostage_slab_bytes} bytes of slab more than a plain load")
            if load.btf_bytes:
                sizes.append(f"BTF {load.btf_bytes} bytes given back")
            if load.kallsyms_bytes:
                sizes.append(f"data symbols {load.kallsyms_bytes} bytes given back")
            detail = f" ({', '.join(sizes)})" if sizes else ""
            self.log(LOG_INFO, f"{name}: loaded two-stage{detail}",
                     message_id=MESSAGE_ID_LOADED_TWO_STAGE, **fields)
        elif load.mode == "plain":
            parts = [load.reason] if load.reason else []
            if load.btf_bytes:
                parts.append(f"without its BTF: {load.btf_bytes} bytes given back")
            if load.kallsyms_bytes:
                parts.append(f"without its data symbols' names: {load.kallsyms_bytes} bytes given back")
            detail = f" ({'; '.join(parts)})" if parts else ""
            self.log(LOG_INFO, f"{name}: loaded plain{detail}",
                     message_id=MESSAGE_ID_LOADED_PLAIN, **fields)
        elif load.mode == "failed":
            cause = load.reason
            if not cause and load.errno is not None:
                cause = os.strerror(load.errno)
            if load.errno is not None:
                symbol = errno_module.errorcode.get(load.errno, str(load.errno))
                cause = f"{cause} ({symbol})" if cause else symbol
            self.log(LOG_ERR, f"{name}: load failed: {cause or 'unknown error'}",
                     message_id=MESSAGE_ID_LOAD_FAILED, **fields)
        else:
            text = {
                "builtin": "built into the kernel, nothing to load",
                "already-loaded": "already loaded",
                "handed-to-modprobe": "left to modprobe",
            }.get(load.mode, load.mode)
            if load.reason:
                text += f" ({load.reason})"
            # Handing a module on is worth seeing at the default level; the others are routine.
            priority = LOG_INFO if load.mode == "handed-to-modprobe" else LOG_DEBUG
            self.log(priority, f"{name}: {text}", message_id=MESSAGE_ID_NOT_LOADED, **fields)

    def batch_unloaded(self, batch: UnloadBatch) -> None:
        """One batch of init-module deletions."""
        parts = [
            f"freed {_plural(len(batch.deleted), 'init module')}: "
            f"{batch.freed_bytes} bytes ({_plural(batch.freed_pages, 'page')})"
        ]
        if batch.failed:
            failures = ", ".join(f"{module} ({error})" for module, error in batch.failed)
            parts.append(f"{len(batch.failed)} could not be deleted: {failures}")
        self.log(
            LOG_WARNING if batch.failed else LOG_INFO,
            "; ".join(parts),
            message_id=MESSAGE_ID_BATCH_UNLOADED,
            INITSPLIT_BATCH_MODULES=" ".join(batch.deleted),
            INITSPLIT_BATCH_COUNT=len(batch.deleted),
            INITSPLIT_FREED_BYTES=batch.freed_bytes,
            INITSPLIT_FREED_PAGES=batch.freed_pages,
            INITSPLIT_TRIGGER=batch.trigger,
            INITSPLIT_UNLOAD_USEC=_usec(batch.seconds),
            INITSPLIT_BATCH_FAILED="; ".join(f"{m}: {e}" for m, e in batch.failed) or None,
            INITSPLIT_BATCH_FAILED_COUNT=len(batch.failed),
        )

    def summary(
        self, *, loads: Sequence[ModuleLoad], batches: Sequence[UnloadBatch], elapsed: float
    ) -> None:
        """The totals, once initsplitd is done (or stopping)."""
        count = {mode: 0 for mode in _LOADED}
        for load in loads:
            if load.mode in count:
                count[load.mode] += 1
        modules = sum(count.values())
        skipped = len(loads) - modules
        freed_bytes = sum(batch.freed_bytes for batch in batches)
        freed_pages = sum(batch.freed_pages for batch in batches)
        loaded = [load for load in loads if load.mode in ("two-stage", "plain")]
        btf_bytes = sum(load.btf_bytes or 0 for load in loaded)
        kallsyms_bytes = sum(load.kallsyms_bytes or 0 for load in loaded)
        two_stage = [load for load in loaded if load.mode == "two-stage"]
        saved_core = sum(load.saved_bytes or 0 for load in two_stage)
        slab = sum(load.twostage_slab_bytes or 0 for load in two_stage)

        text = f"initsplit: {_plural(modules, 'module')}, {count['two-stage']} two-stage, {count['plain']} plain"
        if count["failed"]:
            text += f", {count['failed']} failed"
        if skipped:
            text += f", {skipped} skipped"
        text += f"; init modules freed {freed_bytes} bytes ({_plural(freed_pages, 'page')})"
        unload_failed = sum(len(batch.failed) for batch in batches)
        if unload_failed:
            text += f", {unload_failed} could not be deleted"
        # What stays given back for the modules' life, by class.
        # The slab two-stage loads take more than plain ones is a cost of the same kind.
        given_back = btf_bytes + kallsyms_bytes + saved_core - slab
        text += f"; given back for good: {given_back} bytes (BTF {btf_bytes}, "
        if kallsyms_bytes:
            text += f"data symbols {kallsyms_bytes}, "
        text += f"core layouts {saved_core}"
        if slab:
            text += f", less {slab} of two-stage slab"
        text += ")"

        self.log(
            LOG_NOTICE,
            text,
            message_id=MESSAGE_ID_SUMMARY,
            INITSPLIT_TOTAL_MODULES=modules,
            INITSPLIT_TOTAL_TWO_STAGE=count["two-stage"],
            INITSPLIT_TOTAL_PLAIN=count["plain"],
            INITSPLIT_TOTAL_FAILED=count["failed"],
            INITSPLIT_TOTAL_SKIPPED=skipped,
            INITSPLIT_TOTAL_CORE_BYTES=sum(
                load.core_bytes or 0 for load in loads if load.mode in ("two-stage", "plain")
            ),
            INITSPLIT_TOTAL_INIT_PAGES=sum(
                load.init_pages or 0 for load in loads if load.mode == "two-stage"
            ),
            INITSPLIT_TOTAL_BATCHES=len(batches),
            INITSPLIT_TOTAL_FREED_BYTES=freed_bytes,
            INITSPLIT_TOTAL_FREED_PAGES=freed_pages,
            INITSPLIT_TOTAL_UNLOAD_FAILED=unload_failed,
            INITSPLIT_TOTAL_BTF_BYTES=btf_bytes,
            INITSPLIT_TOTAL_KALLSYMS_BYTES=kallsyms_bytes,
            INITSPLIT_TOTAL_SAVED_CORE_BYTES=saved_core,
            INITSPLIT_TOTAL_TWOSTAGE_SLAB_BYTES=slab,
            INITSPLIT_TOTAL_GIVEN_BACK_BYTES=given_back,
            INITSPLIT_TOTAL_LOAD_USEC=sum(_usec(load.seconds) for load in loads),
            INITSPLIT_ELAPSED_USEC=_usec(elapsed),
        )

    def config_error(self, err: ConfigError) -> None:
        # CONFIG_FILE=/CONFIG_LINE= are the fields systemd's own log_syntax() uses.
        self.log(
            LOG_WARNING,
            str(err),
            message_id=MESSAGE_ID_CONFIG_ERROR,
            CONFIG_FILE=err.file,
            CONFIG_LINE=err.line,
        )

    # --- the plumbing ---

    def log(self, priority: int, message: str, *, message_id: str | None = None, **fields: object) -> None:
        """One entry; ``None`` field values are left out."""
        if priority > self.max_priority:
            return
        entry: dict[str, str] = {
            "MESSAGE": message,
            "PRIORITY": str(priority),
            "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        }
        if message_id is not None:
            entry["MESSAGE_ID"] = message_id
        for name, value in fields.items():
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"invalid journal field name {name!r}")
            if value is not None:
                entry[name] = str(value)
        self._write(entry)

    def _write(self, entry: Mapping[str, str]) -> None:
        if self._sink is not None:
            self._sink(dict(entry))
            return
        if _systemd_journal is not None and self._journal_socket.exists():
            try:
                _systemd_journal.sendv(*(f"{name}={value}" for name, value in entry.items()))
                return
            except OSError:
                pass  # journald went away (ECONNREFUSED) or is overloaded: use stderr
        self._write_stream(int(entry["PRIORITY"]), entry["MESSAGE"])

    def _write_stream(self, priority: int, message: str) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        # Each line is its own record on a stream, so each gets the prefix.
        text = "".join(f"<{priority}>{line}\n" for line in message.splitlines() or [""])
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            pass  # nowhere left to report to; loading modules matters more
