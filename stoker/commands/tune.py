"""`stoker tune CONFIG [--resume]`: a hyperparameter search over trainings of a run config;
`stoker tune CONFIG --pick INDEX`: best.yaml for another trade-off of a finished
multi-objective search's Pareto front."""

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
    group.add_argument("--pick", type=int, metavar="INDEX",
                       help="multi-objective search (tune.metrics): write best.yaml for trade-off INDEX of the "
                            "finished search's Pareto front (the 'pick' column), without running anything")
    parser.add_argument("--status-every", type=float, default=30.0, metavar="S",
                        help="seconds between progress lines (default 30)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's worker logs")
    parser.set_defaults(handler=_tune)


def _tune(args: argparse.Namespace) -> int:
    from stoker.cluster.connect import connect_embedded
    from stoker.cluster.run_life import trial_recorder
    from stoker.config import load_config
    from stoker.errors import UserError
    from stoker.tune.findings import front_lines, importance_lines, pick_tradeoff
    from stoker.tune.runner import check_search, search
    from stoker.tune.storage import experiment_storage, mirrored

    run = load_config(args.config)
    if run.tune is None:
        raise UserError(f"tune: {args.config} has no tune section")
    storage = experiment_storage(run)  # a gs:// or other non-s3 URI: exit 2 naming `storage`
    base, _, _ = check_search(run)  # space, points, dataset and metric: before paying for a cluster start
    storage.check_bucket()  # s3:// storage: an unknown bucket or refused credentials, before Ray starts
    if args.pick is not None:
        with mirrored(storage):  # s3:// storage: the finished search's results, and best.yaml back up
            path, line = pick_tradeoff(base, run.tune, storage.local, args.pick)
        print(f"best config: {path}  ({line}; train it: stoker train {path})")
        return 0
    record = trial_recorder(run, storage)  # a registry that cannot be opened: before Ray starts
    connect_embedded(log_to_driver=args.verbose)
    outcome = search(run, resume=args.resume, fresh=args.fresh,
                     emit=lambda line: print(line, flush=True), status_interval_s=args.status_every, record=record)
    table = outcome.table
    if len(table):
        with_metric = table.drop(columns=["order"])
        print(with_metric.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if outcome.findings is not None:
        for line in [*front_lines(outcome.findings), *importance_lines(outcome.findings)]:
            print(line)
    print(f"\nexperiment: {storage.uri}" + (f"  (staged at {outcome.path})" if storage.remote else ""))
    if outcome.best_config:
        print(f"best config: {outcome.best_config}  (train it: stoker train {outcome.best_config})")
    print(f"report: {outcome.report}")
    if outcome.unfinished:
        # Tune stops gracefully on Ctrl-C and returns as if done: say so, and exit as interrupted.
        count = int((outcome.table["status"] == "unfinished").sum())  # (those with epochs left)
        which = f" with {count} trial{'' if count == 1 else 's'} unfinished" if count else ""
        print(f"stoker: search interrupted{which}; continue it with: stoker tune {args.config} --resume",
              file=sys.stderr)
        return 130
    summary = outcome.failure_summary()
    if summary is not None:
        code, line = summary
        if code == 2:
            raise UserError(line)  # every trial failed on the same kind of bad input: exit 2
        print(f"stoker: {line}", file=sys.stderr)
        return code
    return 0
