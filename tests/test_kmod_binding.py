"""The ctypes binding to libkmod: declarations, list iteration, errors that say what failed."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import threading
from ctypes import byref, c_char_p
from pathlib import Path

import pytest

from initsplit.kmod import LoadStep, ModuleFileError, ModuleIndexError, Resolver
from initsplit.kmod import _libkmod as k
from tests.testbed.kernel import DebianKernel, debian_kernel

TINY_MODULES = ["fs/ext4/ext4.ko", "fs/jbd2/jbd2.ko", "fs/mbcache.ko", "lib/crc16.ko"]


@pytest.fixture(scope="module")
def kernel() -> DebianKernel:
    return debian_kernel()


@pytest.fixture()
def tiny_root(tmp_path: Path, kernel: DebianKernel) -> Path:
    """A root with four real modules of the Debian tree (ext4 and what it needs), depmod'ed."""
    root = tmp_path / "root"
    moddir = root / "lib" / "modules" / kernel.kver
    for rel in TINY_MODULES:
        dest = moddir / "kernel" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kernel.modules_dir / "kernel" / rel, dest)
    for name in ("modules.builtin", "modules.builtin.modinfo"):
        shutil.copyfile(kernel.modules_dir / name, moddir / name)
    (moddir / "modules.order").write_text("".join(f"kernel/{rel}\n" for rel in TINY_MODULES))
    subprocess.run(["depmod", "-b", str(root), kernel.kver], check=True)
    return root


@pytest.fixture()
def ctx(kernel: DebianKernel):
    """A raw kmod_ctx on the Debian tree, with no configuration at all."""
    lib = k.libkmod()
    handle = lib.kmod_new(os.fsencode(kernel.modules_dir), (c_char_p * 1)(None))
    assert lib.kmod_load_resources(handle) == 0
    yield lib, handle
    lib.kmod_unref(handle)


def lookup(lib, handle, key: str) -> list[str]:
    head = k.kmod_list_p()
    lib.kmod_module_new_from_lookup(handle, key.encode(), byref(head))
    try:
        return [lib.kmod_module_get_name(lib.kmod_module_get_module(e)).decode()
                for e in k.iter_list(lib, head)]
    finally:
        lib.kmod_module_unref_list(head)


# -- raw binding ---------------------------------------------------------------------------


def test_every_declared_function_exists() -> None:
    lib = k.libkmod()
    for name, (argtypes, restype) in k.SIGNATURES.items():
        function = getattr(lib, name)
        assert function.argtypes == argtypes and function.restype == restype, name


def test_negative_errno_becomes_oserror_naming_the_call(ctx) -> None:
    lib, handle = ctx
    head = k.kmod_list_p()
    with pytest.raises(OSError) as info:
        lib.kmod_module_new_from_lookup(handle, b"foo]bar", byref(head))
    assert info.value.errno == errno.EINVAL
    assert "kmod_module_new_from_lookup" in str(info.value)
    assert info.value.filename == "foo]bar"
    assert not head


def test_missing_module_path_is_file_not_found(ctx, tmp_path: Path) -> None:
    lib, handle = ctx
    mod = k.kmod_module_p()
    missing = tmp_path / "nothere.ko"
    with pytest.raises(FileNotFoundError) as info:
        lib.kmod_module_new_from_path(handle, os.fsencode(missing), byref(mod))
    assert info.value.filename == str(missing)


def test_get_info_on_a_text_file_is_an_oserror(ctx, tmp_path: Path) -> None:
    lib, handle = ctx
    text = tmp_path / "notamodule.ko"
    text.write_text("just text\n")
    mod = k.kmod_module_p()
    lib.kmod_module_new_from_path(handle, os.fsencode(text), byref(mod))  # only stat()s
    try:
        head = k.kmod_list_p()
        with pytest.raises(OSError, match="kmod_module_get_info"):
            lib.kmod_module_get_info(mod, byref(head))
    finally:
        lib.kmod_module_unref(mod)


