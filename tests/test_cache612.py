"""The daemon's cache lookup (SplitProvider) with entries of Debian 13's Linux 6.12.

A real 6.12 module (loop, from the cached Debian 13 kernel tree, as a .ko.xz like
the distribution ships it) split by the 6.12 splitter and kept in a cache as
`initsplit split` writes it, format 8 with reached_from, goes through
SplitProvider.get() and load_two_stage() with a fake kernel whose sysfs places C's
sections where the manifest's reached_from says: the loader checks exactly the
manifest's placement. What must not be used costs a plain load of the original
with the reason, never a crash:

* a format 7 entry of a 6.12 module: format 7's splitter refused every 6.12 module
  ("unsupported kernel"), so its verdicts are stale there, and a format 7 manifest
  with reached_from is no format 7 manifest at all;
* a manifest naming both reached and reached_from, or an offset int() would take
  but the writer never writes ("+8", " 8", "1_0", ...).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from initsplit.cache import BadEntry, manifest_path, read_entry, write_entry
from initsplit.daemon.service import Service, Settings
from initsplit.daemon.splits import NotSplit, SplitProvider
from initsplit.loader import twostage
from initsplit.loader.recovery import LoadMarkers
from initsplit.loader.twostage import SplitPair, load_two_stage
from initsplit.modfile import read_module
from initsplit.split import SplitModule, split_module
from initsplit.split.policy import SplitOptions
from tests.testbed.fixtures import kernel612, rules612  # noqa: F401  (pytest fixtures)
from tests.testbed.kernel import DebianKernel
from tests.trusted_dir import trusted_tmp  # noqa: F401  (pytest fixture)

TWO_STAGE = SplitOptions(two_stage="always")
NAME = "loop"


@pytest.fixture(scope="module")
def loop_file(kernel612: DebianKernel) -> Path:  # noqa: F811
    path = kernel612.module(NAME)
    assert path.name == "loop.ko.xz", path  # Debian 13 ships its modules xz-compressed
    return path


@pytest.fixture(scope="module")
def loop_split(loop_file: Path, rules612) -> SplitModule:  # noqa: F811
    s = split_module(read_module(loop_file), rules612)
    # A 6.12 split: I reaches C from one anchor per memory, never from struct module alone.
    assert s.reached_from and not s.reached, s
    assert len({anchor for _, anchor, _ in s.reached_from}) > 1, s.reached_from
    return s


@dataclass
class Tree:
    modules: Path
    cache: Path
    runtime: Path
    relpath: Path  # of the compressed original in the module tree
    source: bytes  # decompressed, as the provider hashes it

    @property
    def module(self) -> Path:
        return self.modules / self.relpath

    @property
    def entry(self) -> Path:
        """The cache keeps a compressed original's entry under NAME.ko (modfile.py)."""
        return self.relpath.with_name(f"{NAME}.ko")

    @property
    def manifest(self) -> Path:
        return manifest_path(self.cache, self.entry)

    def provider(self) -> SplitProvider:
        return SplitProvider(modules_dir=self.modules, cache_dir=self.cache, runtime_dir=self.runtime,
                             options=TWO_STAGE)

    def edit(self, **changes: object) -> None:
        fields = json.loads(self.manifest.read_text())
        fields.update(changes)
        self.manifest.write_text(json.dumps(fields))


@pytest.fixture
def tree(trusted_tmp: Path, kernel612: DebianKernel, loop_file: Path,  # noqa: F811
         loop_split: SplitModule) -> Tree:
    relpath = loop_file.relative_to(kernel612.modules_dir)
    t = Tree(trusted_tmp / "modules", trusted_tmp / "cache", trusted_tmp / "run", relpath,
             read_module(loop_file))
    t.module.parent.mkdir(parents=True)
    shutil.copyfile(loop_file, t.module)
    write_entry(t.cache, t.entry, source=t.source, decision="split", name=loop_split.name,
                init_name=loop_split.init_name, core=loop_split.core, init=loop_split.init,
                reached_from=loop_split.reached_from, options=TWO_STAGE.tag)
    return t


