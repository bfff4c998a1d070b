"""The .modinfo section: NUL-separated key=value strings (include/linux/moduleparam.h, __MODULE_INFO)."""

from __future__ import annotations


def parse_modinfo(blob: bytes) -> list[tuple[str, str]]:
    """Return the entries in file order; keys may repeat (alias=, import_ns=, ...)."""
    entries: list[tuple[str, str]] = []
    for raw in blob.split(b"\0"):
        if not raw:
            continue
        text = raw.decode("utf-8", "replace")
        key, sep, value = text.partition("=")
        if sep:
            entries.append((key, value))
    return entries


def first(entries: list[tuple[str, str]], key: str) -> str | None:
    for k, v in entries:
        if k == key:
            return v
    return None


def render_modinfo(entries: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{key}={value}".encode() + b"\0" for key, value in entries)
