"""Split a whole tree of kernel modules, in parallel, into an output tree.

For every NAME.ko found under the inputs, the output tree gets, at the same
relative path, the core module (under the original file name, so modules.dep and
friends still point at it) and the init module <init_name>.ko beside it, and a
manifest (cache.py). A module loaded plain (nothing to split, refused, or turned
down by the policy, split/decide.py) gets its manifest only, which says why; an
invalid split or an error gets nothing, and the daemon decides again at boot.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import functools
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

from .cache import remove_entry, write_entry
from .modfile import MODULE_SUFFIX, CompressedModuleError, is_module_file, module_file_name, read_module, uncompressed_path
from .elf import MalformedElf
from .split import init_module_name
from .split.decide import OUTCOMES, Decision, Outcome, decide, layout_figures, manifest_reason
from .split.policy import DEFAULT_OPTIONS, SplitOptions
from .signing import SigningError, SigningKey, sign_module


@dataclass(frozen=True, slots=True)
class ModuleJob:
    source: Path  # the .ko (or .ko.xz, ...) to read
    relative: Path  # where it lands under the output dir (always NAME.ko)


@dataclass(frozen=True, slots=True)
class ModuleResult:
    path: Path  # relative to its input root, e.g. kernel/drivers/net/dummy.ko
    source: Path
    outcome: Outcome
    reason: str = ""  # refusal reason, validation message or exception text
    detail: str = ""  # where, for refusals (SplitRefused.detail)
    # Bytes of C and I for "split" (0 otherwise) as written to the output, which is
    # what the cache manifest records and the kernel is given: with a signing key
    # these include the appended signature. Without an output, as split (unsigned).
    core_size: int = 0
    init_size: int = 0
    seconds: float = 0.0
    input_size: int = 0
    init_path: Path | None = None  # relative, only for "split"
    # Core layout pages of the plain load and of C, for "split" and "plain"
    # (split.decide.Decision).
    plain_core_pages: int = 0
    split_core_pages: int = 0
    # The slab a two-stage load would take more than the plain one (split/decide.py).
    twostage_slab_bytes: int = 0
    # Discard= classes dropped from what is loaded (C, or the original rewritten at
    # the module's path for a plain load), and what each class gives back.
    discarded: tuple[str, ...] = ()
    rewritten: bool = False
    btf_bytes: int = 0
    kallsyms_bytes: int = 0

    @property
    def ok(self) -> bool:
        """False for the outcomes that point at a bug rather than a decision."""
        return self.outcome not in ("invalid", "error")


class TreeError(Exception):
    """The inputs cannot be processed at all (missing path, clashing outputs...)."""


class OutputError(TreeError):
    """The output cannot be written (a full disk, an I/O error, a path in the way).

    Not one module's problem but the run's, like a SigningError: every module
    after it would fail the same way, and a cache missing their entries must not
    replace a complete one (the kernel hook keeps the old cache on exit 2). So
    split_one() raises it and split_jobs() stops the run."""


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
                    if is_module_file(filename) and source.is_file():
                        # A compressed module's outputs are kept uncompressed (modfile.py).
                        jobs.append(ModuleJob(source, uncompressed_path(source.relative_to(path))))
        elif path.is_file():
            if not is_module_file(path.name):
                raise TreeError(f"{path}: not a {MODULE_SUFFIX} file")
            jobs.append(ModuleJob(path, uncompressed_path(Path(path.name))))
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
    options: SplitOptions = DEFAULT_OPTIONS,
    sign_key: SigningKey | None = None,
) -> list[ModuleResult]:
    """Split and validate every module under *paths*, writing to *output* (None: do not write).

    With *sign_key*, every module written (C, I, a rewritten original) is signed
    with it (signing.py), after validation, before it reaches the cache.

    Returns one result per module, in the order find_modules() lists them. Never
    raises for a module's sake: whatever goes wrong becomes that module's outcome,
    except a SigningError, which is the key's and would be every module's: it stops
    the run and propagates (what was written so far stays; callers write into a
    new directory and throw it away).
    """
    return split_jobs(find_modules(paths, exclude=output), output, workers=workers,
                      progress=progress, options=options, sign_key=sign_key)


def split_jobs(
    jobs: Sequence[ModuleJob],
    output: Path | None,
    *,
    workers: int | None = None,
    progress: Callable[[ModuleResult], None] | None = None,
    options: SplitOptions = DEFAULT_OPTIONS,
    sign_key: SigningKey | None = None,
) -> list[ModuleResult]:
    """split_tree() for jobs already found, so a caller can count them first.

    *progress* is called in this process once per module as it completes.
    """
    if output is not None:
        _check_output(jobs, output)
    if sign_key is not None:
        sign_key = sign_key.described()  # once here, not in every worker: openssl x509
    return run_jobs(jobs, functools.partial(split_one, output=output, options=options, sign_key=sign_key),
                    workers=workers, progress=progress, on_pool_error=lambda job, exc: _error(job, exc, 0.0),
                    # A dead worker (the OOM killer, say) breaks the pool: every job
                    # left would fail with it, so that too stops the run.
                    fatal=(SigningError, OutputError, concurrent.futures.process.BrokenProcessPool))


R = TypeVar("R")


def run_jobs(
    jobs: Sequence[ModuleJob],
    work: Callable[[ModuleJob], R],
    *,
    workers: int | None,
    progress: Callable[[R], None] | None,
    on_pool_error: Callable[[ModuleJob, Exception], R],
    fatal: tuple[type[Exception], ...] = (),
) -> list[R]:
    """work(job) for every job on every core; results in job order.

    *work* must be picklable and catch its own errors; *on_pool_error* turns a
    failure of the pool itself (a worker killed by the OOM killer, say) into that
    job's result, so the run goes on for the others. An exception of a *fatal*
    class that *work* raises stops the run: the jobs not started are cancelled and
    it propagates. *progress* is called in this process once per job as it completes.
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
                except fatal:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
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


