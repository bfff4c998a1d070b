"""Where the daemon gets a module's split from: the pre-split cache, or a split made now."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..cache import CacheHit, read_entry, write_entry
from ..loader.twostage import SplitPair

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NotSplit:
    """Load the original plain, for this reason."""

    reason: str


class SplitProvider:
    """Finds or makes the split of a module, refusing anything outside the module tree."""

    def __init__(self, *, modules_dir: Path, cache_dir: Path, runtime_dir: Path) -> None:
        self.modules_dir = modules_dir.resolve()
        self.cache_dir = cache_dir
        self.runtime_dir = runtime_dir

    def get(self, module_path: Path) -> SplitPair | NotSplit:
        try:
            real = module_path.resolve(strict=True)
            relpath = real.relative_to(self.modules_dir)
        except (OSError, ValueError):
            return NotSplit(f"{module_path} is outside the kernel's module tree")
        if real.suffix != ".ko":
            return NotSplit(f"{real.name}: compressed modules are not split")
        try:
            source = real.read_bytes()
        except OSError as exc:
            return NotSplit(f"cannot read {real}: {exc.strerror}")
        for root in (self.cache_dir, self.runtime_dir):
            hit = read_entry(root, relpath, source=source)
            if hit is not None:
                if hit.init is None:
                    return NotSplit(hit.manifest.reason or hit.manifest.decision)
                return _pair(hit)
        return self._split_now(relpath, source)

    def _split_now(self, relpath: Path, source: bytes) -> SplitPair | NotSplit:
        # Imported here: pyelftools costs most of a second in a slow VM, and with a
        # pre-split cache the daemon never needs it.
        from ..elf import MalformedElf
        from ..tree import decide, layout_figures

        try:
            decision = decide(source)
        except MalformedElf as exc:
            return NotSplit(f"cannot split: {exc}")
        except Exception as exc:  # a splitter bug must cost a plain load, not the boot
            log.exception("splitting %s failed", relpath)
            return NotSplit(f"splitter error: {type(exc).__name__}: {exc}")
        try:
            if decision.outcome == "nothing":
                write_entry(self.runtime_dir, relpath, source=source, decision="nothing",
                            reason="nothing to split")
                return NotSplit("nothing to split")
            if decision.outcome == "refused":
                why = f"refused: {decision.reason}" + (f": {decision.detail}" if decision.detail else "")
                write_entry(self.runtime_dir, relpath, source=source, decision="refused", reason=why)
                return NotSplit(why)
            if decision.outcome != "split" or decision.split is None:
                return NotSplit(f"split failed validation: {decision.reason}")
            result = decision.split
            write_entry(self.runtime_dir, relpath, source=source, decision="split",
                        name=result.name, init_name=result.init_name, core=result.core,
                        init=result.init, **layout_figures(decision.original, result))
        except OSError as exc:
            return NotSplit(f"cannot write split to {self.runtime_dir}: {exc.strerror}")
        hit = read_entry(self.runtime_dir, relpath, source=source)
        if hit is None or hit.init is None:
            return NotSplit("split written but not readable back")
        return _pair(hit)


def _pair(hit: CacheHit) -> SplitPair:
    manifest = hit.manifest
    assert hit.init is not None
    return SplitPair(manifest.name, manifest.init_name, hit.core, hit.init,
                     init_pages=manifest.init_layout_pages or None,
                     plain_core_bytes=manifest.plain_core_bytes or None)
