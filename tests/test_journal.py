"""initsplitd's journal entries, its message catalog, and sd_notify.

The journal is checked three ways:

* the field dicts the Reporter builds (through its ``sink``);
* a real systemd-journald: started privately in a new mount namespace, with its
  own tmpfs on /run, so python3-systemd's ``sendv`` reaches it at the usual
  /run/systemd/journal/socket without touching the host; the entries are read
  back with ``journalctl -o json`` and ``journalctl -x`` (with this catalog
  compiled in) and the stderr fallback goes through journald's stream transport
  via systemd-cat. Skipped where that cannot run (not root, no unshare);
* the catalog: parsed here, compiled with ``journalctl --root --update-catalog``.

The Notifier tests are here too: they talk to real AF_UNIX datagram sockets.
"""

from __future__ import annotations

import dataclasses

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from initsplit.daemon import journal as journal_module
from initsplit.daemon import notify as notify_module
from initsplit.daemon.config import ConfigError
from initsplit.daemon.journal import (
    LOG_DEBUG,
    LOG_ERR,
    LOG_INFO,
    LOG_NOTICE,
    LOG_WARNING,
    MESSAGE_ID_BATCH_UNLOADED,
    MESSAGE_ID_CONFIG_ERROR,
    MESSAGE_ID_LOAD_FAILED,
    MESSAGE_ID_LOADED_PLAIN,
    MESSAGE_ID_LOADED_TWO_STAGE,
    MESSAGE_ID_NOT_LOADED,
    MESSAGE_ID_SUMMARY,
    Reporter,
)
from initsplit.daemon.notify import Notifier
from initsplit.loader.results import ModuleLoad, UnloadBatch

REPO = Path(__file__).resolve().parent.parent
CATALOG = REPO / "conf" / "initsplit.catalog"
ALL_IDS = {
    MESSAGE_ID_LOADED_TWO_STAGE,
    MESSAGE_ID_LOADED_PLAIN,
    MESSAGE_ID_NOT_LOADED,
    MESSAGE_ID_LOAD_FAILED,
    MESSAGE_ID_BATCH_UNLOADED,
    MESSAGE_ID_SUMMARY,
    MESSAGE_ID_CONFIG_ERROR,
}


class Recorder:
    def __init__(self) -> None:
        self.entries: list[dict[str, str]] = []

    def __call__(self, entry: Mapping[str, str]) -> None:
        self.entries.append(dict(entry))

    @property
    def last(self) -> dict[str, str]:
        return self.entries[-1]


def recorded(max_priority: int = LOG_DEBUG) -> tuple[Reporter, Recorder]:
    recorder = Recorder()
    return Reporter(max_priority=max_priority, sink=recorder), recorder


def two_stage(name: str = "dummy", core: int = 16384, init: int = 16384, pages: int = 3) -> ModuleLoad:
    return ModuleLoad(name, "two-stage", init_module=f"{name}__init", core_bytes=core, init_bytes=init,
                      init_pages=pages, seconds=0.0125)


def plain(name: str = "nvme", reason: str = "not proven safe: .init.text referenced from .text") -> ModuleLoad:
    return ModuleLoad(name, "plain", reason=reason, core_bytes=65536, seconds=0.002)


# --- the entries (through the sink) ---


def test_message_ids_are_distinct_128_bit_ids() -> None:
    assert len(ALL_IDS) == 7
    for message_id in ALL_IDS:
        assert re.fullmatch(r"[0-9a-f]{32}", message_id)
        assert uuid.UUID(message_id).hex == message_id


def test_two_stage_load() -> None:
    reporter, rec = recorded()
    reporter.module_loaded(two_stage())
    assert rec.last == {
        "MESSAGE": "dummy: loaded two-stage (core 16384 bytes, init module 16384 bytes)",
        "MESSAGE_ID": MESSAGE_ID_LOADED_TWO_STAGE,
        "PRIORITY": str(LOG_INFO),
        "SYSLOG_IDENTIFIER": "initsplitd",
        "INITSPLIT_MODULE": "dummy",
        "INITSPLIT_MODE": "two-stage",
        "INITSPLIT_INIT_MODULE": "dummy__init",
        "INITSPLIT_CORE_BYTES": "16384",
        "INITSPLIT_INIT_BYTES": "16384",
        "INITSPLIT_INIT_PAGES": "3",
        "INITSPLIT_LOAD_USEC": "12500",
    }