def split_one(job: ModuleJob, output: Path | None,
              options: SplitOptions = DEFAULT_OPTIONS, sign_key: SigningKey | None = None) -> ModuleResult:
    """Read, split, validate, weigh and write one module; runs in a worker process.

    A module that cannot be signed when *sign_key* is given gets no entry (an
    unsigned split in the cache of a signing machine would be refused by an
    enforcing kernel) and its SigningError propagates: the key failing is not this
    module's problem but the run's (split_jobs stops)."""
    start = time.perf_counter()
    try:
        return _split_one(job, output, start, options, sign_key)
    except (SigningError, OutputError):
        if output is not None:
            try:
                _remove_outputs(output, job.relative, None)
            except OSError:
                pass  # the run's error matters more than this one
        raise
    except Exception as exc:
        if output is not None:
            try:
                _remove_outputs(output, job.relative, None)
            except OSError:
                pass  # the error being reported matters more than this one
        return _error(job, exc, time.perf_counter() - start)


def _split_one(job: ModuleJob, output: Path | None, start: float,
               options: SplitOptions, sign_key: SigningKey | None = None) -> ModuleResult:
    try:
        data = read_module(job.source)
        decision = decide(data, options)
    except MalformedElf as exc:
        decision = Decision("error", reason=f"malformed ELF: {exc}")
    except CompressedModuleError as exc:
        data, decision = b"", Decision("error", reason=f"cannot decompress: {exc}")

    # An invalid split is never written: the caller loads the original instead.
    split = decision.split if decision.outcome == "split" else None

    # What the manifest records; a key that was not described() still names its file.
    signer = "" if sign_key is None else (sign_key.signer or str(sign_key.cert))

    def signed(module: bytes) -> bytes:
        # After validation (which reads the unsigned bytes), before the cache
        # writer hashes them into the manifest: the entry holds what is loaded.
        return module if sign_key is None else sign_module(module, sign_key)

    # C and I as they are written: signed when a key is given (ModuleResult.core_size).
    core, init = (b"", b"") if split is None else (split.core, split.init)
    try:
        if output is not None:
            # Every entry gets a manifest (initsplit/cache.py), also for modules that are
            # not split, so the daemon knows the decision without splitting again.
            if split is not None:
                init_relative = job.relative.with_name(split.init_name + MODULE_SUFFIX)
                if init_relative == job.relative:
                    raise TreeError(f"init module {split.init_name} would replace the core")
                core, init = signed(split.core), signed(split.init)
                write_entry(output, job.relative, source=data, decision="split", name=split.name,
                            init_name=split.init_name, core=core, init=init,
                            options=options.tag, discarded=",".join(decision.discarded),
                            btf_bytes=decision.btf_bytes, kallsyms_bytes=decision.kallsyms_bytes,
                            reached=split.reached, reached_from=split.reached_from, signer=signer,
                            **layout_figures(decision, options.rules))
            else:
                # A previous run may have split this module; a stale core left behind
                # would be loaded instead of the original.
                _remove_outputs(output, job.relative, None)
                if decision.outcome in ("nothing", "refused", "plain"):
                    write_entry(output, job.relative, source=data, decision=decision.outcome,
                                reason=manifest_reason(decision), options=options.tag,
                                discarded=",".join(decision.discarded), btf_bytes=decision.btf_bytes,
                                kallsyms_bytes=decision.kallsyms_bytes,
                                rewritten=None if decision.rewritten is None else signed(decision.rewritten),
                                signer=signer if decision.rewritten is not None else "")
    except OSError as exc:
        raise OutputError(f"cannot write the entry of {job.relative} in {output}: {exc}") from exc
    return ModuleResult(
        path=job.relative,
        source=job.source,
        outcome=decision.outcome,
        reason=decision.reason,
        detail=decision.detail,
        core_size=len(core),
        init_size=len(init),
        seconds=time.perf_counter() - start,
        input_size=len(data),
        init_path=job.relative.with_name(split.init_name + MODULE_SUFFIX) if split else None,
        plain_core_pages=decision.plain_core_pages,
        split_core_pages=decision.split_core_pages,
        twostage_slab_bytes=decision.twostage_slab_bytes,
        discarded=decision.discarded,
        rewritten=decision.rewritten is not None,
        btf_bytes=decision.btf_bytes,
        kallsyms_bytes=decision.kallsyms_bytes,
    )


