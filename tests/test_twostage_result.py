"""How load_two_stage() reads finit_module(I)'s result (the kernel side is in test_loader_vm.py).

The syscalls are replaced by a recorder that answers as the 6.1 kernel does for
each case; nothing here needs root or a VM.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from initsplit.loader import twostage
from initsplit.loader.twostage import SplitPair, load_two_stage
from initsplit.split.initresult import encode

class FakeFile:
    """An open, checked split module (fsio.OpenFile) as the loader uses it."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd, self.name = fd, name

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None: ...


CORE, INIT = FakeFile(101, "/c.ko"), FakeFile(102, "/i.ko")
PAIR = SplitPair("isplit_initfail", "isplit_initfail__init", CORE, INIT)
ORIGINAL = Path("/orig.ko")
FILES = {CORE.fd: CORE.name, INIT.fd: INIT.name}


class Kernel:
    def __init__(self, init_answer: int | OSError, plain_answer: int | OSError = 0) -> None:
        self.answers = {CORE.name: 0, INIT.name: init_answer, str(ORIGINAL): plain_answer}
        self.calls: list[tuple[str, str]] = []

    def finit_module(self, target: int | Path, params: str = "") -> int:
        """A split's descriptor (finit_module) or an original's path (finit_module_path)."""
        file = FILES[target] if isinstance(target, int) else str(target)
        self.calls.append(("finit", file))
        answer = self.answers[file]
        if isinstance(answer, OSError):
            raise answer
        return answer

    def delete_module(self, name: str) -> None:
        self.calls.append(("delete", name))


@pytest.fixture
def kernel_for(monkeypatch: pytest.MonkeyPatch):
    def install(kernel: Kernel) -> Kernel:
        monkeypatch.setattr(twostage, "finit_module", kernel.finit_module)
        monkeypatch.setattr(twostage, "finit_module_path", kernel.finit_module)
        monkeypatch.setattr(twostage, "delete_module", kernel.delete_module)
        monkeypatch.setattr(twostage, "_sizes", lambda: {})
        # The fake kernel places C where the layout model says (kernel_state.placement_problem).
        monkeypatch.setattr(twostage, "placement_problem", lambda name, expected, **_: None)
        return kernel
    return install


def test_init_that_ran_and_failed_is_reported_and_not_retried(kernel_for) -> None:
    kernel = kernel_for(Kernel(encode(-errno.ENODEV)))
    load = load_two_stage(PAIR, original=ORIGINAL)
    assert (load.mode, load.errno) == ("failed", errno.ENODEV)
    assert load.reason == "could not insert 'isplit_initfail': No such device"
    assert kernel.calls == [("finit", "/c.ko"), ("finit", "/i.ko"), ("delete", "isplit_initfail")]


@pytest.mark.parametrize("refusal", [errno.EINVAL, errno.ENOENT, errno.ENOEXEC, errno.EEXIST,
                                     errno.ENOMEM, errno.EPERM])
def test_refusal_before_init_falls_back_to_plain(kernel_for, refusal: int) -> None:
    kernel = kernel_for(Kernel(OSError(refusal, "refused")))
    load = load_two_stage(PAIR, original=ORIGINAL)
    assert load.mode == "plain", load
    assert kernel.calls == [("finit", "/c.ko"), ("finit", "/i.ko"), ("delete", "isplit_initfail"),
                            ("finit", "/orig.ko")]


def test_successful_init_is_two_stage(kernel_for) -> None:
    kernel = kernel_for(Kernel(0))
    assert load_two_stage(PAIR, original=ORIGINAL).mode == "two-stage"
    assert kernel.calls == [("finit", "/c.ko"), ("finit", "/i.ko")]


# ----------------------------------------------- loads without the module's BTF

REWRITTEN = FakeFile(103, "/rewritten.ko")
FILES[REWRITTEN.fd] = REWRITTEN.name


