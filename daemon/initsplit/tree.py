"""Split a whole tree of kernel modules, in parallel, into an output tree.

For every NAME.ko found under the inputs, the output tree gets, at the same
relative path, the core module (under the original file name, so modules.dep and
friends still point at it) and the init module <init_name>.ko beside it. A module
that is not split (nothing to split, refused, invalid, error) gets no output at
all: its absence is what tells the caller to load the original instead.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence, TypeVar

from .cache import remove_entry, write_entry
from .elf import ElfObject, MalformedElf, read_elf
from .split import NothingToSplit, SplitModule, SplitRefused, init_module_name, split_object
from .validate import ValidationError, ValidationReport, validate_split

Outcome = Literal["split", "nothing", "refused", "invalid", "error"]
OUTCOMES: tuple[Outcome, ...] = ("split", "nothing", "refused", "invalid", "error")

MODULE_SUFFIX = ".ko"


@dataclass(frozen=True, slots=True)
class ModuleJob:
    source: Path  # the .ko to read
    relative: Path  # where it lands under the output dir


@dataclass(frozen=True, slots=True)
class ModuleResult:
    path: Path  # relative to its input root, e.g. kernel/drivers/net/dummy.ko
    source: Path
    outcome: Outcome
    reason: str = ""  # refusal reason, validation message or exception text
    detail: str = ""  # where, for refusals (SplitRefused.detail)
    core_size: int = 0
    init_size: int = 0
    seconds: float = 0.0
    input_size: int = 0
    init_path: Path | None = None  # relative, only for "split"

    @property
    def ok(self) -> bool:
        """False for the outcomes that point at a bug rather than a decision."""
        return self.outcome not in ("invalid", "error")


class TreeError(Exception):
    """The inputs cannot be processed at all (missing path, clashing outputs...)."""


def find_modules(paths: Iterable[Path], *, exclude: Path | None = None) -> list[ModuleJob]:
    """Every .ko under *paths*, with the relative path its outputs get.

    A directory contributes its modules relative to itself; a file given by name
    lands at the top of the output dir. Symlinked directories are not followed,
    so a tree with loops (or a build dir with `source` links) is walked once.
    The *exclude* directory is skipped: an output dir inside the input tree must
    not feed the previous run's outputs back in.
    """
    excluded = exclude.resolve() if exclude is not None else None
    jobs: list[ModuleJob] = []
    for path in map(Path, paths):
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                if excluded is not None:
                    dirnames[:] = [d for d in dirnames if (Path(dirpath) / d).resolve() != excluded]
                dirnames.sort()
                for filename in sorted(filenames):
                    source = Path(dirpath) / filename
                    if filename.endswith(MODULE_SUFFIX) and source.is_file():
                        jobs.append(ModuleJob(source, source.relative_to(path)))
        elif path.is_file():
            if not path.name.endswith(MODULE_SUFFIX):
                raise TreeError(f"{path}: not a {MODULE_SUFFIX} file")
            jobs.append(ModuleJob(path, Path(path.name)))
        else:
            raise TreeError(f"{path}: no such file or directory")

    seen: dict[Path, Path] = {}
    for job in jobs:
        other = seen.setdefault(job.relative, job.source)
        if other != job.source:
            raise TreeError(f"{other} and {job.source} would both be written to {job.relative}")
    return jobs


def split_tree(
    paths: Iterable[Path],
    output: Path | None,
    *,
    workers: int | None = None,
    progress: Callable[[ModuleResult], None] | None = None,
) -> list[ModuleResult]:
    """Split and validate every module under *paths*, writing to *output* (None: do not write).

    Returns one result per module, in the order find_modules() lists them. Never
    raises for a module's sake: whatever goes wrong becomes that module's outcome.
    """
    return split_jobs(find_modules(paths, exclude=output), output, workers=workers,
                      progress=progress)


def split_jobs(
    jobs: Sequence[ModuleJob],
    output: Path | None,
    *,
    workers: int | None = None,
    progress: Callable[[ModuleResult], None] | None = None,
) -> list[ModuleResult]:
    """split_tree() for jobs already found, so a caller can count them first.

    *progress* is called in this process once per module as it completes.
    """
    if output is not None:
        _check_output(jobs, output)
    return run_jobs(jobs, functools.partial(split_one, output=output), workers=workers,
                    progress=progress, on_pool_error=lambda job, exc: _error(job, exc, 0.0))


R = TypeVar("R")


def run_jobs(
    jobs: Sequence[ModuleJob],
    work: Callable[[ModuleJob], R],
    *,
    workers: int | None,
    progress: Callable[[R], None] | None,
    on_pool_error: Callable[[ModuleJob, Exception], R],
) -> list[R]:
    """work(job) for every job on every core; results in job order.

    *work* must be picklable and catch its own errors; *on_pool_error* turns a
    failure of the pool itself (a worker killed by the OOM killer, say) into that
    job's result, so the run goes on for the others. *progress* is called in this
    process once per job as it completes.
    """
    workers = max(1, workers or os.cpu_count() or 1)
    results: dict[int, R] = {}

    def done(index: int, result: R) -> None:
        results[index] = result
        if progress is not None:
            progress(result)

    if workers == 1 or len(jobs) <= 1:
        # In-process: no fork, and exceptions and profilers see the real stack.
        for index, job in enumerate(jobs):
            done(index, work(job))
    else:
        # Largest first: a few modules (i915, amdgpu, ...) take seconds each, and
        # starting them last would leave one worker finishing alone at the end.
        order = sorted(range(len(jobs)), key=lambda i: _size(jobs[i].source), reverse=True)
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(work, jobs[index]): index for index in order}
            for future in concurrent.futures.as_completed(futures):
                index = futures[future]
                try:
                    result = future.result()
                except Exception as exc:
                    result = on_pool_error(jobs[index], exc)
                done(index, result)
    return [results[index] for index in range(len(jobs))]


def _check_output(jobs: Sequence[ModuleJob], output: Path) -> None:
    # With -o pointing at the input tree, the core would replace the original and
    # the stale-output cleanup would delete originals of modules not split.
    output = output.resolve()
    for job in jobs:
        if (output / job.relative).resolve() == job.source.resolve():
            raise TreeError(f"{job.source}: output would overwrite the input")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def split_one(job: ModuleJob, output: Path | None) -> ModuleResult:
    """Read, split, validate and write one module; runs in a worker process."""
    start = time.perf_counter()
    try:
        return _split_one(job, output, start)
    except Exception as exc:
        if output is not None:
            try:
                _remove_outputs(output, job.relative, None)
            except OSError:
                pass  # the error being reported matters more than this one
        return _error(job, exc, time.perf_counter() - start)


def _split_one(job: ModuleJob, output: Path | None, start: float) -> ModuleResult:
    data = job.source.read_bytes()
    try:
        decision = decide(data)
    except MalformedElf as exc:
        decision = Decision("error", reason=f"malformed ELF: {exc}")

    # An invalid split is never written: the caller loads the original instead.
    split = decision.split if decision.outcome == "split" else None
    if output is not None:
        # Every entry gets a manifest (initsplit/cache.py), also for modules that are
        # not split, so the daemon knows the decision without splitting again.
        if split is not None:
            init_relative = job.relative.with_name(split.init_name + MODULE_SUFFIX)
            if init_relative == job.relative:
                raise TreeError(f"init module {split.init_name} would replace the core")
            write_entry(output, job.relative, source=data, decision="split", name=split.name,
                        init_name=split.init_name, core=split.core, init=split.init,
                        **layout_figures(decision.original, split))
        else:
            # A previous run may have split this module; a stale core left behind
            # would be loaded instead of the original.
            _remove_outputs(output, job.relative, None)
            if decision.outcome in ("nothing", "refused"):
                write_entry(output, job.relative, source=data, decision=decision.outcome,
                            reason=decision.reason if decision.outcome == "refused"
                            else "nothing to split")
    return ModuleResult(
        path=job.relative,
        source=job.source,
        outcome=decision.outcome,
        reason=decision.reason,
        detail=decision.detail,
        core_size=len(split.core) if split else 0,
        init_size=len(split.init) if split else 0,
        seconds=time.perf_counter() - start,
        input_size=len(data),
        init_path=job.relative.with_name(split.init_name + MODULE_SUFFIX) if split else None,
    )


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one module; split is set for "split" and "invalid"."""

    outcome: Outcome
    reason: str = ""
    detail: str = ""
    split: SplitModule | None = None
    report: ValidationReport | None = None
    # The original as read for the split (for layout figures without reading it again).
    original: ElfObject | None = None


