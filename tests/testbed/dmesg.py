"""Find problems in a guest's dmesg, and decode /proc/sys/kernel/tainted.

A split module that "works" but leaves a WARNING, an oops in a worker, or a version
mismatch behind is broken, so tests assert that dmesg_problems() is empty rather than
looking only for the messages they expect.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Bit n of /proc/sys/kernel/tainted -> letter, as in kernel/panic.c (taint_flags) of 6.1.
TAINT_LETTERS = "PFSRMBUDAWCIOELKXTN"

PROBLEM_RE = re.compile(
    r"Oops|BUG:|kernel BUG|WARNING:|Call Trace|general protection|Kernel panic"
    r"|Unknown symbol|disagrees about version|invalid opcode|double fault"
    r"|stack-protector|UBSAN:|list_(add|del) corruption|unable to handle"
)
CUT_HERE = "------------[ cut here ]------------"
END_TRACE = "---[ end trace"


def decode_taint(value: int) -> str:
    """Letters of the set taint bits in bit order, e.g. 12288 -> "OE"; 0 -> ""."""
    letters = []
    for bit in range(value.bit_length()):
        if value >> bit & 1:
            letters.append(TAINT_LETTERS[bit] if bit < len(TAINT_LETTERS) else f"<bit{bit}>")
    return "".join(letters)


def _matches(line: str, allow: Iterable[str | re.Pattern[str]]) -> bool:
    for pattern in allow:
        if isinstance(pattern, re.Pattern):
            if pattern.search(line):
                return True
        elif pattern in line:
            return True
    return False


def dmesg_problems(
    text: str,
    *,
    allow: Iterable[str | re.Pattern[str]] = (),
    tainted: int | None = None,
    allowed_taint: str = "",
) -> list[str]:
    """Lines of `text` (dmesg or console) that show a kernel problem.

    `allow` holds substrings or regexes of expected problems. A WARN splat is one
    block from "[ cut here ]" to "---[ end trace"; if any line of the block matches
    `allow` (e.g. the WARN's own message), the whole block (WARNING line, Call Trace,
    ...) is accepted. Other lines are accepted one by one.

    If `tainted` is given, taint letters outside `allowed_taint` are reported too, as
    a line "tainted: ..." (unsigned test modules give "E", out-of-tree ones "O", an
    accepted WARN still sets "W").
    """
    allow = list(allow)
    problems: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if CUT_HERE in line:
            end = next((j for j in range(i + 1, len(lines)) if END_TRACE in lines[j]), len(lines) - 1)
            block = lines[i : end + 1]
            if not any(_matches(b, allow) for b in block):
                problems.extend(b for b in block if PROBLEM_RE.search(b))
                if not any(PROBLEM_RE.search(b) for b in block):
                    problems.append(line)  # a splat without a recognised header is still one
            i = end + 1
            continue
        if PROBLEM_RE.search(line) and not _matches(line, allow):
            problems.append(line)
        i += 1
    if tainted is not None:
        extra = "".join(c for c in decode_taint(tainted) if c not in allowed_taint)
        if extra:
            problems.append(
                f"tainted: {tainted} = {decode_taint(tainted)!r}, unexpected {extra!r} "
                f"(allowed {allowed_taint!r})"
            )
    return problems
