"""initsplit.fsio: checked fd-based reads, sealed memory files, atomic writes."""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
from pathlib import Path

import pytest

from initsplit import fsio
from initsplit.cache import write_entry
from initsplit.fsio import Untrusted, atomic_write, directory_problem, open_checked
from initsplit.loader.recovery import LoadMarkers
from tests.trusted_dir import trusted_tmp  # noqa: F401  (pytest fixture)

FOREIGN_UID = 12345  # a uid nobody on the test machine has


def _file(path: Path, data: bytes = b"module", mode: int = 0o644) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_sha256_fd_hashes_a_large_file_a_small_chunk_at_a_time(tmp_path: Path) -> None:
    """The daemon hashes each cache entry it uses, on every worker at once: what one
    hash holds is a 64 KiB read, not the file nor a 1 MiB read (PERFORMANCE.md)."""
    import tracemalloc

    data = os.urandom(1 << 20) * 3 + b"tail"
    path = _file(tmp_path / "core.ko", data)
    with open(path, "rb") as f:
        tracemalloc.start()
        try:
            got = fsio.sha256_fd(f.fileno())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert got == (hashlib.sha256(data).hexdigest(), len(data))
    assert peak < 3 * (64 << 10), peak


# ------------------------------------------------------------------ open_checked

def test_open_checked_reads_and_hashes_from_the_descriptor(tmp_path: Path) -> None:
    path = _file(tmp_path / "m.ko", b"checked bytes")
    with open_checked(path) as f:
        # Swapped after the check: the descriptor still reads what was checked.
        _file(tmp_path / "other.ko", b"other bytes").replace(path)
        assert fsio.sha256_fd(f.fileno()) == (hashlib.sha256(b"checked bytes").hexdigest(), 13)
        assert fsio.read_fd(f.fileno(), limit=100) == b"checked bytes"
        assert fcntl.fcntl(f.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert f.closed


@pytest.mark.parametrize(("prepare", "reason"), [
    (lambda p: (_file(p.with_name("real")), p.symlink_to("real")), "is a symlink"),
    (lambda p: _file(p, mode=0o666), "is world-writable"),
    (lambda p: _file(p, mode=0o664), "is group-writable"),
    (lambda p: (_file(p), os.chown(p, FOREIGN_UID, -1)), f"is owned by uid {FOREIGN_UID}"),
    (lambda p: os.mkfifo(p), "is not a regular file"),  # and the open does not hang
    (lambda p: p.mkdir(), "is not a regular file"),
])
def test_open_checked_refuses(tmp_path: Path, prepare, reason: str) -> None:
    path = tmp_path / "m.ko"
    prepare(path)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(Untrusted) as caught:
        open_checked(path)
    assert str(caught.value) == f"{path} {reason}"
    assert len(os.listdir("/proc/self/fd")) == before  # the refused descriptor is closed


def test_open_checked_accepts_the_daemons_own_uid(tmp_path: Path) -> None:
    path = _file(tmp_path / "m.ko")
    os.chown(path, FOREIGN_UID, -1)
    open_checked(path, euid=FOREIGN_UID).close()


def test_read_fd_limit(tmp_path: Path) -> None:
    with open_checked(_file(tmp_path / "big", b"x" * 101)) as f:
        with pytest.raises(Untrusted, match="larger than 100 bytes"):
            fsio.read_fd(f.fileno(), limit=100)
        assert len(fsio.read_fd(f.fileno(), limit=101)) == 101


# ------------------------------------------------------------------ memfd

def test_sealed_memfd_is_immutable() -> None:
    with fsio.sealed_memfd("dummy.ko", b"validated") as f:
        fd = f.fileno()
        assert os.pread(fd, 100, 0) == b"validated"
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        for seal in (fcntl.F_SEAL_SEAL, fcntl.F_SEAL_WRITE, fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_GROW):
            assert seals & seal
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"X", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 1)
        assert stat.S_ISREG(os.fstat(fd).st_mode)  # kernel_read_file() wants a regular file
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert f.label == "memfd:dummy.ko"


# ------------------------------------------------------------------ directories

