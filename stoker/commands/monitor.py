"""`stoker monitor RUN --data PATH`: flag drift of new data and degradation of a trained run.

Labelled data is scored with the run's model (its export, else its best checkpoint) on the
embedded Ray cluster (or the one RAY_ADDRESS names from inside a Ray Job).
Exit codes for automation: 0 within thresholds, 3 drift or degradation found, 2 bad input.
"""

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from stoker.commands.runs import add_registry_options, open_registry
from stoker.config import recorded_run
from stoker.errors import UserError

BREACH_EXIT = 3


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("monitor", help="flag drift and degradation of a run's model on new data")
    parser.add_argument("run", help="run directory (a path or s3:// URI), or run id / name in the registry")
    parser.add_argument("--data", required=True, help="new raw data, as `stoker data prepare` read it: CSV or Parquet "
                        "file, or a directory of Parquet files, local or s3:// (with the run's data.s3 options); "
                        "with the label column, the model is scored on it")
    parser.add_argument("--psi", type=float, help="override cluster.monitor.psi")
    parser.add_argument("--max-metric-drop", type=float, help="override cluster.monitor.max_metric_drop")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_registry_options(parser)
    parser.set_defaults(handler=_monitor)


def find_run_dir(args: argparse.Namespace) -> Path | str:
    """The run's directory, or for a run on S3 its `s3://` URI."""
    from stoker.trainer.run_dir import Records

    candidate = Path(args.run)
    if args.run.startswith("s3://"):
        return args.run
    if Records(candidate).dataset() is not None:
        return candidate.resolve()
    record = open_registry(args).find_run(args.run)
    if record.run_dir and record.run_dir.startswith("s3://"):
        return record.run_dir
    if not record.run_dir or Records(Path(record.run_dir)).dataset() is None:
        raise UserError(f"run {record.id} ({record.name}): its run directory {record.run_dir} is not readable here")
    return Path(record.run_dir)


@contextlib.contextmanager
def readable_run_dir(found: Path | str) -> Iterator[Path]:
    """A local run directory to monitor: the run directory itself; for a run on S3 its staging
    copy when that holds an export (records refreshed from S3), else a temporary copy of its
    records and best checkpoint (stoker.trainer.run_dir)."""
    if isinstance(found, Path):
        yield found
        return
    from stoker.trainer.run_dir import EXPORT_MODEL, fetched_for_export, find_on_s3

    run = find_on_s3(found, "runs")
    if (run.records.export / EXPORT_MODEL).is_file():
        run.pull_records()  # keeps the local export
        yield run.local
        return
    with fetched_for_export(run, "best") as copy:
        yield copy


def _monitor(args: argparse.Namespace) -> int:
    from stoker.cluster.config import MonitorConfig
    from stoker.cluster.monitor import format_report, monitor
    from stoker.datasets.config import S3Config

    with readable_run_dir(find_run_dir(args)) as run_dir:
        run = recorded_run(run_dir)
        limits = run.cluster.monitor if run is not None else MonitorConfig()
        overrides = {k: v for k, v in (("psi", args.psi), ("max_metric_drop", args.max_metric_drop)) if v is not None}
        if overrides:
            limits = MonitorConfig.model_validate({**limits.model_dump(), **overrides})
        # --data and the run's dataset: local paths or s3:// URIs, read with the run's data.s3.
        report = monitor(run_dir, args.data, limits, run.data.s3 if run is not None else S3Config())
    print(json.dumps(report.to_json()) if args.json else format_report(report, limits))
    return BREACH_EXIT if report.breached else 0