def test_list_iteration_follows_modules_dep(ctx, kernel: DebianKernel) -> None:
    """kmod_list_foreach over kmod_module_get_dependencies = modules.dep, deepest first."""
    lib, handle = ctx
    mod = k.kmod_module_p()
    lib.kmod_module_new_from_name(handle, b"ext4", byref(mod))
    try:
        head = lib.kmod_module_get_dependencies(mod)
        try:
            paths = [Path(lib.kmod_module_get_path(lib.kmod_module_get_module(e)).decode())
                     for e in k.iter_list(lib, head)]
        finally:
            lib.kmod_module_unref_list(head)
        assert paths == kernel.module_deps("ext4")[:-1]
        assert Path(lib.kmod_module_get_path(mod).decode()) == kernel.module("ext4")
    finally:
        lib.kmod_module_unref(mod)


def test_apply_filter_and_initstate(ctx) -> None:
    lib, handle = ctx
    assert lookup(lib, handle, "usb:v0000p0000d0000dc00dsc00dp00ic08isc06ip50in00") == [
        "uas", "usb_storage"]
    head = k.kmod_list_p()
    lib.kmod_module_new_from_lookup(handle, b"fs-debugfs", byref(head))
    filtered = k.kmod_list_p()
    try:
        debugfs = lib.kmod_module_get_module(head)
        assert lib.kmod_module_get_name(debugfs) == b"debugfs"
        assert lib.kmod_module_get_path(debugfs) is None
        assert lib.kmod_module_get_initstate(debugfs) == k.KMOD_MODULE_BUILTIN
        lib.kmod_module_unref(debugfs)
        lib.kmod_module_apply_filter(handle, k.KMOD_FILTER_BUILTIN, head, byref(filtered))
        assert not filtered
        lib.kmod_module_apply_filter(handle, k.KMOD_FILTER_BLACKLIST, head, byref(filtered))
        assert len(list(k.iter_list(lib, filtered))) == 1
    finally:
        lib.kmod_module_unref_list(filtered)
        lib.kmod_module_unref_list(head)
    mod = k.kmod_module_p()
    # A name no host has loaded or built in (ext4 was: some hosts build it in, and
    # their /sys/module/ext4 has no initstate file).
    lib.kmod_module_new_from_name(handle, b"initsplit_not_a_module", byref(mod))
    assert lib.kmod_module_get_initstate(mod) < 0  # not loaded here: no exception
    lib.kmod_module_unref(mod)


# -- Resolver errors ---------------------------------------------------------------------


def test_missing_module_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        Resolver(root=tmp_path, kver="9.9.9-nope")
    assert info.value.filename == str(tmp_path / "lib/modules/9.9.9-nope")
    assert "9.9.9-nope" in str(info.value)
    with pytest.raises(FileNotFoundError, match=os.uname().release.replace(".", r"\.")):
        Resolver(root=tmp_path)  # default kver: the running kernel's


def test_module_directory_without_indexes(tmp_path: Path) -> None:
    (tmp_path / "lib/modules/6.1.0-x").mkdir(parents=True)
    with pytest.raises(ModuleIndexError, match="depmod"):
        Resolver(root=tmp_path, kver="6.1.0-x")


def test_modinfo(kernel: DebianKernel, tmp_path: Path) -> None:
    text = tmp_path / "notamodule.ko"
    text.write_bytes(b"\x7fELF but not really")
    with Resolver(root=kernel.root, kver=kernel.kver, config_paths=[]) as resolver:
        info = resolver.modinfo(kernel.module("dummy"))
        assert ("license", "GPL") in info and ("name", "dummy") in info
        with pytest.raises(ModuleFileError, match="notamodule.ko: not a kernel module"):
            resolver.modinfo(text)
        with pytest.raises(FileNotFoundError):
            resolver.modinfo(tmp_path / "missing.ko")
        # errors leave the context usable
        assert resolver.resolve("dummy")[0].name == "dummy"


def test_missing_dependency_file(tiny_root: Path, kernel: DebianKernel,
                                 caplog: pytest.LogCaptureFixture) -> None:
    moddir = tiny_root / "lib/modules" / kernel.kver
    with Resolver(root=tiny_root, kver=kernel.kver, kernel_cmdline="") as resolver:
        assert [s.name for s in resolver.resolve("ext4")] == ["jbd2", "mbcache", "crc16", "ext4"]
        (moddir / "kernel/fs/jbd2/jbd2.ko").unlink()
        with caplog.at_level(logging.ERROR, logger="initsplit.kmod.resolver"):
            with pytest.raises(ModuleFileError, match="ext4: cannot read its modules.dep entry"):
                resolver.resolve("ext4")
        # libkmod's own message reached logging (not stderr)
        assert any("jbd2.ko" in r.getMessage() for r in caplog.records)
        shutil.copyfile(kernel.modules_dir / "kernel/fs/jbd2/jbd2.ko",
                        moddir / "kernel/fs/jbd2/jbd2.ko")
        (moddir / "kernel/fs/ext4/ext4.ko").unlink()
        with pytest.raises(ModuleFileError, match="ext4.ko is listed in modules.dep"):
            resolver.resolve("fs-ext4")


