"""The suite's own rules (tests/conftest.py): under CI a skip is a failure, and says why."""

from __future__ import annotations

import os
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


def run_sample(tmp_path: Path, *, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(REPO)
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
