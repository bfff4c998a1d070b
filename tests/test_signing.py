"""Module signing (initsplit/signing.py): byte for byte what Debian's sign-file writes,
an already-signed input re-signed over the module alone, and `initsplit split
--sign-key/--sign-cert` signing every module it puts into the cache.

Host only: real Debian 6.1 modules from the test bed's kernel, a key made here,
and sign-file from linux-kbuild-6.1 (tools/install-deps). No QEMU.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from initsplit import cli, signing
from initsplit.cache import CacheHit, read_entry, signature_problem
from initsplit.split.policy import SplitOptions
from initsplit.tree import split_tree
from initsplit.elf.discard import signature_length
from initsplit.modsig import MODULE_SIG_STRING, SIGNATURE_TRAILER
from initsplit.modsig import signature_problem as trailer_problem
from initsplit.split import split_module
from tests.testbed.kernel import debian_kernel

SIGN_FILE = Path("/usr/lib/linux-kbuild-6.1/scripts/sign-file")
MODULES = ("kernel/drivers/net/dummy.ko", "kernel/drivers/block/loop.ko", "kernel/lib/crc7.ko")


def sign_file(key: signing.SigningKey, module: bytes, tmp: Path) -> bytes:
    """Debian's own sign-file on *module* (which must be unsigned)."""
    assert SIGN_FILE.is_file(), f"{SIGN_FILE} missing: run tools/install-deps (linux-kbuild-6.1)"
    path = tmp / "sign-file-input.ko"
    path.write_bytes(module)
    subprocess.run([str(SIGN_FILE), key.digest, str(key.key), str(key.cert), str(path)], check=True)
    return path.read_bytes()


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> signing.SigningKey:
    return signing.create_key(tmp_path_factory.mktemp("mok"))


@pytest.fixture(scope="module")
def modules_dir() -> Path:
    return debian_kernel("6.1.0-57-amd64").modules_dir


@pytest.mark.parametrize("relative", MODULES)
def test_same_bytes_as_sign_file(key: signing.SigningKey, modules_dir: Path, relative: str,
                                 tmp_path: Path) -> None:
    original = (modules_dir / relative).read_bytes()
    assert signing.is_signed(original), "Debian's modules come signed by Debian"
    body = signing.strip_signature(original)
    assert not signing.is_signed(body)
    reference = sign_file(key, body, tmp_path)
    # An unsigned input and the Debian-signed original give sign-file's bytes:
    # the old signature goes, the new one covers the module alone.
    assert signing.sign_module(body, key) == reference
    assert signing.sign_module(original, key) == reference
    # Signing again replaces our own signature the same way.
    assert signing.sign_module(reference, key) == reference
    assert reference.endswith(MODULE_SIG_STRING)
    assert len(reference) - signature_length(reference) == len(body)


def test_signature_verifies_with_the_certificate(key: signing.SigningKey, modules_dir: Path,
                                                 tmp_path: Path) -> None:
    signed = signing.sign_module((modules_dir / MODULES[0]).read_bytes(), key)
    body = signing.strip_signature(signed)
    end = len(signed) - len(MODULE_SIG_STRING)
    algo, hash_, id_type, signer_len, key_id_len, pad, sig_len = signing.MODULE_SIGNATURE.unpack_from(
        signed, end - signing.MODULE_SIGNATURE.size)
    assert (algo, hash_, id_type, signer_len, key_id_len, pad) == (0, 0, signing.PKEY_ID_PKCS7, 0, 0,
                                                                   b"\0\0\0")
    # What the daemon checks before it hands a signed split to an enforcing kernel.
    assert trailer_problem(signed[-SIGNATURE_TRAILER:], len(signed)) is None
    assert trailer_problem(body[-SIGNATURE_TRAILER:], len(body)) == \
        "not signed (no appended module signature)"
    for offset, value, problem in ((2, 1, "not a PKCS#7 message"), (0, 1, "unexpected non-zero"),
                                   (6, 1, "unexpected non-zero"), (8, 0x7f, "does not fit")):
        bad = bytearray(signed)
        bad[end - signing.MODULE_SIGNATURE.size + offset] = value
        found = trailer_problem(bytes(bad[-SIGNATURE_TRAILER:]), len(bad))
        assert found is not None and problem in found, (offset, found)
    (tmp_path / "body").write_bytes(body)
    (tmp_path / "sig").write_bytes(signed[len(body):len(body) + sig_len])
    run = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in",
                          str(tmp_path / "sig"), "-content", str(tmp_path / "body"),
                          "-certfile", str(key.cert), "-noverify", "-out", os.devnull],
                         capture_output=True, text=True)
    assert run.returncode == 0 and "Verification successful" in run.stderr, run.stderr


