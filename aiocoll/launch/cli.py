"""The ``aiocoll`` command: ``run``, ``bench``, ``transports`` and ``--version``.

``aiocoll run`` must hand everything after the script (or ``-m module``) to the script untouched,
``--timeout`` and ``-n`` included. argparse cannot be told where its options stop, so the command
line is split by hand at the first word that is not one of ``run``'s own options, and argparse
parses only the part before it. Subcommands import their implementation lazily, so that
``aiocoll run`` does not pay for the benchmark's imports.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence

from .. import __version__

__all__ = ["main"]

# Looked up when `aiocoll bench` runs; a build without it says so instead of failing to import.
_BENCH_MODULE = "aiocoll.launch.bench"

# run's own options, by whether they take a value; the split below must agree with _run_parser.
_RUN_VALUE_OPTIONS = frozenset({"-n", "--nprocs", "--transport", "--timeout", "--grace"})
_RUN_FLAG_OPTIONS = frozenset({"-h", "--help", "--no-prefix"})

_COMMANDS = {
    "run": "start N local ranks of a Python script or module",
    "bench": "time collectives, nccl-tests style",
    "transports": "list the transports found, installed or not, and why",
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _float_check(ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiocoll",
        description="asyncio-native collective communication",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"aiocoll {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in _COMMANDS.items():
        commands.add_parser(name, help=summary)
    return parser


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiocoll run",
        usage="aiocoll run -n N [options] (script.py | -m module) [args ...]",
        description="Start N local ranks with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and "
        "AIOCOLL_SECRET set; relay their output prefixed by rank; if one fails, stop the others "
        "and exit with its code. Everything after the script or module goes to it unchanged.",
        allow_abbrev=False,
    )
    parser.add_argument("-n", "--nprocs", type=_positive_int, required=True, metavar="N",
                        help="number of ranks")
    parser.add_argument("--transport", metavar="T",
                        help="sets AIOCOLL_TRANSPORT for the ranks (tcp, shm, auto, ...)")
    parser.add_argument("--timeout", type=_float_check(lambda v: v > 0, "positive"), metavar="S",
                        help="sets AIOCOLL_TIMEOUT, the ranks' default collective timeout")
    parser.add_argument("--grace", type=_float_check(lambda v: v >= 0, ">= 0"), default=5.0,
                        metavar="S", help="seconds between SIGTERM and SIGKILL when stopping "
                        "ranks (default 5)")
    parser.add_argument("--no-prefix", dest="prefix_output", action="store_false",
                        help="let ranks write straight to the terminal, without [rank] prefixes")
    return parser


def _split_run_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``run``'s arguments into its own options and the target's argv.

    The target argv is ``[script, *args]`` or ``["-m", module, *args]``; ``--`` may separate the
    two parts. An unknown option before the target stays on the options side, where argparse
    rejects it.
    """
    args = list(argv)
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            return args[:i], args[i + 1 :]
        if word == "-m":
            return args[:i], args[i:]
        if word.startswith("-m") and not word.startswith("--"):
            # python's own `-mmodule` spelling
            return args[:i], ["-m", word[2:], *args[i + 1 :]]
        if word in _RUN_VALUE_OPTIONS:
            i += 2
        elif word.startswith("--") and word.split("=", 1)[0] in _RUN_VALUE_OPTIONS:
            i += 1
        elif word.startswith("-n") and not word.startswith("--"):
            i += 1  # -n4
        elif word in _RUN_FLAG_OPTIONS:
            i += 1
        elif word.startswith("-") and word != "-":
            return args[: i + 1], []
        else:
            return args[:i], args[i:]
    return args, []


def _run(argv: Sequence[str]) -> int:
    from .launcher import check_transport, run_launch

    parser = _run_parser()
    own, target = _split_run_argv(argv)
    args = parser.parse_args(own)
    if not target:
        parser.error("expected a script or -m module to run")
    if target[0] == "-m":
        if len(target) < 2 or not target[1]:
            parser.error("-m needs a module name")
    elif not os.path.exists(target[0]):
        # Checked once here rather than reported N times by N interpreters.
        print(f"aiocoll run: can't open file {target[0]!r}: no such file", file=sys.stderr)
        return 2
    if args.transport is not None:
        try:
            check_transport(args.transport)
        except ValueError as exc:
            print(f"aiocoll run: --transport: {exc}", file=sys.stderr)
            return 2
    try:
        result = run_launch(
            target,
            args.nprocs,
            transport=args.transport,
            timeout=args.timeout,
            grace=args.grace,
            prefix_output=args.prefix_output,
        )
    except OSError as exc:
        print(f"aiocoll run: could not start the ranks: {exc}", file=sys.stderr)
        return 1
    return result.exit_code


def _bench(argv: Sequence[str]) -> int:
    # find_spec rather than catching ImportError: a benchmark that exists but fails to import
    # (a missing dependency inside it) must say so, not claim to be absent.
    if importlib.util.find_spec(_BENCH_MODULE) is None:
        print("aiocoll bench: not available in this build", file=sys.stderr)
        return 2
    bench = importlib.import_module(_BENCH_MODULE)
    code = bench.main(list(argv))
    return 0 if code is None else int(code)


def _transports(argv: Sequence[str]) -> int:
    argparse.ArgumentParser(
        prog="aiocoll transports",
        description="List the transports found, installed or not, and why.",
    ).parse_args(list(argv))
    listing = importlib.import_module("aiocoll.transports.__main__")
    return int(listing.main())


def _dispatch(argv: Sequence[str]) -> int:
    if argv and argv[0] == "run":
        return _run(argv[1:])
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    if argv and argv[0] == "transports":
        return _transports(argv[1:])
    parser = _top_parser()
    # Handles --version and --help (exiting), and rejects unknown commands.
    parser.parse_args(argv)
    parser.print_help(sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``aiocoll`` command with ``argv`` (default ``sys.argv[1:]``); return its exit code.

    Usage errors print argparse's message and return 2; ``--help`` and ``--version`` return 0.
    ``aiocoll run`` returns the first failing rank's exit code (``128 + signal`` for a signal).

    Raises:
        Exception: whatever a subcommand's implementation raises unexpectedly (bench, transports).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(args)
    except SystemExit as exc:
        # argparse exits on --help, --version and usage errors; callers get the code instead.
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1
