"""The Secure Boot test bed's MOK enrollment (tests/testbed/secureboot.py) on the host:
Debian's OVMF_VARS_4M.ms.fd parsed as edk2 lays out authenticated variables
(VariableFormat.h), MokList appended in the store's free space, nothing else moved."""

from __future__ import annotations

import struct
import uuid

import pytest

from tests.testbed import secureboot as sb
from tests.testbed import _util

CERT = b"0\x82\x03\x00" + bytes(range(256)) * 3  # any bytes: the store does not parse them


def test_ms_vars_store_has_secure_boot_keys() -> None:
    names = {v.name for v in sb.variables(sb.OVMF_VARS.read_bytes())}
    assert {"PK", "KEK", "db", "dbx"} <= names, names
    assert "MokList" not in names


def test_moklist_appended() -> None:
    template = sb.OVMF_VARS.read_bytes()
    image = sb.vars_with_mok(CERT)
    assert len(image) == len(template)
    before = sb.variables(template)
    after = sb.variables(image)
    assert after[:-1] == before  # nothing else changed
    mok = after[-1]
    assert (mok.name, mok.vendor, mok.attributes) == ("MokList", sb.SHIM_LOCK_GUID, 0x3)
    # EFI_SIGNATURE_LIST: type, list size, header size, signature size, then
    # EFI_SIGNATURE_DATA (owner GUID, the certificate).
    kind, list_size, header_size, sig_size = struct.unpack_from("<16sIII", mok.data)
    assert uuid.UUID(bytes_le=kind) == sb.EFI_CERT_X509_GUID
    assert (list_size, header_size, sig_size) == (len(mok.data), 0, 16 + len(CERT))
    assert mok.data[28:44] == sb.SHIM_LOCK_GUID.bytes_le and mok.data[44:] == CERT
    # Only erased bytes (the store's free space) were overwritten.
    changed = [i for i in range(len(image)) if image[i] != template[i]]
    assert changed and all(template[i] == 0xFF for i in changed)


def test_second_moklist_refused() -> None:
    with pytest.raises(_util.TestbedError, match="exists already"):
        sb.append_variable(sb.vars_with_mok(CERT), "MokList", sb.SHIM_LOCK_GUID, 0x3, b"x")


def test_not_a_vars_store_refused() -> None:
    with pytest.raises(_util.TestbedError, match="_FVH"):
        sb.variables(bytes(4096))
