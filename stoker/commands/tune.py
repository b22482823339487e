"""`stoker tune CONFIG [--resume]`: a hyperparameter search over trainings of a run config."""

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("tune", help="search hyperparameters (the config's tune section) with Ray Tune")
    parser.add_argument("config")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue an interrupted search (an error if there is none); "
                            "rerunning the same experiment without it also continues")
    group.add_argument("--fresh", action="store_true", help="discard an earlier search of the same name")
    parser.add_argument("--status-every", type=float, default=30.0, metavar="S",
                        help="seconds between progress lines (default 30)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's worker logs")
    parser.set_defaults(handler=_tune)


def _tune(args: argparse.Namespace) -> int:
    from stoker.cluster.connect import connect_embedded
    from stoker.config import load_config
    from stoker.datasets.manifest import Manifest
    from stoker.errors import UserError
    from stoker.tune.runner import search

    run = load_config(args.config)
    if run.tune is None:
        raise UserError(f"tune: {args.config} has no tune section")
    Manifest.read(run.data.output, run.data.s3)  # before paying for a cluster start
    connect_embedded(log_to_driver=args.verbose)
    outcome = search(run, resume=args.resume, fresh=args.fresh,
                     emit=lambda line: print(line, flush=True), status_interval_s=args.status_every)
    table = outcome.table
    if len(table):
        with_metric = table.drop(columns=["order"])
        print(with_metric.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\nexperiment: {outcome.path}")
    if outcome.best_config:
        print(f"best config: {outcome.best_config}  (train it: stoker train {outcome.best_config})")
    print(f"report: {outcome.report}")
    if outcome.unfinished:
        # Tune stops gracefully on Ctrl-C and returns as if done: say so, and exit as interrupted.
        count = len(outcome.unfinished)
        print(f"stoker: search interrupted with {count} trial{'' if count == 1 else 's'} unfinished; "
              f"continue it with: stoker tune {args.config} --resume", file=sys.stderr)
        return 130
    return 0
