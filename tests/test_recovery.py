"""Recovery after a killed daemon (loader/recovery.py) against a fake sysfs and
/proc/modules: a stale marker never costs a live module, our inert core does go.

The kernel facts the fakes stand for (that a plain original lists its .init.*
sections in /sys/module/NAME/sections after init, and our core module none) are
checked on the real kernel by tests/test_loader_vm.py.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from initsplit.loader import recovery, twostage
from initsplit.loader.recovery import LoadMarkers
from initsplit.loader.twostage import SplitPair, load_two_stage
from initsplit.fsio import sealed_memfd
from tests.trusted_dir import trusted_tmp  # noqa: F401  (pytest fixture)

CORE_ADDRESS = 0xFFFFFFFFC0A01040
# What the splitter leaves in C: the original's sections without .init*.
CORE_SECTIONS = (".text", ".rodata", ".data", "__ksymtab", "__kcrctab", ".gnu.linkonce.this_module")
ORIGINAL_SECTIONS = CORE_SECTIONS + (".init.text", ".init.data")


@dataclass
class FakeKernel:
    root: Path
    deleted: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        (self.root / "proc").mkdir()
        (self.root / "sys/module").mkdir(parents=True)
        self._write_proc()

    def load(self, name: str, sections: tuple[str, ...] = CORE_SECTIONS, *,
             address: int = CORE_ADDRESS, listed: bool = True) -> None:
        module = self.root / "sys/module" / name
        module.mkdir()
        (module / "initstate").write_text("live\n")
        if listed:
            (module / "sections").mkdir()
            for section in sections:
                (module / "sections" / section).write_text(
                    f"{address if section == '.gnu.linkonce.this_module' else 0:#018x}\n")
        self._write_proc()

    def delete_module(self, name: str, *, flags: int = 0) -> None:
        self.deleted.append(name)
        for path in sorted((self.root / "sys/module" / name).rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        (self.root / "sys/module" / name).rmdir()
        self._write_proc()

    def _write_proc(self) -> None:
        names = sorted(p.name for p in (self.root / "sys/module").iterdir())
        (self.root / "proc/modules").write_text(
            "".join(f"{n} 16384 0 - Live 0x0000000000000000\n" for n in names))

    @property
    def loaded(self) -> set[str]:
        return {p.name for p in (self.root / "sys/module").iterdir()}


@pytest.fixture
def kernel(trusted_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> FakeKernel:  # noqa: F811
    fake = FakeKernel(trusted_tmp)
    monkeypatch.setattr(recovery, "delete_module", fake.delete_module)
    return fake


@pytest.fixture
def markers(kernel: FakeKernel) -> LoadMarkers:
    return LoadMarkers(kernel.root / "loading", sys_root=kernel.root / "sys",
                       proc_root=kernel.root / "proc")


def _write_marker(markers: LoadMarkers, name: str, text: str) -> None:
    markers.directory.mkdir(exist_ok=True)
    (markers.directory / name).write_text(text)


# ------------------------------------------------- the original is never deleted

def test_plain_original_under_a_stale_core_marker_is_left_alone(kernel: FakeKernel,
                                                                markers: LoadMarkers) -> None:
    # Our C never got in (or was removed); modprobe then loaded the original.
    kernel.load("dummy", ORIGINAL_SECTIONS)
    markers.core("dummy", "dummy__init")
    result = markers.recover()
    assert kernel.deleted == [] and "dummy" in kernel.loaded
    assert result.removed_cores == []
    assert result.problems == ["dummy: left alone: it is loaded, but it has .init.data, .init.text: "
                               "it is the original, loaded plain by someone else"]
    assert not (markers.directory / "dummy").exists()


def test_plain_original_at_our_old_address_is_left_alone(kernel: FakeKernel,
                                                         markers: LoadMarkers) -> None:
    # The worst case: the original got the very address C had (vmalloc reused it).
    kernel.load("dummy", ORIGINAL_SECTIONS, address=CORE_ADDRESS)
    _write_marker(markers, "dummy", f"core-loaded dummy__init {CORE_ADDRESS:#x}\n")
    markers.recover()
    assert kernel.deleted == []


def test_another_module_without_init_at_another_address_is_left_alone(kernel: FakeKernel,
                                                                      markers: LoadMarkers) -> None:
    kernel.load("dummy", CORE_SECTIONS, address=CORE_ADDRESS + 0x10000)
    _write_marker(markers, "dummy", f"core-loaded dummy__init {CORE_ADDRESS:#x}\n")
    result = markers.recover()
    assert kernel.deleted == []
    assert "not at 0xffffffffc0a01040 where our core module was" in result.problems[0]


def test_without_a_section_list_nothing_is_deleted(kernel: FakeKernel, markers: LoadMarkers) -> None:
    kernel.load("dummy", listed=False)  # no CONFIG_KALLSYMS, or the list failed to allocate
    markers.core("dummy", "dummy__init")
    result = markers.recover()
    assert kernel.deleted == []
    assert "cannot be told from the original" in result.problems[0]


# ------------------------------------------------- our inert core is deleted

def test_inert_core_under_a_core_marker_is_removed(kernel: FakeKernel, markers: LoadMarkers) -> None:
    # Killed after finit_module(C) returned, before "core-loaded" was written.
    kernel.load("dummy")
    markers.core("dummy", "dummy__init")
    result = markers.recover()
    assert kernel.deleted == ["dummy"] and result.removed_cores == ["dummy"]
    assert result.problems == [] and os.listdir(markers.directory) == []


def test_inert_core_at_the_recorded_address_is_removed(kernel: FakeKernel,
                                                       markers: LoadMarkers) -> None:
    kernel.load("dummy")
    markers.core_loaded("dummy", "dummy__init")
    assert (markers.directory / "dummy").read_text() == f"core-loaded dummy__init {CORE_ADDRESS:#x}\n"
    result = markers.recover()
    assert kernel.deleted == ["dummy"] and result.removed_cores == ["dummy"]


def test_hidden_addresses_fall_back_to_the_section_test(kernel: FakeKernel,
                                                        markers: LoadMarkers) -> None:
    kernel.load("dummy", address=0)  # kptr_restrict=2: module_sect_read() shows 0
    markers.core_loaded("dummy", "dummy__init")
    assert (markers.directory / "dummy").read_text() == "core-loaded dummy__init -\n"
    markers.recover()
    assert kernel.deleted == ["dummy"]


def test_loaded_init_module_is_pending_deletion(kernel: FakeKernel, markers: LoadMarkers) -> None:
    kernel.load("dummy")
    kernel.load("dummy__init", (".init.text", ".gnu.linkonce.this_module"))
    markers.core_loaded("dummy", "dummy__init")
    result = markers.recover()
    assert result.pending_init == [("dummy", "dummy__init")] and kernel.deleted == []
    assert (markers.directory / "dummy").read_text() == "init-done dummy__init\n"


# ------------------------------------------------- the marker files themselves

def test_leftover_temp_files_are_removed(kernel: FakeKernel, markers: LoadMarkers) -> None:
    _write_marker(markers, ".dummy.tmp", "core dummy__init\n")  # the old writer's fixed name
    _write_marker(markers, ".loop.5f1c0e2a9b3d.tmp", "core loop__init\n")
    _write_marker(markers, ".keep", "")
    result = markers.recover()
    assert sorted(os.listdir(markers.directory)) == [".keep"]
    assert result.problems == [] and kernel.deleted == []


def test_markers_in_an_untrusted_directory_are_not_acted_upon(kernel: FakeKernel,
                                                              markers: LoadMarkers) -> None:
    kernel.load("dummy")
    markers.core("dummy", "dummy__init")
    markers.directory.chmod(0o777)
    result = markers.recover()
    assert kernel.deleted == []
    assert result.problems == [f"load markers in {markers.directory} not used: "
                               f"{markers.directory} is world-writable"]


def test_a_symlinked_marker_is_not_acted_upon(kernel: FakeKernel, markers: LoadMarkers) -> None:
    kernel.load("dummy")
    _write_marker(markers, "real", "core dummy__init\n")
    (markers.directory / "dummy").symlink_to("real")
    result = markers.recover()
    assert "dummy" in kernel.loaded and kernel.deleted == []
    assert result.problems == [f"dummy: marker not used: {markers.directory / 'dummy'} is a symlink"]


# ------------------------------------------------- the loader records C's identity

def test_two_stage_load_records_the_core_address_before_loading_the_init_module(
        kernel: FakeKernel, markers: LoadMarkers, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def finit_module(fd: int, params: str = "", *, flags: int = 0) -> int:
        if os.pread(fd, 4, 0) == b"CORE":
            kernel.load("dummy")
        else:
            seen.append((markers.directory / "dummy").read_text())
            kernel.load("dummy__init", (".init.text",))
        return 0  # the raw result of a load whose init succeeded

    monkeypatch.setattr(twostage, "finit_module", finit_module)
    monkeypatch.setattr(twostage, "SYS_ROOT", kernel.root / "sys")
    pair = SplitPair("dummy", "dummy__init", sealed_memfd("c", b"CORE"), sealed_memfd("i", b"INIT"),
                     reached=((".gnu.linkonce.this_module", 0),))
    load = load_two_stage(pair, original=Path("/nonexistent"), markers=markers)
    assert load.mode == "two-stage", load
    assert seen == [f"core-loaded dummy__init {CORE_ADDRESS:#x}\n"]
    assert (markers.directory / "dummy").read_text() == "init-done dummy__init\n"


def test_a_marker_that_cannot_be_rewritten_does_not_stop_recovery(
        kernel: FakeKernel, markers: LoadMarkers, monkeypatch: pytest.MonkeyPatch) -> None:
    # /run full: rewriting "aaa" to init-done fails; "zzz", sorted after it, is an
    # inert core that must still go (else it looks loaded and its device gets nothing).
    kernel.load("aaa", CORE_SECTIONS)
    kernel.load("aaa__init", (".init.text",))
    kernel.load("zzz", CORE_SECTIONS)
    _write_marker(markers, "aaa", "core aaa__init\n")
    _write_marker(markers, "zzz", "core zzz__init\n")

    def full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(markers, "init_done", full)
    result = markers.recover()
    assert result.pending_init == [("aaa", "aaa__init")]
    assert result.removed_cores == ["zzz"] and "zzz" not in kernel.loaded
    assert result.problems == ["aaa: marker kept as it was: No space left on device"]
    assert (markers.directory / "aaa").read_text() == "core aaa__init\n"


# ------------------------------------------------- no stale core marker outlives I

def test_init_module_is_deleted_only_under_an_init_done_marker(
        kernel: FakeKernel, markers: LoadMarkers, monkeypatch: pytest.MonkeyPatch) -> None:
    # I's init ran, but "init-done" could not be written then (/run full for a
    # moment): the marker still says core-loaded. Were I deleted under it, a daemon
    # killed right after would find C (the live driver now) under "core-loaded" with
    # no I, and delete it under its device.
    kernel.load("dummy")
    kernel.load("dummy__init", (".init.text",))
    markers.core_loaded("dummy", "dummy__init")
    seen: list[str] = []

    def delete_module(name: str, *, flags: int = 0) -> None:
        seen.append((markers.directory / "dummy").read_text())
        kernel.delete_module(name)

    monkeypatch.setattr(recovery, "delete_module", delete_module)
    batch = recovery.delete_init_modules([("dummy", "dummy__init")], markers, trigger="quiet")
    assert batch.deleted == ("dummy__init",) and seen == ["init-done dummy__init\n"]
    assert os.listdir(markers.directory) == [] and "dummy" in kernel.loaded


def test_a_marker_that_cannot_say_init_done_goes_before_the_init_module(
        kernel: FakeKernel, markers: LoadMarkers, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel.load("dummy")
    kernel.load("dummy__init", (".init.text",))
    markers.core_loaded("dummy", "dummy__init")

    def full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(markers, "init_done", full)
    seen: list[bool] = []

    def killed_before_deleting(name: str, *, flags: int = 0) -> None:
        seen.append((markers.directory / "dummy").exists())
        raise OSError(errno.EINTR, "killed")  # stands for SIGKILL right here

    monkeypatch.setattr(recovery, "delete_module", killed_before_deleting)
    recovery.delete_init_modules([("dummy", "dummy__init")], markers, trigger="quiet")
    assert seen == [False]
    # The next daemon finds the init module by its name, and leaves C alone.
    monkeypatch.setattr(recovery, "delete_module", kernel.delete_module)
    result = markers.recover()
    assert result.pending_init == [("dummy", "dummy__init")] and kernel.deleted == []


def test_an_init_module_without_marker_is_pending_and_others_are_not(
        kernel: FakeKernel, markers: LoadMarkers) -> None:
    kernel.load("dummy")
    kernel.load("dummy__init", (".init.text",))
    kernel.load("loop", ORIGINAL_SECTIONS)
    result = markers.recover()  # no marker directory at all
    assert result.pending_init == [("dummy", "dummy__init")] and kernel.deleted == []


def _initstate(kernel: FakeKernel, name: str, state: str) -> None:
    (kernel.root / "sys/module" / name / "initstate").write_text(state + "\n")


def test_an_init_module_in_use_is_tried_again(
        kernel: FakeKernel, markers: LoadMarkers, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel.load("dummy")
    kernel.load("dummy__init", (".init.text",))
    markers.init_done("dummy", "dummy__init")

    def busy(name: str, *, flags: int = 0) -> None:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

    monkeypatch.setattr(recovery, "delete_module", busy)
    batch = recovery.delete_init_modules([("dummy", "dummy__init")], markers, trigger="quiet")
    assert batch.busy == (("dummy", "dummy__init"),)
    assert batch.failed == (("dummy__init", os.strerror(errno.EBUSY)),)
    assert (markers.directory / "dummy").read_text() == "init-done dummy__init\n"


def test_an_init_module_still_initialising_is_not_marked_done(
        kernel: FakeKernel, markers: LoadMarkers) -> None:
    # A killed daemon's finit_module(I) the kernel completes: I is COMING and its
    # init may yet fail. "init-done" now would make C, inert if it fails, look done.
    kernel.load("dummy")
    kernel.load("dummy__init", (".init.text",))
    _initstate(kernel, "dummy__init", "coming")
    markers.core_loaded("dummy", "dummy__init")
    batch = recovery.delete_init_modules([("dummy", "dummy__init")], markers, trigger="quiet")
    assert batch.busy == (("dummy", "dummy__init"),) and kernel.deleted == []
    assert (markers.directory / "dummy").read_text().startswith("core-loaded dummy__init ")
    fast = LoadMarkers(markers.directory, sys_root=markers.sys_root, proc_root=markers.proc_root,
                       settle_wait=0.2)
    result = fast.recover()
    assert result.pending_init == [("dummy", "dummy__init")] and kernel.deleted == []
    assert "has not finished loading or unloading" in result.problems[0]
    assert (markers.directory / "dummy").read_text().startswith("core-loaded dummy__init ")


def test_recovery_waits_for_an_initialising_init_module_whose_init_then_fails(
        kernel: FakeKernel, markers: LoadMarkers) -> None:
    # The init fails while recovery waits: the kernel frees I, C is inert and goes,
    # so that coldplug loads the module afresh (else it looks loaded for good).
    import threading

    kernel.load("dummy")
    kernel.load("dummy__init", (".init.text",))
    _initstate(kernel, "dummy__init", "coming")
    markers.core_loaded("dummy", "dummy__init")
    threading.Timer(0.3, kernel.delete_module, args=("dummy__init",)).start()
    result = markers.recover()
    assert result.pending_init == [] and result.removed_cores == ["dummy"]
    assert kernel.deleted == ["dummy__init", "dummy"] and os.listdir(markers.directory) == []


def test_a_long_named_init_module_without_marker_is_found(kernel: FakeKernel,
                                                          markers: LoadMarkers) -> None:
    from initsplit.split.names import init_module_name

    core = "a_module_name_long_enough_to_need_the_shortened_form_x"
    init = init_module_name(core)
    assert init != core + "__init"
    kernel.load(core)
    kernel.load(init, (".init.text",))
    assert markers.recover().pending_init == [(core, init)]


def test_an_init_module_on_its_way_out_is_not_taken_for_a_success(
        kernel: FakeKernel, markers: LoadMarkers) -> None:
    # Its init failed: the kernel set it GOING and tears it down (sysfs first, then
    # /proc/modules). Still listed for a moment, it must not count as loaded.
    import threading

    kernel.load("dummy")
    kernel.load("dummy__init", (".init.text",))
    _initstate(kernel, "dummy__init", "going")
    markers.core_loaded("dummy", "dummy__init")
    threading.Timer(0.3, kernel.delete_module, args=("dummy__init",)).start()
    result = markers.recover()
    assert result.pending_init == [] and result.removed_cores == ["dummy"], result


def test_the_batch_removes_the_inert_core_when_a_pending_init_module_failed(
        kernel: FakeKernel, markers: LoadMarkers) -> None:
    # Recovery left the pair pending, I still initialising; then I's init failed.
    kernel.load("dummy")
    markers.core_loaded("dummy", "dummy__init")
    batch = recovery.delete_init_modules([("dummy", "dummy__init")], markers, trigger="quiet")
    assert batch.removed_cores == ("dummy",) and batch.deleted == ()
    assert kernel.deleted == ["dummy"] and os.listdir(markers.directory) == []


def test_one_recovery_waits_at_most_its_settle_time_for_all_markers(
        kernel: FakeKernel, markers: LoadMarkers) -> None:
    # Two loads stuck in their inits (the reason the daemon gave up): the handback
    # must finish within systemd's stop timeout, so the wait is shared.
    import time

    for name in ("aaa", "bbb"):
        kernel.load(name)
        kernel.load(f"{name}__init", (".init.text",))
        _initstate(kernel, f"{name}__init", "coming")
        markers.core_loaded(name, f"{name}__init")
    started = time.monotonic()
    result = LoadMarkers(markers.directory, sys_root=markers.sys_root, proc_root=markers.proc_root,
                         settle_wait=0.5).recover()
    assert time.monotonic() - started < 0.9
    assert result.pending_init == [("aaa", "aaa__init"), ("bbb", "bbb__init")]