@pytest.mark.parametrize("failure", [errno.ENODEV, errno.ENXIO, errno.EINVAL, errno.ENOMEM])
def test_an_init_that_failed_without_its_btf_runs_once(kernel_for, failure: int) -> None:
    # A missing BTF cannot make an init fail (REWRITE_REFUSED_ERRNOS): the init's
    # failure is the module's, reported as modprobe reports it, as with its BTF.
    kernel = kernel_for(Kernel(encode(-failure)))
    pair = SplitPair(PAIR.name, PAIR.init_name, CORE, INIT, btf_bytes=18952)
    load = load_two_stage(pair, original=ORIGINAL)
    assert (load.mode, load.errno) == ("failed", failure), load
    assert kernel.calls == [("finit", "/c.ko"), ("finit", "/i.ko"), ("delete", "isplit_initfail")]


def test_a_two_stage_load_without_btf_says_what_it_gave_back(kernel_for) -> None:
    kernel_for(Kernel(0))
    pair = SplitPair(PAIR.name, PAIR.init_name, CORE, INIT, btf_bytes=18952)
    load = load_two_stage(pair, original=ORIGINAL)
    assert load.mode == "two-stage" and load.btf_bytes == 18952, load


def test_rewritten_original_loads_plain(kernel_for) -> None:
    kernel = kernel_for(Kernel(0))
    kernel.answers[REWRITTEN.name] = 0
    load = twostage.load_rewritten("isplit_initfail", REWRITTEN, original=ORIGINAL,
                                   reason="nothing to split", btf_bytes=1160)
    assert (load.mode, load.reason, load.btf_bytes) == ("plain", "nothing to split", 1160)
    assert kernel.calls == [("finit", "/rewritten.ko")]


@pytest.mark.parametrize("failure", [errno.ENODEV, errno.ENXIO, errno.ENOMEM, errno.ENOENT, errno.EINVAL])
def test_rewritten_original_whose_init_fails_runs_it_once(kernel_for, failure: int) -> None:
    kernel = kernel_for(Kernel(0))
    kernel.answers[REWRITTEN.name] = OSError(failure, "failed")
    load = twostage.load_rewritten("isplit_initfail", REWRITTEN, original=ORIGINAL,
                                   reason="nothing to split")
    assert (load.mode, load.errno) == ("failed", failure), load
    assert load.reason == f"nothing to split; could not insert 'isplit_initfail': {os.strerror(failure)}"
    assert kernel.calls == [("finit", "/rewritten.ko")]


@pytest.mark.parametrize("refusal", sorted(twostage.REWRITE_REFUSED_ERRNOS))
def test_rewritten_original_the_kernel_refuses_is_loaded_as_the_original(kernel_for, refusal: int) -> None:
    # A kernel that insists on signatures, say: the original goes in, with its BTF.
    kernel = kernel_for(Kernel(0))
    kernel.answers[REWRITTEN.name] = OSError(refusal, "refused")
    load = twostage.load_rewritten("isplit_initfail", REWRITTEN, original=ORIGINAL,
                                   reason="nothing to split", btf_bytes=1160)
    assert load.mode == "plain" and load.btf_bytes is None, load
    assert load.reason == f"nothing to split; without what Discard= drops: {os.strerror(refusal)}; loaded with it"
    assert kernel.calls == [("finit", "/rewritten.ko"), ("finit", "/orig.ko")]


def test_rewritten_original_loaded_by_someone_else(kernel_for) -> None:
    kernel = kernel_for(Kernel(0))
    kernel.answers[REWRITTEN.name] = OSError(errno.EEXIST, "exists")
    load = twostage.load_rewritten("isplit_initfail", REWRITTEN, original=ORIGINAL)
    assert load.mode == "already-loaded" and kernel.calls == [("finit", "/rewritten.ko")]


# ------------------------------------------- C where the layout model put it

def _fake_sections(root: Path, name: str, addresses: dict[str, int]) -> Path:
    sections = root / "module" / name / "sections"
    sections.mkdir(parents=True)
    for section, address in addresses.items():
        (sections / section).write_text(f"{address:#018x}\n")
    return root