def _error(job: ModuleJob, exc: BaseException, seconds: float) -> ModuleResult:
    return ModuleResult(path=job.relative, source=job.source, outcome="error",
                        reason=f"{type(exc).__name__}: {exc}", seconds=seconds)


def _remove_outputs(output: Path, relative: Path, init_name: str | None) -> None:
    if init_name is None:
        # Kbuild names a module after its file, with '-' read as '_' (KBUILD_MODNAME).
        init_name = init_module_name(module_file_name(relative.name))
    remove_entry(output, relative, init_name)


# ---------------------------------------------------------------- summaries

def count_outcomes(results: Iterable[ModuleResult]) -> dict[Outcome, int]:
    counts = collections.Counter(r.outcome for r in results)
    return {outcome: counts.get(outcome, 0) for outcome in OUTCOMES}


def refusal_reasons(results: Iterable[ModuleResult], outcome: Outcome = "refused"
                    ) -> list[tuple[str, int]]:
    """Refusal reasons (or, for "plain", the policy's) with how many modules each,
    most frequent first."""
    counts = collections.Counter(r.reason for r in results if r.outcome == outcome)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def summary_line(results: Sequence[ModuleResult], seconds: float) -> str:
    c = count_outcomes(results)
    return (f"split {c['split']}, plain by policy {c['plain']}, nothing to split {c['nothing']}, "
            f"refused {c['refused']}, invalid {c['invalid']}, errors {c['error']} in {seconds:.1f} s")
