"""Errors of the libkmod binding beyond the plain OSError its calls raise."""

from __future__ import annotations


class KmodError(Exception):
    """libkmod could not give a trustworthy answer; the message says why and where."""


class ModuleIndexError(KmodError):
    """The module directory has no usable modules.dep.bin etc. (depmod was not run)."""


class ModuleFileError(KmodError):
    """A module file named by the indexes is missing, or a file is not a kernel module."""
