"""The dracut module's cache step (dracut/90initsplit/module-setup.sh,
_initsplit_split_cache) run in bash without dracut: dracut's d* log functions
stubbed, $initdir a temporary image tree, $initsplit_bin this tree's initsplit.

It signs the image's pre-split cache as [Signing] in the host's configuration says
(INITSPLIT_CONFIG_ROOT stands in for /), and the key stays out of the image. That
dracut copies only *.conf files of /etc/initsplit into a real image is checked by
tests/test_deb_package.py. Host only, no root needed: a real Debian 6.1 module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from initsplit import signing
from tests.testbed.kernel import debian_kernel

REPO = Path(__file__).resolve().parent.parent
MODULE_SETUP = REPO / "dracut" / "90initsplit" / "module-setup.sh"
KVER = "6.1.0-57-amd64"
DUMMY = "kernel/drivers/net/dummy.ko"

# dracut's logging functions, recorded; dfatal's caller exits as dracut's would.
_DRIVER = r"""
dwarn() { printf 'W %s\n' "$*"; }
dinfo() { printf 'I %s\n' "$*"; }
dfatal() { printf 'F %s\n' "$*"; }
source "$MODULE_SETUP"
initsplit_bin="$INITSPLIT_BIN"
_initsplit_split_cache
"""


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> signing.SigningKey:
    return signing.create_key(tmp_path_factory.mktemp("host-key"))


def _run(tmp_path: Path, config: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    initdir = tmp_path / "initdir"
    module = initdir / "lib/modules" / KVER / DUMMY
    module.parent.mkdir(parents=True)
    shutil.copyfile(debian_kernel(KVER).modules_dir / DUMMY, module)
    root = tmp_path / "host"
    (root / "etc/initsplit").mkdir(parents=True)
    (root / "etc/initsplit/initsplitd.conf").write_text(config)
    wrapper = tmp_path / "initsplit"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO / 'daemon'} exec /usr/bin/python3 -m initsplit \"$@\"\n")
    wrapper.chmod(0o755)
    new = tmp_path / "initsplit-new"
    new.write_text("")
    env = {**os.environ, "MODULE_SETUP": str(MODULE_SETUP), "INITSPLIT_BIN": str(wrapper),
           "INITSPLIT_CONFIG_ROOT": str(root), "initdir": str(initdir), "kernel": KVER,
           "initsplit_new": str(new)}
    proc = subprocess.run(["bash", "-c", _DRIVER], capture_output=True, text=True, env=env, timeout=300)
    return proc, initdir


def _cache_files(initdir: Path) -> list[Path]:
    return sorted((initdir / "usr/lib/initsplit/cache" / KVER).rglob("*.ko"))


def test_cache_signed_with_the_configured_key(key: signing.SigningKey, tmp_path: Path) -> None:
    proc, initdir = _run(tmp_path, f"[Daemon]\nTwoStage=always\n[Signing]\nSignKey={key.key}\n"
                                   f"SignCert={key.cert}\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"signing with {key.key}" in proc.stdout, proc.stdout
    files = _cache_files(initdir)
    assert {p.name for p in files} == {"dummy.ko", "dummy__init.ko"}, proc.stdout
    assert all(signing.is_signed(p.read_bytes()) for p in files)
    # Nothing of the key in the image: no file named like it, no file holding it.
    secret = key.key.read_bytes()
    for path in initdir.rglob("*"):
        assert path.name != key.key.name, path
        if path.is_file():
            assert secret not in path.read_bytes(), path


def test_cache_unsigned_with_sign_no(key: signing.SigningKey, tmp_path: Path) -> None:
    proc, initdir = _run(tmp_path, f"[Daemon]\nTwoStage=always\n[Signing]\nSign=no\nSignKey={key.key}\n"
                                   f"SignCert={key.cert}\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = _cache_files(initdir)
    assert files and not any(signing.is_signed(p.read_bytes()) for p in files)


def test_signing_problem_is_fatal(tmp_path: Path) -> None:
    """A key configured but missing: the image must not silently get an unsigned cache."""
    proc, initdir = _run(tmp_path, "[Signing]\nSignKey=/nonexistent/mok.key\nSignCert=/nonexistent/mok.pub\n")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "F initsplit: splitting the modules" in proc.stdout, proc.stdout
    assert "/nonexistent/mok.key: no such file" in proc.stdout, proc.stdout
    assert not _cache_files(initdir)
