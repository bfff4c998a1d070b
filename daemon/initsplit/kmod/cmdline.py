"""The module settings on a kernel command line, read exactly as libkmod reads /proc/cmdline.

libkmod (kmod 30, ``kmod_config_parse_kcmdline`` in libkmod-config.c) turns every
``module.param[=value]`` word into an ``options module param=value`` entry and
``modprobe.blacklist=a,b`` into ``blacklist a`` / ``blacklist b``, appended after
everything read from the modprobe.d files.  It always reads the *running* kernel's
/proc/cmdline; the Resolver uses this port when it is told to assume another command
line, so it has to agree with libkmod character for character — including its quirks:

* the buffer is 4096 bytes, so anything past byte 4095 is silently ignored;
* a word is only taken if it reaches its end in the PARAM or VALUE state: ``a.b.c=1``
  (a second dot in the parameter) and ``a=b.c`` are dropped; ``mod.param`` with no
  ``=`` is kept as the option ``param``;
* module names are normalised with dashes to underscores (outside ``[...]``) and a name
  with an unbalanced bracket is dropped — but the names *listed* in
  ``modprobe.blacklist=`` are taken verbatim, dashes included (so
  ``modprobe.blacklist=snd-foo`` never matches module ``snd_foo``);
* ``"mod.param=value with spaces"`` (whole word quoted, as grub writes it) is rewritten
  to ``param="value with spaces"``; quotes elsewhere in the name or parameter drop the
  word; ``--`` does not stop parsing (the kernel's init arguments are parsed too).

The resolver checks this port against libkmod on every start (see resolver.py).
"""

from __future__ import annotations

from dataclasses import dataclass

KCMD_LINE_SIZE = 4096  # libkmod-internal.h; read_str_safe() keeps at most size - 1 bytes

_SPACES = frozenset(b" \n\t\v\f\r")
_IGNORE, _MODNAME, _PARAM, _VALUE, _COMPLETE = range(5)


@dataclass(frozen=True)
class KernelCmdline:
    """What a kernel command line adds to the modprobe configuration, in libkmod's order."""

    options: tuple[tuple[str, str], ...]  # (normalised module name, "param=value")
    blacklist: tuple[str, ...]


def read_proc_cmdline(path: str = "/proc/cmdline") -> bytes:
    """The raw command line; empty when unreadable (libkmod then adds nothing either)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def parse_kernel_cmdline(text: str | bytes) -> KernelCmdline:
    """Port of kmod 30's kmod_config_parse_kcmdline() + kcmdline_parse_result()."""
    raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    # libkmod works in place on a NUL-terminated buffer, NULing separators as it goes;
    # we do the same on a bytearray so that every offset below means what it does in C.
    buf = bytearray(raw[: KCMD_LINE_SIZE - 1]) + b"\0"
    options: list[tuple[str, str]] = []
    blacklist: list[str] = []

    state = _MODNAME
    modname = 0
    param: int | None = None
    value: int | None = None  # like the C variable, not reset between words
    quote_start: int | None = None
    is_quoted = False
    p = 0
    more = True
    while more:
        c = buf[p]
        if c == ord('"'):
            is_quoted = not is_quoted
            # Only a quote opening the whole word is allowed while reading the name.
            if is_quoted and state == _MODNAME and p == modname:
                quote_start = p
                modname = p + 1
            elif state != _VALUE:
                state = _IGNORE
        elif c == 0 or c in _SPACES:
            if c == 0:
                more = False
            if is_quoted and state == _VALUE:
                pass  # a space inside a quoted value
            elif is_quoted:
                state = _IGNORE  # spaces are only allowed in the value part
            elif state in (_VALUE, _PARAM):
                buf[p] = 0
                state = _COMPLETE
            else:
                modname = p + 1
                state = _MODNAME
                quote_start = None
        elif c == ord("."):
            if state == _MODNAME:
                buf[p] = 0
                param = p + 1
                state = _PARAM
            elif state == _PARAM:
                state = _IGNORE
        elif c == ord("="):
            if state == _PARAM:
                value = p + 1  # '=' stays: the option text is "param=value"
                state = _VALUE
            elif state == _MODNAME:
                state = _IGNORE

        if state == _COMPLETE:
            assert param is not None
            if quote_start is not None and quote_start < modname:
                # "mod.param=a b" -> mod\0param="a b": shift name and param left over
                # the opening quote and put the quote after '='.
                assert value is not None
                buf[quote_start:quote_start + (value - modname)] = buf[modname:value]
                value -= 1
                modname -= 1
                param -= 1
                buf[value] = ord('"')
            _parse_result(_cstr(buf, modname), _cstr(buf, param),
                          _cstr(buf, value) if value is not None else None,
                          options, blacklist)
            modname = p + 1
            state = _MODNAME
            quote_start = None
        p += 1

    return KernelCmdline(tuple(options), tuple(blacklist))


def _parse_result(modname: bytes, param: bytes, value: bytes | None,
                  options: list[tuple[str, str]], blacklist: list[str]) -> None:
    if modname == b"modprobe" and param.startswith(b"blacklist="):
        # strsep(&value, ","): every field, empty ones included, verbatim.
        for name in (value or b"").split(b","):
            blacklist.append(_decode(name))
        return
    normalised = underscores(modname)
    if normalised is None:
        return  # libkmod: "Ignoring bad option on kernel command line"
    # kmod_config_add_options() turns tabs in the option text into spaces.
    options.append((_decode(normalised), _decode(param).replace("\t", " ")))


def underscores(name: bytes) -> bytes | None:
    """shared/util.c underscores(): '-' -> '_' outside [...]; None where C returns -EINVAL."""
    out = bytearray(name)
    i = 0
    while i < len(out):
        c = out[i]
        if c == ord("-"):
            out[i] = ord("_")
        elif c == ord("]"):
            return None
        elif c == ord("["):
            close = out.find(b"]", i)
            if close < 0:
                return None
            i = close
        i += 1
    return bytes(out)


def _cstr(buf: bytearray, start: int) -> bytes:
    return bytes(buf[start:buf.index(0, start)])


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")
