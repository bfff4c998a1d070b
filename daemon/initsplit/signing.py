"""Sign kernel modules with a key and certificate, in the kernel's own format.

The format is the one scripts/sign-file.c writes and kernel/module/signing.c
(module_sig_check(), mod_verify_sig()) reads, declared in
include/linux/module_signature.h:

    module bytes
    PKCS#7 (CMS) SignedData, DER, detached (no content), no certificates, no
        signed attributes, the signer named by issuer and serial number
    struct module_signature {
        u8 algo, hash;    0, 0: both are named inside the PKCS#7 message
        u8 id_type;       PKEY_ID_PKCS7 (2)
        u8 signer_len;    0
        u8 key_id_len;    0
        u8 __pad[3];
        __be32 sig_len;   length of the PKCS#7 message
    }
    "~Module signature appended~\\n"

sign-file builds the message with CMS_sign() and CMS_add1_signer() under
CMS_NOCERTS | CMS_BINARY | CMS_DETACHED | CMS_NOATTR (its default, without -k);
`openssl cms -sign -binary -noattr -nocerts -outform DER` is the same call, and
RSA PKCS#1 v1.5 signatures are deterministic, so the bytes are sign-file's
(tests/test_signing.py compares them with Debian's sign-file).

A module already signed (every Debian module is) has its signature stripped
first: the new one covers the module alone, as the kernel checks it. Signing
runs where the cache is built (`initsplit split`), never in the daemon: the
private key never enters an initramfs.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .elf.discard import signature_length
from .modsig import MODULE_SIG_STRING, MODULE_SIGNATURE, PKEY_ID_PKCS7

# DKMS's machine owner key (dkms's mok_signing_key / mok_certificate defaults).
DKMS_KEY = Path("/var/lib/dkms/mok.key")
DKMS_CERT = Path("/var/lib/dkms/mok.pub")
# initsplit's own pair when DKMS has none (initsplit key create).
DEFAULT_KEY_DIR = Path("/var/lib/initsplit")
KEY_NAME = "mok.key"
CERT_NAME = "mok.pub"
KEY_SUBJECT = "/CN=initsplit module signing key"

OPENSSL = "openssl"


class SigningError(Exception):
    """The module could not be signed (no key, openssl failed); nothing is written.

    Never one module's problem: the same key signs every module, so a split run
    stops at the first one (tree.split_one re-raises it) rather than producing a
    cache of errors."""


# A few bytes signed and verified once before a run (SigningKey.check_signs()).
_TRIAL = b"initsplit: does this key sign for this certificate?\n"


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key (PEM) and its X.509 certificate (DER or PEM), as sign-file takes them.

    Only paths: picklable for the splitter's worker processes, and the key is read
    by openssl alone.
    """

    key: Path
    cert: Path
    digest: str = "sha256"
    # Who signs, as the cache manifests record it (cache.Manifest.signer):
    # described() fills it in once, before the worker processes start.
    signer: str = ""

    def check(self) -> None:
        """Both files there and readable, the key root-only (check_private())."""
        for path in (self.key, self.cert):
            if not path.is_file():
                raise SigningError(f"{path}: no such file")
            if not os.access(path, os.R_OK):
                raise SigningError(f"{path}: not readable (signing needs root)")
        check_private(self.key)

    def pinned(self) -> SigningKey:
        """This key with both paths resolved now, symlinks followed once.

        check_private() judges the file and the directories the key really lies
        in; openssl, run once per module afterwards, must open that same file and
        not the name given, or whoever could re-point a symlink on the way (in a
        directory others can write) would choose the key after the check.
        """
        try:
            return dataclasses.replace(self, key=self.key.resolve(strict=True),
                                       cert=self.cert.resolve(strict=True))
        except FileNotFoundError as exc:
            raise SigningError(f"{exc.filename}: no such file") from None  # as check() says it
        except OSError as exc:
            raise SigningError(f"{exc.filename}: {exc.strerror}") from None

    def check_signs(self) -> None:
        """check(), then a trial signature of a few bytes verified against the certificate.

        Catches before any module is written what would otherwise fail every one
        of them: a key that is not the certificate's, a certificate that is not
        X.509, an openssl that does not work.
        """
        self.check()
        message = pkcs7_signature(_TRIAL, self)
        verify_signature(_TRIAL, message, self.cert)

    def described(self) -> SigningKey:
        """This key with *signer* set: "SUBJECT (sha256 FINGERPRINT)" of its certificate."""
        if self.signer:
            return self
        return dataclasses.replace(self, signer=certificate_identity(self.cert))


