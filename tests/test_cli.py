"""The initsplit command line, in-process through main() and as `python3 -m initsplit`.

Runs on a small tree of real Debian modules: some that split, some with nothing
to split, some the splitter refuses.
"""

from __future__ import annotations

import os
import pty
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from initsplit.cache import MANIFEST_SUFFIX, BadEntry, CacheHit, read_entry

from initsplit import cli, tree
from initsplit.split import decide as decide_module
from initsplit.elf import read_elf
from initsplit.elf.discard import without_sections
from initsplit.split.modinfo import first, parse_modinfo
from initsplit.validate import ValidationError, validate_split
from tests.testbed.kernel import debian_kernel

REPO = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"  # Debian's, with python3-pyelftools

# relative path -> (expected outcome, init module file name if split)
MODULES = {
    "kernel/drivers/net/dummy.ko": ("split", "dummy__init.ko"),
    "kernel/drivers/atm/adummy.ko": ("split", "adummy__init.ko"),
    # A dash in the file name: the module (and so its init module) uses '_'.
    "kernel/sound/core/seq/snd-seq-dummy.ko": ("split", "snd_seq_dummy__init.ko"),
    "kernel/net/sched/em_u32.ko": ("split", "em_u32__init.ko"),
    "kernel/drivers/leds/trigger/ledtrig-default-on.ko": ("split", "ledtrig_default_on__init.ko"),
    "kernel/drivers/media/rc/keymaps/rc-pine64.ko": ("split", "rc_pine64__init.ko"),
    "kernel/lib/crc7.ko": ("nothing", None),
    "kernel/lib/crc16.ko": ("nothing", None),
    "kernel/drivers/pci/pci-stub.ko": ("refused", None),
    "kernel/drivers/platform/x86/intel/pmc/intel_pmc_core_pltdrv.ko": ("refused", None),
}
SUMMARY = re.compile(
    r"^split 6, plain by policy 0, nothing to split 2, refused 2, invalid 0, errors 0 in \d+\.\d s$", re.M)


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    modules_dir = debian_kernel().modules_dir
    root = tmp_path_factory.mktemp("modules")
    for relative in MODULES:
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(modules_dir / relative, target)
    return root


def _expected_files() -> set[str]:
    # Every module has BTF and none BTF ids (Discard=btf, the default): a split
    # module gets its C and I, every other one its original without the BTF.
    files = set()
    for relative, (outcome, init) in MODULES.items():
        files.add(relative)
        if outcome == "split":
            files.add(str(Path(relative).with_name(init)))
    return files