def _read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


@dataclass
class FakeKernel:
    """finit_module and friends: what was loaded, and a sysfs placing C's sections."""

    sys_root: Path
    loaded: list[bytes]
    plain: list[Path]
    deleted: list[str]


@pytest.fixture
def fake_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop_split: SplitModule) -> FakeKernel:
    fake = FakeKernel(tmp_path / "sys", [], [], [])
    _place(fake.sys_root, loop_split.reached_from)
    monkeypatch.setattr(twostage, "SYS_ROOT", fake.sys_root)
    monkeypatch.setattr(twostage, "finit_module",
                        lambda fd, params="", **_: fake.loaded.append(_read_all(fd)) or 0)
    monkeypatch.setattr(twostage, "finit_module_path", lambda path, params="", **_: fake.plain.append(path))
    monkeypatch.setattr(twostage, "delete_module", lambda name, **_: fake.deleted.append(name))
    return fake


def _place(sys_root: Path, reached_from: tuple[tuple[str, str, int], ...]) -> None:
    """/sys/module/loop/sections as the kernel would show C placed by the layout model:
    each anchor section in a memory of its own, each section at its offset from it."""
    sections = sys_root / "module" / NAME / "sections"
    sections.mkdir(parents=True)
    anchors = sorted({anchor for _, anchor, _ in reached_from} | {".gnu.linkonce.this_module"})
    bases = {anchor: 0xffffffffc0000000 + i * 0x100000 for i, anchor in enumerate(anchors)}
    addresses = dict(bases)
    for section, anchor, offset in reached_from:
        addresses[section] = bases[anchor] + offset
    for section, address in addresses.items():
        (sections / section).write_text(f"{address:#018x}\n")


def test_a_612_split_entry_loads_two_stage_with_its_reached_from(tree: Tree, loop_split: SplitModule,
                                                                 fake_kernel: FakeKernel) -> None:
    pair = tree.provider().get(tree.module)
    assert isinstance(pair, SplitPair), pair
    assert pair.name == NAME and pair.reached == () and pair.reached_from == loop_split.reached_from
    load = load_two_stage(pair, original=tree.module)
    assert load.mode == "two-stage", load
    assert fake_kernel.loaded == [loop_split.core, loop_split.init]
    assert fake_kernel.plain == [] and fake_kernel.deleted == []


def test_the_loader_checks_the_manifests_reached_from(tree: Tree, loop_split: SplitModule,
                                                      fake_kernel: FakeKernel) -> None:
    """One offset of the manifest 8 bytes off the kernel's placement: C comes out
    and the original goes in, I never loaded."""
    section, anchor, offset = loop_split.reached_from[0]
    moved = ((section, anchor, offset + 8),) + loop_split.reached_from[1:]
    tree.edit(reached_from=" ".join(f"{s}={a}={o}" for s, a, o in moved))
    pair = tree.provider().get(tree.module)
    assert isinstance(pair, SplitPair), pair
    load = load_two_stage(pair, original=tree.module)
    assert load.mode == "plain" and f"C's {section}" in load.reason and anchor in load.reason, load
    assert fake_kernel.loaded == [loop_split.core]  # C only
    assert fake_kernel.deleted == [NAME] and fake_kernel.plain == [tree.module]


def _format_7(tree: Tree, **changes: object) -> None:
    """The manifest as format 7 wrote it: no signer field, no reached_from field."""
    fields = json.loads(tree.manifest.read_text())
    del fields["signer"], fields["reached_from"]
    fields.update(format=7, **changes)
    tree.manifest.write_text(json.dumps(fields))


