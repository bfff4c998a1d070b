"""The suite's own rules (tests/conftest.py): under CI a skip is a failure, and says
why; a test that boots QEMU is marked vm, or it cannot boot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SAMPLE = '''
import pytest

@pytest.fixture
def needs_widget():
    pytest.skip("no widget in a fixture")

def test_skips():
    pytest.skip("no widget")

def test_fixture_skips(needs_widget):
    pass

def test_passes():
    pass
'''


# Stands in for a boot: run_qemu() runs any argv, here one that exits at once.
BOOTING_SAMPLE = '''
import pytest

from tests.testbed.qemu import run_qemu


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    return run_qemu(["true"], log=tmp_path_factory.mktemp("q") / "log", timeout=30)


def test_boots_unmarked(tmp_path):
    run_qemu(["true"], log=tmp_path / "log", timeout=30)


def test_fixture_boots_unmarked(guest):
    pass


@pytest.mark.vm
def test_boots_marked(tmp_path):
    assert run_qemu(["true"], log=tmp_path / "log", timeout=30).returncode == 0
'''


def run_sample(tmp_path: Path, *, ci: str | None, sample: str = SAMPLE) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(sample)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    # The repository (tests.conftest, tests.testbed) and the package the test bed uses.
    env["PYTHONPATH"] = f"{REPO}:{REPO / 'daemon'}"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_skip_fails_under_ci(tmp_path: Path) -> None:
    run = run_sample(tmp_path, ci="true")
    assert run.returncode == 1, run.stdout + run.stderr
    # A skip in a fixture is reported as an error of its setup: a failure all the same.
    assert "1 failed, 1 passed, 1 error" in run.stdout, run.stdout
    assert "skipped under CI=true, which counts as a failure: Skipped: no widget" in run.stdout
    assert "no widget in a fixture" in run.stdout


def test_skip_is_listed_locally(tmp_path: Path) -> None:
    run = run_sample(tmp_path, ci=None)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed, 2 skipped" in run.stdout, run.stdout
    assert "SKIPPED [1]" in run.stdout and "no widget" in run.stdout, run.stdout


def test_boot_needs_the_vm_marker(tmp_path: Path) -> None:
    """`-m "not vm"` is the suite without QEMU because an unmarked test cannot boot,
    itself or through a module fixture it asks for; a marked one can."""
    run = run_sample(tmp_path, ci=None, sample=BOOTING_SAMPLE)
    assert run.returncode == 1, run.stdout + run.stderr
    # (and a warning: the sample's directory does not register the vm marker)
    assert re.search(r"\b1 failed, 1 passed, (1 warning, )?1 error\b", run.stdout), run.stdout
    assert "test_boots_unmarked is not marked vm but boots QEMU" in run.stdout, run.stdout
    assert "test_fixture_boots_unmarked is not marked vm but boots QEMU" in run.stdout, run.stdout