def test_trusted_directory_chain(trusted_tmp: Path) -> None:
    (trusted_tmp / "a/b").mkdir(parents=True, mode=0o755)
    assert directory_problem(trusted_tmp / "a/b") is None
    assert directory_problem(trusted_tmp / "a/missing/too") is None  # nobody else can create it
    assert directory_problem(Path("relative")) == "relative is not an absolute path"


def test_world_writable_parents_are_refused_sticky_or_not(trusted_tmp: Path) -> None:
    assert directory_problem(Path("/tmp/anything")) == "/tmp is world-writable"  # mode 1777
    shared = trusted_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    assert directory_problem(shared / "cache") == f"{shared} is world-writable"
    # A missing directory under a writable one is not fine: anyone can create it.
    assert directory_problem(shared / "cache" / "6.1") == f"{shared} is world-writable"


def test_group_writable_and_foreign_directories_are_refused(trusted_tmp: Path) -> None:
    group = trusted_tmp / "group"
    group.mkdir()
    group.chmod(0o775)
    assert directory_problem(group / "x") == f"{group} is group-writable"
    foreign = trusted_tmp / "foreign"
    foreign.mkdir(mode=0o755)
    os.chown(foreign, FOREIGN_UID, -1)
    assert directory_problem(foreign) == f"{foreign} is owned by uid {FOREIGN_UID}"


def test_symlinks_are_followed_and_their_targets_checked(trusted_tmp: Path) -> None:
    (trusted_tmp / "real").mkdir(mode=0o755)
    (trusted_tmp / "link").symlink_to("real")
    assert directory_problem(trusted_tmp / "link") is None
    (trusted_tmp / "to-tmp").symlink_to("/tmp")
    assert directory_problem(trusted_tmp / "to-tmp" / "cache") == "/tmp is world-writable"
    (trusted_tmp / "real" / "up").symlink_to("../group")
    group = trusted_tmp / "group"
    group.mkdir()
    group.chmod(0o775)
    assert directory_problem(trusted_tmp / "real/up") == f"{group} is group-writable"
    (trusted_tmp / "loop").symlink_to("loop")
    assert "too many levels" in directory_problem(trusted_tmp / "loop")


def test_a_file_in_the_chain_is_refused(trusted_tmp: Path) -> None:
    _file(trusted_tmp / "f")
    assert directory_problem(trusted_tmp / "f" / "x") == f"{trusted_tmp / 'f'} is not a directory"


# ------------------------------------------------------------------ atomic writes

def test_atomic_write_replaces_a_planted_symlink_instead_of_writing_through(tmp_path: Path) -> None:
    victim = _file(tmp_path / "victim", b"precious")
    target = tmp_path / "flag"
    target.symlink_to(victim)
    atomic_write(target, b"new")
    assert victim.read_bytes() == b"precious"
    assert not target.is_symlink() and target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["flag", "victim"]  # no temp file left


def test_atomic_write_cleans_its_temp_file_on_failure(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path / "dir", b"data")  # rename(2) onto a directory fails
    assert os.listdir(tmp_path) == ["dir"]


def test_atomic_write_makes_parents_0755_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        atomic_write(tmp_path / "a/b/flag", b"1", make_parents=True)
    finally:
        os.umask(old)
    for directory in (tmp_path / "a", tmp_path / "a/b"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755


def test_cache_entry_directories_are_never_world_writable(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_entry(tmp_path, Path("kernel/drivers/net/dummy.ko"), source=b"src",
                    decision="nothing", reason="nothing to split")
    finally:
        os.umask(old)
    for directory in ("kernel", "kernel/drivers", "kernel/drivers/net"):
        assert stat.S_IMODE((tmp_path / directory).stat().st_mode) == 0o755


def test_load_marker_is_not_written_through_a_planted_temp_symlink(tmp_path: Path) -> None:
    # The old writer used the fixed name .NAME.tmp and followed a symlink there.
    victim = _file(tmp_path / "victim", b"precious")
    markers = tmp_path / "loading"
    markers.mkdir()
    (markers / ".dummy.tmp").symlink_to(victim)
    LoadMarkers(markers).core("dummy", "dummy__init")
    assert victim.read_bytes() == b"precious"
    assert not (markers / "dummy").is_symlink()
    assert (markers / "dummy").read_text() == "core dummy__init\n"
