"""Minimal writer (and reader) for the cpio "newc" format the kernel unpacks as an initramfs.

Written in Python instead of calling cpio(1) so that the archive can contain device
nodes and root-owned files without needing a staging tree on disk (and without root
privileges on the host), and so that the archive is byte-for-byte deterministic.
"""

from __future__ import annotations

import zlib
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath


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


def read_initramfs(path: Path) -> dict[str, bytes | str]:
    """Path -> contents (bytes for files, the target for symlinks) of a dracut image:
    an optional uncompressed early cpio, then the gzip-compressed main one ("newc"),
    then any uncompressed archives appended to it (appended_initramfs()); a later
    entry replaces an earlier one, as the kernel's unpacker does."""
    data = path.read_bytes()
    out: dict[str, bytes | str] = {}

    def parse(buf: bytes, pos: int = 0) -> int:
        while buf[pos:pos + 6] == b"070701":
            fields = [int(buf[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
            mode, size, namesize = fields[1], fields[6], fields[11]
            name = buf[pos + 110:pos + 110 + namesize - 1].decode()
            pos = (pos + 110 + namesize + 3) & ~3
            body = buf[pos:pos + size]
            pos = (pos + size + 3) & ~3
            if name == "TRAILER!!!":
                while pos < len(buf) and buf[pos] == 0:
                    pos += 1
                return pos
            if stat.S_ISREG(mode):
                out[name] = body
            elif stat.S_ISLNK(mode):
                out[name] = body.decode()
        return pos

    rest = data[parse(data):] if data.startswith(b"070701") else data
    if rest:
        # gzip.decompress() would read the appended archives as further members.
        stream = _gzip_member(rest)
        parse(stream.data)
        tail = rest[stream.used:].lstrip(b"\0")
        while tail.startswith(b"070701"):
            tail = tail[parse(tail):].lstrip(b"\0")
    return out


@dataclass(frozen=True)
class _Member:
    data: bytes
    used: int  # bytes of the input the member took


def _gzip_member(data: bytes) -> _Member:
    inflater = zlib.decompressobj(wbits=31)
    out = inflater.decompress(data)
    if not inflater.eof:
        raise ValueError("truncated gzip stream in the initramfs")
    return _Member(out, len(data) - len(inflater.unused_data))


def appended_initramfs(initrd: bytes, archive: CpioArchive) -> bytes:
    """*initrd* with *archive* appended, uncompressed: the kernel unpacks one archive
    after another (init/initramfs.c, unpack_to_rootfs()) and replaces what an earlier
    one wrote (do_name(): maybe_unlink()). An uncompressed archive must start
    4-aligned; the zeros before it are skipped."""
    return initrd + b"\0" * (-len(initrd) % 4) + archive.getvalue()
