"""loader/reprobe.py against a fake sysfs: after a daemon died, every device without a
driver is handed to its bus's drivers_probe, and nothing else. The kernel side (a
probe that failed in the dying daemon and is repaired) is a case of
tests/test_daemon_vm.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from initsplit.loader import reprobe


def _bus(root: Path, bus: str, devices: dict[str, bool], *, probe: bool = True) -> None:
    base = root / "bus" / bus
    (base / "devices").mkdir(parents=True)
    (base / "drivers").mkdir()
    if probe:
        (base / "drivers_probe").write_text("")
    for name, bound in devices.items():
        device = root / "devices" / bus / name
        device.mkdir(parents=True)
        (base / "devices" / name).symlink_to(device)
        if bound:
            (device / "driver").symlink_to(base / "drivers")


def test_only_unbound_devices_are_probed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _bus(tmp_path, "pci", {"0000:00:1f.2": False, "0000:00:02.0": True, "0000:00:03.0": False})
    _bus(tmp_path, "platform", {"serial8250": True})
    _bus(tmp_path, "nope", {"x": False}, probe=False)  # a bus without drivers_probe
    written: list[tuple[str, str]] = []

    def write(path: Path, text: str) -> None:
        written.append((f"{path.parent.name}/{path.name}", text))
        if text == "0000:00:1f.2":  # the driver core binds it
            (tmp_path / "devices/pci" / text / "driver").symlink_to(tmp_path / "bus/pci/drivers")

    monkeypatch.setattr(reprobe, "_write", write)
    assert reprobe.reprobe_unbound(sys_root=tmp_path) == ["pci/0000:00:1f.2"]
    assert written == [
        ("pci/drivers_probe", "0000:00:03.0"), ("pci/drivers_probe", "0000:00:1f.2")]


def test_a_refused_write_is_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _bus(tmp_path, "pci", {"0000:00:1f.2": False})

    def refuse(path: Path, text: str) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(reprobe, "_write", refuse)
    assert reprobe.reprobe_unbound(sys_root=tmp_path) == []
    assert reprobe.reprobe_unbound(sys_root=tmp_path / "missing") == []
