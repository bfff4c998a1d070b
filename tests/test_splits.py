"""The daemon's SplitProvider and the two-stage loader without a kernel: what the
kernel is handed must be the bytes that were checked, descriptors never leak, and
a cache entry or directory that is not trustworthy costs a plain load with a reason.

finit_module is replaced by a fake that reads what the kernel would read (from the
descriptor it is given), so the tests run on the host without loading anything.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from initsplit import signing
from initsplit.cache import CacheHit, manifest_path, read_entry, write_entry
from initsplit.daemon.config import Config
from initsplit.daemon.journal import Reporter
from initsplit.daemon.main import loading_policy, make_provider
from initsplit.daemon.service import Service, Settings
from initsplit.daemon.splits import NotSplit, SplitProvider
from initsplit.split.decide import decide
from initsplit.split import tables
from initsplit.split.policy import SplitOptions
from initsplit.loader import kernel_state, twostage
from initsplit.loader.recovery import LoadMarkers
from initsplit.loader.twostage import SplitPair, load_two_stage
from initsplit.split import split_module
from tests.testbed.kernel import debian_kernel
from tests.trusted_dir import trusted_tmp  # noqa: F401  (pytest fixture)

DUMMY = Path("kernel/drivers/net/dummy.ko")


@dataclass
class FakeKernel:
    """finit_module/delete_module stand-ins: records what each load read."""

    loaded: list[bytes] = field(default_factory=list)
    refuse: set[int] = field(default_factory=set)  # 1: the first load fails, 2: the second ...
    deleted: list[str] = field(default_factory=list)

    def finit_module(self, target: int | Path, params: str = "", *, flags: int = 0) -> int:
        # The kernel reads the whole file behind the descriptor from offset 0
        # (kernel_read_file_from_fd); a path is what the old loader passed.
        data = target.read_bytes() if isinstance(target, Path) else _read_all(target)
        self.loaded.append(data)
        if len(self.loaded) in self.refuse:
            raise OSError(22, os.strerror(22))
        return 0  # the raw result of a load whose init succeeded

    def delete_module(self, name: str, *, flags: int = 0) -> None:
        self.deleted.append(name)


def _read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


# Two-stage wherever a module splits: the default (TwoStage=when-not-worse) weighs the
# init module's slab and loads every module of Debian 6.1 plain (split/decide.py);
# these tests are about the two-stage machinery.
TWO_STAGE = SplitOptions(two_stage="always")


@pytest.fixture(scope="module")
def dummy_source() -> bytes:
    return (debian_kernel().modules_dir / DUMMY).read_bytes()


@pytest.fixture(scope="module")
def dummy_split(dummy_source: bytes):
    # What the daemon loads: the split as decide() makes it (C without its BTF).
    decision = decide(dummy_source, TWO_STAGE)
    assert decision.outcome == "split" and decision.discarded == ("btf",), decision
    return decision.split


@dataclass
class Tree:
    modules: Path
    cache: Path
    runtime: Path

    @property
    def module(self) -> Path:
        return self.modules / DUMMY

    def provider(self, options: SplitOptions = TWO_STAGE) -> SplitProvider:
        return SplitProvider(modules_dir=self.modules, cache_dir=self.cache, runtime_dir=self.runtime,
                             options=options)


@pytest.fixture
def tree(trusted_tmp: Path, dummy_source: bytes) -> Tree:  # noqa: F811
    t = Tree(trusted_tmp / "modules", trusted_tmp / "cache", trusted_tmp / "run")
    t.module.parent.mkdir(parents=True)
    t.module.write_bytes(dummy_source)
    return t


@pytest.fixture
def presplit(tree: Tree, dummy_source: bytes, dummy_split) -> Tree:
    # As `initsplit split` writes it: C without its BTF, and the manifest says so.
    write_entry(tree.cache, DUMMY, source=dummy_source, decision="split", name=dummy_split.name,
                init_name=dummy_split.init_name, core=dummy_split.core, init=dummy_split.init,
                discarded="btf", btf_bytes=1160, reached=dummy_split.reached,
                options=TWO_STAGE.tag)
    return tree


@pytest.fixture
def fake_kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    fake = FakeKernel()
    monkeypatch.setattr(twostage, "finit_module", fake.finit_module)
    monkeypatch.setattr(twostage, "delete_module", fake.delete_module)
    # The fake kernel places C where the layout model says (kernel_state.placement_problem).
    monkeypatch.setattr(twostage, "placement_problem", lambda name, expected, **_: None)
    return fake


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ------------------------------------------------- checked bytes are loaded bytes

def test_cache_hit_loads_the_checked_bytes_even_if_swapped_after_the_check(
        presplit: Tree, dummy_split, fake_kernel: FakeKernel) -> None:
    pair = presplit.provider().get(presplit.module)
    assert isinstance(pair, SplitPair), pair
    # Between the check and the load, someone with a way in swaps both files.
    core = presplit.cache / DUMMY
    (core.parent / "evil").write_bytes(b"unchecked kernel code")
    os.replace(core.parent / "evil", core)
    init = core.with_name(f"{dummy_split.init_name}.ko")
    init.unlink()
    init.symlink_to("/tmp/unchecked__init.ko")
    Path("/tmp/unchecked__init.ko").write_bytes(b"unchecked init code")
    try:
        load = load_two_stage(pair, original=presplit.module)
    finally:
        Path("/tmp/unchecked__init.ko").unlink()
    assert load.mode == "two-stage", load
    assert fake_kernel.loaded == [dummy_split.core, dummy_split.init]


def test_fresh_split_loads_the_validated_bytes_not_the_copy_written(
        tree: Tree, dummy_split, fake_kernel: FakeKernel) -> None:
    pair = tree.provider().get(tree.module)
    assert isinstance(pair, SplitPair), pair
    written = tree.runtime / DUMMY
    assert written.read_bytes() == dummy_split.core  # kept for the next daemon
    written.write_bytes(b"tampered after the split was written")
    load = load_two_stage(pair, original=tree.module)
    assert load.mode == "two-stage", load
    assert fake_kernel.loaded == [dummy_split.core, dummy_split.init]


def test_fresh_split_is_handed_over_in_sealed_memory(tree: Tree) -> None:
    pair = tree.provider().get(tree.module)
    assert isinstance(pair, SplitPair), pair
    with pair.core, pair.init:
        for f in (pair.core, pair.init):
            assert os.readlink(f"/proc/self/fd/{f.fileno()}").startswith("/memfd:")
            with pytest.raises(PermissionError):
                os.pwrite(f.fileno(), b"X", 0)


def test_the_runtime_copy_is_reused_by_the_next_daemon(tree: Tree, dummy_split,
                                                       fake_kernel: FakeKernel) -> None:
    tree.provider().get(tree.module).close()
    pair = tree.provider().get(tree.module)
    assert isinstance(pair, SplitPair), pair
    assert os.readlink(f"/proc/self/fd/{pair.core.fileno()}") == str(tree.runtime / DUMMY)
    load_two_stage(pair, original=tree.module)
    assert fake_kernel.loaded == [dummy_split.core, dummy_split.init]


# ------------------------------------------------- no descriptor leaks

@pytest.mark.parametrize(("refuse", "mode"), [
    (set(), "two-stage"),   # both modules go in
    ({1}, "plain"),         # core refused: plain load of the original
    ({2}, "plain"),         # init module refused: core deleted, plain load
    ({1, 2}, "failed"),     # the plain load fails too
])
def test_no_descriptor_is_left_open_on_any_path(presplit: Tree, fake_kernel: FakeKernel,
                                                monkeypatch: pytest.MonkeyPatch,
                                                refuse: set[int], mode: str) -> None:
    fake_kernel.refuse = refuse
    monkeypatch.setattr(twostage, "finit_module_path",
                        lambda path, params="", **_: fake_kernel.finit_module(path, params))
    provider = presplit.provider()
    before = _open_fds()
    for _ in range(20):
        fake_kernel.loaded.clear()
        load = load_two_stage(provider.get(presplit.module), original=presplit.module)
        assert load.mode == mode, load
    assert _open_fds() == before


def test_no_descriptor_is_left_open_when_the_loader_raises(presplit: Tree,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("loader bug")

    monkeypatch.setattr(twostage, "finit_module", broken)
    provider = presplit.provider()
    before = _open_fds()
    for _ in range(5):
        with pytest.raises(RuntimeError):
            load_two_stage(provider.get(presplit.module), original=presplit.module)
    assert _open_fds() == before


def test_no_descriptor_is_left_open_by_a_bad_entry(presplit: Tree, dummy_split) -> None:
    init = presplit.cache / DUMMY.with_name(f"{dummy_split.init_name}.ko")
    init.write_bytes(b"damaged")  # the core opens and checks fine, the init module does not
    provider = presplit.provider()
    before = _open_fds()
    for _ in range(5):
        result = provider.get(presplit.module)
        if isinstance(result, SplitPair):  # a fresh split from the runtime directory
            result.close()
    assert _open_fds() == before


# ------------------------------------------------- untrusted entries: plain, with the reason

FOREIGN_UID = 12345  # a uid nobody on the test machine has


def _symlink_to_copy(path: Path) -> None:
    """Replace *path* by a symlink to an identical copy (so only the symlink is wrong)."""
    copy = path.with_name(path.name + ".copy")
    shutil.copyfile(path, copy)
    path.unlink()
    path.symlink_to(copy.name)


def _manifest(t: Tree) -> Path:
    return manifest_path(t.cache, DUMMY)


def _init(t: Tree) -> Path:
    return t.cache / DUMMY.with_name("dummy__init.ko")


def _edit_manifest(t: Tree, **changes: object) -> None:
    fields = json.loads(_manifest(t).read_text())
    fields.update(changes)
    _manifest(t).write_text(json.dumps(fields))


def _edit_reached(t: Tree, prefix: str) -> None:
    """The manifest's reached with *prefix* before the first offset."""
    first, *rest = json.loads(_manifest(t).read_text())["reached"].split(" ")
    name, offset = first.rsplit("=", 1)
    _edit_manifest(t, reached=" ".join([f"{name}={prefix}{offset}", *rest]))