def certificate_identity(cert: Path) -> str:
    """ "SUBJECT (sha256 AB:CD:...)" of a DER or PEM X.509 certificate, as openssl prints it."""
    for form in ("DER", "PEM"):
        run = subprocess.run([OPENSSL, "x509", "-inform", form, "-in", str(cert), "-noout",
                              "-subject", "-fingerprint", "-sha256", "-nameopt", "oneline"],
                             capture_output=True, text=True, check=False)
        if run.returncode == 0:
            break
    else:
        lines = run.stderr.strip().splitlines()
        raise SigningError(f"{cert}: not an X.509 certificate ({lines[-1] if lines else run.returncode})")
    subject = fingerprint = ""
    for line in run.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "subject":
            subject = value.strip()
        elif "Fingerprint" in key:
            fingerprint = value.strip()
    return f"{subject} (sha256 {fingerprint})"


def check_private(key: Path, *, owner: int = 0) -> None:
    """Refuse a private key anybody but root could read or replace.

    Whoever can read the key can sign modules an enforcing kernel loads (the
    MOK is trusted like the distribution's key); whoever can replace it, or a
    directory above it, chooses the key the cache is signed with. So: the file
    owned by *owner* (root) with no group/other bits, and every directory above
    it owned by root and not writable by group/other, unless sticky (/tmp:
    others cannot rename root's entries there). ``initsplit key create`` makes
    its directory 0700 and the key 0600, which passes.
    """
    info = key.stat()
    if info.st_uid != owner:
        raise SigningError(f"{key}: owned by uid {info.st_uid}, not root: refusing to sign with it")
    if info.st_mode & 0o077:
        raise SigningError(f"{key}: mode {stat.S_IMODE(info.st_mode):04o} lets others read it "
                           "(chmod 600): refusing to sign with it")
    for directory in key.resolve().parents:
        info = directory.stat()
        writable = info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX
        if info.st_uid != owner or writable:
            raise SigningError(f"{key}: lies in {directory}, which someone but root can write: "
                               "refusing to sign with it")


def verify_signature(data: bytes, message: bytes, cert: Path) -> None:
    """Check the detached PKCS#7 *message* over *data* against *cert* (DER or PEM).

    What the kernel's pkcs7_verify() (crypto/asymmetric_keys/pkcs7_verify.c) checks
    of a module signature: the signer is *cert* and the signature is over *data*.
    -noverify: the certificate is self-signed, there is no chain to check.
    """
    with tempfile.TemporaryDirectory(prefix="initsplit-verify-") as tmp:
        content, signature, pem = Path(tmp, "data"), Path(tmp, "sig"), Path(tmp, "cert.pem")
        content.write_bytes(data)
        signature.write_bytes(message)
        _certificate_pem(cert, pem)
        run = subprocess.run(
            [OPENSSL, "cms", "-verify", "-binary", "-inform", "DER", "-in", str(signature),
             "-content", str(content), "-certfile", str(pem), "-noverify", "-out", os.devnull],
            capture_output=True, text=True, check=False)
    if run.returncode != 0:
        lines = run.stderr.strip().splitlines()
        raise SigningError(f"a trial signature by the key does not verify with {cert}: the key is not "
                           f"the certificate's ({lines[-1] if lines else run.returncode})")


def _certificate_pem(cert: Path, pem: Path) -> None:
    # cms -certfile reads PEM only; DKMS's and initsplit's certificates are DER.
    for form in ("DER", "PEM"):
        run = subprocess.run([OPENSSL, "x509", "-inform", form, "-in", str(cert), "-outform", "PEM",
                              "-out", str(pem)], capture_output=True, text=True, check=False)
        if run.returncode == 0:
            return
    lines = run.stderr.strip().splitlines()
    raise SigningError(f"{cert}: not an X.509 certificate ({lines[-1] if lines else run.returncode})")


