"""A scratch directory the daemon trusts: every directory above it root-owned and
not group- or world-writable. pytest's tmp_path lives under /tmp (mode 1777), which
the daemon rightly refuses for kernel code, so tests of the trusted paths need this.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from initsplit.fsio import directory_problem

# /run is root-owned 0755 on Debian (systemd mounts it mode=755) and a tmpfs.
BASE = Path("/run")


@pytest.fixture
def trusted_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="initsplit-test-", dir=BASE))
    path.chmod(0o755)
    assert directory_problem(path) is None, directory_problem(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
