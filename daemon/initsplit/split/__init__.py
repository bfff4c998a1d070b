"""The splitter: one kernel module in, a core module and an init module out.

The splitter and its ELF model (pyelftools) are imported on first use only: the
daemon imports this package for names.py and initresult.py, and with a pre-split
cache never splits, so it must not pay for pyelftools at boot (most of a second
in a slow VM).
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import NothingToSplit, SplitRefused
from .names import init_module_name

_FROM_SPLITTER = ("SplitModule", "split_module", "split_object")

__all__ = ["NothingToSplit", "SplitModule", "SplitRefused", "init_module_name", "split_module", "split_object"]


def __getattr__(name: str) -> Any:
    # PEP 562: "from initsplit.split import split_module" lands here the first time.
    if name in _FROM_SPLITTER:
        return getattr(importlib.import_module(".splitter", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
