"""The init module's name, which the splitter gives it and the loader's recovery
recognises it by (a loaded init module whose load marker is gone)."""

from __future__ import annotations

import hashlib

from .tables import MODULE_NAME_LEN

INIT_SUFFIX = "__init"


def init_module_name(name: str) -> str:
    """The init module's name: NAME__init, shortened deterministically to fit MODULE_NAME_LEN."""
    candidate = name + INIT_SUFFIX
    if len(candidate) <= MODULE_NAME_LEN - 1:
        return candidate
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    keep = MODULE_NAME_LEN - 1 - len(INIT_SUFFIX) - len(digest) - 1
    return f"{name[:keep]}_{digest}{INIT_SUFFIX}"