def test_defaults_for_another_root(tiny_root: Path, kernel: DebianKernel) -> None:
    """modprobe.d under root, and nothing skipped as 'loaded' by this machine's state."""
    conf = tiny_root / "etc/modprobe.d"
    conf.mkdir(parents=True)
    (conf / "t.conf").write_text("options ext4 initsplit=1\nblacklist ext4\n")
    (tiny_root / "lib/modprobe.d").mkdir(parents=True)
    (tiny_root / "lib/modprobe.d/t.conf").write_text("options ext4 shadowed=1\n")
    with Resolver(root=tiny_root, kver=kernel.kver, kernel_cmdline="ext4.x=2") as resolver:
        assert resolver.ignore_loaded
        steps = resolver.resolve("ext4")
        # same file name in an earlier directory wins, as in libkmod
        assert steps[-1] == LoadStep("ext4", tiny_root / "lib/modules" / kernel.kver
                                     / "kernel/fs/ext4/ext4.ko", "initsplit=1 x=2")
        assert resolver.resolve("fs-ext4") == []  # alias match, blacklisted
        assert resolver.resolve("no-such-thing") == []


def test_use_from_one_thread_only(kernel: DebianKernel) -> None:
    resolver = Resolver(root=kernel.root, kver=kernel.kver, config_paths=[])
    errors: list[BaseException] = []

    def other() -> None:
        try:
            resolver.resolve("dummy")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    with pytest.raises(ValueError, match="NUL"):
        resolver.resolve("dum\0my")
    resolver.close()
    resolver.close()
    with pytest.raises(ValueError, match="closed"):
        resolver.resolve("dummy")


def test_no_module_reference_leaks(kernel: DebianKernel, caplog: pytest.LogCaptureFixture) -> None:
    """close() finds the context freed: every module reference taken was dropped."""
    keys = ["ext4", "btrfs", "uhci-hcd", "fs-debugfs", "snd-hda-intel", "nope", "foo]",
            "usb:v0000p0000d0000dc00dsc00dp00ic08isc06ip50in00", "symbol:usb_register_driver"]
    with caplog.at_level(logging.WARNING, logger="initsplit.kmod.resolver"):
        with Resolver(root=kernel.root, kver=kernel.kver) as resolver:
            for key in keys:
                resolver.resolve(key)
            resolver.modinfo(kernel.module("dummy"))
        assert not [r for r in caplog.records if "leaked" in r.getMessage()]
        # and the check does notice a leak
        resolver = Resolver(root=kernel.root, kver=kernel.kver)
        mod = k.kmod_module_p()
        k.libkmod().kmod_module_new_from_name(resolver._ctx, b"dummy", byref(mod))
        resolver.close()
        assert [r for r in caplog.records if "leaked" in r.getMessage()]
        k.libkmod().kmod_module_unref(mod)  # frees the context too


# -- the probe API: libkmod's own answer --------------------------------------------------


def dry_run_actions(lib, handle, key: str, flags: int) -> list[tuple[str, bool, str]]:
    """(name, install, options) of every print_action() call, for each match of ``key``."""
    actions: list[tuple[str, bool, str]] = []

    def on_action(mod, install, options) -> None:
        actions.append((lib.kmod_module_get_name(mod).decode(), bool(install), options.decode()))

    callback = k.KMOD_PRINT_ACTION_FN(on_action)
    head = k.kmod_list_p()
    lib.kmod_module_new_from_lookup(handle, key.encode(), byref(head))
    try:
        for entry in k.iter_list(lib, head):
            mod = lib.kmod_module_get_module(entry)
            try:
                lib.kmod_module_probe_insert_module(
                    mod, flags | k.KMOD_PROBE_DRY_RUN, None, k.KMOD_RUN_INSTALL_FN(), None, callback)
            finally:
                lib.kmod_module_unref(mod)
    finally:
        lib.kmod_module_unref_list(head)
    return actions


