"""modprobe's module resolution through libkmod.so.2 (ctypes; stdlib only).

:class:`Resolver` turns a MODALIAS into the :class:`LoadStep` list that
``modprobe --show-depends`` would print.  libkmod is not thread-safe: use each
Resolver from one thread only.
"""

from .errors import KmodError, ModuleFileError, ModuleIndexError
from .resolver import LoadStep, Resolver

__all__ = [
    "KmodError",
    "LoadStep",
    "ModuleFileError",
    "ModuleIndexError",
    "Resolver",
]
