"""Damaged real modules: the splitter and the validator fail cleanly, or not at all.

The inputs are small modules of the Debian tree, picked with a fixed seed, then
truncated, bit-flipped and given absurd header, symbol and relocation fields.
On any of them split_module() may only succeed or raise NothingToSplit,
SplitRefused or MalformedElf, and a split that succeeds must then validate or
raise ValidationError. Separately, the outputs of good splits are damaged in
ways that change what the kernel would load: the validator must reject every
one of those with ValidationError.

Each failure message carries the module and the mutation, which reproduces it
with tests/elfmut.py.
"""

from __future__ import annotations

import random
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

from initsplit.elf import MalformedElf
from initsplit.split import NothingToSplit, SplitModule, SplitRefused, split_module
from initsplit.validate import ValidationError, validate_split
from tests.elfmut import MeaningMutator, Mutator
from tests.testbed.kernel import debian_kernel

SEED = 20240607
SPLIT_SAMPLES = 16
NOTHING_SAMPLES = 2
REFUSED_SAMPLES = 2
SAMPLES = SPLIT_SAMPLES + NOTHING_SAMPLES + REFUSED_SAMPLES
INPUT_MUTATIONS = 60  # per module: 20 x 60 = 1,200 damaged inputs
OUTPUT_MUTATIONS = 24  # per split module and output (core, init), each kind
FLAG_SAMPLES = 4  # split modules whose every allocated section gets its flags toggled
SLOW = 5.0  # seconds; one small module taking longer means something blew up
# Small modules keep the run short; every kind of table still occurs among them.
MIN_SIZE, MAX_SIZE = 6_000, 24_000


@dataclass(frozen=True)
class Sample:
    path: Path
    data: bytes
    outcome: str  # "split" | "nothing" | "refused"
    split: SplitModule | None


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    modules_dir = debian_kernel().modules_dir
    dummy = modules_dir / "kernel/drivers/net/dummy.ko"
    candidates = sorted(p for p in modules_dir.rglob("*.ko")
                        if MIN_SIZE < p.stat().st_size < MAX_SIZE and p != dummy)
    random.Random(SEED).shuffle(candidates)
    quota = {"split": SPLIT_SAMPLES, "nothing": NOTHING_SAMPLES, "refused": REFUSED_SAMPLES}
    picked: list[Sample] = []
    for path in [dummy, *candidates]:
        data = path.read_bytes()
        try:
            sample = Sample(path, data, "split", split_module(data))
        except NothingToSplit:
            sample = Sample(path, data, "nothing", None)
        except SplitRefused:
            sample = Sample(path, data, "refused", None)
        if quota[sample.outcome]:
            quota[sample.outcome] -= 1
            picked.append(sample)
        if not any(quota.values()):
            break
    assert not any(quota.values()), f"not enough small modules in {modules_dir}: missing {quota}"
    return picked


def _check_input(data: bytes) -> str | None:
    """None if the splitter and validator behaved; otherwise what went wrong."""
    try:
        split = split_module(data)
    except (NothingToSplit, MalformedElf):
        return None
    except SplitRefused as exc:
        return None if exc.reason else "SplitRefused without a reason"
    except Exception:
        return "split_module raised " + traceback.format_exc(limit=-3)
    try:
        validate_split(data, split.core, split.init)
    except ValidationError as exc:
        return None if str(exc) else "ValidationError without a message"
    except Exception:
        return "validate_split raised " + traceback.format_exc(limit=-3)
    return None


def _check_output(original: bytes, core: bytes, init: bytes, *, must_reject: bool) -> str | None:
    try:
        validate_split(original, core, init)
    except ValidationError:
        return None
    except Exception:
        return "validate_split raised " + traceback.format_exc(limit=-3)
    return "accepted" if must_reject else None


def _rng(*parts: object) -> random.Random:
    # One generator per case: a failure reproduces alone, whatever ran before it.
    return random.Random(":".join(map(str, (SEED, *parts))))


def _report(failures: list[str], cases: int) -> str:
    return f"{len(failures)} of {cases} cases misbehaved:\n" + "\n".join(failures[:30])


@pytest.mark.parametrize("index", range(SAMPLES))
def test_damaged_module(samples: list[Sample], index: int) -> None:
    sample = samples[index]
    kinds = len(Mutator(sample.data, _rng()).kinds())
    failures = []
    for case in range(INPUT_MUTATIONS):
        mutator = Mutator(sample.data, _rng(sample.path.name, case))
        # Round robin over the kinds so every module gets every kind of damage.
        description, data = mutator.kinds()[case % kinds]()
        start = time.perf_counter()
        problem = _check_input(data)
        seconds = time.perf_counter() - start
        if problem is None and seconds > SLOW:
            problem = f"took {seconds:.1f} s"
        if problem is not None:
            failures.append(f"{sample.path.name} [{sample.outcome}] {description}: {problem}")
    assert not failures, _report(failures, INPUT_MUTATIONS)


