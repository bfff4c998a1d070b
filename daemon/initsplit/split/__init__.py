"""The splitter: one kernel module in, a core module and an init module out."""

from .errors import NothingToSplit, SplitRefused
from .splitter import SplitModule, init_module_name, split_module, split_object

__all__ = ["NothingToSplit", "SplitModule", "SplitRefused", "init_module_name", "split_module", "split_object"]