def default_key() -> SigningKey | None:
    """DKMS's MOK when both its files exist, else initsplit's own pair, else None."""
    for key in (SigningKey(DKMS_KEY, DKMS_CERT),
                SigningKey(DEFAULT_KEY_DIR / KEY_NAME, DEFAULT_KEY_DIR / CERT_NAME)):
        if key.key.is_file() and key.cert.is_file():
            return key
    return None


def configured_key(*, sign: str = "auto", key: Path | None = None,
                   cert: Path | None = None) -> SigningKey | None:
    """The key the configuration's [Signing] section names (daemon/config.py), or None.

    ``sign`` is "auto", "yes" or "no". "no": None. Otherwise ``key``/``cert`` when
    set (both or neither), else :func:`default_key`. "auto" with no key found is
    None (an unsigned cache, as before Secure Boot support); "yes" with none, a
    key configured but missing or unreadable, or only one of the two set, is a
    :class:`SigningError`: an explicit choice must not quietly produce an unsigned
    cache that an enforcing kernel would not use.
    """
    if sign == "no":
        return None
    if (key is None) != (cert is None):
        raise SigningError("SignKey= and SignCert= go together: set both or neither")
    if key is not None and cert is not None:
        chosen = SigningKey(key, cert)
        chosen.check()
        return chosen
    found = default_key()
    if found is None:
        if sign == "yes":
            raise SigningError(f"Sign=yes but no key: neither {DKMS_KEY} nor {DEFAULT_KEY_DIR / KEY_NAME} "
                               "exists; make one with 'initsplit key create' or set SignKey=/SignCert=")
        return None
    found.check()
    return found


def strip_signature(data: bytes) -> bytes:
    """*data* without its appended module signature (unchanged if unsigned)."""
    return data[:len(data) - signature_length(data)]


def is_signed(data: bytes) -> bool:
    return signature_length(data) > 0


def pkcs7_signature(data: bytes, key: SigningKey) -> bytes:
    """The detached DER PKCS#7 message sign-file makes for *data*."""
    with tempfile.NamedTemporaryFile(prefix="initsplit-sign-") as content:
        content.write(data)
        content.flush()
        run = subprocess.run(
            [OPENSSL, "cms", "-sign", "-binary", "-noattr", "-nocerts", "-outform", "DER",
             "-md", key.digest, "-signer", str(key.cert), "-inkey", str(key.key),
             "-in", content.name],
            capture_output=True, check=False)
    if run.returncode != 0 or not run.stdout:
        message = run.stderr.decode(errors="replace").strip().splitlines()
        raise SigningError(f"openssl cms -sign failed: {message[-1] if message else run.returncode}")
    return run.stdout


def sign_module(data: bytes, key: SigningKey) -> bytes:
    """*data* (its old signature stripped) with a signature by *key* appended."""
    body = strip_signature(data)
    message = pkcs7_signature(body, key)
    info = MODULE_SIGNATURE.pack(0, 0, PKEY_ID_PKCS7, 0, 0, b"\0\0\0", len(message))
    return body + message + info + MODULE_SIG_STRING


def create_key(directory: Path, *, subject: str = KEY_SUBJECT, days: int = 36500) -> SigningKey:
    """A new MOK pair in *directory* the DKMS way: KEY (PEM, mode 0600) and CERT (DER).

    Refuses to replace an existing pair: a key enrolled with mokutil would no
    longer match the modules signed after it.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = SigningKey(directory / KEY_NAME, directory / CERT_NAME)
    for path in (key.key, key.cert):
        if path.exists():
            raise SigningError(f"{path} exists already; remove it first to make a new key")
    # openssl writes the key with the umask's mode: create it 0600 first.
    fd = os.open(key.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    run = subprocess.run(
        [OPENSSL, "req", "-new", "-x509", "-nodes", "-days", str(days), "-subj", subject,
         "-newkey", "rsa:2048", "-keyout", str(key.key), "-outform", "DER", "-out", str(key.cert)],
        capture_output=True, text=True, check=False)
    if run.returncode != 0:
        key.key.unlink(missing_ok=True)
        key.cert.unlink(missing_ok=True)
        lines = run.stderr.strip().splitlines()
        raise SigningError(f"openssl req failed: {lines[-1] if lines else run.returncode}")
    os.chmod(key.key, 0o600)
    os.chmod(key.cert, 0o644)
    return key
