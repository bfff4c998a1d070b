"""sd_notify(3) for initsplitd (a Type=notify service): readiness, status, watchdog.

python3-systemd's ``systemd.daemon.notify`` (libsystemd's sd_notify) is used when it
is importable; otherwise the same datagram is sent by hand to $NOTIFY_SOCKET, a path
or, with a leading "@", an abstract socket. Without NOTIFY_SOCKET every call is a
no-op, so the daemon runs the same from a shell. Notifications are best effort: a
failure to send never stops module loading, the methods just return False.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

try:
    from systemd import daemon as _systemd_daemon
except ImportError:  # python3-systemd not installed: send the datagram ourselves
    _systemd_daemon = None


def _one_line(text: str) -> str:
    # The protocol is newline-separated assignments; a newline would start a new one.
    return " ".join(text.splitlines())


class Notifier:
    """Talks to the service manager through $NOTIFY_SOCKET.

    ``environ`` (default ``os.environ``) is read once, here. libsystemd reads the
    process environment itself, so it is only used when ``environ`` is the process
    environment and ``use_libsystemd`` is true.
    """

    def __init__(self, *, environ: Mapping[str, str] | None = None, use_libsystemd: bool = True) -> None:
        env = os.environ if environ is None else environ
        self._socket = env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = self._read_watchdog(env)
        self._libsystemd = use_libsystemd and _systemd_daemon is not None and env is os.environ

    @staticmethod
    def _read_watchdog(env: Mapping[str, str]) -> int | None:
        # As sd_watchdog_enabled(): WATCHDOG_USEC must be a positive integer, and when
        # WATCHDOG_PID is set the watchdog is meant for that process only (it is
        # inherited by children, which must not ping on the daemon's behalf).
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        if usec <= 0:
            return None
        pid = env.get("WATCHDOG_PID")
        if pid is not None:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        return usec

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog() calls: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        return self.send("\n".join(lines))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        if self._watchdog_usec is None:
            return False
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        lines = ["STOPPING=1"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        return self.send("\n".join(lines))

    def send(self, state: str) -> bool:
        """Send raw ``state`` (newline-separated assignments); True if it was sent."""
        if self._socket is None:
            return False
        if self._libsystemd:
            assert _systemd_daemon is not None
            try:
                return bool(_systemd_daemon.notify(state))
            except OSError:
                return False
        return self._send_datagram(state)

    def _send_datagram(self, state: str) -> bool:
        address = self._socket
        assert address is not None
        if address.startswith("@"):
            # Abstract namespace: the kernel's name starts with a NUL byte instead.
            target: str | bytes = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            target = address
        else:
            return False  # not an address this protocol version knows (as sd_notify: -EINVAL)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(state.encode(), target)
        except OSError:
            return False
        return True