def test_a_format_7_entry_of_a_612_module_is_stale(tree: Tree) -> None:
    # What format 7's splitter wrote for every 6.12 module; read as valid, it would
    # keep this machine on plain loads for as long as the kernel stays installed.
    write_entry(tree.cache, tree.entry, source=tree.source, decision="refused",
                reason="unsupported kernel: 6.12.117+deb13-amd64", options=TWO_STAGE.tag)
    _format_7(tree)
    found = read_entry(tree.cache, tree.entry, source=tree.source, options=TWO_STAGE.tag)
    assert isinstance(found, BadEntry), found
    assert "has format 7, made by a splitter that refused every 6.12 module, and is stale" in found.reason
    assert "Debian 6.12.117+deb13-amd64, struct module_memory" in found.reason, found.reason
    result = tree.provider().get(tree.module)
    assert isinstance(result, NotSplit) and result.reason == found.reason, result
    assert "unsupported kernel" not in result.reason
    # The same entry as format 8 says what 8's splitter decided: it is used.
    tree.edit(format=8)
    assert tree.provider().get(tree.module) == NotSplit("unsupported kernel: 6.12.117+deb13-amd64")


def test_a_format_7_manifest_with_reached_from_is_refused(tree: Tree) -> None:
    _format_7(tree, reached_from=json.loads(tree.manifest.read_text())["reached_from"])
    result = tree.provider().get(tree.module)
    assert isinstance(result, NotSplit) and result.rewritten is None, result
    assert "has format 7, which records no signer and no reached_from" in result.reason, result


def _offset_item(tree: Tree, text: str) -> str:
    """The manifest's reached_from with the first offset written as *text*."""
    items = json.loads(tree.manifest.read_text())["reached_from"].split(" ")
    section, anchor, _ = items[0].split("=")
    return " ".join([f"{section}={anchor}={text}", *items[1:]])


# Each mutation of a good 6.12 manifest, and what the reason must say.
MUTATIONS = {
    "both reached and reached_from": (lambda t: t.edit(reached=".gnu.linkonce.this_module=0"),
                                      "both reached and reached_from"),
    "offset with a plus": (lambda t: t.edit(reached_from=_offset_item(t, "+8")), "bad offset '+8'"),
    "offset with an underscore": (lambda t: t.edit(reached_from=_offset_item(t, "1_0")),
                                  "bad offset '1_0'"),
    "offset with a leading zero": (lambda t: t.edit(reached_from=_offset_item(t, "08")), "bad offset '08'"),
    "negative zero": (lambda t: t.edit(reached_from=_offset_item(t, "-0")), "bad offset '-0'"),
    "offset in other digits": (lambda t: t.edit(reached_from=_offset_item(t, "\u0668")),
                               "bad offset '\u0668'"),
    "offset with a blank": (lambda t: t.edit(reached_from=_offset_item(t, "\t8")), "bad offset '\\t8'"),
    "offset after two blanks": (lambda t: t.edit(reached_from=_offset_item(t, "0").replace("=0", "= 8", 1)),
                                "bad offset ''"),
    "item separated by two blanks": (
        lambda t: t.edit(reached_from=json.loads(t.manifest.read_text())["reached_from"].replace(" ", "  ", 1)),
        "reached_from: bad item ''"),
}


@pytest.mark.parametrize("kind", MUTATIONS)
def test_a_mutated_manifest_is_refused_and_loads_plain(kind: str, tree: Tree, fake_kernel: FakeKernel) -> None:
    mutate, reason = MUTATIONS[kind]
    mutate(tree)
    found = read_entry(tree.cache, tree.entry, source=tree.source, options=TWO_STAGE.tag)
    assert isinstance(found, BadEntry) and "is corrupt: " in found.reason, found
    assert reason in found.reason, found.reason
    service = Service(settings=Settings(), resolver=_Quiet(), source=_Quiet(), provider=tree.provider(),
                      reporter=_Quiet(), notifier=_Quiet(), markers=LoadMarkers(tree.runtime / "loading"))
    try:
        load = service._load(_Step(NAME, tree.module))
    finally:
        service.scheduler.shutdown()
    assert load.mode == "plain" and load.reason == found.reason, load
    assert fake_kernel.plain == [tree.module] and fake_kernel.loaded == []  # nothing split loaded
    assert not (tree.runtime / tree.entry).exists()  # and nothing split instead


@dataclass(frozen=True)
class _Step:
    name: str
    path: Path | None = None
    options: str = ""
    install_command: str | None = None
    builtin: bool = False


class _Quiet:
    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
