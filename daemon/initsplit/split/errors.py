"""Outcomes of a split attempt other than success."""


class SplitRefused(Exception):
    """Splitting this module is not proven safe; load the original instead.

    ``reason`` is a short, stable phrase (used for counting); ``detail`` says where.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class NothingToSplit(Exception):
    """The module has no .init sections: there is nothing to give back."""
