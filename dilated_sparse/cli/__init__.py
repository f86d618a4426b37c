"""The ``dilated-sparse`` command line (also ``python -m dilated_sparse``).

Subcommands:

* ``info``: versions, how the extension was loaded, compiled architectures and head dims, devices.
* ``show PATTERN [pattern options] --seq-len N --block-size B``: draw a pattern's block layout
  (``-o file.png`` with matplotlib, or ``--ascii`` in the terminal) and print its statistics.
* ``bench``: time this op against the reference, dense SDPA and FlexAttention; table, JSON, plot.
* ``check``: a quick self-test of the installed build against the reference on each device.

Bad options print one line naming the option and exit with status 2 (never a traceback);
failures at run time print one line and exit with status 1 (``DILATED_SPARSE_DEBUG=1`` shows the
traceback instead).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from . import bench, check, info, show
from ._args import ArgumentParser, CliError, one_line

__all__ = ["build_parser", "main"]

PROG = "dilated-sparse"
_COMMANDS = {"info": info, "show": show, "bench": bench, "check": check}


def build_parser(prog: str = PROG) -> ArgumentParser:
    """The top-level parser with one subparser per command."""
    parser = ArgumentParser(
        prog=prog,
        description="Block-sparse attention over CSR block lists: inspect, draw, benchmark, check.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for module in _COMMANDS.values():
        module.add_parser(sub)
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Status 0: success; 1: the command ran and failed (a self-test failed, a run-time error);
    2: bad options (one line on stderr naming the option).
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    try:
        args, extra = parser.parse_known_args(args_list)
    except SystemExit as stop:  # argparse already printed its one line (or --help / --version)
        return int(stop.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    module = _COMMANDS[args.command]
    sub_prog = f"{prog} {args.command}"
    if extra and not getattr(module, "ACCEPTS_PATTERN_OPTIONS", False):
        print(f"{sub_prog}: error: unrecognized arguments: {' '.join(extra)}", file=sys.stderr)
        return 2
    try:
        return int(module.run(args, extra) or 0)
    except CliError as error:
        print(f"{sub_prog}: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{sub_prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if os.environ.get("DILATED_SPARSE_DEBUG"):
            raise
        print(f"{sub_prog}: error: {type(error).__name__}: {one_line(str(error))}", file=sys.stderr)
        return 1