BAD_ENTRIES = {
    "corrupt manifest": (lambda t: _manifest(t).write_text('{"format": 1, "source_sha'),
                         "is corrupt: not JSON"),
    "manifest not an object": (lambda t: _manifest(t).write_text("[1, 2]"),
                               "is corrupt: not a JSON object"),
    "manifest field of the wrong type": (lambda t: _edit_manifest(t, init_file=7),
                                         "is corrupt: init_file is int, not str"),
    "manifest with an unknown field": (lambda t: _edit_manifest(t, extra=1),
                                       "is corrupt: got an unexpected keyword argument 'extra'"),
    "manifest naming another init file": (lambda t: _edit_manifest(t, init_file="loop__init.ko"),
                                          "names init module file 'loop__init.ko'"),
    "manifest naming a path": (lambda t: _edit_manifest(t, init_file="../../dummy__init.ko"),
                               "names init module file '../../dummy__init.ko'"),
    "init module name with a slash": (lambda t: _edit_manifest(t, init_name="x/dummy__init",
                                                               init_file="x/dummy__init.ko"),
                                      "names init module file 'x/dummy__init.ko'"),
    "stale manifest": (lambda t: _edit_manifest(t, source_sha256="0" * 64), "is stale"),
    # What int() takes but render_reached() never writes, and both placements at once.
    "reached offset with a plus": (lambda t: _edit_reached(t, "+"), "is corrupt: reached: bad offset '+"),
    "reached offset after a blank": (lambda t: _edit_reached(t, "\t"),
                                     "is corrupt: reached: bad offset '\\t"),
    "reached and reached_from": (lambda t: _edit_manifest(t, reached_from=".text=.text=0"),
                                 "is corrupt: both reached and reached_from"),
    "core changed since the split": (
        lambda t: (t.cache / DUMMY).write_bytes((t.cache / DUMMY).read_bytes() + b"\0"),
        "does not match its manifest"),
    "symlinked core": (lambda t: _symlink_to_copy(t.cache / DUMMY), "dummy.ko is a symlink"),
    "symlinked init module": (lambda t: _symlink_to_copy(_init(t)), "dummy__init.ko is a symlink"),
    "symlinked manifest": (lambda t: _symlink_to_copy(_manifest(t)), "dummy.ko.initsplit is a symlink"),
    "world-writable core": (lambda t: (t.cache / DUMMY).chmod(0o666), "dummy.ko is world-writable"),
    "group-writable init module": (lambda t: _init(t).chmod(0o664), "dummy__init.ko is group-writable"),
    "world-writable manifest": (lambda t: _manifest(t).chmod(0o646),
                                "dummy.ko.initsplit is world-writable"),
    "foreign-owned core": (lambda t: os.chown(t.cache / DUMMY, FOREIGN_UID, -1),
                           f"dummy.ko is owned by uid {FOREIGN_UID}"),
    "foreign-owned manifest": (lambda t: os.chown(_manifest(t), FOREIGN_UID, -1),
                               f"dummy.ko.initsplit is owned by uid {FOREIGN_UID}"),
    "core is a directory": (lambda t: ((t.cache / DUMMY).unlink(), (t.cache / DUMMY).mkdir()),
                            "dummy.ko is not a regular file"),
    "core missing": (lambda t: (t.cache / DUMMY).unlink(), "dummy.ko: No such file or directory"),
    "world-writable entry directory": (lambda t: (t.cache / "kernel/drivers").chmod(0o777),
                                       "cache entry directory"),
    "symlinked entry directory": (
        lambda t: ((t.cache / "kernel/drivers/net").rename(t.cache / "net"),
                   (t.cache / "kernel/drivers/net").symlink_to("../../net")),
        "kernel/drivers/net is a symlink"),
    "world-writable parent of the cache": (lambda t: t.cache.parent.chmod(0o1777),
                                           f"cache directory {'{cache}'} is not trusted"),
    "foreign-owned cache directory": (lambda t: os.chown(t.cache, FOREIGN_UID, -1),
                                      f"is owned by uid {FOREIGN_UID}"),
}


