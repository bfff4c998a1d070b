"""The appended module signature's layout, as the kernel reads it.

include/linux/module_signature.h: a signed module ends in the PKCS#7 message,
then struct module_signature, then the marker. Split out of elf/discard.py so the
daemon checks a cache entry's signature (cache.signature_problem()) without the
ELF package: nothing of it is imported at boot.
"""

from __future__ import annotations

import struct

MODULE_SIG_STRING = b"~Module signature appended~\n"
# struct module_signature: algo, hash, id_type, signer_len, key_id_len, __pad[3], sig_len
# (big-endian).
MODULE_SIGNATURE = struct.Struct(">BBBBB3sI")
PKEY_ID_PKCS7 = 2
# Bytes at the end of a signed module that signature_problem() reads.
SIGNATURE_TRAILER = MODULE_SIGNATURE.size + len(MODULE_SIG_STRING)


def signature_problem(tail: bytes, size: int) -> str | None:
    """None when a file of *size* bytes ending in *tail* (at least SIGNATURE_TRAILER
    bytes) carries an appended signature the kernel would go on to verify; else why not.

    The kernel's own checks before the cryptography: kernel/module/signing.c
    module_sig_check() (the marker), kernel/module_signature.c mod_check_sig()
    (sig_len shorter than what precedes the struct, id_type PKEY_ID_PKCS7, every
    other field zero). Whether the key is trusted only the kernel can say.
    """
    if size < SIGNATURE_TRAILER or len(tail) < SIGNATURE_TRAILER or not tail.endswith(MODULE_SIG_STRING):
        return "not signed (no appended module signature)"
    algo, hash_, id_type, signer_len, key_id_len, pad, sig_len = MODULE_SIGNATURE.unpack_from(
        tail, len(tail) - SIGNATURE_TRAILER)
    if id_type != PKEY_ID_PKCS7:
        return f"signature is not a PKCS#7 message (id_type {id_type})"
    if algo or hash_ or signer_len or key_id_len or any(pad):
        return "signature info has unexpected non-zero fields"
    if not 0 < sig_len < size - SIGNATURE_TRAILER:
        return f"signature length {sig_len} does not fit the file"
    return None
