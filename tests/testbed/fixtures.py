"""pytest fixtures for tests that use the test bed.

Use them by importing into a test module (`from tests.testbed.fixtures import kernel,
kmods`) or from the root conftest.py (`pytest_plugins = ["tests.testbed.fixtures"]`).
Both are session-scoped: the kernel is resolved and the modules are built once per run.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from initsplit.layout.rules import LayoutRules, rules_for_tree

from .kernel import DebianKernel, cache_dir, debian_kernel
from .kmodbuild import build_test_modules


@pytest.fixture(scope="session")
def kernel() -> DebianKernel:
    """The current Debian kernel (downloaded/extracted on first use)."""
    return debian_kernel()


@pytest.fixture(scope="session")
def kernel612() -> DebianKernel:
    """Debian 13's current kernel (Linux 6.12), fetched through the private apt configuration."""
    return debian_kernel(release="13")


@pytest.fixture(scope="session")
def rules612(kernel612: DebianKernel) -> LayoutRules:
    """The layout rules of that kernel, read from the config beside its modules."""
    rules = rules_for_tree(kernel612.modules_dir)
    assert rules.config, "the Debian 6.12 kernel's config must be found next to its modules"
    assert rules.strict_module_rwx and rules.kallsyms_all, rules
    return rules


@pytest.fixture(scope="session")
def kmods(kernel: DebianKernel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """All modules in tests/kmods built for `kernel`: {"isplit_roinit": Path(...ko), ...}."""
    return build_test_modules(tmp_path_factory.mktemp("kmods"), kernel=kernel)


@pytest.fixture(scope="module")
def vmshare() -> Iterator[Path]:
    """A fresh directory the guest can read through the host root (boot(host_root=True))."""
    base = cache_dir() / "vmshare"
    base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)