def test_print_action_order_is_the_answer(ctx, kernel: DebianKernel) -> None:
    """The declared kmod_module_probe_insert_module() reports the probe list in order,
    and the Resolver's steps are exactly those calls (each module once)."""
    lib, handle = ctx
    flags = k.KMOD_PROBE_IGNORE_LOADED | k.KMOD_PROBE_APPLY_BLACKLIST_ALIAS_ONLY
    with Resolver(root=kernel.root, kver=kernel.kver, config_paths=[]) as resolver:
        for key in ("fs-ext4", "btrfs", "snd-hda-intel", "uhci-hcd",
                    "usb:v0000p0000d0000dc00dsc00dp00ic08isc06ip50in00"):
            raw = [name for name, _, _ in dry_run_actions(lib, handle, key, flags)]
            assert [s.name for s in resolver.resolve(key)] == list(dict.fromkeys(raw)), key
    assert [name for name, _, _ in dry_run_actions(lib, handle, "fs-ext4", flags)] == [
        "crc32c_intel", "crc32c_generic", "jbd2", "mbcache", "crc16", "ext4"]


def test_callback_error_is_raised_after_the_c_call(
        kernel: DebianKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception in print_action() does not unwind through libkmod: it is raised
    when the probe has returned, and the Resolver stays usable."""
    with Resolver(root=kernel.root, kver=kernel.kver, config_paths=[]) as resolver:
        real = resolver._action

        def failing(mod, install, options):
            raise LookupError("from the callback")

        monkeypatch.setattr(resolver, "_action", failing)
        with pytest.raises(LookupError, match="from the callback"):
            resolver.resolve("ext4")
        monkeypatch.setattr(resolver, "_action", real)
        assert resolver.resolve("ext4")[-1].name == "ext4"


TINY_CONF = """\
blacklist crc16
options crc16 via_name=1
options crc_alias via_alias=1
alias crc_alias crc16
install mbcache /bin/true mbcache $CMDLINE_OPTS
softdep jbd2 post: mbcache
softdep ext4 pre: initsplit-no-such-module foo]bar
"""


def show_depends(root: Path, kver: str, conf: Path, key: str) -> list[str]:
    proc = subprocess.run(["modprobe", "-d", str(root), "-S", kver, "-C", str(conf),
                           "--show-depends", "--", key], capture_output=True, text=True)
    return list(dict.fromkeys(proc.stdout.splitlines()))  # modprobe loads a module once


def test_blacklist_install_and_softdeps(tiny_root: Path, kernel: DebianKernel,
                                        tmp_path: Path) -> None:
    """Each piece libkmod's probe decides, as the Resolver's LoadSteps, and as modprobe."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "00-t.conf").write_text(TINY_CONF)  # before modules.softdep
    moddir = tiny_root / "lib/modules" / kernel.kver / "kernel"
    with Resolver(root=tiny_root, kver=kernel.kver, config_paths=[conf],
                  kernel_cmdline="") as resolver:
        # blacklisted: by name it loads, through an alias not (and the alias's options)
        assert resolver.resolve("crc16") == [LoadStep("crc16", moddir / "lib/crc16.ko", "via_name=1")]
        assert resolver.resolve("crc_alias") == []
        # the install command is used for a post softdep, which libkmod only reaches
        # if the match (required) loaded
        steps = resolver.resolve("jbd2")
        assert steps == [LoadStep("jbd2", moddir / "fs/jbd2/jbd2.ko"),
                         LoadStep("mbcache", moddir / "fs/mbcache.ko", "",
                                  "/bin/true mbcache $CMDLINE_OPTS")]
        assert (steps[1].requires, steps[1].after) == (("jbd2",), ())
        # ext4: a softdep that is no valid alias is logged and skipped, as modprobe does
        ext4 = resolver.resolve("ext4")
        assert [s.name for s in ext4] == ["jbd2", "mbcache", "crc16", "ext4"]
        assert ext4[1].install_command is not None
        assert ext4[-1].requires == ("jbd2", "mbcache", "crc16")  # a command, still required
        for key in ("crc16", "crc_alias", "jbd2", "ext4"):
            assert [s.show_depends_line() for s in resolver.resolve(key)] == \
                show_depends(tiny_root, kernel.kver, conf, key), key


