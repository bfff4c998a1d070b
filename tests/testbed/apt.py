"""Debian releases the test bed knows, and apt for each without touching the host's sources.

The host's own release (Debian 12 on the project's machines) is read through the
host's apt as it is configured. Any other release (Debian 13 "trixie") gets a
private apt configuration under cache_dir()/apt/SUITE: a sources list naming that
suite on the host's own mirror, and private list, cache and status directories,
passed with -o to apt-get and apt-cache. /etc/apt is only read.

    apt/<suite>/sources.list     deb [signed-by=debian-archive-keyring] MIRROR SUITE main
    apt/<suite>/lists/           apt-get update's package lists (private)
    apt/<suite>/cache/           apt's package cache (private; downloads go to debs/)
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from ._util import TestbedError, file_lock, run

RELEASE_ENV = "INITSPLIT_DEBIAN"
DEFAULT_RELEASE = "12"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


@dataclass(frozen=True)
class DebianRelease:
    """One Debian release the tests run on."""

    version: str
    """"12", "13": what INITSPLIT_DEBIAN and `make demo DEBIAN=` take."""
    suite: str
    """The archive's suite name ("bookworm", "trixie")."""
    kernel_series: str
    """The upstream series of its kernel ("6.1", "6.12")."""
    python: str
    """Its python3 ("3.11", "3.13"), what its python3-* packages install into."""


RELEASES: dict[str, DebianRelease] = {
    "12": DebianRelease("12", "bookworm", "6.1", "3.11"),
    "13": DebianRelease("13", "trixie", "6.12", "3.13"),
}


def debian_release(version: str | None = None) -> DebianRelease:
    """The release *version* names; None: INITSPLIT_DEBIAN, else Debian 12."""
    version = version or os.environ.get(RELEASE_ENV) or DEFAULT_RELEASE
    try:
        return RELEASES[version]
    except KeyError:
        raise TestbedError(f"unknown Debian release {version!r} (known: {', '.join(RELEASES)})") from None


def release_of_kver(kver: str) -> DebianRelease:
    """The release whose kernel *kver* ("6.1.0-57-amd64", "6.12.117+deb13-amd64") is."""
    for release in RELEASES.values():
        if kver.startswith(release.kernel_series + "."):
            return release
    raise TestbedError(f"no known Debian release ships kernel {kver}")


@functools.cache
def host_suite() -> str:
    """VERSION_CODENAME of the host (/etc/os-release), "" when it does not say."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME":
            return value.strip().strip('"')
    return ""


def apt_options(release: DebianRelease) -> list[str]:
    """The -o options that point apt-get and apt-cache at *release*'s packages.

    [] for the host's own release. For another one, the private configuration is
    written (and `apt-get update` run into it) the first time it is asked for.
    """
    if release.suite == host_suite():
        return []
    from .kernel import cache_dir  # (kernel.py imports this module)

    base = cache_dir() / "apt" / release.suite
    options = [f"-oDir::Etc::sourcelist={base / 'sources.list'}", "-oDir::Etc::sourceparts=-",
               f"-oDir::State::Lists={base / 'lists'}", f"-oDir::Cache={base / 'cache'}",
               f"-oDir::State::status={base / 'status'}"]
    with file_lock(cache_dir() / "locks" / f"apt-{release.suite}.lock"):
        if not any((base / "lists").glob("*_Packages*")):
            if not KEYRING.exists():
                raise TestbedError(f"{KEYRING} is missing: install debian-archive-keyring")
            from .rootfs import debian_mirror

            for sub in ("lists/partial", "cache/archives/partial"):
                (base / sub).mkdir(parents=True, exist_ok=True)
            (base / "status").touch()
            (base / "sources.list").write_text(
                f"deb [signed-by={KEYRING}] {debian_mirror()} {release.suite} main\n")
            run(["apt-get", *options, "update"], what=f"update the private apt lists of {release.suite}",
                timeout=600)
    return options
