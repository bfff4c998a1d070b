"""Suite-wide rules.

A skipped test is a test that did not run. Under CI (CI=true, as .ci/run is run)
every skip fails the run, with the reason pytest was given: the test bed installs
everything the tests need, so a skip there is a missing install step or a defect,
never a pass. Locally a skip stays a skip, and `make test` lists each one (-rs).

A test that boots a guest in QEMU, itself or through a fixture it asks for, is
marked vm (pyproject.toml's markers); one that is not cannot start QEMU
(tests/testbed/qemu.py run_qemu() raises), so `-m "not vm"` (make check) selects
exactly the tests that boot nothing, whatever their file names.
"""

from __future__ import annotations

import os

import pytest


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if _ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before the item's fixtures are set up: a module-scoped fixture that boots
    # does so for the first test asking for it, which must be marked vm too.
    from tests.testbed import qemu

    qemu.boot_refused = None if item.get_closest_marker("vm") else (
        f"{item.nodeid} is not marked vm but boots QEMU (itself or through a fixture): "
        "mark it @pytest.mark.vm (tests/conftest.py)")
