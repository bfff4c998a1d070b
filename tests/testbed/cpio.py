"""Minimal writer for the cpio "newc" format the kernel unpacks as an initramfs.

Written in Python instead of calling cpio(1) so that the archive can contain device
nodes and root-owned files without needing a staging tree on disk (and without root
privileges on the host), and so that the archive is byte-for-byte deterministic.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import PurePosixPath


@dataclass
class CpioArchive:
    _chunks: list[bytes] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)
    _ino: int = 1

    def _entry(self, path: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = str(PurePosixPath("/", path)).lstrip("/")
        if name in self._seen:
            raise ValueError(f"duplicate initramfs entry {name!r}")
        self._seen.add(name)
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = [
            self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
            0, 0, rdev[0], rdev[1], len(encoded), 0,
        ]
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        self._chunks.append(_pad(header + encoded))
        self._chunks.append(_pad(data))

    def _parents(self, path: str) -> None:
        # The kernel does not create missing parent directories while unpacking.
        for parent in reversed(PurePosixPath("/", path).parents):
            rel = str(parent).lstrip("/")
            if rel and rel not in self._seen:
                self._entry(rel, stat.S_IFDIR | 0o755)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        self._parents(path)
        if str(PurePosixPath("/", path)).lstrip("/") not in self._seen:
            self._entry(path, stat.S_IFDIR | mode)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._parents(path)
        self._entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        self._parents(path)
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parents(path)
        self._entry(path, stat.S_IFCHR | mode, rdev=(major, minor))

    def __contains__(self, path: str) -> bool:
        return str(PurePosixPath("/", path)).lstrip("/") in self._seen

    def getvalue(self) -> bytes:
        trailer = CpioArchive()
        trailer._entry("TRAILER!!!", 0)
        return b"".join(self._chunks + trailer._chunks)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)
