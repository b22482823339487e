"""`stoker`: one table of subcommands, one module per verb (stoker/commands/).

Exit codes: 0 success, 2 user error (one line naming the file, key, row or column; the
traceback only with --debug), 1 internal failure.
"""

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from stoker import __version__
from stoker.commands import (
    config_cmd,
    dashboard,
    data,
    evaluate,
    export,
    jobs,
    k8s,
    models,
    monitor,
    runs,
    submit,
    train,
    tune,
)
from stoker.errors import UserError

# Each entry registers its verb(s) on the subparsers; only commands that work are listed.
COMMANDS = (data, train, export, evaluate, config_cmd, k8s, submit, jobs, runs, models, monitor, tune,
            dashboard)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stoker", description="Distributed training runtime on Ray + DeepSpeed.")
    parser.add_argument("--version", action="version", version=f"stoker {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (accepted anywhere on the command line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS:
        module.register(sub)
    return parser


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """`--debug` taken from anywhere before a `--` (`stoker train x.yaml --debug` as well as
    `stoker --debug train x.yaml`). No option takes a value that starts with `--`, so the flag
    is never some other option's argument."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [a for a in argv[:end] if a != "--debug"] + argv[end:]
    return kept, len(kept) != len(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"stoker: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error of ours.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps interpreter shutdown quiet
        return 0
    except KeyboardInterrupt:
        print("stoker: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if args.debug:
            traceback.print_exc()
        else:
            print(f"stoker: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