def test_plain_load() -> None:
    reporter, rec = recorded()
    reporter.module_loaded(plain())
    entry = rec.last
    assert entry["MESSAGE"] == "nvme: loaded plain (not proven safe: .init.text referenced from .text)"
    assert entry["MESSAGE_ID"] == MESSAGE_ID_LOADED_PLAIN
    assert entry["PRIORITY"] == str(LOG_INFO)
    assert entry["INITSPLIT_MODE"] == "plain"
    assert entry["INITSPLIT_REASON"] == "not proven safe: .init.text referenced from .text"
    assert entry["INITSPLIT_CORE_BYTES"] == "65536"
    # Fields the load does not have are left out, not sent empty.
    assert "INITSPLIT_INIT_MODULE" not in entry and "INITSPLIT_INIT_BYTES" not in entry
    assert "ERRNO" not in entry


def test_failed_load() -> None:
    reporter, rec = recorded()
    reporter.module_loaded(ModuleLoad("floppy", "failed", reason="No such device", errno=19))
    entry = rec.last
    assert entry["MESSAGE"] == "floppy: load failed: No such device (ENODEV)"
    assert entry["MESSAGE_ID"] == MESSAGE_ID_LOAD_FAILED
    assert entry["PRIORITY"] == str(LOG_ERR)
    assert entry["ERRNO"] == "19"
    reporter.module_loaded(ModuleLoad("floppy", "failed", errno=19))
    assert rec.last["MESSAGE"] == "floppy: load failed: No such device (ENODEV)"


def test_modules_initsplitd_did_not_load() -> None:
    reporter, rec = recorded()
    reporter.module_loaded(ModuleLoad("ext4", "builtin"))
    reporter.module_loaded(ModuleLoad("loop", "already-loaded"))
    reporter.module_loaded(ModuleLoad("zfs", "handed-to-modprobe", reason="not in the module tree"))
    assert [(e["MESSAGE"], e["PRIORITY"]) for e in rec.entries] == [
        ("ext4: built into the kernel, nothing to load", str(LOG_DEBUG)),
        ("loop: already loaded", str(LOG_DEBUG)),
        ("zfs: left to modprobe (not in the module tree)", str(LOG_INFO)),
    ]
    assert {e["MESSAGE_ID"] for e in rec.entries} == {MESSAGE_ID_NOT_LOADED}


def test_batch_unloaded() -> None:
    reporter, rec = recorded()
    deleted = tuple(f"m{i}__init" for i in range(12))
    reporter.batch_unloaded(UnloadBatch(deleted, 196608, trigger="batch-size", seconds=0.004))
    entry = rec.last
    assert entry["MESSAGE"] == "freed 12 init modules: 196608 bytes (48 pages)"
    assert entry["MESSAGE_ID"] == MESSAGE_ID_BATCH_UNLOADED
    assert entry["PRIORITY"] == str(LOG_INFO)
    assert entry["INITSPLIT_BATCH_MODULES"] == " ".join(deleted)
    assert entry["INITSPLIT_BATCH_COUNT"] == "12"
    assert entry["INITSPLIT_FREED_BYTES"] == "196608"
    assert entry["INITSPLIT_FREED_PAGES"] == "48"
    assert entry["INITSPLIT_TRIGGER"] == "batch-size"
    assert entry["INITSPLIT_UNLOAD_USEC"] == "4000"
    assert entry["INITSPLIT_BATCH_FAILED_COUNT"] == "0"
    assert "INITSPLIT_BATCH_FAILED" not in entry


def test_batch_with_failures_is_a_warning() -> None:
    reporter, rec = recorded()
    reporter.batch_unloaded(UnloadBatch(("a__init",), 4096, failed=(("b__init", "Device or resource busy"),)))
    entry = rec.last
    assert entry["MESSAGE"] == (
        "freed 1 init module: 4096 bytes (1 page); 1 could not be deleted: b__init (Device or resource busy)"
    )
    assert entry["PRIORITY"] == str(LOG_WARNING)
    assert entry["INITSPLIT_BATCH_FAILED"] == "b__init: Device or resource busy"
    assert entry["INITSPLIT_BATCH_FAILED_COUNT"] == "1"