def _files(root: Path) -> set[str]:
    """The module files written (manifests are checked on their own)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and not p.name.endswith(MANIFEST_SUFFIX)}


def test_split_writes_a_manifest_per_decided_module(small_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli.main([*SPLIT, str(small_tree), "-o", str(out), "--quiet"]) == 0
    for relative, (outcome, _init) in MODULES.items():
        source = (small_tree / relative).read_bytes()
        hit = read_entry(out, Path(relative), source=source)
        assert isinstance(hit, CacheHit), (relative, hit)
        with hit:
            assert hit.manifest.decision == outcome, (relative, hit.manifest)
            assert (hit.init is not None) == (outcome == "split")
        # A manifest never vouches for another source.
        stale = read_entry(out, Path(relative), source=source + b"x")
        assert isinstance(stale, BadEntry) and "is stale" in stale.reason, stale


# The splitting tests make pairs wherever a module splits: the default policy
# (TwoStage=when-not-worse) weighs the init module's slab and loads every module of
# Debian 6.1 plain; test_split_by_default_writes_rewritten_originals checks that.
SPLIT = ("split", "--two-stage", "always")


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "daemon")}
    return subprocess.run([PYTHON, "-m", "initsplit", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300, **kwargs)


# ----------------------------------------------------------------- split

def test_split_by_default_writes_rewritten_originals(small_tree: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The default weighs the init module's slab: every module that splits loads plain,
    and what `initsplit split` writes for it is its original without the BTF."""
    out = tmp_path / "out"
    assert cli.main(["split", str(small_tree), "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert re.search(r"^split 0, plain by policy 6, nothing to split 2, refused 2, invalid 0, "
                     r"errors 0 in \d+\.\d s$", stdout, re.M), stdout
    assert _files(out) == set(MODULES)  # no init module anywhere
    for relative in MODULES:
        assert (out / relative).read_bytes() == without_sections(
            (small_tree / relative).read_bytes(), {".BTF"}), relative
        hit = read_entry(out, Path(relative), source=(small_tree / relative).read_bytes())
        assert isinstance(hit, CacheHit), hit
        with hit:
            if MODULES[relative][0] == "split":
                assert hit.manifest.decision == "plain", relative
                assert "two-stage would cost more than it frees" in hit.manifest.reason


def test_split_writes_pairs_for_split_modules_only(small_tree: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert cli.main([*SPLIT, str(small_tree), "-o", str(out)]) == 0
    stdout, stderr = capsys.readouterr()
    assert SUMMARY.search(stdout), stdout
    assert stderr == ""  # not a terminal: no progress line
    assert _files(out) == _expected_files()

    for relative, (outcome, init_file) in MODULES.items():
        if outcome != "split":
            rewritten = (out / relative).read_bytes()
            assert rewritten == without_sections((small_tree / relative).read_bytes(), {".BTF"})
            continue
        core_path = out / relative
        init_path = core_path.with_name(init_file)
        original = (small_tree / relative).read_bytes()
        validate_split(original, core_path.read_bytes(), init_path.read_bytes())
        assert core_path.stat().st_mode & 0o777 == 0o644
        info = parse_modinfo(read_elf(init_path.read_bytes()).section(".modinfo").data)
        assert first(info, "name") == init_file.removesuffix(".ko")


def test_split_is_deterministic_across_worker_counts(small_tree: Path, tmp_path: Path) -> None:
    outputs = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"out{jobs}"
        assert cli.main([*SPLIT, str(small_tree), "-o", str(out), "-j", jobs, "--quiet"]) == 0
        outputs[jobs] = {f: (out / f).read_bytes() for f in _files(out)}
    assert outputs["1"] == outputs["2"]
    assert set(outputs["1"]) == _expected_files()


def test_list_refused_and_quiet(small_tree: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main([*SPLIT, str(small_tree), "-o", str(tmp_path / "out"), "--quiet",
                     "--list-refused"])
    assert code == 0
    stdout, stderr = capsys.readouterr()
    assert stderr == ""
    lines = stdout.splitlines()
    assert len(lines) == 2, stdout  # no summary with --quiet, one line per reason
    assert {tuple(line.split(None, 1)) for line in lines} == {
        ("1", ".rodata points into init"),
        ("1", ".altinstr_replacement points into init"),
    }


def test_split_single_files(small_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    files = [small_tree / "kernel/drivers/net/dummy.ko", small_tree / "kernel/lib/crc7.ko"]
    assert cli.main([*SPLIT, *map(str, files), "-o", str(out), "-q"]) == 0
    assert _files(out) == {"dummy.ko", "dummy__init.ko", "crc7.ko"}
    # Without discard classes a module loaded plain is loaded as it is: nothing written.
    out = tmp_path / "kept"
    assert cli.main([*SPLIT, *map(str, files), "-o", str(out), "-q", "--discard", ""]) == 0
    assert _files(out) == {"dummy.ko", "dummy__init.ko"}
    entry = read_entry(out, Path("crc7.ko"), source=files[1].read_bytes())
    assert isinstance(entry, CacheHit) and entry.core is None and entry.manifest.discarded == ""


def test_split_removes_stale_outputs(small_tree: Path, tmp_path: Path) -> None:
    """A module that is no longer split must not leave an old core for the caller to load."""
    out = tmp_path / "out"
    stale = [out / "kernel/lib/crc7.ko", out / "kernel/lib/crc7__init.ko",
             out / "kernel/drivers/pci/pci-stub.ko", out / "kernel/drivers/pci/pci_stub__init.ko"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"stale")
    assert cli.main([*SPLIT, str(small_tree), "-o", str(out), "-q"]) == 0
    assert _files(out) == _expected_files()
    assert all(path.read_bytes() != b"stale" for path in stale if path.exists())


def test_split_reports_broken_module_and_goes_on(small_tree: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    shutil.copytree(small_tree, src)
    (src / "kernel/broken.ko").write_bytes(b"\x7fELF" + bytes(100))
    (src / "kernel/short.ko").write_bytes((src / "kernel/drivers/net/dummy.ko").read_bytes()[:5000])
    out = tmp_path / "out"
    assert cli.main([*SPLIT, str(src), "-o", str(out)]) == 1
    stdout, stderr = capsys.readouterr()
    assert "errors 2 in" in stdout and stdout.startswith("split 6, plain by policy 0, nothing to split 2, refused 2,")
    assert re.search(r"^initsplit: error: kernel/broken\.ko: malformed ELF: ", stderr, re.M), stderr
    assert re.search(r"^initsplit: error: kernel/short\.ko: malformed ELF: ", stderr, re.M), stderr
    assert _files(out) == _expected_files()


def test_split_invalid_module_writes_nothing(small_tree: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A split the validator rejects is reported and not written.

    No real module fails validation (that is the point of the corpus test), so the
    validator is made to reject dummy; -j 1 keeps the run in this process.
    """
    real = decide_module.validate_split

    def reject_dummy(original: bytes, core: bytes, init: bytes, *rules, **parsed):
        if b"name=dummy\0" in original:
            raise ValidationError("rejected for the test")
        return real(original, core, init, *rules, **parsed)

    monkeypatch.setattr(decide_module, "validate_split", reject_dummy)
    out = tmp_path / "out"
    assert cli.main([*SPLIT, str(small_tree), "-o", str(out), "-j", "1"]) == 1
    stdout, stderr = capsys.readouterr()
    assert "split 5, plain by policy 0, nothing to split 2, refused 2, invalid 1, errors 0" in stdout
    assert "initsplit: invalid: kernel/drivers/net/dummy.ko: rejected for the test" in stderr
    assert _files(out) == _expected_files() - {"kernel/drivers/net/dummy.ko",
                                                "kernel/drivers/net/dummy__init.ko"}


def test_split_usage_errors(small_tree: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    assert cli.main([*SPLIT, str(tmp_path / "missing"), "-o", out]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert cli.main([*SPLIT, str(small_tree)]) == 2  # no -o
    assert cli.main([*SPLIT, str(small_tree), "-o", out, "-j", "0"]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert cli.main([]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main([*SPLIT, str(empty), "-o", out]) == 2
    not_ko = tmp_path / "module.bin"
    not_ko.write_bytes(b"")
    assert cli.main([*SPLIT, str(not_ko), "-o", out]) == 2
    capsys.readouterr()
    assert not (tmp_path / "out").exists()


def test_split_refuses_to_overwrite_its_input(small_tree: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    shutil.copytree(small_tree, src)
    before = {f: (src / f).read_bytes() for f in _files(src)}
    assert cli.main([*SPLIT, str(src), "-o", str(src)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert {f: (src / f).read_bytes() for f in _files(src)} == before


def test_split_output_inside_input_is_not_read_back(small_tree: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    shutil.copytree(small_tree, src)
    for _ in range(2):  # the second run must not pick up the first run's outputs
        assert cli.main([*SPLIT, str(src), "-o", str(src / "out")]) == 0
        assert SUMMARY.search(capsys.readouterr().out)
    assert _files(src / "out") == _expected_files()


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for code in ("0", "1", "2"):
        assert re.search(rf"^  {code}  ", text, re.M), text
    for code in ("0  ", "1  ", "2  "):
        assert code in cli.__doc__


# ----------------------------------------------------------------- check

def test_check_decisions(small_tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", str(small_tree / "kernel/drivers/net/dummy.ko")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert re.fullmatch(r"split: dummy -> dummy \+ dummy__init \(anchors \d+, init bytes \d+\)",
                        lines[0]), lines
    assert re.fullmatch(r"validation: ok \(\d+ allocated bytes, \d+ relocations, .*\)", lines[1]), lines
    # The default weighs the init module's slab: dummy loads plain.
    assert lines[2:] == ["core layout: 4 pages two-stage, 4 plain",
                         "slab of the init module: 5288 bytes",
                         "load: plain: two-stage would cost more than it frees "
                         "(TwoStage=when-not-worse): core layout 4 pages two-stage, 4 plain, "
                         "and 5288 bytes of slab for the init module"], lines
    assert cli.main(["check", "--two-stage", "always",
                     str(small_tree / "kernel/drivers/net/dummy.ko")]) == 0
    assert capsys.readouterr().out.splitlines()[4] == "load: two-stage (TwoStage=always)"

    assert cli.main(["check", str(small_tree / "kernel/lib/crc7.ko")]) == 0
    assert capsys.readouterr().out == "nothing to split\n"

    assert cli.main(["check", str(small_tree / "kernel/drivers/pci/pci-stub.ko")]) == 0
    assert capsys.readouterr().out == "refused: .rodata points into init (.init.data)\n"


def test_check_validation_failure(small_tree: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """No real module fails validation, so the validator is made to reject this one."""
    def reject(original: bytes, core: bytes, init: bytes, *rules, **parsed):
        raise ValidationError("rejected for the test")

    monkeypatch.setattr(decide_module, "validate_split", reject)
    assert cli.main(["check", str(small_tree / "kernel/drivers/net/dummy.ko")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("split: dummy -> dummy + dummy__init (")
    assert lines[1] == "validation: FAILED: rejected for the test"


def test_check_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "text.ko"
    text.write_text("not a module\n")
    assert cli.main(["check", str(text)]) == 2
    assert "not an ELF kernel module" in capsys.readouterr().err
    assert cli.main(["check", str(tmp_path / "missing.ko")]) == 2
    assert "No such file or directory" in capsys.readouterr().err
    assert cli.main(["check"]) == 2


# ------------------------------------------------------------ subprocess

def test_python_m_initsplit_split(small_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _run(*SPLIT, str(small_tree), "-o", str(out), "--list-refused")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert SUMMARY.search(result.stdout), result.stdout
    assert ".rodata points into init" in result.stdout
    assert _files(out) == _expected_files()


def test_python_m_initsplit_check(small_tree: Path, tmp_path: Path) -> None:
    result = _run("check", str(small_tree / "kernel/sound/core/seq/snd-seq-dummy.ko"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("split: snd_seq_dummy -> snd_seq_dummy + snd_seq_dummy__init (")
    assert "\nvalidation: ok (" in result.stdout
    result = _run("check", str(small_tree / "kernel/lib/crc16.ko"))
    assert (result.returncode, result.stdout) == (0, "nothing to split\n")
    result = _run("check", str(small_tree / "kernel/drivers/platform/x86/intel/pmc/intel_pmc_core_pltdrv.ko"))
    assert (result.returncode, result.stdout) == (
        0, "refused: .altinstr_replacement points into init (.init.text)\n")
    not_elf = tmp_path / "not-elf.ko"
    not_elf.write_bytes(b"\0" * 4096)
    result = _run("check", str(not_elf))
    assert result.returncode == 2
    assert "not an ELF kernel module" in result.stderr
    result = _run("split")
    assert result.returncode == 2 and "usage:" in result.stderr


def test_progress_line_on_a_terminal(small_tree: Path, tmp_path: Path) -> None:
    """With stderr on a terminal, one line is redrawn in place and erased at the end."""
    master, slave = pty.openpty()
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO / "daemon")}
        process = subprocess.Popen(
            [PYTHON, "-m", "initsplit", *SPLIT, str(small_tree), "-o", str(tmp_path / "out")],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        stdout, _ = process.communicate(timeout=300)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert process.returncode == 0
    assert SUMMARY.search(stdout)
    assert b"\n" not in seen  # one line, redrawn with \r, never scrolled
    assert b"10/10 modules" in seen, seen
    assert seen.endswith(b"\r\x1b[K"), seen


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_split_stops_when_the_output_cannot_be_written(small_tree: Path, tmp_path: Path, jobs: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """An output that cannot be written (here a file where the entries' directory
    goes; a full disk alike) is the run's problem, not each module's: the split
    stops with exit 2 and one message (tree.OutputError), where it went on and
    exited 1, which the kernel hook takes as a good cache to install."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "kernel").write_text("in the way\n")
    assert cli.main(["split", str(small_tree), "-o", str(out), "-q", "-j", jobs]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("cannot write the entry of kernel/") == 1, err
    assert "error:" not in err, err  # no module reported as one of its own errors
    assert sorted(p.name for p in out.iterdir()) == ["kernel"], sorted(out.iterdir())


def _worker_dies(job: tree.ModuleJob, *args: object, **kwargs: object) -> tree.ModuleResult:
    os._exit(9)  # as the OOM killer would end it: no exception, no result


def test_split_stops_when_a_worker_process_dies(small_tree: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A worker that dies breaks the process pool (BrokenProcessPool): the split stops
    with exit 2, where every module left became an error and the split exited 1."""
    monkeypatch.setattr(tree, "split_one", _worker_dies)
    assert cli.main(["split", str(small_tree), "-o", str(tmp_path / "out"), "-q", "-j", "2"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "a worker process died" in err and err.count("initsplit:") == 1, err
