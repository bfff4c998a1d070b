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

from initsplit.kmod import KmodError, LoadStep, ModuleFileError, ModuleIndexError, Resolver
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
    lib.kmod_module_new_from_name(handle, b"ext4", byref(mod))
    assert lib.kmod_module_get_initstate(mod) < 0  # not loaded here: no exception
    lib.kmod_module_unref(mod)


def test_fnmatch_is_libcs() -> None:
    # backslash escapes and brackets, as fnmatch(3) with flags 0 (Python's differ)
    assert k.fnmatch("snd\\*", "snd*") and not k.fnmatch("snd\\*", "snd_x")
    assert k.fnmatch("usb[!_]x", "usbax") and not k.fnmatch("usb[!_]x", "usb_x")


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


def test_kernel_cmdline_self_check(kernel: DebianKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """If libkmod's reading of /proc/cmdline ever differs from our parser, we say so."""
    from initsplit.kmod import resolver as resolver_module

    monkeypatch.setattr(resolver_module, "read_proc_cmdline",
                        lambda: b"initsplit_never.seen=1 modprobe.blacklist=zz")
    with pytest.raises(KmodError, match="/proc/cmdline"):
        Resolver(root=kernel.root, kver=kernel.kver, config_paths=[], kernel_cmdline="")


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