def test_summary() -> None:
    reporter, rec = recorded()
    loads = [two_stage(f"s{i}") for i in range(34)] + [plain(f"p{i}") for i in range(6)]
    batches = [UnloadBatch(tuple(f"s{i}__init" for i in range(30)), 491520),
               UnloadBatch(tuple(f"s{i}__init" for i in range(30, 34)), 65536, trigger="stop")]
    reporter.summary(loads=loads, batches=batches, elapsed=12.5)
    entry = rec.last
    assert entry["MESSAGE"] == ("initsplit: 40 modules, 34 two-stage, 6 plain; init modules freed 557056 "
                                "bytes (136 pages); given back for good: 0 bytes (BTF 0, core layouts 0)")
    assert entry["MESSAGE_ID"] == MESSAGE_ID_SUMMARY
    assert entry["PRIORITY"] == str(LOG_NOTICE)
    totals = {k: v for k, v in entry.items() if k.startswith("INITSPLIT_")}
    assert totals == {
        "INITSPLIT_TOTAL_MODULES": "40",
        "INITSPLIT_TOTAL_TWO_STAGE": "34",
        "INITSPLIT_TOTAL_PLAIN": "6",
        "INITSPLIT_TOTAL_FAILED": "0",
        "INITSPLIT_TOTAL_SKIPPED": "0",
        "INITSPLIT_TOTAL_CORE_BYTES": str(34 * 16384 + 6 * 65536),
        "INITSPLIT_TOTAL_INIT_PAGES": str(34 * 3),
        "INITSPLIT_TOTAL_BATCHES": "2",
        "INITSPLIT_TOTAL_FREED_BYTES": "557056",
        "INITSPLIT_TOTAL_FREED_PAGES": "136",
        "INITSPLIT_TOTAL_UNLOAD_FAILED": "0",
        "INITSPLIT_TOTAL_BTF_BYTES": "0",
        "INITSPLIT_TOTAL_KALLSYMS_BYTES": "0",
        "INITSPLIT_TOTAL_SAVED_CORE_BYTES": "0",
        "INITSPLIT_TOTAL_TWOSTAGE_SLAB_BYTES": "0",
        "INITSPLIT_TOTAL_GIVEN_BACK_BYTES": "0",
        "INITSPLIT_TOTAL_LOAD_USEC": str(34 * 12500 + 6 * 2000),
        "INITSPLIT_ELAPSED_USEC": "12500000",
    }


def test_summary_counts_what_is_given_back_for_good() -> None:
    # BTF dropped from a two-stage and a plain load, a page of core layout won by
    # one split and one lost by none (the policy loads those plain); a failed
    # load's figures count for nothing.
    reporter, rec = recorded()
    loads = [dataclasses.replace(two_stage("a"), btf_bytes=18952, plain_core_bytes=20480),
             dataclasses.replace(plain("b"), btf_bytes=41488),
             dataclasses.replace(plain("c"), mode="failed", btf_bytes=999)]
    reporter.summary(loads=loads, batches=[], elapsed=1.0)
    entry = rec.last
    assert entry["MESSAGE"].endswith("; given back for good: 64536 bytes (BTF 60440, core layouts 4096)")
    assert (entry["INITSPLIT_TOTAL_BTF_BYTES"], entry["INITSPLIT_TOTAL_SAVED_CORE_BYTES"],
            entry["INITSPLIT_TOTAL_GIVEN_BACK_BYTES"]) == ("60440", "4096", "64536")
    reporter.module_loaded(loads[0])
    assert rec.last["INITSPLIT_BTF_BYTES"] == "18952"
    assert rec.last["MESSAGE"] == ("a: loaded two-stage (core 16384 bytes, init module 16384 bytes, "
                                   "+1 pages against a plain load, BTF 18952 bytes given back)")
    reporter.module_loaded(loads[1])
    assert rec.last["MESSAGE"].endswith("; without its BTF: 41488 bytes given back)")


def test_summary_counts_the_two_stage_slab_against_it() -> None:
    # The slab a two-stage load takes more than a plain one (layout/twostage_slab.py)
    # is taken off what it gives back, per module and in the total; a plain load
    # has none, whatever a stale field says.
    reporter, rec = recorded()
    loads = [dataclasses.replace(two_stage("a"), plain_core_bytes=20480, twostage_slab_bytes=5288),
             dataclasses.replace(plain("b"), btf_bytes=41488, twostage_slab_bytes=777)]
    reporter.summary(loads=loads, batches=[], elapsed=1.0)
    entry = rec.last
    assert entry["MESSAGE"].endswith("; given back for good: 40296 bytes (BTF 41488, core layouts 4096, "
                                     "less 5288 of two-stage slab)")
    assert (entry["INITSPLIT_TOTAL_TWOSTAGE_SLAB_BYTES"], entry["INITSPLIT_TOTAL_GIVEN_BACK_BYTES"]) == \
        ("5288", str(41488 + 4096 - 5288))
    reporter.module_loaded(loads[0])
    assert rec.last["INITSPLIT_TWOSTAGE_SLAB_BYTES"] == "5288"
    assert rec.last["MESSAGE"] == ("a: loaded two-stage (core 16384 bytes, init module 16384 bytes, "
                                   "+1 pages against a plain load, 5288 bytes of slab more than a "
                                   "plain load)")


