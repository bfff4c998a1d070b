"""Command line interface: `initsplit split` for trees, `initsplit check` for one module,
`initsplit analyze` for what the kernel allocates and what splitting saves,
`initsplit key create` for a module signing key (Secure Boot, signing.py).

Exit codes:
  0  success: every module was split and validated, or left alone because there
     was nothing to split or splitting was refused (both normal outcomes; the
     original module is loaded instead)
  1  some module failed validation or hit an unexpected error
  2  usage error, input not found, or (for `check`) not an ELF kernel module

The logic lives in initsplit.tree; this module only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import concurrent.futures.process
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence, TextIO

from . import __version__
from .daemon.config import Config, ConfigError, load_config
from .elf import MalformedElf
from .split import SplitModule
from .layout import rules_for_tree
from .split.decide import decide
from .split.policy import DISCARD_CLASSES, TWO_STAGE_POLICIES, SplitOptions
from .modfile import MODULE_SUFFIX, CompressedModuleError, read_module
from .signing import DEFAULT_KEY_DIR, SigningError, SigningKey, configured_key, create_key, default_key
from .tree import TreeError, find_modules, refusal_reasons, split_jobs, summary_line

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# The kernel hook and the dracut module tell "some modules failed, the cache is
# good for the others" (1) from "no usable cache" (2): a key that cannot sign is
# the second, as it would fail every module.
EXIT_SIGNING = EXIT_USAGE

_EPILOG = """\
exit codes:
  0  success (modules split, or nothing to split / refused: the original is used)
  1  some module failed validation or hit an unexpected error
  2  usage error, input not found, or not an ELF kernel module; or split: the
     signing key cannot sign (missing, readable or replaceable by others than
     root, not the certificate's, a certificate that is not X.509, openssl
     failing): checked before the first module, and a signing failure during
     the run stops it; so does an output that cannot be written (a full disk)
     or a worker process that dies: the output is then incomplete and must not
     be used
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="initsplit",
        description="Split Linux kernel modules into a core module and an init module.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    split = commands.add_parser(
        "split",
        help="split every .ko under the given paths into an output tree",
        description="Split every .ko under PATH... into DIR, keeping relative paths.\n"
        "Modules that are not split get no output file: load the original for them.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    split.add_argument("paths", metavar="PATH", nargs="+", type=Path,
                       help="a .ko file or a directory searched for .ko files")
    split.add_argument("-o", "--output", metavar="DIR", type=Path, required=True,
                       help="output directory")
    split.add_argument("-j", "--jobs", metavar="N", type=_positive_int, default=None,
                       help="worker processes (default: number of CPUs)")
    split.add_argument("-q", "--quiet", action="store_true",
                       help="no progress and no summary; problems are still reported")
    split.add_argument("--list-refused", action="store_true",
                       help="print the refusal reasons (and the policy's) with how many modules each")
    split.add_argument("--sign-key", metavar="KEY", type=Path, default=None,
                       help="sign every module written (C, I, rewritten originals) with this "
                       "private key (PEM), as sign-file does; needs --sign-cert")
    split.add_argument("--sign-cert", metavar="CERT", type=Path, default=None,
                       help="the X.509 certificate of --sign-key (DER or PEM), the one enrolled "
                       "with mokutil --import")
    split.add_argument("--sign", action="store_true",
                       help="sign with the default key: DKMS's /var/lib/dkms/mok.key and mok.pub, "
                       f"else {DEFAULT_KEY_DIR}/mok.key and mok.pub (initsplit key create)")
    split.add_argument("--sign-configured", action="store_true",
                       help="sign as the [Signing] section of /etc/initsplit/initsplitd.conf (and its "
                       "drop-ins) says: Sign=auto (default) uses SignKey=/SignCert=, else the default "
                       "key as --sign, else does not sign; Sign=no never signs (the kernel hook and "
                       "dracut module use this)")
    _add_policy_options(split)

    key = commands.add_parser(
        "key",
        help="make the key initsplit signs modules with (Secure Boot)",
        description="Make a machine owner key (MOK) pair for signing split modules, the way\n"
        "DKMS makes its own, and say how to enroll it with mokutil.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    key_commands = key.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    create = key_commands.add_parser("create", help="create DIR/mok.key (0600) and DIR/mok.pub (DER)")
    create.add_argument("directory", metavar="DIR", nargs="?", type=Path, default=DEFAULT_KEY_DIR,
                        help=f"where the pair goes (default: {DEFAULT_KEY_DIR})")

    check = commands.add_parser(
        "check",
        help="say whether one module would be split, and validate the result",
        description="Print whether FILE.ko would be split (or why not) and validate the split.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("module", metavar="FILE.ko", type=Path)
    _add_policy_options(check)

    analyze = commands.add_parser(
        "analyze",
        help="predict per module the kernel's allocations and the pages a split saves",
        description="Lay out every module under TREE as the kernel would (core and init\n"
        "layouts, in pages), split it, and predict the saving against a kernel that\n"
        "keeps init resident and against today's kernel.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    analyze.add_argument("tree", metavar="TREE", nargs="?", type=Path, default=None,
                         help="a module tree or .ko file (default: /lib/modules/$(uname -r))")
    analyze.add_argument("--loaded", action="store_true",
                         help="only the modules loaded now (/proc/modules), from the running "
                         "kernel's tree: what initsplit would give back on this system")
    analyze.add_argument("--json", action="store_true", help="print JSON, with every module")
    analyze.add_argument("--plot", metavar="FILE.svg", type=_svg_path,
                         help="also draw the size histogram and the savings into an SVG file")
    analyze.add_argument("--per-module", action="store_true",
                         help="also list every module in the text output")
    analyze.add_argument("-j", "--jobs", metavar="N", type=_positive_int, default=None,
                         help="worker processes (default: number of CPUs)")
    _add_policy_options(analyze)
    return parser


def _add_policy_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--two-stage", metavar="POLICY", choices=TWO_STAGE_POLICIES, default=None,
                         help="which modules that split load two-stage: "
                         f"{', '.join(TWO_STAGE_POLICIES)} (default: TwoStage= of "
                         "/etc/initsplit/initsplitd.conf, else when-not-worse)")
    command.add_argument("--writable-ro-after-init", choices=("yes", "no"), default=None,
                         help="split modules with .data..ro_after_init too, which leaves it "
                         "writable (default: WritableRoAfterInit= of the configuration, else no)")
    command.add_argument("--discard", metavar="CLASSES", type=_discard_classes, default=None,
                         help="what to drop from every module, space- or comma-separated: "
                         f"{', '.join(DISCARD_CLASSES)}, or '' for nothing (default: Discard= "
                         "of the configuration, else btf)")


def _svg_path(text: str) -> Path:
    # The plot is SVG text only (no image library is needed, see analyze.render_svg):
    # refuse another suffix rather than write SVG into a file named .png.
    path = Path(text)
    if path.suffix.lower() != ".svg":
        raise argparse.ArgumentTypeError(f"{text!r}: the plot is written as SVG; name a .svg file")
    return path


def _discard_classes(text: str) -> frozenset[str]:
    names = frozenset(n for n in text.replace(",", " ").split())
    unknown = names - set(DISCARD_CLASSES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown class {', '.join(sorted(unknown))}")
    return names


def _load_config() -> tuple[Config, list[ConfigError]]:
    """The daemon's configuration as it reads it at /, or under $INITSPLIT_CONFIG_ROOT (tests)."""
    return load_config(root=Path(os.environ.get("INITSPLIT_CONFIG_ROOT") or "/"))


def _split_options(args: argparse.Namespace, tree: Path | None) -> SplitOptions:
    """The daemon's own TwoStage= and WritableRoAfterInit= unless the command line
    says otherwise, and the layout rules of the tree's kernel: the cache must hold
    what the daemon would load."""
    config, _errors = _load_config()  # the daemon reports the errors; here defaults stand
    options = config.split_options(rules_for_tree(tree))
    return SplitOptions(
        two_stage=args.two_stage or options.two_stage,
        writable_ro_after_init=(options.writable_ro_after_init if args.writable_ro_after_init is None
                                else args.writable_ro_after_init == "yes"),
        rules=options.rules,
        discard=options.discard if args.discard is None else args.discard,
        keep_btf=options.keep_btf)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse exits 2 on usage errors and 0 for --help/--version; return
        # instead so main() is callable from tests and other code.
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "split":
        return _split(args)
    if args.command == "analyze":
        return _analyze(args)
    if args.command == "key":
        return _key_create(args.directory)
    return _check(args.module, _split_options(args, args.module))


# -------------------------------------------------------------------- split

def _sign_key(args: argparse.Namespace) -> SigningKey | None:
    """The key --sign-key/--sign-cert, --sign or --sign-configured name, checked; None: do not sign."""
    if (args.sign_key is None) != (args.sign_cert is None):
        raise TreeError("--sign-key and --sign-cert go together")
    if sum((args.sign_key is not None, args.sign, args.sign_configured)) > 1:
        raise TreeError("--sign-key, --sign and --sign-configured exclude each other")
    if args.sign_configured:
        return _configured_key()
    if args.sign_key is not None:
        key: SigningKey | None = SigningKey(args.sign_key, args.sign_cert)
    elif args.sign:
        key = default_key()
        if key is None:
            raise TreeError(f"--sign: no key (neither DKMS's nor {DEFAULT_KEY_DIR}/mok.key); "
                            "make one with 'initsplit key create'")
    else:
        return None
    assert key is not None
    try:
        key = key.pinned()
        key.check_signs()
    except SigningError as exc:
        raise TreeError(str(exc)) from None
    return key


def _configured_key() -> SigningKey | None:
    """The key of the configuration's [Signing] section, checked; None: do not sign."""
    config, errors = _load_config()
    for error in errors:
        print(f"initsplit: {error}", file=sys.stderr)
    try:
        key = configured_key(sign=config.sign, key=config.sign_key, cert=config.sign_cert)
        if key is not None:
            key = key.pinned()
            key.check_signs()
    except SigningError as exc:
        raise TreeError(f"[Signing]: {exc}") from None
    if key is not None:
        print(f"initsplit: signing with {key.key} (certificate {key.cert})", file=sys.stderr)
    return key


def _split(args: argparse.Namespace) -> int:
    start = time.monotonic()
    try:
        sign_key = _sign_key(args)
        jobs = find_modules(args.paths, exclude=args.output)
        if not jobs:
            raise TreeError(f"no {MODULE_SUFFIX} files in {' '.join(map(str, args.paths))}")
        options = _split_options(args, args.paths[0])
        with _progress(len(jobs), sys.stderr, enabled=not args.quiet) as tick:
            results = split_jobs(jobs, args.output, workers=args.jobs, progress=lambda _: tick(),
                                 options=options, sign_key=sign_key)
    except TreeError as exc:
        print(f"initsplit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SigningError as exc:
        # The key worked for the trial signature and failed later (openssl
        # gone, the key replaced mid-run): the same for every module left.
        print(f"initsplit: signing failed, split stopped, {args.output or 'the output'} is "
              f"incomplete: {exc}", file=sys.stderr)
        return EXIT_SIGNING
    except concurrent.futures.process.BrokenProcessPool as exc:
        print(f"initsplit: a worker process died (killed, out of memory?), split stopped, "
              f"{args.output or 'the output'} is incomplete: {exc}", file=sys.stderr)
        return EXIT_USAGE

    problems = [result for result in results if not result.ok]
    for result in problems:
        print(f"initsplit: {result.outcome}: {result.path}: {result.reason}", file=sys.stderr)
    if not args.quiet:
        print(summary_line(results, time.monotonic() - start))
    if args.list_refused:
        for reason, count in refusal_reasons(results):
            print(f"{count:6d}  {reason}")
        for reason, count in refusal_reasons(results, "plain"):
            print(f"{count:6d}  plain: {reason}")
    return EXIT_FAILED if problems else EXIT_OK


@contextlib.contextmanager
def _progress(total: int, stream: TextIO, *, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """Yield a tick() that counts one module done, redrawing one status line.

    Only on a terminal: in logs and pipes a carriage-return line is noise. Redraws
    are limited to ten a second so thousands of small modules do not flood it.
    """
    if not enabled or not stream.isatty():
        yield lambda: None
        return
    start = last = time.monotonic()
    done = 0

    def draw(now: float) -> None:
        rate = done / (now - start) if now > start else 0.0
        stream.write(f"\r\033[K{done}/{total} modules, {rate:.0f}/s")
        stream.flush()

    def tick() -> None:
        nonlocal done, last
        done += 1
        now = time.monotonic()
        if now - last >= 0.1 or done == total:
            last = now
            draw(now)

    try:
        yield tick
    finally:
        # Erase the line so the summary (or an error) starts on a clean one.
        stream.write("\r\033[K")
        stream.flush()


# ---------------------------------------------------------------------- key

def _key_create(directory: Path) -> int:
    try:
        key = create_key(directory)
    except (SigningError, OSError) as exc:
        print(f"initsplit: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"initsplit: private key {key.key} (keep it: root only, never in an initramfs)")
    print(f"initsplit: certificate {key.cert}")
    print("To trust it under Secure Boot, enroll it and reboot to confirm in MokManager:")
    print(f"  mokutil --import {key.cert}")
    print("Anything signed with this key then loads on this machine.")
    return EXIT_OK


# ------------------------------------------------------------------ analyze

def _analyze(args: argparse.Namespace) -> int:
    from . import analyze  # the layout model is only needed here

    tree = args.tree if args.tree is not None else Path("/lib/modules") / os.uname().release
    try:
        jobs = find_modules([tree])
        if args.loaded:
            jobs, missing = analyze.loaded_jobs(jobs)
            for name in missing:
                print(f"initsplit: {name} is loaded but not in {tree}", file=sys.stderr)
        if not jobs:
            raise TreeError(f"no {MODULE_SUFFIX} files in {tree}" + (" loaded now" if args.loaded else ""))
    except (TreeError, OSError) as exc:
        print(f"initsplit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    options = _split_options(args, tree)
    rules = options.rules
    with _progress(len(jobs), sys.stderr, enabled=not args.json) as tick:
        results = analyze.analyze_jobs(jobs, rules, workers=args.jobs, progress=lambda _: tick(),
                                       options=options)
    summary = analyze.summarize(results, rules, str(tree), options)
    for problem in summary["problems"]:
        print(f"initsplit: {problem['outcome']}: {problem['path']}: {problem['reason']}",
              file=sys.stderr)
    if args.json:
        print(analyze.render_json(summary, results))
    else:
        print(analyze.render_text(summary, results, per_module=args.per_module))
    if args.plot is not None:
        try:
            analyze.write_plot(summary, args.plot)
        except OSError as exc:
            print(f"initsplit: {args.plot}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_FAILED if summary["problems"] else EXIT_OK


# -------------------------------------------------------------------- check

def _check(path: Path, options: SplitOptions) -> int:
    try:
        data = read_module(path)
    except OSError as exc:
        print(f"initsplit: {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except CompressedModuleError as exc:
        print(f"initsplit: {path}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        decision = decide(data, options)
    except MalformedElf as exc:
        print(f"initsplit: {path}: not an ELF kernel module: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {exc}")
        return EXIT_FAILED

    if decision.outcome == "nothing":
        print("nothing to split")
    elif decision.outcome == "refused":
        print(f"refused: {decision.reason}" + (f" ({decision.detail})" if decision.detail else ""))
    elif decision.outcome == "invalid":
        assert decision.split is not None
        print(_split_line(decision.split))
        print(f"validation: FAILED: {decision.reason}")
        return EXIT_FAILED
    else:
        split, report = decision.split, decision.report
        assert split is not None and report is not None
        print(_split_line(split))
        print(f"validation: ok ({report.allocated_bytes} allocated bytes, "
              f"{report.relocations} relocations, {report.records_moved} records moved, "
              f"{report.anchors} anchors, {report.synthesized_relocations} synthesized relocations)")
        print(f"core layout: {decision.split_core_pages} pages two-stage, "
              f"{decision.plain_core_pages} plain")
        print(f"slab of the init module: {decision.twostage_slab_bytes} bytes")
        if decision.outcome == "plain":
            print(f"load: plain: {decision.reason}: {decision.detail}")
        else:
            print(f"load: two-stage (TwoStage={options.two_stage})")
    return EXIT_OK


def _split_line(split: SplitModule) -> str:
    return (f"split: {split.name} -> {split.name} + {split.init_name} "
            f"(anchors {len(split.anchors)}, init bytes {len(split.init)})")
