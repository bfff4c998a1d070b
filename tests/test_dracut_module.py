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
    assert f"W initsplit: signing with {key.key}" in proc.stdout, proc.stdout
    _no_doubled_prefix(proc)
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


def _no_doubled_prefix(proc: subprocess.CompletedProcess[str]) -> None:
    # The split's lines carry "initsplit: " themselves; dracut's must not add another.
    assert "initsplit: initsplit:" not in proc.stdout, proc.stdout


def test_signing_problem_builds_the_image_without_a_cache(key: signing.SigningKey, tmp_path: Path) -> None:
    """A configured key that cannot sign must not cost the machine its initramfs: dracut
    warns (no dfatal) and the image gets no pre-split cache, rather than an unsigned
    one an enforcing kernel would refuse. Each case is the split's exit 2."""
    assert signing.default_key() is None, \
        "this host has a default signing key (DKMS's or /var/lib/initsplit): Sign=yes would find it"
    other = signing.create_key(tmp_path / "other")
    corrupt = tmp_path / "corrupt.pub"
    corrupt.write_bytes(b"not a certificate\n")
    cases = {
        "missing key": ("[Signing]\nSignKey=/nonexistent/mok.key\nSignCert=/nonexistent/mok.pub\n",
                        "/nonexistent/mok.key: no such file"),
        "Sign=yes, no key": ("[Signing]\nSign=yes\n", "Sign=yes but no key"),
        "mismatched pair": (f"[Signing]\nSignKey={other.key}\nSignCert={key.cert}\n",
                            "private key does not match certificate"),
        "corrupt certificate": (f"[Signing]\nSignKey={key.key}\nSignCert={corrupt}\n",
                                "Unable to load signer certificate"),
    }
    for name, (config, message) in cases.items():
        proc, initdir = _run(tmp_path / name.replace(" ", "-").replace(",", "").replace("=", ""), config)
        assert proc.returncode == 0, (name, proc.stdout + proc.stderr)
        assert "F " not in proc.stdout, (name, proc.stdout)
        assert any(line.startswith("W initsplit: ") and message in line
                   for line in proc.stdout.splitlines()), (name, proc.stdout)
        assert "(exit 2): the image gets no pre-split cache" in proc.stdout, (name, proc.stdout)
        assert not (initdir / "usr/lib/initsplit/cache" / KVER).exists(), name
        # The report still runs: the image is built.
        assert "I initsplit: " in proc.stdout and " MB added" in proc.stdout, (name, proc.stdout)
        _no_doubled_prefix(proc)