def test_summary_mentions_failures_and_skips() -> None:
    reporter, rec = recorded()
    loads = [two_stage(), ModuleLoad("x", "failed", reason="boom"), ModuleLoad("ext4", "builtin")]
    batch = UnloadBatch((), 0, failed=(("dummy__init", "busy"),))
    reporter.summary(loads=loads, batches=[batch], elapsed=1.0)
    assert rec.last["MESSAGE"] == (
        "initsplit: 2 modules, 1 two-stage, 0 plain, 1 failed, 1 skipped; "
        "init modules freed 0 bytes (0 pages), 1 could not be deleted; given back for good: "
        "0 bytes (BTF 0, core layouts 0)"
    )


def test_config_error() -> None:
    reporter, rec = recorded()
    reporter.config_error(ConfigError("/etc/initsplit/initsplitd.conf", 3, "invalid Workers=0: out of range"))
    entry = rec.last
    assert entry["MESSAGE"] == "/etc/initsplit/initsplitd.conf:3: invalid Workers=0: out of range"
    assert entry["MESSAGE_ID"] == MESSAGE_ID_CONFIG_ERROR
    assert entry["PRIORITY"] == str(LOG_WARNING)
    assert entry["CONFIG_FILE"] == "/etc/initsplit/initsplitd.conf" and entry["CONFIG_LINE"] == "3"
    reporter.config_error(ConfigError("kernel command line", None, "unknown parameter"))
    assert "CONFIG_LINE" not in rec.last


def test_log_and_level_filter() -> None:
    reporter, rec = recorded(max_priority=LOG_INFO)
    reporter.log(LOG_DEBUG, "not shown")
    reporter.module_loaded(ModuleLoad("ext4", "builtin"))  # debug as well
    reporter.log(LOG_INFO, "shown", INITSPLIT_MODULE="dummy", INITSPLIT_NOTHING=None)
    assert rec.entries == [
        {"MESSAGE": "shown", "PRIORITY": "6", "SYSLOG_IDENTIFIER": "initsplitd", "INITSPLIT_MODULE": "dummy"}
    ]
    reporter.max_priority = LOG_DEBUG
    reporter.log(LOG_DEBUG, "now shown", message_id=MESSAGE_ID_SUMMARY)
    assert rec.last["MESSAGE_ID"] == MESSAGE_ID_SUMMARY
    with pytest.raises(ValueError):
        reporter.log(LOG_INFO, "x", _PID="1")
    with pytest.raises(ValueError):
        reporter.log(LOG_INFO, "x", initsplit_module="lower case")


# --- the stderr fallback and the python3-systemd path (with a stand-in) ---


def test_fallback_without_journal_socket(tmp_path: Path) -> None:
    stream = io.StringIO()
    reporter = Reporter(journal_socket=tmp_path / "no-such-socket", stream=stream)
    reporter.module_loaded(two_stage())
    reporter.module_loaded(ModuleLoad("floppy", "failed", reason="No such device", errno=19))
    reporter.log(LOG_WARNING, "two\nlines")
    reporter.log(LOG_DEBUG, "filtered")
    assert stream.getvalue() == (
        "<6>dummy: loaded two-stage (core 16384 bytes, init module 16384 bytes)\n"
        "<3>floppy: load failed: No such device (ENODEV)\n"
        "<4>two\n"
        "<4>lines\n"
    )


class FakeSystemdJournal:
    def __init__(self, error: OSError | None = None) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.error = error

    def sendv(self, *args: str) -> None:
        if self.error is not None:
            raise self.error
        self.calls.append(args)


@pytest.fixture
def socket_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "journal-socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield path


