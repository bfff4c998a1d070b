"""initsplitd's configuration: files, drop-ins, bad lines, kernel command line."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

import pytest

from initsplit.layout import LayoutRules
from initsplit.daemon.config import (
    COMMAND_LINE,
    Config,
    ConfigError,
    config_files,
    kernel_command_line_overrides,
    load_config,
    parse_timespan,
    split_kernel_command_line,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "conf" / "initsplitd.conf"

MAIN = "etc/initsplit/initsplitd.conf"
ETC = "etc/initsplit/initsplitd.conf.d"
RUN = "run/initsplit/initsplitd.conf.d"
USR = "usr/lib/initsplit/initsplitd.conf.d"


def write(root: Path, relative: str, text: str | bytes) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def load(root: Path) -> tuple[Config, list[ConfigError]]:
    return load_config(root=root)


# --- defaults and the shipped file ---


def test_defaults_without_any_file(tmp_path: Path) -> None:
    config, errors = load(tmp_path)
    assert errors == []
    assert config == Config()
    assert config.enabled is True
    assert config.quiet_period_sec == 2.0
    assert config.batch_size == 32
    assert config.workers == 2
    assert config.exit_after_quiet_sec == 30.0
    assert config.exclude == ()
    assert config.cache_dir == Path("/usr/lib/initsplit/cache")
    assert config.runtime_dir == Path("/run/initsplit")
    assert config.log_level == 6 and config.log_level_name == "info"


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().workers = 3  # type: ignore[misc]


def test_shipped_file_is_all_defaults_commented_out() -> None:
    config, errors = load_config(paths=[SHIPPED])
    assert errors == [] and config == Config()


def test_shipped_file_documents_the_real_defaults(tmp_path: Path) -> None:
    # Uncommenting every "#Key=value" line must change nothing: the documented
    # defaults are the code's defaults, and every documented key exists.
    text = SHIPPED.read_text()
    uncommented = re.sub(r"(?m)^#([A-Za-z]+=)", r"\1", text)
    keys = re.findall(r"(?m)^([A-Za-z]+)=", uncommented)
    assert sorted(keys) == sorted(
        ["QuietPeriodSec", "BatchSize", "Workers", "ExitAfterQuietSec", "Exclude", "CacheDir",
         "RuntimeDir", "LogLevel", "LoadTimeoutSec", "InstallCommandTimeoutSec", "TwoStage",
         "WritableRoAfterInit", "Discard", "KeepBTF", "Sign", "SignKey", "SignCert"]
    )
    path = write(tmp_path, "initsplitd.conf", uncommented)
    config, errors = load_config(paths=[path])
    assert errors == [] and config == Config()


def test_two_stage_policy_and_ro_after_init(tmp_path: Path) -> None:
    path = write(tmp_path, "initsplitd.conf", "[Daemon]\nTwoStage=always\nWritableRoAfterInit=yes\n")
    config, errors = load_config(paths=[path])
    assert errors == [] and (config.two_stage, config.writable_ro_after_init) == ("always", True)
    options = config.split_options(LayoutRules(kernel="6.1.0-57-amd64"))
    assert options.two_stage == "always" and options.writable_ro_after_init
    assert options.rules.kernel == "6.1.0-57-amd64"
    assert options.tag == "two-stage=always writable-ro-after-init=yes"
    # A bad value keeps what was there, and says so; an empty one resets.
    path = write(tmp_path, "initsplitd.conf",
                 "[Daemon]\nTwoStage=when-it-saves\nTwoStage=sometimes\nWritableRoAfterInit=maybe\n")
    config, errors = load_config(paths=[path])
    assert config.two_stage == "when-it-saves" and not config.writable_ro_after_init
    assert [e.line for e in errors] == [3, 4], errors
    assert "not one of when-not-worse, when-it-saves, always" in errors[0].message
    path = write(tmp_path, "initsplitd.conf", "[Daemon]\nTwoStage=always\nTwoStage=\n")
    assert load_config(paths=[path])[0].two_stage == "when-not-worse"


def test_discard_classes_and_modules_that_keep_their_btf(tmp_path: Path) -> None:
    assert Config().discard == ("btf",)  # on by default
    path = write(tmp_path, "initsplitd.conf", "[Daemon]\nKeepBTF=nf_tables\nKeepBTF=bridge xfs\n")
    config, errors = load_config(paths=[path])
    assert errors == [] and config.keep_btf == ("nf_tables", "bridge", "xfs")
    options = config.split_options(LayoutRules())
    assert options.drops("btf", "ext4") and not options.drops("btf", "nf_tables")
    assert options.accepts("btf", "ext4") and not options.accepts("btf", "nf_tables")
    assert options.accepts("", "nf_tables")
    # An empty Discard= drops nothing; an unknown class is an error that keeps the value.
    path = write(tmp_path, "initsplitd.conf", "[Daemon]\nDiscard=\nDiscard=kallsyms\n")
    config, errors = load_config(paths=[path])
    assert config.discard == () and "unknown class 'kallsyms'" in errors[0].message
    assert not config.split_options(LayoutRules()).drops("btf", "ext4")
    # initsplit.btf=keep on the kernel command line keeps every module's BTF.
    overrides, errors = kernel_command_line_overrides("quiet initsplit.btf=keep")
    assert errors == [] and overrides.keep_btf
    assert overrides.apply(Config()).discard == ()
    _, errors = kernel_command_line_overrides("initsplit.btf=maybe")
    assert "must be keep or discard" in errors[0].message


def test_signing_section(tmp_path: Path) -> None:
    """[Signing] is read beside [Daemon] (the cache builders use it, signing.configured_key())."""
    assert (Config().sign, Config().sign_key, Config().sign_cert) == ("auto", None, None)
    path = write(tmp_path, "initsplitd.conf",
                 "[Daemon]\nWorkers=3\n[Signing]\nSign=yes\nSignKey=/root/mok.key\n"
                 "SignCert=/root/mok.pub\nWorkers=4\n")
    config, errors = load_config(paths=[path])
    assert (config.sign, config.sign_key, config.sign_cert) == ("yes", Path("/root/mok.key"),
                                                                Path("/root/mok.pub"))
    # Keys belong to their section: Workers= under [Signing] is unknown there.
    assert config.workers == 3
    assert [(e.line, e.message) for e in errors] == [(7, "unknown key 'Workers' in [Signing], ignoring")]
    # Booleans spell yes/no; auto resets; bad values and relative paths keep the value.
    path = write(tmp_path, "initsplitd.conf",
                 "[Signing]\nSign=off\nSignKey=/k\nSignKey=k\nSignCert=/c/\nSign=maybe\n")
    config, errors = load_config(paths=[path])
    assert (config.sign, config.sign_key, config.sign_cert) == ("no", Path("/k"), None)
    assert [e.line for e in errors] == [4, 5, 6], errors
    assert "not an absolute path" in errors[0].message and "names a directory" in errors[1].message
    assert "not auto or a boolean" in errors[2].message
    path = write(tmp_path, "initsplitd.conf", "[Signing]\nSign=no\nSignKey=/k\nSign=auto\nSignKey=\n")
    config, errors = load_config(paths=[path])
    assert errors == [] and (config.sign, config.sign_key) == ("auto", None)


# --- main file and drop-ins ---


def test_main_file_then_dropins_sorted_by_name_across_directories(tmp_path: Path) -> None:
    write(tmp_path, MAIN, "[Daemon]\nQuietPeriodSec=5\nWorkers=3\nBatchSize=4\n")
    write(tmp_path, f"{USR}/10-vendor.conf", "[Daemon]\nBatchSize=8\nWorkers=5\n")
    write(tmp_path, f"{ETC}/20-admin.conf", "[Daemon]\nWorkers=6\n")
    write(tmp_path, f"{RUN}/30-runtime.conf", "[Daemon]\nBatchSize=16\n")
    files, errors = config_files(root=tmp_path)
    assert errors == []
    assert files == [
        tmp_path / MAIN,
        tmp_path / USR / "10-vendor.conf",
        tmp_path / ETC / "20-admin.conf",
        tmp_path / RUN / "30-runtime.conf",
    ]
    config, errors = load(tmp_path)
    assert errors == []
    assert config.quiet_period_sec == 5.0  # main file, not overridden
    assert config.workers == 6  # 20-admin.conf came after 10-vendor.conf
    assert config.batch_size == 16  # 30-runtime.conf last


def test_dropins_apply_without_main_file(tmp_path: Path) -> None:
    write(tmp_path, f"{USR}/50-x.conf", "[Daemon]\nWorkers=7\n")
    config, errors = load(tmp_path)
    assert errors == [] and config.workers == 7


def test_same_name_etc_masks_run_masks_usr_lib(tmp_path: Path) -> None:
    write(tmp_path, f"{USR}/50-x.conf", "[Daemon]\nWorkers=5\nBatchSize=5\n")
    write(tmp_path, f"{RUN}/50-x.conf", "[Daemon]\nWorkers=6\n")
    etc = write(tmp_path, f"{ETC}/50-x.conf", "[Daemon]\nWorkers=7\n")
    files, _ = config_files(root=tmp_path)
    assert files == [etc]
    config, _ = load(tmp_path)
    # The /usr/lib file is not read at all, so its BatchSize= does not leak through.
    assert config.workers == 7 and config.batch_size == 32
    etc.unlink()
    config, _ = load(tmp_path)
    assert config.workers == 6 and config.batch_size == 32
    (tmp_path / RUN / "50-x.conf").unlink()
    config, _ = load(tmp_path)
    assert config.workers == 5 and config.batch_size == 5


def test_dev_null_symlink_and_empty_file_mask(tmp_path: Path) -> None:
    write(tmp_path, f"{USR}/50-x.conf", "[Daemon]\nWorkers=5\n")
    write(tmp_path, f"{USR}/60-y.conf", "[Daemon]\nBatchSize=5\n")
    (tmp_path / ETC).mkdir(parents=True)
    os.symlink("/dev/null", tmp_path / ETC / "50-x.conf")
    write(tmp_path, f"{RUN}/60-y.conf", "")
    files, errors = config_files(root=tmp_path)
    assert files == [] and errors == []
    assert load(tmp_path) == (Config(), [])


def test_non_conf_entries_are_skipped_and_do_not_mask(tmp_path: Path) -> None:
    write(tmp_path, f"{ETC}/README", "Workers=9\n")
    write(tmp_path, f"{ETC}/50-x.conf.bak", "[Daemon]\nWorkers=9\n")
    (tmp_path / ETC / "50-x.conf").mkdir()  # a directory: skipped, masks nothing
    os.symlink(tmp_path / "nowhere", tmp_path / ETC / "70-dangling.conf")
    usr = write(tmp_path, f"{USR}/50-x.conf", "[Daemon]\nWorkers=4\n")
    files, errors = config_files(root=tmp_path)
    assert files == [usr] and errors == []
    assert load(tmp_path)[0].workers == 4


def test_explicit_paths_replace_the_search(tmp_path: Path) -> None:
    write(tmp_path, MAIN, "[Daemon]\nWorkers=9\n")
    a = write(tmp_path, "a.conf", "[Daemon]\nWorkers=3\nBatchSize=3\n")
    b = write(tmp_path, "b.conf", "[Daemon]\nWorkers=4\n")
    config, errors = load_config(root=tmp_path, paths=[b, a])
    assert errors == [] and config.workers == 3 and config.batch_size == 3
    config, errors = load_config(paths=[tmp_path / "missing.conf"])
    assert config == Config()
    assert len(errors) == 1 and errors[0].file == str(tmp_path / "missing.conf")
    assert errors[0].line is None and "cannot read" in errors[0].message


# --- syntax ---


def test_syntax_comments_continuations_sections(tmp_path: Path) -> None:
    write(
        tmp_path,
        MAIN,
        "# comment\n"
        "; another comment\n"
        "\n"
        "[X-Vendor]\n"
        "Anything=goes\n"
        "[Daemon]\n"
        "  Workers =  3  \n"
        "Exclude=a \\\n"
        "# a comment inside a continuation is skipped\n"
        "  b\\\n"
        "  c\n"
        "[Daemon]\n"
        "BatchSize=7\n",
    )
    config, errors = load(tmp_path)
    assert errors == []
    assert config.workers == 3 and config.batch_size == 7
    assert config.exclude == ("a", "b", "c")


def bad_lines_file() -> str:
    return (
        "Workers=3\n"  # 1: before any section
        "[Daemon]\n"  # 2
        "Workers=0\n"  # 3: out of range
        "Workers=17\n"  # 4: out of range
        "BatchSize=abc\n"  # 5
        "QuietPeriodSec=fast\n"  # 6
        "LogLevel=loud\n"  # 7
        "CacheDir=relative/path\n"  # 8
        "RuntimeDir=/run/../etc\n"  # 9
        "NoSuchKey=1\n"  # 10
        "workers=3\n"  # 11: keys are case-sensitive
        "just some words\n"  # 12: no '='
        "Exclude=good bad/name\n"  # 13
        "ExitAfterQuietSec=-1\n"  # 14
        "BatchSize=1.5\n"  # 15
        "[Frobnicate]\n"  # 16: one error for the section...
        "Workers=5\n"  # 17: ...none for its settings
        "[Daemon\n"  # 18: broken header
        "Workers=6\n"  # 19: ignored with the broken section
        "[Daemon]\n"  # 20
        "QuietPeriodSec=infinity\n"  # 21
    )


def test_bad_lines_name_file_and_line_and_keep_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, MAIN, bad_lines_file())
    config, errors = load(tmp_path)
    assert config == Config()
    assert all(error.file == str(path) for error in errors)
    assert [error.line for error in errors] == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 21]
    for error in errors:
        assert str(error).startswith(f"{path}:{error.line}: ")
    by_line = {error.line: error.message for error in errors}
    assert "outside of a section" in by_line[1]
    assert "Workers=0" in by_line[3] and "1..16" in by_line[3]
    assert "unknown key 'NoSuchKey'" in by_line[10]
    assert "missing '='" in by_line[12]
    assert "bad/name" in by_line[13]
    assert "unknown section [Frobnicate]" in by_line[16]
    assert "invalid section header" in by_line[18]


def test_bad_line_keeps_the_previous_value(tmp_path: Path) -> None:
    write(tmp_path, MAIN, "[Daemon]\nWorkers=3\nExclude=a\n")
    dropin = write(tmp_path, f"{ETC}/50-x.conf", "[Daemon]\nWorkers=99\nExclude=b c!\nBatchSize=9\n")
    config, errors = load(tmp_path)
    assert config.workers == 3  # from the main file, not the default
    assert config.exclude == ("a",)  # the bad list line adds nothing
    assert config.batch_size == 9  # the good line after the bad ones still counts
    assert [(e.file, e.line) for e in errors] == [(str(dropin), 2), (str(dropin), 3)]


def test_unreadable_main_file_is_one_error_and_dropins_still_apply(tmp_path: Path) -> None:
    (tmp_path / MAIN).mkdir(parents=True)  # a directory where the file should be
    write(tmp_path, f"{ETC}/50-x.conf", "[Daemon]\nWorkers=4\n")
    config, errors = load(tmp_path)
    assert config.workers == 4
    assert len(errors) == 1
    assert errors[0].file == str(tmp_path / MAIN) and errors[0].line is None
    assert str(errors[0]).startswith(f"{tmp_path / MAIN}: cannot read")


def test_invalid_utf8_line_is_skipped(tmp_path: Path) -> None:
    path = write(tmp_path, MAIN, b"[Daemon]\nExclude=caf\xe9\nWorkers=4\n")
    config, errors = load(tmp_path)
    assert config.workers == 4 and config.exclude == ()
    assert [(e.file, e.line) for e in errors] == [(str(path), 2)]


def test_empty_assignment_resets_to_default(tmp_path: Path) -> None:
    write(tmp_path, MAIN, "[Daemon]\nWorkers=5\nLogLevel=debug\nCacheDir=/srv/cache\n")
    write(tmp_path, f"{ETC}/50-x.conf", "[Daemon]\nWorkers=\nLogLevel=\n")
    config, errors = load(tmp_path)
    assert errors == []
    assert config.workers == 2 and config.log_level == 6
    assert config.cache_dir == Path("/srv/cache")


# --- values ---


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2", 2.0),
        ("2.5", 2.5),
        ("0", 0.0),
        ("2s", 2.0),
        ("500ms", 0.5),
        ("500 msec", 0.5),
        ("1min 30s", 90.0),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("250us", 0.00025),
        (".5s", 0.5),
    ],
)
def test_timespans(text: str, seconds: float) -> None:
    assert parse_timespan(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "fast", "-1", "2x", "1.2.3", "s"])
def test_bad_timespans(text: str) -> None:
    with pytest.raises(ValueError):
        parse_timespan(text)


def test_time_settings_accept_spans(tmp_path: Path) -> None:
    write(tmp_path, MAIN, "[Daemon]\nQuietPeriodSec=500ms\nExitAfterQuietSec=2min\n")
    config, errors = load(tmp_path)
    assert errors == []
    assert config.quiet_period_sec == 0.5 and config.exit_after_quiet_sec == 120.0


@pytest.mark.parametrize("text", ["0", "infinity"])
def test_exit_after_quiet_never(tmp_path: Path, text: str) -> None:
    write(tmp_path, MAIN, f"[Daemon]\nExitAfterQuietSec={text}\n")
    config, errors = load(tmp_path)
    assert errors == [] and config.exit_after_quiet_sec == 0.0


def test_quiet_period_must_be_finite(tmp_path: Path) -> None:
    write(tmp_path, MAIN, "[Daemon]\nQuietPeriodSec=infinity\n")
    config, errors = load(tmp_path)
    assert config.quiet_period_sec == 2.0 and len(errors) == 1
    assert not math.isinf(config.quiet_period_sec)


def test_workers_range(tmp_path: Path) -> None:
    for value, expected, n_errors in [("1", 1, 0), ("16", 16, 0), ("0", 2, 1), ("17", 2, 1)]:
        write(tmp_path, MAIN, f"[Daemon]\nWorkers={value}\n")
        config, errors = load(tmp_path)
        assert (config.workers, len(errors)) == (expected, n_errors), value


@pytest.mark.parametrize(
    ("text", "level"), [("debug", 7), ("info", 6), ("notice", 5), ("warning", 4), ("err", 3), ("3", 3)]
)
def test_log_levels(tmp_path: Path, text: str, level: int) -> None:
    write(tmp_path, MAIN, f"[Daemon]\nLogLevel={text}\n")
    config, errors = load(tmp_path)
    assert errors == [] and config.log_level == level


def test_directories(tmp_path: Path) -> None:
    write(tmp_path, MAIN, "[Daemon]\nCacheDir=/srv/initsplit/cache/\nRuntimeDir=/tmp/x\n")
    config, errors = load(tmp_path)
    assert errors == []
    assert config.cache_dir == Path("/srv/initsplit/cache") and config.runtime_dir == Path("/tmp/x")


def test_exclude_accumulates_resets_and_normalizes(tmp_path: Path) -> None:
    write(tmp_path, MAIN, "[Daemon]\nExclude=nvme  e1000e\nExclude=snd-hda-intel nvme\n")
    write(tmp_path, f"{USR}/10-a.conf", "[Daemon]\nExclude=\nExclude=i915\n")
    write(tmp_path, f"{ETC}/20-b.conf", "[Daemon]\nExclude=xfs\n")
    config, errors = load(tmp_path)
    assert errors == []
    # The drop-in's empty Exclude= dropped the main file's list; later lines add.
    assert config.exclude == ("i915", "xfs")
    (tmp_path / USR / "10-a.conf").unlink()
    config, _ = load(tmp_path)
    assert config.exclude == ("nvme", "e1000e", "snd_hda_intel", "xfs")
    assert config.excluded("snd-hda-intel") and config.excluded("snd_hda_intel")
    assert not config.excluded("dummy")


# --- kernel command line ---


@pytest.mark.parametrize("value", ["off", "0", "no", "false", "OFF", "n"])
def test_rescue_switch(value: str) -> None:
    overrides, errors = kernel_command_line_overrides(f"BOOT_IMAGE=/vmlinuz root=/dev/sda1 initsplit={value} quiet")
    assert errors == []
    assert overrides.enabled is False
    config = overrides.apply(Config(workers=4))
    assert config.enabled is False and config.workers == 4


@pytest.mark.parametrize("cmdline", ["initsplit", "initsplit=on", "initsplit=1", "initsplit=off initsplit=yes"])
def test_switch_on_and_last_one_wins(cmdline: str) -> None:
    overrides, errors = kernel_command_line_overrides(cmdline)
    assert errors == [] and overrides.enabled is True


def test_no_initsplit_parameters_change_nothing() -> None:
    overrides, errors = kernel_command_line_overrides(
        "BOOT_IMAGE=/vmlinuz ro quiet initsplitx=off xinitsplit=off modprobe.blacklist=nvme"
    )
    assert errors == []
    config = Config(workers=3, exclude=("a",))
    assert overrides.apply(config) == config


def test_quiet_exclude_and_log_level() -> None:
    overrides, errors = kernel_command_line_overrides(
        "initsplit.quiet=500ms initsplit.exclude=snd-hda-intel,e1000e initsplit.exclude=xfs "
        "initsplit.log-level=debug"
    )
    assert errors == []
    assert overrides.quiet_period_sec == 0.5
    assert overrides.exclude == ("snd_hda_intel", "e1000e", "xfs")
    assert overrides.log_level == 7
    config = overrides.apply(Config(exclude=("nvme", "xfs")))
    assert config.quiet_period_sec == 0.5 and config.log_level == 7
    assert config.exclude == ("nvme", "xfs", "snd_hda_intel", "e1000e")
    assert config.enabled is True


def test_rd_prefix_only_in_initrd() -> None:
    cmdline = "rd.initsplit=off rd.initsplit.quiet=5"
    outside, errors = kernel_command_line_overrides(cmdline)
    assert errors == [] and outside.enabled is None and outside.quiet_period_sec is None
    inside, errors = kernel_command_line_overrides(cmdline, in_initrd=True)
    assert errors == [] and inside.enabled is False and inside.quiet_period_sec == 5.0


def test_quotes_and_double_dash() -> None:
    assert split_kernel_command_line('a "b c" d="e f"  g') == ["a", "b c", "d=e f", "g"]
    overrides, errors = kernel_command_line_overrides('"initsplit.exclude=a, b" -- initsplit=off')
    assert errors == []
    assert overrides.exclude == ("a", "b")
    assert overrides.enabled is None  # after "--": arguments for init, not the kernel


def test_bad_command_line_values_are_errors() -> None:
    overrides, errors = kernel_command_line_overrides(
        "initsplit=maybe initsplit.quiet=soon initsplit.log_level=loud initsplit.frob=1 initsplit.exclude=a/b"
    )
    assert overrides == type(overrides)()
    assert len(errors) == 5
    assert all(error.file == COMMAND_LINE and error.line is None for error in errors)
    assert str(errors[0]).startswith("kernel command line: invalid 'initsplit=maybe'")
    assert "unknown parameter 'initsplit.frob=1'" in errors[3].message


def test_timeouts(tmp_path: Path) -> None:
    path = write(tmp_path, "initsplitd.conf",
                 "[Daemon]\nLoadTimeoutSec=45s\nInstallCommandTimeoutSec=1min\n")
    config, errors = load_config(paths=[path])
    assert errors == []
    assert (config.load_timeout_sec, config.install_command_timeout_sec) == (45.0, 60.0)
    path = write(tmp_path, "initsplitd.conf",
                 "[Daemon]\nLoadTimeoutSec=0\nInstallCommandTimeoutSec=0\n")
    config, errors = load_config(paths=[path])
    assert config.load_timeout_sec == 0.0  # never give up
    assert len(errors) == 1 and "InstallCommandTimeoutSec" in str(errors[0]), errors  # must end
    assert config.install_command_timeout_sec == 30.0


def test_load_timeout_defaults_to_the_stage_unless_configured(tmp_path: Path) -> None:
    # In the initramfs a stuck load must be given up before systemd's 90 s device
    # timeout fails the root mount; on the real root it is a 10 minute backstop.
    config, _ = load_config(paths=[])
    assert config.load_timeout_sec is None
    assert config.default_load_timeout(in_initrd=True) == 30.0
    assert config.default_load_timeout(in_initrd=False) == 600.0
    path = write(tmp_path, "initsplitd.conf", "[Daemon]\nLoadTimeoutSec=2min\n")
    config, _ = load_config(paths=[path])
    assert config.default_load_timeout(in_initrd=True) == 120.0


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge"])
def test_a_file_that_is_no_configuration_is_an_error_not_a_hang(tmp_path: Path, kind: str) -> None:
    # Read before the daemon is ready: a FIFO would block the read for ever and
    # /dev/zero never end, and systemd's start timeout would decide the boot.
    main = tmp_path / MAIN
    main.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(main)
    elif kind == "dev-zero":
        main.symlink_to("/dev/zero")
    else:
        main.write_bytes(b"[Daemon]\nWorkers=3\n" + b"#" * (2 << 20) + b"\n")
    write(tmp_path, f"{ETC}/50-x.conf", "[Daemon]\nWorkers=4\n")
    config, errors = load(tmp_path)
    assert config.workers == 4  # the drop-in still applies
    assert len(errors) == 1 and str(errors[0]).startswith(f"{main}: cannot read"), errors


def test_a_symlinked_drop_in_is_read(tmp_path: Path) -> None:
    target = write(tmp_path, "usr/lib/initsplit/workers.conf", "[Daemon]\nWorkers=5\n")
    (tmp_path / ETC).mkdir(parents=True)
    (tmp_path / ETC / "50-x.conf").symlink_to(target)
    config, errors = load(tmp_path)
    assert (config.workers, errors) == (5, [])
