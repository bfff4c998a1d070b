"""The whole Debian module tree through initsplit.tree: every module accounted for.

Each module must be split and validated, have nothing to split, or be refused
with a reason; no module may fail validation or raise. The counts must stay in
a plausible range, so a splitter that starts refusing everything fails too.
Run with -s to see the counts and the refusal reasons.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from initsplit.cache import MANIFEST_SUFFIX

from initsplit.elf import read_elf
from initsplit.elf.discard import without_sections
from initsplit.split.modinfo import parse_modinfo
from initsplit.split.splitter import NAMESPACE
from initsplit.split.policy import SplitOptions
from initsplit.tree import count_outcomes, refusal_reasons, split_tree, summary_line
from tests.testbed.kernel import debian_kernel

pytestmark = pytest.mark.corpus

# Debian 6.1.0-56-amd64: 4023 modules, 3522 split, 465 with nothing to split, 36 refused.
MIN_MODULES = 3900
MIN_SPLIT = 3400
MAX_REFUSED = 100

# Modules whose written files are inspected: (relative path, module name).
SPOT_CHECKS = [
    ("kernel/drivers/net/dummy.ko", "dummy"),
    ("kernel/sound/core/seq/snd-seq-dummy.ko", "snd_seq_dummy"),
    ("kernel/fs/ext4/ext4.ko", "ext4"),
    ("kernel/drivers/gpu/drm/i915/i915.ko", None),  # refused: nothing written
]


def test_whole_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    modules_dir = debian_kernel().modules_dir
    out = tmp_path / "out"
    start = time.monotonic()
    # Every module that splits, split and validated (TwoStage=always): the default
    # would load them all plain on 6.1, which is checked below from the same figures.
    results = split_tree([modules_dir], out, options=SplitOptions(two_stage="always"))
    seconds = time.monotonic() - start
    counts = count_outcomes(results)

    with capsys.disabled():
        print(f"\n{modules_dir}: {summary_line(results, seconds)}")
        for reason, count in refusal_reasons(results):
            print(f"  refused {count:3d}  {reason}")
        for reason, count in refusal_reasons(results, "plain"):
            print(f"  plain   {count:3d}  {reason}")

    problems = [f"{r.outcome}: {r.path}: {r.reason}" for r in results if not r.ok]
    assert not problems, "\n".join(problems[:50])
    assert len(results) >= MIN_MODULES
    assert counts["split"] > MIN_SPLIT
    assert counts["refused"] < MAX_REFUSED

    # Never worse than plain (split/decide.py, the default TwoStage=when-not-worse):
    # on 6.1 no module's two-stage load frees more core pages than its init
    # module's slab takes (layout/twostage_slab.py), so the default loads every one
    # plain; a few would even keep more core pages (their anchor crosses a page).
    two_stage = [r for r in results if r.outcome == "split"]
    assert all(r.twostage_slab_bytes > 4096 for r in two_stage)
    pays = [f"{r.path}: {r.plain_core_pages - r.split_core_pages} pages, {r.twostage_slab_bytes} bytes"
            for r in two_stage
            if (r.plain_core_pages - r.split_core_pages) * 4096 >= r.twostage_slab_bytes]
    assert not pays, "\n".join(pays[:50])
    by_pages = [r for r in two_stage if r.split_core_pages > r.plain_core_pages]
    assert by_pages
    # Hardening: no module with .data..ro_after_init is loaded two-stage.
    sealed = [r for r in results if r.outcome == "plain" and "ro_after_init" in r.reason]
    assert len(sealed) >= 20, len(sealed)
    saved = sum(r.plain_core_pages - r.split_core_pages for r in two_stage)
    # Discard=btf: every module loses its BTF but those with BTF ids (they register
    # kfuncs): in 6.1.0-57 nf_conntrack, nf_nat, tcp_bbr and tcp_dctcp.
    kept_btf = sorted(r.path.name for r in results if "btf" not in r.discarded)
    assert kept_btf == ["nf_conntrack.ko", "nf_nat.ko", "tcp_bbr.ko", "tcp_dctcp.ko"], kept_btf
    assert all(r.btf_bytes > 0 for r in results if r.discarded)
    btf_bytes = sum(r.btf_bytes for r in results)
    with capsys.disabled():
        print(f"  two-stage {len(two_stage)} modules: {saved} core pages fewer than plain, "
              f"{len(by_pages)} need more, {sum(r.twostage_slab_bytes for r in two_stage):,} bytes of "
              f"slab, none worth it; plain for .data..ro_after_init {len(sealed)}; "
              f"BTF dropped from {len(results) - len(kept_btf)} modules ({btf_bytes:,} bytes the "
              f"kernel would keep), kept by {len(kept_btf)}")
    for result in results:
        if result.outcome == "refused":
            assert result.reason.strip(), result
        if result.outcome == "split":
            assert result.core_size > 0 and result.init_size > 0, result

    by_path = {str(r.path): r for r in results}
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    expected = {str(r.path) for r in results if r.outcome == "split" or r.rewritten}
    expected |= {str(r.init_path) for r in results if r.outcome == "split"}
    # A manifest for every decided module (the daemon's cache reads them).
    expected |= {f"{r.path}{MANIFEST_SUFFIX}" for r in results
                 if r.outcome in ("split", "plain", "nothing", "refused")}
    assert written == expected  # no module files for unsplit modules, no temp files left

    for relative, name in SPOT_CHECKS:
        result = by_path[relative]
        core = out / relative
        if name is None:
            # Loaded plain, as the original without its BTF.
            assert result.outcome == "refused" and result.rewritten, result
            assert core.read_bytes() == without_sections((modules_dir / relative).read_bytes(), {".BTF"})
            continue
        assert result.outcome == "split", result
        init = core.with_name(f"{name}__init.ko")
        assert result.init_path == init.relative_to(out)
        assert core.stat().st_size == result.core_size
        assert init.stat().st_size == result.init_size
        core_info = parse_modinfo(read_elf(core.read_bytes()).section(".modinfo").data)
        init_info = parse_modinfo(read_elf(init.read_bytes()).section(".modinfo").data)
        assert ("name", name) in core_info
        assert ("name", f"{name}__init") in init_info
        assert ("import_ns", NAMESPACE) in init_info

    # 400 MB of outputs: do not leave them to pytest's tmp retention.
    shutil.rmtree(out)
