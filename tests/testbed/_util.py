"""Small shared helpers: running host commands with useful errors, and file locks.

Every failure in the test bed must say *what* failed and show the tool's own output,
because the tests are meant to fail loudly (never skip) when the environment is broken.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path


class TestbedError(RuntimeError):
    """The test bed could not provide what a test asked for (kernel, headers, build, VM)."""


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    what: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> str:
    """Run a command, return its stdout; raise TestbedError with all output on failure.

    `what` is a human description ("download linux-image-6.1.0-56-amd64") so the
    exception message reads as a sentence rather than a bare exit code.
    """
    cmd = [os.fspath(a) for a in argv]
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
        )
    except FileNotFoundError as e:
        raise TestbedError(f"cannot {what}: {cmd[0]} is not installed ({e})") from e
    except subprocess.TimeoutExpired as e:
        raise TestbedError(f"cannot {what}: {' '.join(cmd)} timed out after {timeout}s") from e
    if proc.returncode != 0:
        raise TestbedError(
            f"cannot {what}: `{' '.join(cmd)}` exited {proc.returncode}\n"
            f"--- stdout ---\n{tail(proc.stdout)}\n--- stderr ---\n{tail(proc.stderr)}"
        )
    return proc.stdout


def tail(text: str, lines: int = 60) -> str:
    parts = text.rstrip("\n").splitlines()
    if len(parts) > lines:
        parts = [f"[... {len(parts) - lines} lines cut ...]"] + parts[-lines:]
    return "\n".join(parts)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock, so parallel pytest processes (xdist, two terminals)
    do not download or extract into the same cache directory at the same time.

    flock is released by the kernel if the process dies, so a crashed run never
    leaves a stale lock behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextmanager
def try_file_lock(path: Path) -> Iterator[bool]:
    """file_lock() if nobody holds it now (True), else False at once: for clean-ups
    that must not wait for, nor disturb, a process using what the lock guards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