def test_sends_key_value_pairs_through_python_systemd(
    monkeypatch: pytest.MonkeyPatch, socket_file: Path
) -> None:
    fake = FakeSystemdJournal()
    monkeypatch.setattr(journal_module, "_systemd_journal", fake)
    stream = io.StringIO()
    Reporter(journal_socket=socket_file, stream=stream).module_loaded(two_stage())
    assert stream.getvalue() == ""
    (args,) = fake.calls
    assert args[0] == "MESSAGE=dummy: loaded two-stage (core 16384 bytes, init module 16384 bytes)"
    assert f"MESSAGE_ID={MESSAGE_ID_LOADED_TWO_STAGE}" in args
    assert "SYSLOG_IDENTIFIER=initsplitd" in args and "PRIORITY=6" in args
    assert "INITSPLIT_INIT_MODULE=dummy__init" in args


def test_fallback_when_journald_refuses(monkeypatch: pytest.MonkeyPatch, socket_file: Path) -> None:
    monkeypatch.setattr(journal_module, "_systemd_journal", FakeSystemdJournal(ConnectionRefusedError()))
    stream = io.StringIO()
    Reporter(journal_socket=socket_file, stream=stream).log(LOG_ERR, "still reported")
    assert stream.getvalue() == "<3>still reported\n"


def test_fallback_without_python_systemd(monkeypatch: pytest.MonkeyPatch, socket_file: Path) -> None:
    monkeypatch.setattr(journal_module, "_systemd_journal", None)
    stream = io.StringIO()
    Reporter(journal_socket=socket_file, stream=stream).log(LOG_NOTICE, "no python3-systemd")
    assert stream.getvalue() == "<5>no python3-systemd\n"


def test_python_systemd_is_the_debian_one() -> None:
    # The daemon runs on Debian 12's python3-systemd; make sure that is what is tested.
    from systemd import journal as systemd_journal  # tools/install-deps installs python3-systemd

    assert journal_module._systemd_journal is systemd_journal
    assert hasattr(systemd_journal, "sendv")


# --- the catalog ---


def parse_catalog(text: str) -> dict[str, tuple[dict[str, str], str]]:
    """MESSAGE_ID -> (headers, body), checking the structure systemd's importer expects."""
    entries: dict[str, tuple[dict[str, str], str]] = {}
    current: str | None = None
    headers: dict[str, str] = {}
    body: list[str] = []
    in_headers = False

    def finish() -> None:
        if current is not None:
            assert current not in entries, f"duplicate entry {current}"
            entries[current] = (headers, "\n".join(body).strip())

    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            continue
        if line.startswith("-- "):
            finish()
            current = line[3:].strip()
            assert re.fullmatch(r"[0-9a-f]{32}", current), f"line {number}: bad id {current!r}"
            headers, body, in_headers = {}, [], True
            continue
        assert current is not None or not line.strip(), f"line {number}: text before the first entry"
        if in_headers:
            if not line.strip():
                in_headers = False
                continue
            match = re.fullmatch(r"([A-Za-z-]+): (.+)", line)
            assert match, f"line {number}: not a header: {line!r}"
            headers[match[1]] = match[2]
        else:
            body.append(line)
    finish()
    return entries


def sample_entries() -> dict[str, list[dict[str, str]]]:
    """Entries per MESSAGE_ID, from the sparsest inputs each kind of entry can have."""
    reporter, rec = recorded()
    reporter.module_loaded(ModuleLoad("dummy", "two-stage"))
    reporter.module_loaded(ModuleLoad("nvme", "plain"))
    reporter.module_loaded(ModuleLoad("floppy", "failed"))
    reporter.module_loaded(ModuleLoad("ext4", "builtin"))
    reporter.batch_unloaded(UnloadBatch((), 0))
    reporter.summary(loads=[], batches=[], elapsed=0.0)
    reporter.config_error(ConfigError("kernel command line", None, "x"))
    by_id: dict[str, list[dict[str, str]]] = {}
    for entry in rec.entries:
        by_id.setdefault(entry["MESSAGE_ID"], []).append(entry)
    return by_id


def test_catalog_structure_and_substitutions() -> None:
    catalog = parse_catalog(CATALOG.read_text())
    assert set(catalog) == ALL_IDS
    samples = sample_entries()
    assert set(samples) == ALL_IDS
    for message_id, (headers, body) in catalog.items():
        assert set(headers) == {"Subject", "Defined-By", "Documentation"}, message_id
        assert headers["Defined-By"] == "initsplit"
        assert len(body) > 40, message_id
        # journalctl -x shows a field missing from the entry as its bare name, so
        # every @FIELD@ must be in every entry of that MESSAGE_ID.
        used = set(re.findall(r"@([A-Z0-9_]+)@", headers["Subject"] + body))
        for entry in samples[message_id]:
            assert used <= set(entry), (message_id, used - set(entry))