def test_sample_mix(samples: list[Sample]) -> None:
    """The damaged inputs start from every outcome, and add up to over 1,000 cases."""
    outcomes = [s.outcome for s in samples]
    assert outcomes.count("split") == SPLIT_SAMPLES
    assert outcomes.count("nothing") == NOTHING_SAMPLES
    assert outcomes.count("refused") == REFUSED_SAMPLES
    assert len(samples) * INPUT_MUTATIONS >= 1000


def _split_samples(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if s.split is not None]


# I's .modinfo and __versions are synthesized strings that the kernel reads by
# meaning (key=value pairs, NUL-terminated names in fixed-size slots): the
# validator checks what they say, so a flipped byte in padding or in the
# description is a legitimate "same". They are damaged by meaning further down.
INIT_STRING_SECTIONS = frozenset({".modinfo", "__versions"})


@pytest.mark.parametrize("side", ["core", "init"])
@pytest.mark.parametrize("index", range(SPLIT_SAMPLES))
def test_validator_rejects_changed_output(samples: list[Sample], index: int, side: str) -> None:
    sample = _split_samples(samples)[index]
    split = sample.split
    assert split is not None
    validate_split(sample.data, split.core, split.init)  # the undamaged pair is fine
    target = split.core if side == "core" else split.init
    skip = INIT_STRING_SECTIONS if side == "init" else frozenset()
    kinds = len(MeaningMutator(target, _rng(), skip_sections=skip).kinds())
    failures, cases = [], 0
    for case in range(OUTPUT_MUTATIONS * kinds // 4):
        mutator = MeaningMutator(target, _rng(sample.path.name, side, case), skip_sections=skip)
        mutated = mutator.kinds()[case % kinds]()
        if mutated is None:
            continue
        description, data = mutated
        cases += 1
        pair = (data, split.init) if side == "core" else (split.core, data)
        problem = _check_output(sample.data, *pair, must_reject=True)
        if problem is not None:
            failures.append(f"{sample.path.name} {side}: {description}: {problem}")
    assert cases >= OUTPUT_MUTATIONS
    assert not failures, _report(failures, cases)


@pytest.mark.parametrize("side", ["core", "init"])
@pytest.mark.parametrize("index", range(FLAG_SAMPLES))
def test_validator_rejects_changed_section_flags(samples: list[Sample], index: int, side: str) -> None:
    sample = _split_samples(samples)[index]
    split = sample.split
    assert split is not None
    target = split.core if side == "core" else split.init
    failures, cases = [], 0
    for description, data in MeaningMutator(target, _rng()).section_flags():
        cases += 1
        pair = (data, split.init) if side == "core" else (split.core, data)
        problem = _check_output(sample.data, *pair, must_reject=True)
        if problem is not None:
            failures.append(f"{sample.path.name} {side}: {description}: {problem}")
    assert not failures, _report(failures, cases)


@pytest.mark.parametrize("side", ["core", "init"])
@pytest.mark.parametrize("index", range(SPLIT_SAMPLES))
def test_validator_survives_damaged_output(samples: list[Sample], index: int, side: str) -> None:
    """Arbitrary damage to an output: ValidationError or acceptance, nothing else."""
    sample = _split_samples(samples)[index]
    split = sample.split
    assert split is not None
    target = split.core if side == "core" else split.init
    kinds = len(Mutator(target, _rng()).kinds())
    failures = []
    for case in range(OUTPUT_MUTATIONS):
        description, data = Mutator(target, _rng(sample.path.name, side, "any", case)).kinds()[case % kinds]()
        pair = (data, split.init) if side == "core" else (split.core, data)
        problem = _check_output(sample.data, *pair, must_reject=False)
        if problem is not None:
            failures.append(f"{sample.path.name} {side}: {description}: {problem}")
    assert not failures, _report(failures, OUTPUT_MUTATIONS)


def _with_modinfo(init: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and init.count(old) == 1, (old, new)
    return init.replace(old, new)


def test_validator_checks_init_modinfo(samples: list[Sample]) -> None:
    """What I's .modinfo says matters to the kernel: its name, namespace import, vermagic."""
    sample = _split_samples(samples)[0]
    split = sample.split
    assert split is not None
    name = split.init_name.encode()
    for description, init in [
        ("name", _with_modinfo(split.init, b"name=" + name, b"name=" + name[:-1] + b"X")),
        ("import_ns", _with_modinfo(split.init, b"import_ns=INITSPLIT", b"import_ns=INITSPLIX")),
        ("vermagic", _with_modinfo(split.init, b"vermagic=6.1.", b"vermagic=6.2.")),
    ]:
        with pytest.raises(ValidationError):
            validate_split(sample.data, split.core, init)
            pytest.fail(f"I with a changed {description} in .modinfo was accepted")