def test_placement_is_checked_against_the_kernels_section_addresses(tmp_path: Path) -> None:
    from initsplit.loader.kernel_state import placement_problem

    base = 0xFFFFFFFFC0A01040
    sys_root = _fake_sections(tmp_path, "dummy", {".gnu.linkonce.this_module": base,
                                                  ".text": base - 8448, ".bss": base + 896})
    assert placement_problem("dummy", ((".text", -8448), (".bss", 896)), sys_root=sys_root) is None
    assert placement_problem("dummy", ((".text", -8448), (".bss", 900)), sys_root=sys_root) == \
        "C's .bss is at +0x380 from its struct module, not at +0x384 as the layout model has it"
    assert placement_problem("dummy", ((".data", 0),), sys_root=sys_root) == \
        "the kernel does not list C's .data"
    assert placement_problem("dummy", (), sys_root=sys_root) == \
        "no placement of C to check I's offsets against"
    # A reader the kernel shows no addresses to (module_sect_read() prints 0).
    hidden = _fake_sections(tmp_path / "hidden", "dummy", {".gnu.linkonce.this_module": 0, ".text": 0})
    assert "does not show C's section addresses" in placement_problem(
        "dummy", ((".text", -8448),), sys_root=hidden)


def test_612_placement_is_checked_from_each_memorys_anchor(tmp_path: Path) -> None:
    """6.12: one allocation per struct module_memory type, each section's offset
    from the anchor section of its memory (SplitModule.reached_from)."""
    from initsplit.loader.kernel_state import placement_problem

    data, text, rodata = 0xFFFFFFFFC0A05000, 0xFFFFFFFFC0A01000, 0xFFFFFFFFC0A07000
    sys_root = _fake_sections(tmp_path, "dummy", {
        ".gnu.linkonce.this_module": data, ".data": data - 256, ".text": text, ".exit.text": text + 704,
        "__mcount_loc": rodata, ".rodata.str1.1": rodata + 56})
    good = ((".data", ".gnu.linkonce.this_module", -256), (".exit.text", ".text", 704),
            (".gnu.linkonce.this_module", ".gnu.linkonce.this_module", 0),
            (".rodata.str1.1", "__mcount_loc", 56), (".text", ".text", 0), ("__mcount_loc", "__mcount_loc", 0))
    assert placement_problem("dummy", (), from_anchors=good, sys_root=sys_root) is None
    # An offset taken from the struct module (6.1's one allocation) is wrong here.
    assert placement_problem("dummy", (), from_anchors=((".exit.text", ".gnu.linkonce.this_module",
                                                         704),), sys_root=sys_root) == \
        (f"C's .exit.text is at {text + 704 - data:+#x} from its memory's anchor .gnu.linkonce.this_module, "
         "not at +0x2c0 as the layout model has it")
    assert placement_problem("dummy", (), from_anchors=((".rodata", "__ksymtab", 0),), sys_root=sys_root) == \
        "the kernel does not list C's __ksymtab"
    hidden = _fake_sections(tmp_path / "hidden", "dummy", {".gnu.linkonce.this_module": 0, ".text": 0})
    assert "does not show C's section addresses" in placement_problem(
        "dummy", (), from_anchors=good, sys_root=hidden)


def test_c_placed_otherwise_costs_a_plain_load_before_i_is_loaded(
        kernel_for, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = kernel_for(Kernel(0))
    monkeypatch.setattr(twostage, "placement_problem",
                        lambda name, expected, **_: "C's .text is at -0x2100, not at -0x2000")
    load = load_two_stage(PAIR, original=ORIGINAL)
    assert load.mode == "plain", load
    assert load.reason == "init module not loaded: C's .text is at -0x2100, not at -0x2000"
    # C went in, I never did: C was deleted and the original loaded plain.
    assert kernel.calls == [("finit", "/c.ko"), ("delete", "isplit_initfail"), ("finit", "/orig.ko")]