@pytest.mark.parametrize("kind", BAD_ENTRIES)
def test_a_bad_cache_entry_costs_a_plain_load_with_the_reason(kind: str, presplit: Tree,
                                                              fake_kernel: FakeKernel,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    damage, reason = BAD_ENTRIES[kind]
    damage(presplit)
    plain: list[Path] = []
    monkeypatch.setattr(twostage, "finit_module_path",
                        lambda path, params="", **_: plain.append(path))
    service = _service(presplit)
    load = service._load(Step("dummy", presplit.module))
    service.scheduler.shutdown()
    assert load.mode == "plain", load
    assert reason.format(cache=presplit.cache) in load.reason, load.reason
    assert plain == [presplit.module] and fake_kernel.loaded == []  # nothing split was loaded
    assert not (presplit.runtime / DUMMY).exists()  # and no split was made instead


def test_runtime_directory_under_a_world_writable_one_is_refused(tree: Tree,
                                                                 trusted_tmp: Path) -> None:  # noqa: F811
    shared = trusted_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: sticky does not make it a place for kernel code
    tree.runtime = shared / "initsplit"
    result = tree.provider().get(tree.module)
    assert isinstance(result, NotSplit), result
    assert result.reason == (f"runtime directory {tree.runtime} is not trusted for kernel code: "
                             f"{shared} is world-writable")
    assert not tree.runtime.exists()  # no split written where anyone could replace it


def test_a_directory_problem_is_reported_once(presplit: Tree, tmp_path: Path) -> None:
    reports: list[str] = []
    presplit.cache = tmp_path / "cache"  # under /tmp
    provider = SplitProvider(modules_dir=presplit.modules, cache_dir=presplit.cache,
                             runtime_dir=presplit.runtime, report=reports.append)
    for _ in range(3):
        result = provider.get(presplit.module)
        assert isinstance(result, NotSplit) and "/tmp is world-writable" in result.reason
    assert reports == [f"cache directory {presplit.cache} is not trusted for kernel code: "
                       "/tmp is world-writable; modules are loaded plain instead"]


def test_a_missing_cache_directory_is_no_problem(tree: Tree, dummy_split) -> None:
    tree.cache = tree.cache / "not" / "there"
    pair = tree.provider().get(tree.module)
    assert isinstance(pair, SplitPair), pair  # split now, as before
    pair.close()


def test_nothing_and_refused_entries_still_answer(presplit: Tree, dummy_source: bytes) -> None:
    write_entry(presplit.cache, DUMMY, source=dummy_source, decision="refused",
                reason="refused: .rodata points into init")
    result = presplit.provider().get(presplit.module)
    assert result == NotSplit("refused: .rodata points into init")


def test_a_policy_plain_entry_answers_with_its_reason(presplit: Tree, dummy_source: bytes) -> None:
    why = ("two-stage would cost more than it frees (TwoStage=when-not-worse): core layout "
           "4 pages two-stage, 4 plain, and 5288 bytes of slab for the init module")
    write_entry(presplit.cache, DUMMY, source=dummy_source, decision="plain", reason=why)
    assert presplit.provider(SplitOptions()).get(presplit.module) == NotSplit(why)


def test_an_entry_made_under_other_options_is_decided_again(presplit: Tree) -> None:
    # The pre-split cache says two-stage (made with TwoStage=always); a daemon told to
    # load two-stage only where a page comes back weighs dummy itself: C takes as
    # many core pages as the plain load (4) and its init module's slab comes on top,
    # so it loads plain, and keeps that decision, under its own options, for the
    # next daemon.
    saves = SplitOptions(two_stage="when-it-saves")
    result = presplit.provider(saves).get(presplit.module)
    assert isinstance(result, NotSplit) and result.reason == (
        "two-stage would free less than a page (TwoStage=when-it-saves): "
        "core layout 4 pages two-stage, 4 plain, and 5288 bytes of slab for the init module"), result
    # Loaded plain, as the original without its BTF (what the kernel would keep for it).
    assert result.rewritten is not None and result.btf_bytes == 1160
    result.close()
    kept = read_entry(presplit.runtime, DUMMY, source=presplit.module.read_bytes(), options=saves.tag)
    assert isinstance(kept, CacheHit) and kept.manifest.decision == "plain", kept
    assert kept.manifest.options == "two-stage=when-it-saves writable-ro-after-init=no"
    assert kept.manifest.discarded == "btf"
    # The options the cache was made under still use its pair.
    pair = presplit.provider().get(presplit.module)
    assert isinstance(pair, SplitPair), pair
    pair.close()


def test_a_module_that_keeps_its_btf_is_not_loaded_from_an_entry_without(presplit: Tree) -> None:
    # The pre-split cache dropped dummy's BTF (the default); a daemon told to keep
    # it (KeepBTF=dummy, or initsplit.btf=keep) loads the original plain rather
    # than splitting again at boot.
    for keep in (dataclasses.replace(TWO_STAGE, keep_btf=frozenset({"dummy"})),
                 dataclasses.replace(TWO_STAGE, discard=frozenset())):
        result = presplit.provider(keep).get(presplit.module)
        assert result == NotSplit("keeps its BTF; the cache entry lacks it "
                                  "(KeepBTF= or initsplit.btf=keep)"), result
    pair = presplit.provider(dataclasses.replace(TWO_STAGE, keep_btf=frozenset({"e1000"}))).get(
        presplit.module)
    assert isinstance(pair, SplitPair) and pair.btf_bytes == 1160, pair
    pair.close()


def test_a_runtime_entry_of_a_plain_load_keeps_no_copy_in_run(tree: Tree) -> None:
    # /run is memory: the daemon keeps the decision, and makes the rewritten
    # original again from the module when the next daemon needs it.
    plain_only = SplitOptions(two_stage="when-it-saves")  # dummy: plain, 4 pages either way
    first = tree.provider(plain_only).get(tree.module)
    assert isinstance(first, NotSplit) and first.rewritten is not None, first
    made = _read_all(first.rewritten.fileno())
    first.close()
    assert not (tree.runtime / DUMMY).exists()  # only the manifest
    again = tree.provider(plain_only).get(tree.module)
    assert isinstance(again, NotSplit) and again.rewritten is not None and again.btf_bytes == 1160
    assert os.readlink(f"/proc/self/fd/{again.rewritten.fileno()}").startswith("/memfd:")
    assert _read_all(again.rewritten.fileno()) == made
    again.close()


@pytest.mark.parametrize("where", ["inside", "around"])
def test_a_directory_overlapping_the_module_tree_is_not_used(tree: Tree, where: str) -> None:
    # RuntimeDir= pointing into /lib/modules would have the daemon write over the
    # originals it falls back to.
    if where == "inside":
        tree.runtime = tree.modules / "kernel" / "initsplit"
    else:
        tree.cache = tree.modules.parent
    result = tree.provider().get(tree.module)
    assert isinstance(result, NotSplit) and "overlaps the kernel's module tree" in result.reason, result
    assert tree.module.read_bytes()[:4] == b"\x7fELF"


def test_splits_made_at_boot_leave_run_after_a_clean_exit(tree: Tree, dummy_source: bytes) -> None:
    # Kept for a restarted daemon while it runs, gone once it exited cleanly: /run is
    # memory. Decisions without module bytes go too: a page of tmpfs each.
    tree.provider().get(tree.module).close()
    core = tree.runtime / DUMMY
    init = core.with_name("dummy__init.ko")
    manifest = manifest_path(tree.runtime, DUMMY)
    assert core.exists() and init.exists() and manifest.exists()
    crc7 = Path("kernel/lib/crc7.ko")
    write_entry(tree.runtime, crc7, source=b"x", decision="nothing", reason="nothing to split")
    freed = tree.provider().release_runtime_splits()
    assert not core.exists() and not init.exists() and not manifest.exists()
    assert not manifest_path(tree.runtime, crc7).exists()
    # Whole blocks, as the file system holds them: at least the module bytes and a
    # block for each manifest.
    assert freed > len(dummy_source) and freed % 512 == 0, freed
    # The next daemon splits again (in memory), as if there had been none.
    pair = tree.provider().get(tree.module)
    assert isinstance(pair, SplitPair), pair
    pair.close()


def test_release_leaves_what_it_must_not_touch(tree: Tree, dummy_source: bytes, dummy_split) -> None:
    # A split entry overwritten by a plain decision: its stray module files go too.
    write_entry(tree.runtime, DUMMY, source=dummy_source, decision="split", name="dummy",
                init_name="dummy__init", core=dummy_split.core, init=dummy_split.init,
                reached=dummy_split.reached)
    write_entry(tree.runtime, DUMMY, source=dummy_source, decision="plain", reason="policy")
    core = tree.runtime / DUMMY
    assert core.exists()
    tree.provider().release_runtime_splits()
    assert not core.exists() and not core.with_name("dummy__init.ko").exists()
    assert not manifest_path(tree.runtime, DUMMY).exists()
    # A manifest naming a file elsewhere is left alone, and the exit stays clean.
    other = Path("kernel/drivers/net/other.ko")
    write_entry(tree.runtime, other, source=b"y", decision="split", name="other",
                init_name="other__init", core=b"c", init=b"i",
                reached=((".gnu.linkonce.this_module", 0),))
    raw = manifest_path(tree.runtime, other)
    raw.write_text(raw.read_text().replace('"other__init.ko"', '"../../../../x__init.ko"'))
    assert tree.provider().release_runtime_splits() == 0
    assert raw.exists() and (tree.runtime / other).exists()
    # Never the pre-split cache, even when RuntimeDir= names it.
    tree.runtime = tree.cache
    write_entry(tree.cache, DUMMY, source=dummy_source, decision="split", name="dummy",
                init_name="dummy__init", core=dummy_split.core, init=dummy_split.init,
                reached=dummy_split.reached)
    assert tree.provider().release_runtime_splits() == 0 and (tree.cache / DUMMY).exists()


# ------------------------------------------------- a Service around the provider

@dataclass(frozen=True)
class Step:
    name: str
    path: Path | None = None
    options: str = ""
    install_command: str | None = None
    builtin: bool = False


class _Quiet:
    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def _service(t: Tree) -> Service:
    return Service(settings=Settings(), resolver=_Quiet(), source=_Quiet(), provider=t.provider(),
                   reporter=_Quiet(), notifier=_Quiet(), markers=LoadMarkers(t.runtime / "loading"))


def test_temp_files_of_a_killed_daemon_are_removed_at_start(tree: Tree, dummy_split,
                                                            dummy_source: bytes) -> None:
    # A daemon killed while keeping a split leaves its temp file in /run, which is
    # memory; a daemon restarted after every kill would pile them up.
    write_entry(tree.runtime, DUMMY, source=dummy_source, decision="split", name=dummy_split.name,
                init_name=dummy_split.init_name, core=dummy_split.core, init=dummy_split.init,
                reached=dummy_split.reached)
    kept = sorted(p.relative_to(tree.runtime) for p in tree.runtime.rglob("*") if p.is_file())
    left = tree.runtime / DUMMY.parent / ".dummy__init.ko.5f1c0e2a9b3d.tmp"
    left.write_bytes(dummy_split.init)
    (tree.runtime / ".dummy.ko.0a1b2c3d4e5f.tmp").write_bytes(b"half a module")
    assert tree.provider().remove_leftover_temps() == 2
    assert sorted(p.relative_to(tree.runtime) for p in tree.runtime.rglob("*") if p.is_file()) == kept
    assert isinstance(tree.provider().get(tree.module), SplitPair)  # the kept split still serves


def test_temp_files_in_an_untrusted_runtime_directory_are_not_touched(tree: Tree) -> None:
    tree.runtime.mkdir()
    tree.runtime.chmod(0o777)
    left = tree.runtime / ".dummy.ko.0a1b2c3d4e5f.tmp"
    left.write_bytes(b"x")
    assert tree.provider().remove_leftover_temps() == 0 and left.exists()


def test_the_init_wrapper_carries_the_name_initcall_blacklist_matches(dummy_split) -> None:
    # The kernel names ->init by kallsyms for initcall_blacklist= (init/main.c);
    # dummy's module_init() routine is dummy_init_module. The real kernel's refusal
    # is tested by tests/test_loader_vm.py (softdog, blacklisted on its command line).
    from initsplit.elf import read_elf
    from initsplit.split.splitter import WRAPPER_SECTION

    obj = read_elf(dummy_split.init)
    wrapper = next(s.index for s in obj.sections if s.name == WRAPPER_SECTION)
    assert [s.name for s in obj.symbols if s.shndx == wrapper and s.name] == ["dummy_init_module"]


# ------------------------------------------------- a kernel that enforces signatures
#
# Secure Boot's lockdown (or module.sig_enforce=1): the provider hands over only
# pre-split cache entries whose modules are signed, never splits at boot, and
# everything else is the original, loaded plain. The fake kernel does not check
# signatures; the Secure Boot VM tests show the real one does.

@pytest.fixture(scope="module")
def mok(tmp_path_factory: pytest.TempPathFactory) -> signing.SigningKey:
    return signing.create_key(tmp_path_factory.mktemp("mok")).described()


@pytest.fixture
def signed_presplit(tree: Tree, dummy_source: bytes, dummy_split, mok: signing.SigningKey) -> Tree:
    # As `initsplit split --sign-key` writes it.
    write_entry(tree.cache, DUMMY, source=dummy_source, decision="split", name=dummy_split.name,
                init_name=dummy_split.init_name, core=signing.sign_module(dummy_split.core, mok),
                init=signing.sign_module(dummy_split.init, mok), discarded="btf", btf_bytes=1160,
                reached=dummy_split.reached, options=TWO_STAGE.tag, signer=mok.signer)
    return tree


def _enforcing(t: Tree, reports: list[str] | None = None) -> SplitProvider:
    return SplitProvider(modules_dir=t.modules, cache_dir=t.cache, runtime_dir=t.runtime,
                         options=TWO_STAGE, signed_only=True,
                         report=(reports.append if reports is not None else None))


def test_enforcing_kernel_loads_a_signed_cache_entry_two_stage(signed_presplit: Tree, dummy_split,
                                                               mok: signing.SigningKey,
                                                               fake_kernel: FakeKernel) -> None:
    assert "CN = initsplit module signing key (sha256 " in mok.signer
    reports: list[str] = []
    pair = _enforcing(signed_presplit, reports).get(signed_presplit.module)
    assert isinstance(pair, SplitPair), pair
    load = load_two_stage(pair, original=signed_presplit.module)
    assert load.mode == "two-stage", load
    assert fake_kernel.loaded == [signing.sign_module(dummy_split.core, mok),
                                  signing.sign_module(dummy_split.init, mok)]
    assert reports == []


def test_enforcing_kernel_never_uses_an_unsigned_entry_and_says_how_to_sign_once(
        presplit: Tree, fake_kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    reports: list[str] = []
    provider = _enforcing(presplit, reports)
    plain: list[Path] = []
    monkeypatch.setattr(twostage, "finit_module_path", lambda path, params="", **_: plain.append(path))
    for _ in range(3):
        result = provider.get(presplit.module)
        assert result == NotSplit("signatures enforced: the cache entry is not signed"), result
        assert twostage.load_plain("dummy", presplit.module, reason=result.reason).mode == "plain"
    assert plain == [presplit.module] * 3 and fake_kernel.loaded == []
    assert len(reports) == 1, reports
    assert reports[0].startswith(f"the kernel enforces module signatures and the pre-split cache "
                                 f"{presplit.cache} is not signed (the cache entry is not signed)")
    for step in ("initsplit key create", "mokutil --import", "[Signing]", "SignKey=",
                 "/etc/kernel/postinst.d/initsplit", "dracut --force"):
        assert step in reports[0], (step, reports[0])


def test_enforcing_kernel_checks_the_files_signatures_not_only_the_manifest(
        presplit: Tree, mok: signing.SigningKey) -> None:
    # A manifest that names a signer over unsigned files (a cache written by hand,
    # a bug): the files must carry the kernel's signature trailer themselves.
    _edit_manifest(presplit, signer=mok.signer)
    result = _enforcing(presplit).get(presplit.module)
    assert isinstance(result, NotSplit)
    assert result.reason == (f"signatures enforced: {presplit.cache / DUMMY}: not signed "
                             "(no appended module signature)"), result.reason


def test_enforcing_kernel_never_splits_at_boot_nor_uses_the_runtime_directory(
        tree: Tree, dummy_source: bytes, dummy_split, mok: signing.SigningKey) -> None:
    tree.cache.mkdir()
    # A split an earlier daemon made at boot (the initramfs's, say): unsigned.
    write_entry(tree.runtime, DUMMY, source=dummy_source, decision="split", name=dummy_split.name,
                init_name=dummy_split.init_name, core=dummy_split.core, init=dummy_split.init,
                reached=dummy_split.reached, options=TWO_STAGE.tag, discarded="btf")
    before = sorted(p.relative_to(tree.runtime) for p in tree.runtime.rglob("*"))
    reports: list[str] = []
    result = _enforcing(tree, reports).get(tree.module)
    assert result == NotSplit("signatures enforced: no pre-split cache entry (for these options), "
                              "and a split made now would be unsigned"), result
    assert sorted(p.relative_to(tree.runtime) for p in tree.runtime.rglob("*")) == before
    # A module missing from a cache that exists is not the cache's signing problem.
    assert reports == []
    shutil.rmtree(tree.runtime)
    assert isinstance(_enforcing(tree).get(tree.module), NotSplit)
    assert not tree.runtime.exists()  # nothing was split and kept


def test_enforcing_kernel_without_a_cache_says_how_to_get_one(tree: Tree) -> None:
    reports: list[str] = []
    result = _enforcing(tree, reports).get(tree.module)
    assert result == NotSplit(f"signatures enforced: no pre-split cache {tree.cache}"), result
    assert len(reports) == 1 and "initsplit key create" in reports[0], reports
    assert not tree.runtime.exists()


def test_enforcing_kernel_loads_a_signed_rewritten_original_and_not_an_unsigned_one(
        tree: Tree, dummy_source: bytes, mok: signing.SigningKey) -> None:
    decision = decide(dummy_source, SplitOptions())
    assert decision.outcome == "plain" and decision.rewritten is not None, decision
    fields = dict(source=dummy_source, decision="plain", reason="policy", discarded="btf",
                  btf_bytes=decision.btf_bytes, options=SplitOptions().tag)
    write_entry(tree.cache, DUMMY, rewritten=signing.sign_module(decision.rewritten, mok),
                signer=mok.signer, **fields)
    provider = SplitProvider(modules_dir=tree.modules, cache_dir=tree.cache, runtime_dir=tree.runtime,
                             signed_only=True)
    result = provider.get(tree.module)
    assert isinstance(result, NotSplit) and result.rewritten is not None, result
    assert result.reason == "policy" and result.btf_bytes == decision.btf_bytes
    result.close()
    # Unsigned: the original as its distribution signed it, not the rewritten copy.
    write_entry(tree.cache, DUMMY, rewritten=decision.rewritten, **fields)
    result = provider.get(tree.module)
    assert result == NotSplit("signatures enforced: the cache entry is not signed"), result


def test_a_format_7_cache_still_serves_as_unsigned(presplit: Tree, fake_kernel: FakeKernel) -> None:
    # Caches built before signers were recorded (format 7) hold the same entries.
    fields = json.loads(_manifest(presplit).read_text())
    assert fields.pop("signer") == "" and fields["format"] == 8
    fields["format"] = 7
    _manifest(presplit).write_text(json.dumps(fields))
    pair = presplit.provider().get(presplit.module)
    assert isinstance(pair, SplitPair), pair
    pair.close()
    assert _enforcing(presplit).get(presplit.module) == \
        NotSplit("signatures enforced: the cache entry is not signed")
    # A format 7 manifest cannot name a signer; format 6 is not read at all.
    _edit_manifest(presplit, signer="CN = someone")
    assert "which records no signer" in presplit.provider().get(presplit.module).reason
    _edit_manifest(presplit, format=6, signer="")
    assert "has format 6, not 8" in presplit.provider().get(presplit.module).reason


def test_a_format_7_entry_of_a_build_not_known_is_stale(presplit: Tree, dummy_split) -> None:
    """Format 7 is read only for a build KERNEL_TABLES knows with 6.1's layout
    (by its module_layout CRC); of any other build its verdicts may be what 8's
    splitter no longer says (tests/test_cache612.py: 6.12's)."""
    source = presplit.module.read_bytes()
    crc = next(iter(tables.KNOWN_STRUCT_MODULE_LAYOUTS))
    name = b"module_layout".ljust(tables.MODULE_NAME_LEN, b"\0")
    assert source.count(struct.pack("<Q", crc) + name) == 1
    other = source.replace(struct.pack("<Q", crc) + name, struct.pack("<Q", crc ^ 1) + name)
    presplit.module.write_bytes(other)
    write_entry(presplit.cache, DUMMY, source=other, decision="refused",
                reason="struct module layout unknown (kernel build not known)", options=TWO_STAGE.tag)
    _edit_manifest(presplit, format=7)
    result = presplit.provider().get(presplit.module)
    assert isinstance(result, NotSplit), result
    assert result.reason.endswith("has format 7, made by a splitter that refused every 6.12 module, "
                                  f"and is stale: the module's build is not known "
                                  f"(module_layout CRC {crc ^ 1:#010x})"), result.reason


@pytest.mark.parametrize("refusal", [errno.EKEYREJECTED, errno.ENOKEY, errno.EPERM, errno.EBADMSG])
def test_a_signed_core_the_kernel_refuses_falls_back_to_the_original(
        signed_presplit: Tree, fake_kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch,
        refusal: int) -> None:
    """The key is not enrolled (ENOKEY: unavailable key; EKEYREJECTED; EPERM under
    lockdown): kernel/module/signing.c module_sig_check() refuses C before anything of it
    runs, and the original goes in plain."""
    def refuse_core(target: int | Path, params: str = "", *, flags: int = 0) -> int:
        raise OSError(refusal, os.strerror(refusal))

    plain: list[Path] = []
    monkeypatch.setattr(twostage, "finit_module", refuse_core)
    monkeypatch.setattr(twostage, "finit_module_path", lambda path, params="", **_: plain.append(path))
    pair = _enforcing(signed_presplit).get(signed_presplit.module)
    assert isinstance(pair, SplitPair), pair
    load = load_two_stage(pair, original=signed_presplit.module)
    assert load.mode == "plain", load
    assert load.reason == f"core module refused: {os.strerror(refusal)}", load
    assert plain == [signed_presplit.module] and fake_kernel.deleted == []


def _sysfs(root: Path, *, lockdown: str | None = None, sig_enforce: str | None = None) -> Path:
    if lockdown is not None:
        (root / "kernel/security").mkdir(parents=True)
        (root / "kernel/security/lockdown").write_text(lockdown + "\n")
    if sig_enforce is not None:
        (root / "module/module/parameters").mkdir(parents=True)
        (root / "module/module/parameters/sig_enforce").write_text(sig_enforce + "\n")
    return root


@pytest.mark.parametrize(("lockdown", "sig_enforce", "signatures"), [
    ("[none] integrity confidentiality", "N", ""),
    ("none [integrity] confidentiality", None, "kernel lockdown is active (integrity)"),
    ("none integrity [confidentiality]", None, "kernel lockdown is active (confidentiality)"),
    (None, "Y", "kernel enforces module signatures"),
    ("none [integrity] confidentiality", "Y",
     "kernel enforces module signatures; kernel lockdown is active (integrity)"),
])
def test_probe_capabilities_reads_lockdown_and_sig_enforce(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           lockdown: str | None, sig_enforce: str | None,
                                                           signatures: str) -> None:
    monkeypatch.setattr(kernel_state, "_probe_unload", lambda: True)
    caps = kernel_state.probe_capabilities(sys_root=_sysfs(tmp_path, lockdown=lockdown,
                                                           sig_enforce=sig_enforce))
    assert caps.signatures == signatures and caps.reason == signatures
    assert caps.signed_only == bool(signatures) and caps.two_stage  # two-stage, where signed
    monkeypatch.setattr(kernel_state, "_probe_unload", lambda: False)
    caps = kernel_state.probe_capabilities(sys_root=tmp_path)
    assert not caps.two_stage and caps.reason.startswith("kernel cannot unload modules")


ENFORCING = kernel_state.KernelCapabilities(can_unload=True, accepts_unsigned=False,
                                            reason="kernel lockdown is active (integrity)",
                                            signatures="kernel lockdown is active (integrity)")


def _policy(config: Config, capabilities: kernel_state.KernelCapabilities) -> tuple[tuple[str, bool], list[str]]:
    entries: list[dict] = []
    policy = loading_policy(config, capabilities, kver="6.1.0-57-amd64",
                            reporter=Reporter(sink=entries.append))
    return policy, [e["MESSAGE"] for e in entries]


def test_loading_policy_on_an_enforcing_kernel_is_signed_only_and_said_once(tree: Tree) -> None:
    (plain_only, signed_only), messages = _policy(Config(), ENFORCING)
    assert (plain_only, signed_only) == ("", True)
    assert messages == ["initsplitd: kernel lockdown is active (integrity): only modules whose signed "
                        "split is in the pre-split cache /usr/lib/initsplit/cache/6.1.0-57-amd64 are "
                        "loaded two-stage, every other one plain (its original, as its distribution "
                        "signed it)"]
    provider = make_provider(dataclasses.replace(Config(), cache_dir=tree.cache), kver="6.1.0-57-amd64",
                             reporter=Reporter(sink=lambda _: None), signed_only=signed_only)
    assert provider.signed_only
    # The rescue switch and a kernel that cannot unload still mean every module plain.
    (plain_only, signed_only), messages = _policy(dataclasses.replace(Config(), enabled=False), ENFORCING)
    assert (plain_only, signed_only) == ("initsplit=off on the kernel command line", False)
    no_unload = dataclasses.replace(ENFORCING, can_unload=False,
                                    reason="kernel cannot unload modules; kernel lockdown is active (integrity)")
    (plain_only, signed_only), messages = _policy(Config(), no_unload)
    assert (plain_only, signed_only) == (no_unload.reason, False)
    assert messages == [f"initsplitd: loading every module plain: {no_unload.reason}"]
    # A kernel that takes unsigned modules: nothing said, nothing limited.
    accepting = kernel_state.KernelCapabilities(can_unload=True, accepts_unsigned=True, reason="")
    assert _policy(Config(), accepting) == (("", False), [])


def test_service_on_an_enforcing_kernel_two_stages_signed_entries_only(
        signed_presplit: Tree, trusted_tmp: Path, dummy_source: bytes, mok: signing.SigningKey,  # noqa: F811
        fake_kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the Service: dummy's signed entry goes in two-stage; a second module with
    an unsigned entry, and a third with none, go in plain as their originals."""
    plain: list[Path] = []
    monkeypatch.setattr(twostage, "finit_module_path", lambda path, params="", **_: plain.append(path))
    others = {}
    for name in ("unsigned", "missing"):
        relative = DUMMY.with_name(f"{name}.ko")
        (signed_presplit.modules / relative).write_bytes(dummy_source)
        others[name] = signed_presplit.modules / relative
    decision = decide(dummy_source, TWO_STAGE)
    write_entry(signed_presplit.cache, DUMMY.with_name("unsigned.ko"), source=dummy_source,
                decision="split", name="unsigned", init_name="unsigned__init",
                core=decision.split.core, init=decision.split.init, reached=decision.split.reached,
                options=TWO_STAGE.tag, discarded="btf")
    reports: list[str] = []
    service = Service(settings=Settings(), resolver=_Quiet(), source=_Quiet(),
                      provider=_enforcing(signed_presplit, reports), reporter=_Quiet(),
                      notifier=_Quiet(), markers=LoadMarkers(signed_presplit.runtime / "loading"))
    try:
        loads = [service._load(Step(name, path)) for name, path in
                 (("dummy", signed_presplit.module), ("unsigned", others["unsigned"]),
                  ("missing", others["missing"]))]
    finally:
        service.scheduler.shutdown()
    assert [load.mode for load in loads] == ["two-stage", "plain", "plain"], loads
    assert loads[1].reason == "signatures enforced: the cache entry is not signed"
    assert loads[2].reason == ("signatures enforced: no pre-split cache entry (for these options), "
                               "and a split made now would be unsigned")
    assert plain == [others["unsigned"], others["missing"]]
    assert fake_kernel.loaded == [signing.sign_module(decision.split.core, mok),
                                  signing.sign_module(decision.split.init, mok)]
    assert len(reports) == 1 and "mokutil --import" in reports[0]
    assert not signed_presplit.runtime.joinpath(DUMMY.with_name("missing.ko")).exists()