def test_catalog_compiles_with_journalctl(tmp_path: Path) -> None:
    journalctl = shutil.which("journalctl")
    if journalctl is None:
        pytest.fail("journalctl not found: tools/install-deps installs systemd")
    catalog_dir = tmp_path / "usr/lib/systemd/catalog"
    catalog_dir.mkdir(parents=True)
    shutil.copy(CATALOG, catalog_dir / "initsplit.catalog")
    subprocess.run([journalctl, f"--root={tmp_path}", "--update-catalog"], check=True, capture_output=True)
    assert (tmp_path / "var/lib/systemd/catalog/database").stat().st_size > 0
    listed = subprocess.run(
        [journalctl, f"--root={tmp_path}", "--list-catalog"], check=True, capture_output=True, text=True
    ).stdout
    ids = {line.split()[0] for line in listed.splitlines()}
    assert ids == ALL_IDS
    assert all(": " in line and line.split()[1] == "initsplit:" for line in listed.splitlines())
    dumped = subprocess.run(
        [journalctl, f"--root={tmp_path}", "--dump-catalog", MESSAGE_ID_SUMMARY],
        check=True, capture_output=True, text=True,
    ).stdout
    assert "Defined-By: initsplit" in dumped and "@INITSPLIT_TOTAL_FREED_BYTES@" in dumped


# --- a real journald ---

# Run by the test (through a sink) and by a child process (through python3-systemd
# into a real journald); both must produce the same entries.
SCENARIO = """
from initsplit.daemon.config import ConfigError
from initsplit.loader.results import ModuleLoad, UnloadBatch
loads = [
    ModuleLoad("dummy", "two-stage", init_module="dummy__init", core_bytes=16384, init_bytes=16384,
               init_pages=3, seconds=0.0125),
    ModuleLoad("nvme", "plain", reason="not proven safe: .init.text referenced from .text",
               core_bytes=65536, seconds=0.002),
    ModuleLoad("floppy", "failed", reason="No such device", errno=19, seconds=0.001),
    ModuleLoad("ext4", "builtin"),
]
batch = UnloadBatch(("dummy__init",), 16384, failed=(("x__init", "Device or resource busy"),),
                    trigger="stop", seconds=0.003)
for load in loads:
    reporter.module_loaded(load)
reporter.batch_unloaded(batch)
reporter.summary(loads=loads, batches=[batch], elapsed=1.5)
reporter.config_error(ConfigError("/etc/initsplit/initsplitd.conf", 3, "invalid Workers=0: out of range"))
reporter.log(6, "line one\\nline two", INITSPLIT_MODULE="dummy")
"""

EMIT = """
import sys
from pathlib import Path
from initsplit.daemon.journal import Reporter, LOG_DEBUG
if sys.argv[1] == "journal":
    reporter = Reporter(max_priority=LOG_DEBUG)
    exec(Path(sys.argv[2]).read_text())
else:
    # Where no journal socket exists: "<N>" lines on stderr, here read by journald's
    # stream transport (systemd-cat), which must turn the prefix into PRIORITY=.
    reporter = Reporter(max_priority=LOG_DEBUG, journal_socket=Path("/nonexistent/socket"))
    reporter.log(3, "fallback: an error")
    reporter.log(5, "fallback: a notice")
"""