def test_split_ignores_the_appended_signature(modules_dir: Path) -> None:
    """The splitter reads the ELF, not the bytes after it: a Debian-signed original and
    the same module unsigned give the same C and I, neither of which carries the
    original's signature (it signs other bytes)."""
    original = (modules_dir / MODULES[0]).read_bytes()
    signed_split = split_module(original)
    unsigned_split = split_module(signing.strip_signature(original))
    assert signed_split.core == unsigned_split.core
    assert signed_split.init == unsigned_split.init
    assert not signing.is_signed(signed_split.core) and not signing.is_signed(signed_split.init)


def test_split_signs_every_module_it_writes(key: signing.SigningKey, modules_dir: Path,
                                            tmp_path: Path) -> None:
    """--two-stage always: dummy and loop get C and I; crc7 (nothing to split) and, under
    the default Discard=btf, every original is rewritten. Each file written is
    sign-file's signature over what the unsigned run writes, and the manifests
    vouch for the signed bytes."""
    tree = tmp_path / "tree"
    for relative in MODULES:
        (tree / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(modules_dir / relative, tree / relative)
    plain, signed = tmp_path / "plain", tmp_path / "signed"
    assert cli.main(["split", "--two-stage", "always", str(tree), "-o", str(plain), "-q", "-j", "1"]) == 0
    assert cli.main(["split", "--two-stage", "always", str(tree), "-o", str(signed), "-q", "-j", "1",
                     "--sign-key", str(key.key), "--sign-cert", str(key.cert)]) == 0
    written = sorted(p.relative_to(plain) for p in plain.rglob("*.ko"))
    assert sorted(p.relative_to(signed) for p in signed.rglob("*.ko")) == written
    assert {p.name for p in written} >= {"dummy.ko", "dummy__init.ko", "loop.ko", "loop__init.ko",
                                         "crc7.ko"}
    for relative in written:
        unsigned = (plain / relative).read_bytes()
        assert not signing.is_signed(unsigned), relative
        assert (signed / relative).read_bytes() == sign_file(key, unsigned, tmp_path), relative
    signer = key.described().signer
    assert signer.startswith("CN = initsplit module signing key (sha256 "), signer
    for relative in MODULES:
        hit = read_entry(signed, Path(relative), source=(tree / relative).read_bytes())
        assert isinstance(hit, CacheHit), (relative, hit)
        with hit:
            assert hit.manifest.core_size == (signed / relative).stat().st_size, hit.manifest
            # Who signed, for the daemon on an enforcing kernel; an unsigned cache says "".
            assert hit.manifest.signer == signer, hit.manifest
            assert signature_problem(hit) is None
        unsigned = read_entry(plain, Path(relative), source=(tree / relative).read_bytes())
        assert isinstance(unsigned, CacheHit), (relative, unsigned)
        with unsigned:
            assert unsigned.manifest.signer == ""
            expected = None if unsigned.core is None else "the cache entry is not signed"
            assert signature_problem(unsigned) == expected, relative


def test_split_results_report_the_sizes_written(key: signing.SigningKey, modules_dir: Path,
                                                tmp_path: Path) -> None:
    """ModuleResult.core_size/init_size are the bytes of C and I as written, the sizes the
    manifest records: with a key, signature included."""
    tree = tmp_path / "tree"
    (tree / MODULES[0]).parent.mkdir(parents=True)
    shutil.copyfile(modules_dir / MODULES[0], tree / MODULES[0])
    options = SplitOptions(two_stage="always")
    for name, sign_key in (("plain", None), ("signed", key)):
        out = tmp_path / name
        [result] = split_tree([tree], out, workers=1, options=options, sign_key=sign_key)
        assert result.outcome == "split", result
        core, init = out / result.path, out / result.init_path
        assert (result.core_size, result.init_size) == (core.stat().st_size, init.stat().st_size)
        assert signing.is_signed(core.read_bytes()) == (sign_key is not None)
        hit = read_entry(out, result.path, source=(tree / MODULES[0]).read_bytes())
        assert isinstance(hit, CacheHit)
        with hit:
            assert (hit.manifest.core_size, hit.manifest.init_size) == (result.core_size, result.init_size)
    # Without an output nothing is signed: the sizes are the split's own.
    [dry] = split_tree([tree], None, workers=1, options=options, sign_key=key)
    assert dry.core_size < result.core_size and dry.init_size < result.init_size


def _one_module_tree(modules_dir: Path, tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    shutil.copyfile(modules_dir / MODULES[0], tree / "dummy.ko")
    return tree


def _split_signed(tree: Path, out: Path, key: Path, cert: Path) -> int:
    return cli.main(["split", "--two-stage", "always", str(tree), "-o", str(out), "-q",
                     "--sign-key", str(key), "--sign-cert", str(cert)])


def _fake_openssl(directory: Path) -> Path:
    """An openssl on PATH that fails every signature and passes the rest to the real one."""
    real = shutil.which("openssl")
    assert real, "openssl missing"
    directory.mkdir()
    fake = directory / "openssl"
    fake.write_text(f'#!/bin/sh\nif [ "$1 $2" = "cms -sign" ]; then echo "fake openssl: no" >&2; exit 1; fi\n'
                    f'exec {real} "$@"\n')
    fake.chmod(0o755)
    return directory


def test_key_that_cannot_sign_stops_before_writing(key: signing.SigningKey, modules_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A key that cannot sign would fail every module: one trial signature before the
    first module finds it and the split exits 2 (EXIT_SIGNING, not 1, which the hook
    and the dracut module take as "a good cache with a few errors"), writing nothing."""
    assert cli.EXIT_SIGNING not in (cli.EXIT_OK, cli.EXIT_FAILED)
    tree = _one_module_tree(modules_dir, tmp_path)
    other = signing.create_key(tmp_path / "other")
    corrupt = tmp_path / "corrupt.pub"
    corrupt.write_bytes(key.cert.read_bytes()[:100])  # a certificate cut short: not X.509
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    bad.chmod(0o600)
    cases = {"mismatched pair": (other.key, key.cert, "private key does not match certificate"),
             "corrupt certificate": (key.key, corrupt, "Unable to load signer certificate"),
             "not a key": (bad, key.cert, "openssl cms -sign failed")}
    for name, (private, cert, message) in cases.items():
        out = tmp_path / name
        assert _split_signed(tree, out, private, cert) == cli.EXIT_SIGNING, name
        assert message in capsys.readouterr().err, name
        assert not out.exists(), name
    monkeypatch.setenv("PATH", f"{_fake_openssl(tmp_path / 'bin')}:{os.environ['PATH']}")
    out = tmp_path / "failing openssl"
    assert _split_signed(tree, out, key.key, key.cert) == cli.EXIT_SIGNING
    assert "fake openssl: no" in capsys.readouterr().err
    assert not out.exists()


def test_trial_signature_is_verified(key: signing.SigningKey, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """check_signs() verifies the trial signature against the certificate, so a signature
    openssl made but by another key is caught too (openssl is faked to sign with it)."""
    key.check_signs()
    other = signing.create_key(tmp_path / "other")
    real = signing.pkcs7_signature
    monkeypatch.setattr(signing, "pkcs7_signature", lambda data, _key: real(data, other))
    with pytest.raises(signing.SigningError, match="does not verify with"):
        key.check_signs()


def test_signing_failure_mid_run_stops_it(key: signing.SigningKey, modules_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A key that passed the trial and fails later stops the run at the first failure
    (exit 2) rather than turning every remaining module into an error; in-process
    (-j 1) and in worker processes (-j 2, forked: the patched function is theirs too)."""
    tree = tmp_path / "tree"
    # Many copies, so that the bound below holds with seconds of margin on a loaded
    # machine: 6 calls were measured with two workers, the test allows 24.
    copies = 48
    for index in range(copies):
        (tree / str(index)).mkdir(parents=True)
        shutil.copyfile(modules_dir / MODULES[0], tree / str(index) / "dummy.ko")
    calls = tmp_path / "calls"
    real = signing.sign_module

    def failing(data: bytes, signer: signing.SigningKey) -> bytes:
        with calls.open("a") as log:
            log.write("x")
        # Slow, as openssl is: the pool has time to see the first failure and
        # cancel the rest before the workers get through the queue.
        time.sleep(0.5)
        raise signing.SigningError("openssl cms -sign failed: injected")

    monkeypatch.setattr("initsplit.tree.sign_module", failing)
    for jobs in ("1", "2"):
        calls.write_text("")
        out = tmp_path / f"out-{jobs}"
        assert cli.main(["split", "--two-stage", "always", str(tree), "-o", str(out), "-q", "-j", jobs,
                         "--sign-key", str(key.key), "--sign-cert", str(key.cert)]) == cli.EXIT_SIGNING
        err = capsys.readouterr().err
        assert "signing failed, split stopped" in err and "injected" in err, err
        assert err.count("injected") == 1, err  # one message, not one per module
        # -j 1 stops at the first module; with two workers, what was running or
        # already in the call queue (ProcessPoolExecutor keeps workers + 1 calls
        # there, refilled as results come; 6 were measured) still runs, the rest
        # is cancelled: at most half the copies, 12 s of them at 0.5 s a call.
        assert len(calls.read_text()) <= (1 if jobs == "1" else copies // 2) < copies, calls.read_text()
        assert not [p for p in out.rglob("*.ko")], "a module written unsigned"
    assert real is signing.sign_module


def test_private_key_must_be_root_only(key: signing.SigningKey, tmp_path: Path) -> None:
    """SignKey= (and --sign-key) refuses a key others could read or replace: not owned
    by root, any group/other bit, a directory above it not root's or writable by others
    (unless sticky, as /tmp). `initsplit key create`'s pair (0700 directory, 0600 key)
    passes. The tests run as root, so ownership is changed for real."""
    assert os.geteuid() == 0, "needs root to chown the key to nobody"
    made = signing.create_key(tmp_path / "keys")
    assert stat.S_IMODE(made.key.parent.stat().st_mode) == 0o700
    made.check()
    for mode in (0o640, 0o604, 0o601):
        made.key.chmod(mode)
        with pytest.raises(signing.SigningError, match=f"mode {mode:04o} lets others read it"):
            made.check()
    made.key.chmod(0o600)
    os.chown(made.key, 65534, -1)
    with pytest.raises(signing.SigningError, match="owned by uid 65534, not root"):
        made.check()
    os.chown(made.key, 0, -1)
    for mode in (0o770, 0o707, 0o777):
        made.key.parent.chmod(mode)
        with pytest.raises(signing.SigningError, match="which someone but root can write"):
            made.check()
    made.key.parent.chmod(0o1777)  # sticky, as /tmp: others cannot replace root's key
    made.check()
    made.key.parent.chmod(0o700)
    os.chown(made.key.parent, 65534, -1)
    with pytest.raises(signing.SigningError, match="which someone but root can write"):
        made.check()
    os.chown(made.key.parent, 0, -1)
    # Through the configuration: the same refusal, exit 2.
    made.key.chmod(0o644)
    with pytest.raises(signing.SigningError, match="lets others read it"):
        signing.configured_key(key=made.key, cert=made.cert)
    out = tmp_path / "out"
    assert _split_signed(made.cert.parent, out, made.key, made.cert) == cli.EXIT_SIGNING
    assert not out.exists()


def test_sign_options_usage(key: signing.SigningKey, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    assert cli.main(["split", str(key.cert.parent), "-o", out, "--sign-key", str(key.key)]) == cli.EXIT_USAGE
    assert "--sign-key and --sign-cert go together" in capsys.readouterr().err
    assert cli.main(["split", str(key.cert.parent), "-o", out, "--sign-key", str(tmp_path / "none"),
                     "--sign-cert", str(key.cert)]) == cli.EXIT_USAGE
    assert "no such file" in capsys.readouterr().err


def test_key_create(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "keys"
    assert cli.main(["key", "create", str(directory)]) == cli.EXIT_OK
    stdout = capsys.readouterr().out
    key, cert = directory / "mok.key", directory / "mok.pub"
    assert f"mokutil --import {cert}" in stdout
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    subject = subprocess.run(["openssl", "x509", "-inform", "DER", "-in", str(cert), "-noout",
                              "-subject"], capture_output=True, text=True, check=True).stdout
    assert "CN = initsplit module signing key" in subject
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    # An existing pair is never replaced: it may be enrolled already.
    before = key.read_bytes()
    assert cli.main(["key", "create", str(directory)]) == cli.EXIT_FAILED
    assert "exists already" in capsys.readouterr().err
    assert key.read_bytes() == before


def test_default_key_prefers_dkms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dkms, own = tmp_path / "dkms", tmp_path / "own"
    monkeypatch.setattr(signing, "DKMS_KEY", dkms / "mok.key")
    monkeypatch.setattr(signing, "DKMS_CERT", dkms / "mok.pub")
    monkeypatch.setattr(signing, "DEFAULT_KEY_DIR", own)
    assert signing.default_key() is None
    signing.create_key(own)
    assert signing.default_key() == signing.SigningKey(own / "mok.key", own / "mok.pub")
    signing.create_key(dkms)
    assert signing.default_key() == signing.SigningKey(dkms / "mok.key", dkms / "mok.pub")


@pytest.fixture
def no_default_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """DKMS's and initsplit's default key directories moved under tmp_path (empty)."""
    dkms, own = tmp_path / "dkms", tmp_path / "own"
    monkeypatch.setattr(signing, "DKMS_KEY", dkms / "mok.key")
    monkeypatch.setattr(signing, "DKMS_CERT", dkms / "mok.pub")
    monkeypatch.setattr(signing, "DEFAULT_KEY_DIR", own)
    return dkms, own


def test_configured_key(key: signing.SigningKey, no_default_keys: tuple[Path, Path]) -> None:
    dkms, own = no_default_keys
    # auto without any key: no signing (today's unsigned cache); yes: an error.
    assert signing.configured_key() is None
    with pytest.raises(signing.SigningError, match="Sign=yes but no key"):
        signing.configured_key(sign="yes")
    # The default key once there is one; an explicit pair before it; no: never.
    signing.create_key(own)
    assert signing.configured_key() == signing.SigningKey(own / "mok.key", own / "mok.pub")
    assert signing.configured_key(sign="yes") == signing.SigningKey(own / "mok.key", own / "mok.pub")
    assert signing.configured_key(key=key.key, cert=key.cert) == key
    assert signing.configured_key(sign="no", key=key.key, cert=key.cert) is None
    # An explicit pair that is not there, or half a pair, is an error, never unsigned.
    with pytest.raises(signing.SigningError, match="no such file"):
        signing.configured_key(key=dkms / "missing.key", cert=key.cert)
    with pytest.raises(signing.SigningError, match="go together"):
        signing.configured_key(key=key.key)


def _config_root(tmp_path: Path, text: str) -> Path:
    root = tmp_path / "config-root"
    conf = root / "etc/initsplit/initsplitd.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(text)
    return root


def test_split_sign_configured(key: signing.SigningKey, modules_dir: Path, tmp_path: Path,
                               no_default_keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """--sign-configured (the kernel hook's and dracut module's option) signs with the
    [Signing] section's key, and not at all with Sign=no or, under Sign=auto, no key."""
    tree = tmp_path / "tree"
    tree.mkdir()
    shutil.copyfile(modules_dir / MODULES[0], tree / "dummy.ko")

    def split(config: str, name: str) -> tuple[int, Path, str]:
        monkeypatch.setenv("INITSPLIT_CONFIG_ROOT", str(_config_root(tmp_path / name, config)))
        out = tmp_path / name / "out"
        rc = cli.main(["split", "--two-stage", "always", str(tree), "-o", str(out), "-q", "-j", "1",
                       "--sign-configured"])
        return rc, out, capsys.readouterr().err

    rc, out, err = split(f"[Signing]\nSignKey={key.key}\nSignCert={key.cert}\n", "explicit")
    assert rc == cli.EXIT_OK and f"signing with {key.key}" in err, err
    written = sorted(out.rglob("*.ko"))
    assert {p.name for p in written} == {"dummy.ko", "dummy__init.ko"}
    assert all(signing.is_signed(p.read_bytes()) for p in written)

    rc, out, err = split(f"[Signing]\nSign=no\nSignKey={key.key}\nSignCert={key.cert}\n", "off")
    assert rc == cli.EXIT_OK and "signing" not in err, err
    written = sorted(out.rglob("*.ko"))
    assert written and not any(signing.is_signed(p.read_bytes()) for p in written)

    rc, out, err = split("", "auto-no-key")
    assert rc == cli.EXIT_OK and not any(signing.is_signed(p.read_bytes()) for p in out.rglob("*.ko"))

    rc, out, err = split("[Signing]\nSign=yes\n", "yes-no-key")
    assert rc == cli.EXIT_USAGE and "[Signing]: Sign=yes but no key" in err, err
    assert not out.exists()
    assert cli.main(["split", str(tree), "-o", str(tmp_path / "x"), "--sign", "--sign-configured"]) \
        == cli.EXIT_USAGE
    assert "exclude each other" in capsys.readouterr().err


def test_a_symlinked_key_is_pinned_before_the_check(modules_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """--sign-key naming a symlink in a directory others can write: the check judges
    the file the link points to, and every signature of the run is made with that
    file (SigningKey.pinned()), even when the link is re-pointed after the check,
    as whoever can write that directory could do. Unpinned, openssl would open the
    re-pointed link and sign with the other key (a key/certificate mismatch here)."""
    made = signing.create_key(tmp_path / "keys")
    other = signing.create_key(tmp_path / "other")
    links = tmp_path / "links"
    links.mkdir()
    links.chmod(0o777)  # root's, not sticky: others could re-point the links
    (links / "mok.key").symlink_to(made.key)
    (links / "mok.pub").symlink_to(made.cert)
    tree = tmp_path / "tree"
    (tree / "net").mkdir(parents=True)
    shutil.copyfile(modules_dir / MODULES[0], tree / "net" / "dummy.ko")
    real = signing.sign_module

    def repointing(data: bytes, signer: signing.SigningKey) -> bytes:
        link = links / "mok.key"
        if link.resolve() != other.key:
            link.unlink()
            link.symlink_to(other.key)
        return real(data, signer)

    monkeypatch.setattr("initsplit.tree.sign_module", repointing)
    out = tmp_path / "out"
    assert cli.main(["split", "--two-stage", "always", str(tree), "-o", str(out), "-q", "-j", "1",
                     "--sign-key", str(links / "mok.key"), "--sign-cert", str(links / "mok.pub")]) == 0
    assert (links / "mok.key").resolve() == other.key  # the link was re-pointed mid-run
    written = sorted(out.rglob("*.ko"))
    assert {p.name for p in written} == {"dummy.ko", "dummy__init.ko"}, written
    for path in written:
        signed = path.read_bytes()
        unsigned = signed[:len(signed) - signature_length(signed)]
        assert signed == sign_file(made, unsigned, tmp_path), path