def test_unreadable_dependency_line_of_a_softdep(tiny_root: Path, kernel: DebianKernel,
                                                 tmp_path: Path) -> None:
    """A broken modules.dep line of a module reached only as a softdep is found too,
    and named."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "t.conf").write_text("softdep crc16 post: ext4\n")
    with Resolver(root=tiny_root, kver=kernel.kver, config_paths=[conf],
                  kernel_cmdline="") as resolver:
        assert [s.name for s in resolver.resolve("crc16")] == [
            "crc16", "jbd2", "mbcache", "ext4"]
        (tiny_root / "lib/modules" / kernel.kver / "kernel/fs/mbcache.ko").unlink()
        with pytest.raises(ModuleFileError, match="^ext4: cannot read its modules.dep entry"):
            resolver.resolve("crc16")


def _cmdline_mounts() -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if " /proc/cmdline " in line]


def test_kernel_cmdline_is_read_by_libkmod(tiny_root: Path, kernel: DebianKernel,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Another command line is shown to libkmod in a private mount namespace that ends
    with its thread; this machine's own takes none."""
    from initsplit.kmod import cmdline

    before = Path("/proc/cmdline").read_bytes()
    mounts = _cmdline_mounts()
    with Resolver(root=tiny_root, kver=kernel.kver,
                  kernel_cmdline='"ext4.x=a b" crc16.y modprobe.blacklist=ext4') as resolver:
        assert [(s.name, s.options) for s in resolver.resolve("ext4")] == [
            ("jbd2", ""), ("mbcache", ""), ("crc16", "y"), ("ext4", 'x="a b"')]
        assert resolver.resolve("fs-ext4") == []  # blacklisted alias match
    assert Path("/proc/cmdline").read_bytes() == before
    assert _cmdline_mounts() == mounts

    def forbidden(*args):
        raise AssertionError("no namespace for this machine's own command line")

    monkeypatch.setattr(cmdline, "call_seeing_cmdline", forbidden)
    with Resolver(root=tiny_root, kver=kernel.kver, kernel_cmdline=before.decode()) as resolver:
        assert resolver.resolve("ext4")[-1].name == "ext4"


_GIVES_ANYTHING = """
from initsplit.kmod import cmdline
print(cmdline.proc_cmdline_gives_libkmod_anything())
"""


@pytest.mark.parametrize(("text", "gives"), [
    ("quiet console=ttyS0 root=UUID=0b1c", False),
    ("quiet a.b=1", True), ("modprobe.blacklist=x", True), ("", False),
    ("a.b.c=1 a=b.c", False),  # dots, but no word libkmod takes
])
def test_what_proc_cmdline_gives_libkmod(text: str, gives: bool, tmp_path: Path) -> None:
    """The check behind skipping the namespace, against libkmod reading that /proc/cmdline."""
    path = tmp_path / "cmdline"
    path.write_text(text)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "daemon"))
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c",
         f"mount --bind {path} /proc/cmdline && exec /usr/bin/python3 -c '{_GIVES_ANYTHING}'"],
        capture_output=True, text=True, env=env, check=True)
    assert proc.stdout.strip() == str(gives)


def test_a_command_line_without_module_words_needs_no_namespace(
        tiny_root: Path, kernel: DebianKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    from initsplit.kmod import cmdline

    calls: list[str] = []
    real = cmdline.call_seeing_cmdline
    monkeypatch.setattr(cmdline, "call_seeing_cmdline",
                        lambda text, fn: calls.append(text) or real(text, fn))
    monkeypatch.setattr(cmdline, "proc_cmdline_gives_libkmod_anything", lambda: False)
    Resolver(root=tiny_root, kver=kernel.kver, kernel_cmdline="").close()
    Resolver(root=tiny_root, kver=kernel.kver, kernel_cmdline="quiet ro").close()
    assert calls == []
    Resolver(root=tiny_root, kver=kernel.kver, kernel_cmdline="ext4.x=1").close()
    monkeypatch.setattr(cmdline, "proc_cmdline_gives_libkmod_anything", lambda: True)
    Resolver(root=tiny_root, kver=kernel.kver, kernel_cmdline="").close()
    assert calls == ["ext4.x=1", ""]