# Runs as root in a new mount namespace: a tmpfs on /run (and /var/log/journal)
# keeps the private journald apart from anything on the host.
NAMESPACE_SCRIPT = r"""
set -eu
OUT=$1 PYTHON=$2 JOURNALD=$3 EXPECTED=$4
mount -t tmpfs tmpfs /run
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
mkdir -p /run/systemd/journal
"$JOURNALD" </dev/null >"$OUT/journald.log" 2>&1 &
JPID=$!
trap 'kill $JPID 2>/dev/null || true' EXIT
i=0
until [ -S /run/systemd/journal/socket ] && [ -S /run/systemd/journal/stdout ]; do
    i=$((i + 1)); [ $i -lt 200 ] || { echo "journald did not start" >&2; exit 1; }
    sleep 0.05
done
"$PYTHON" "$OUT/emit.py" journal "$OUT/scenario.py"
systemd-cat -t initsplitd-fallback "$PYTHON" "$OUT/emit.py" fallback
i=0
while :; do
    journalctl -D /run/log/journal -o json --no-pager \
        SYSLOG_IDENTIFIER=initsplitd SYSLOG_IDENTIFIER=initsplitd-fallback >"$OUT/entries.json"
    [ "$(wc -l <"$OUT/entries.json")" -ge "$EXPECTED" ] && break
    i=$((i + 1)); [ $i -lt 100 ] || break
    sleep 0.1
done
kill $JPID; wait $JPID || true
trap - EXIT
# journalctl -x reads the catalog database only from /var/lib/systemd/catalog
# (--root does not apply to it): compile ours and mount it there.
if [ -d /var/lib/systemd/catalog ]; then
    mkdir -p "$OUT/catroot/usr/lib/systemd/catalog"
    cp "$OUT/initsplit.catalog" "$OUT/catroot/usr/lib/systemd/catalog/"
    journalctl --root="$OUT/catroot" --update-catalog
    mount --bind "$OUT/catroot/var/lib/systemd/catalog" /var/lib/systemd/catalog
    journalctl -D /run/log/journal -x --no-pager SYSLOG_IDENTIFIER=initsplitd >"$OUT/explained.txt"
fi
"""

# A PID namespace too: when its first process ends (or is killed on a timeout),
# the kernel kills the private journald with it, so none is ever left behind.
UNSHARE = ("unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", "--mount-proc")
JOURNALD_CANDIDATES = ("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald")


def scenario_entries() -> list[dict[str, str]]:
    reporter, rec = recorded()
    exec(SCENARIO, {"reporter": reporter})
    return rec.entries


@pytest.fixture(scope="module")
def private_journal() -> Iterator[tuple[list[dict[str, object]], str | None]]:
    journald = next((p for p in JOURNALD_CANDIDATES if os.access(p, os.X_OK)), None)
    needed = {name: shutil.which(name) for name in ("unshare", "journalctl", "systemd-cat")}
    if os.geteuid() != 0 or journald is None or None in needed.values():
        pytest.fail(f"needs root, unshare, systemd-journald, journalctl and systemd-cat; have "
                    f"euid {os.geteuid()}, journald {journald}, {needed} (tools/install-deps)")
    if subprocess.run([*UNSHARE, "true"], capture_output=True).returncode != 0:
        pytest.fail("cannot create a mount namespace here (the tests run as root)")
    # A short directory name: socket paths and the like stay well within limits.
    out = Path(tempfile.mkdtemp(prefix="initsplit-journal-"))
    try:
        (out / "scenario.py").write_text(SCENARIO)
        (out / "emit.py").write_text(EMIT)
        shutil.copy(CATALOG, out / "initsplit.catalog")
        expected = len(scenario_entries()) + 2
        env = dict(os.environ, PYTHONPATH=str(REPO / "daemon"))
        env.pop("NOTIFY_SOCKET", None)
        run = subprocess.run(
            [*UNSHARE, "sh", "-c", NAMESPACE_SCRIPT, "sh", str(out), sys.executable, journald, str(expected)],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert run.returncode == 0, run.stdout + run.stderr + (out / "journald.log").read_text()
        entries = [json.loads(line) for line in (out / "entries.json").read_text().splitlines()]
        explained = (out / "explained.txt").read_text() if (out / "explained.txt").exists() else None
        yield entries, explained
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_real_journald_stores_the_same_entries(private_journal: tuple[list[dict[str, object]], str | None]) -> None:
    entries, _ = private_journal
    native = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "initsplitd"]
    # Fields journald adds itself start with "_" (trusted) or "__" (addresses).
    stored = [{k: v for k, v in e.items() if not k.startswith("_")} for e in native]
    assert stored == scenario_entries()
    assert all(e["_TRANSPORT"] == "journal" for e in native)


def test_real_journald_understands_the_stderr_fallback(
    private_journal: tuple[list[dict[str, object]], str | None]
) -> None:
    entries, _ = private_journal
    fallback = [(e["MESSAGE"], e["PRIORITY"], e["_TRANSPORT"]) for e in entries
                if e.get("SYSLOG_IDENTIFIER") == "initsplitd-fallback"]
    assert fallback == [("fallback: an error", "3", "stdout"), ("fallback: a notice", "5", "stdout")]


