"""File I/O for files the daemon trusts: kernel code it loads, and its own state.

One rule for everything read: a file is opened once, without following a symlink,
and what was opened is checked on the descriptor (fstat), hashed from it and, for
module code, handed to the kernel as that same descriptor (finit_module(2)). Nothing
is opened again by path, so a file swapped or replaced by a symlink after the check
cannot be the one that is used.

What "trusted" means (for files and for every directory above them):

* regular file (or directory), not a symlink;
* owned by root or by the daemon's effective uid;
* not group- or world-writable. A sticky world-writable directory (/tmp) is no
  better: anyone can create a name in it before we do.

Writes are atomic: a temp file created with O_EXCL|O_NOFOLLOW in the target's
directory, written, fchmod-ed, then renamed over the target, so a reader sees the
old file or the whole new one and a planted symlink is never written through.
No fsync: everything written here is either derived data a rerun regenerates or
lives on a tmpfs (/run).

Standard library only: this module is part of the daemon's import closure in the
initramfs (dracut/90initsplit/python-closure.py).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
from pathlib import Path

TEMP_SUFFIX = ".tmp"
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
# What sha256_fd() reads at a time: the daemon hashes every cache entry it uses,
# on each worker thread at once. 1 MiB reads (a bytes object each) raised its peak
# RSS by 2.5-3.0 MiB hashing four 6.12 cores (kvm, drm, ...) on two threads, 64 KiB
# ones by 0.4 MiB (host, Python 3.11, MALLOC_MMAP_THRESHOLD_ as the units set it).
_HASH_CHUNK = 1 << 16
# Linux's own limit on symlinks followed in one lookup (include/linux/namei.h MAXSYMLINKS).
_MAX_SYMLINKS = 40
# memfd seals that make the contents immutable for good (mm/memfd.c memfd_add_seals).
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class Untrusted(Exception):
    """A file or directory that must not be used; str() is the reason ("X is a symlink")."""


class OpenFile:
    """An open read-only descriptor and what it was opened as (for messages).

    The owner must close it; closing twice is harmless.
    """

    __slots__ = ("_fd", "label")

    def __init__(self, fd: int, label: str) -> None:
        self._fd: int | None = fd
        self.label = label

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.label}: file is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> OpenFile:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OpenFile({self._fd}, {self.label!r})"


# ------------------------------------------------------------------ checks

def ownership_problem(info: os.stat_result, *, euid: int | None = None) -> str | None:
    """Why a file or directory with *info* could have been written by someone else."""
    owner = os.geteuid() if euid is None else euid
    if info.st_uid not in (0, owner):
        return f"is owned by uid {info.st_uid}"
    if info.st_mode & stat.S_IWOTH:
        return "is world-writable"
    if info.st_mode & stat.S_IWGRP:
        return "is group-writable"
    return None


def file_problem(info: os.stat_result, *, euid: int | None = None) -> str | None:
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    return ownership_problem(info, euid=euid)


def directory_problem(path: Path, *, euid: int | None = None) -> str | None:
    """Why *path* (absolute) is not a directory only root or we can change, or None.

    Walks the path from / the way the kernel resolves it and checks every directory
    it passes through, including those a symlink leads to: whoever can write one of
    them can swap what lies below. A symlink is fine when its own directory is (a
    symlink cannot be rewritten in place). A missing tail is fine too: if the
    directory above it is trusted, nobody else can create it.
    """
    if not path.is_absolute():
        return f"{path} is not an absolute path"
    todo = list(path.parts[1:])
    current = Path("/")
    problem = _checked_directory(current, euid)
    hops = 0
    while problem is None and todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            current = current.parent  # already checked on the way down
            continue
        step = current / part
        try:
            info = os.lstat(step)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(info.st_mode):
            hops += 1
            if hops > _MAX_SYMLINKS:
                return f"{path} has too many levels of symbolic links"
            target = Path(os.readlink(step))
            if target.is_absolute():
                current = Path("/")
            todo[:0] = list(target.parts[1:] if target.is_absolute() else target.parts)
            continue
        problem = _directory_info_problem(step, info, euid)
        current = step
    return problem


def _checked_directory(path: Path, euid: int | None) -> str | None:
    try:
        info = os.lstat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    return _directory_info_problem(path, info, euid)


def _directory_info_problem(path: Path, info: os.stat_result, euid: int | None) -> str | None:
    if not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a directory"
    problem = ownership_problem(info, euid=euid)
    return f"{path} {problem}" if problem else None


# ------------------------------------------------------------------ reading

def open_checked(path: Path, *, euid: int | None = None) -> OpenFile:
    """Open *path* read-only without following a symlink, and check what was opened.

    Raises Untrusted for a symlink or a file that fails the checks above, and
    OSError (FileNotFoundError, ...) when it cannot be opened at all. O_NONBLOCK:
    a FIFO planted in its place must fail the check, not hang the open.
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Untrusted(f"{path} is a symlink") from None
        raise
    try:
        problem = file_problem(os.fstat(fd), euid=euid)
    except BaseException:
        os.close(fd)
        raise
    if problem:
        os.close(fd)
        raise Untrusted(f"{path} {problem}")
    return OpenFile(fd, str(path))


def read_fd(fd: int, *, limit: int) -> bytes:
    """The whole file behind *fd*, from offset 0; Untrusted when larger than *limit*."""
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, min(_CHUNK, limit + 1 - offset), offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)
        if offset > limit:
            raise Untrusted(f"is larger than {limit} bytes")


def sha256_fd(fd: int) -> tuple[str, int]:
    """SHA-256 (hex) and size of the file behind *fd*, read from offset 0."""
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _HASH_CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest(), offset


def sealed_memfd(name: str, data: bytes) -> OpenFile:
    """*data* in an anonymous memory file sealed against any change (memfd_create(2)).

    For kernel code that exists only in memory (a split made now): the kernel reads
    it from this descriptor, and the seals guarantee it reads what was validated.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        _write_all(fd, data)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return OpenFile(fd, f"memfd:{name}")


# ------------------------------------------------------------------ writing

def make_dirs(path: Path, *, mode: int = 0o755) -> None:
    """mkdir -p with *mode* for every directory created (Path.mkdir gives parents 0777 & ~umask)."""
    missing: list[Path] = []
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            break
        missing.append(candidate)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            pass


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644, make_parents: bool = False) -> None:
    """Replace *path* with *data* atomically (temp file in the same directory, rename)."""
    if make_parents:
        make_dirs(path.parent)
    tmp, fd = _create_temp(path)
    try:
        try:
            _write_all(fd, data)
            os.fchmod(fd, mode)  # created 0600: nothing readable before it is complete
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def is_leftover_temp(name: str) -> bool:
    """Whether *name* is a temp file atomic_write (or an older daemon) left after a crash."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def _create_temp(path: Path) -> tuple[Path, int]:
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}{TEMP_SUFFIX}")
        try:
            return tmp, os.open(tmp, _TEMP_FLAGS, 0o600)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