def layout_figures(original: ElfObject | None, split: SplitModule) -> dict[str, int]:
    """What the daemon reports per module beside the kernel's own sizes (cache manifest)."""
    from .layout import layout_of, module_layout

    if original is None:
        raise ValueError("layout figures need the parsed original")
    return {"plain_core_bytes": module_layout(original).core.size,
            "init_layout_pages": layout_of(split.init).init.pages}


def decide(data: bytes) -> Decision:
    """Split the module in *data* and validate the result, all in memory.

    MalformedElf propagates: for one module named on the command line it is a
    usage error, in a tree it is that module's error.
    """
    original = read_elf(data)
    try:
        split = split_object(original)
    except NothingToSplit:
        return Decision("nothing")
    except SplitRefused as exc:
        return Decision("refused", reason=exc.reason, detail=exc.detail)
    # Nothing is written that the validator has not checked against the original.
    try:
        report = validate_split(data, split.core, split.init)
    except ValidationError as exc:
        return Decision("invalid", reason=str(exc) or type(exc).__name__, split=split)
    return Decision("split", split=split, report=report, original=original)


def _error(job: ModuleJob, exc: BaseException, seconds: float) -> ModuleResult:
    return ModuleResult(path=job.relative, source=job.source, outcome="error",
                        reason=f"{type(exc).__name__}: {exc}", seconds=seconds)


def _remove_outputs(output: Path, relative: Path, init_name: str | None) -> None:
    if init_name is None:
        # Kbuild names a module after its file, with '-' read as '_' (KBUILD_MODNAME).
        init_name = init_module_name(relative.name.removesuffix(MODULE_SUFFIX).replace("-", "_"))
    remove_entry(output, relative, init_name)


# ---------------------------------------------------------------- summaries

def count_outcomes(results: Iterable[ModuleResult]) -> dict[Outcome, int]:
    counts = collections.Counter(r.outcome for r in results)
    return {outcome: counts.get(outcome, 0) for outcome in OUTCOMES}


def refusal_reasons(results: Iterable[ModuleResult]) -> list[tuple[str, int]]:
    """Refusal reasons with how many modules each, most frequent first."""
    counts = collections.Counter(r.reason for r in results if r.outcome == "refused")
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def summary_line(results: Sequence[ModuleResult], seconds: float) -> str:
    c = count_outcomes(results)
    return (f"split {c['split']}, nothing to split {c['nothing']}, refused {c['refused']}, "
            f"invalid {c['invalid']}, errors {c['error']} in {seconds:.1f} s")