def test_journalctl_explains_entries_with_the_catalog(
    private_journal: tuple[list[dict[str, object]], str | None]
) -> None:
    _, explained = private_journal
    if explained is None:
        pytest.fail("journalctl -x gave no output: no /var/lib/systemd/catalog to mount the "
                    "compiled catalog on (systemd creates it; tools/install-deps installs systemd)")
    assert "Subject: Module dummy loaded in two stages" in explained
    assert "and the temporary init module\n░░ dummy__init, which holds" in explained
    assert "Subject: Module nvme loaded plain" in explained
    assert "because: not proven safe: .init.text referenced from .text" in explained
    assert "Subject: Module floppy could not be loaded" in explained
    assert "Subject: Init modules deleted, 16384 bytes given back" in explained
    assert "Subject: initsplit summary: 16384 bytes of init memory given back" in explained
    assert "Subject: Problem in initsplitd's configuration" in explained
    assert "@" not in explained.replace("initsplitd@", "")


# --- sd_notify ---


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="isn-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(short_dir / "notify")
        sock.bind(address)
    else:
        name = f"initsplit-test-{uuid.uuid4().hex}"
        sock.bind(b"\0" + name.encode())
        address = "@" + name
    sock.settimeout(5)
    try:
        yield sock, address
    finally:
        sock.close()


HAVE_LIBSYSTEMD = notify_module._systemd_daemon is not None


@pytest.mark.parametrize("use_libsystemd", [True, False], ids=["libsystemd", "datagram"])
def test_notifier_messages(
    monkeypatch: pytest.MonkeyPatch, notify_socket: tuple[socket.socket, str], use_libsystemd: bool
) -> None:
    if use_libsystemd and not HAVE_LIBSYSTEMD:
        pytest.fail("python3-systemd not installed (tools/install-deps installs it)")
    sock, address = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = Notifier(use_libsystemd=use_libsystemd)
    assert notifier.enabled
    assert notifier._libsystemd is use_libsystemd

    assert notifier.ready("loading modules")
    assert sock.recv(4096) == b"READY=1\nSTATUS=loading modules"
    assert notifier.status("40 modules\n34 two-stage")
    assert sock.recv(4096) == b"STATUS=40 modules 34 two-stage"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    assert notifier.stopping("freeing init modules")
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=freeing init modules"
    # No watchdog configured: nothing is sent.
    assert notifier.watchdog_interval() is None
    assert notifier.watchdog() is False
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


@pytest.mark.parametrize("use_libsystemd", [True, False], ids=["libsystemd", "datagram"])
def test_notifier_watchdog(
    monkeypatch: pytest.MonkeyPatch, notify_socket: tuple[socket.socket, str], use_libsystemd: bool
) -> None:
    if use_libsystemd and not HAVE_LIBSYSTEMD:
        pytest.fail("python3-systemd not installed (tools/install-deps installs it)")
    sock, address = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier(use_libsystemd=use_libsystemd)
    assert notifier.watchdog_interval() == 1.5
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_watchdog_for_another_process_or_invalid() -> None:
    base = {"NOTIFY_SOCKET": "/nonexistent/notify"}
    assert Notifier(environ=base | {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}).watchdog_interval() is None
    assert Notifier(environ=base | {"WATCHDOG_USEC": "0"}).watchdog_interval() is None
    assert Notifier(environ=base | {"WATCHDOG_USEC": "soon"}).watchdog_interval() is None
    assert Notifier(environ=base | {"WATCHDOG_USEC": "500000"}).watchdog_interval() == 0.25


def test_notifier_with_explicit_environment(notify_socket: tuple[socket.socket, str]) -> None:
    # libsystemd reads the process environment, so a given mapping means the plain datagram.
    sock, address = notify_socket
    notifier = Notifier(environ={"NOTIFY_SOCKET": address})
    assert not notifier._libsystemd
    assert notifier.ready()
    assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize("use_libsystemd", [True, False], ids=["libsystemd", "datagram"])
def test_notifier_without_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch, use_libsystemd: bool) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    notifier = Notifier(use_libsystemd=use_libsystemd)
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.status("x") is False
    assert notifier.stopping() is False
    assert notifier.watchdog() is False


@pytest.mark.parametrize("use_libsystemd", [True, False], ids=["libsystemd", "datagram"])
def test_notifier_never_raises(monkeypatch: pytest.MonkeyPatch, short_dir: Path, use_libsystemd: bool) -> None:
    # The manager's socket is gone (or never existed): report False, keep going.
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "missing"))
    assert Notifier(use_libsystemd=use_libsystemd).ready("x") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert Notifier(use_libsystemd=use_libsystemd).ready("x") is False
