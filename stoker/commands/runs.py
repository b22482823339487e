"""`stoker runs list|show|compare`: the runs registry."""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from stoker.cluster.registry import ENV_URL, STATUSES, Registry, RunRecord, redact, resolve_url
from stoker.commands.tables import print_records, print_table, progress_cell, workers_cell
from stoker.errors import UserError


def add_registry_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--registry", metavar="URL",
        help="registry database URL (default: STOKER_REGISTRY_URL, else the one --config records into, "
             "else sqlite in --storage)",
    )
    parser.add_argument(
        "--config", metavar="CONFIG",
        help="read the registry this run config's runs are recorded in, as `stoker train` wrote it "
             "(its cluster.registry.url, else <storage>/registry.db)",
    )
    parser.add_argument("--storage", help="run storage directory holding registry.db (default: runs)")


def registry_url(args: argparse.Namespace) -> tuple[str, str]:
    """(URL, where it came from) of the registry a verb reads: found the way `stoker train`
    writes it (`stoker.cluster.registry.registry_for_run`), so a run recorded by a config is
    found again from that config wherever the command runs."""
    if args.registry:
        return args.registry, "--registry"
    if os.environ.get(ENV_URL):
        return os.environ[ENV_URL], ENV_URL
    if args.config:
        from stoker.config import load_config

        run = load_config(args.config)
        if args.storage:
            run = run.model_copy(update={"storage": args.storage})
        url = resolve_url(run.cluster.registry.url, run.storage)
        return url, f"--config {args.config}"
    return resolve_url(None, args.storage or "runs"), f"--storage {args.storage}" if args.storage else "the default --storage runs"


def open_registry(args: argparse.Namespace, announce: bool = False) -> Registry:
    """The registry a verb reads. It must exist: a verb that reads runs never creates an empty
    registry (which would answer "no runs" from the wrong directory)."""
    url, origin = registry_url(args)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:") \
            and not Path(parsed.database).is_file():
        raise UserError(
            f"no runs registry at {parsed.database} (from {origin}); runs are recorded in the registry of "
            "the config that trained them: pass --config CONFIG, --storage DIR or --registry URL, "
            f"or set {ENV_URL}"
        )
    if announce:
        print(f"registry: {redact(url)}", file=sys.stderr)
    return Registry(url)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("runs", help="list, show and compare recorded runs")
    verbs = parser.add_subparsers(dest="runs_command", metavar="VERB")
    verbs.required = True

    listing = verbs.add_parser("list", help="recorded runs, newest first")
    listing.add_argument("--name", help="only runs of this name")
    listing.add_argument("--status", choices=STATUSES)
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    add_registry_options(listing)
    listing.set_defaults(handler=_list)

    show = verbs.add_parser("show", help="everything recorded about one run")
    show.add_argument("run", help="run id, id prefix or name (the latest run of that name)")
    add_registry_options(show)
    show.set_defaults(handler=_show)

    compare = verbs.add_parser("compare", help="config and metric differences between runs")
    compare.add_argument("runs", nargs="+", metavar="RUN")
    add_registry_options(compare)
    compare.set_defaults(handler=_compare)


def summary(record: RunRecord) -> dict[str, Any]:
    return {
        "id": record.id, "name": record.name, "status": record.status,
        "created_at": record.created_at.isoformat(timespec="seconds"),
        "updated_at": record.updated_at.isoformat(timespec="seconds"),
        "config_hash": record.config_hash, "data_fingerprint": record.data_fingerprint,
        "data_path": record.data_path, "stoker_version": record.stoker_version,
        "git_commit": record.git_commit, "git_dirty": record.git_dirty,
        "metric": record.metric, "best_epoch": record.best_epoch, "score": record.score,
        "metrics": record.metrics, "checkpoint": record.checkpoint, "run_dir": record.run_dir,
        "submission_id": record.submission_id, "address": record.address, "error": record.error,
    }


def _list(args: argparse.Namespace) -> int:
    registry = open_registry(args, announce=True)
    records = registry.runs(name=args.name, status=args.status, limit=args.limit)
    print_records([{**summary(r), "progress": _progress(r)} for r in records], LIST_COLUMNS, args.json)
    return 0


def _progress(record: RunRecord) -> dict[str, Any] | None:
    """A running run's epoch, samples/s and ETA, where this machine can read its records (a
    local or shared folder; an S3 run's registry row has its scores once it ends)."""
    from stoker.trainer.run_dir import Records, is_s3

    if record.status != "running" or not record.run_dir or is_s3(record.run_dir):
        return None
    return Records(Path(record.run_dir)).progress()


LIST_COLUMNS = [
    ("ID", lambda r: r["id"]),
    ("NAME", lambda r: r["name"]),
    ("STATUS", lambda r: r["status"]),
    ("CREATED", lambda r: r["created_at"][:16].replace("T", " ")),
    ("SCORE", lambda r: f"{r['metric']}={r['score']:.4f}" if r["score"] is not None else None),
    ("WORKERS", lambda r: workers_cell((r["metrics"] or {}).get("scaling"))),
    ("PROGRESS", lambda r: progress_cell(r["progress"])),
    ("DATA", lambda r: (r["data_fingerprint"] or "-").removeprefix("sha256:")[:12]),
    ("COMMIT", lambda r: (r["git_commit"] or "-")[:10]),
]


def _show(args: argparse.Namespace) -> int:
    record = open_registry(args).find_run(args.run)
    details = summary(record)
    details["config"] = record.config
    print(json.dumps(details, indent=2, default=str))
    return 0


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def compare_rows(records: list[RunRecord]) -> list[tuple[str, ...]]:
    """The keys where the runs differ: identity, data, code, config, then every metric."""
    columns = [
        {
            "status": r.status, "data_fingerprint": r.data_fingerprint, "git_commit": r.git_commit,
            "config_hash": r.config_hash, "best_epoch": r.best_epoch,
            **{f"config.{k}": v for k, v in _flatten(r.config or {}).items() if k not in ("name",)},
        }
        for r in records
    ]
    metric_columns = [_flatten(r.metrics or {}) for r in records]
    rows = [("KEY", *(f"{r.name} ({r.id})" for r in records))]
    keys = list(dict.fromkeys(k for column in columns for k in column))
    for key in keys:
        values = [column.get(key) for column in columns]
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1:
            rows.append((key, *("-" if v is None else str(v) for v in values)))
    metric_keys = list(dict.fromkeys(k for column in metric_columns for k in column))
    for key in metric_keys:
        rows.append((f"metrics.{key}", *(_cell(column.get(key)) for column in metric_columns)))
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _compare(args: argparse.Namespace) -> int:
    registry = open_registry(args)
    records = [registry.find_run(ref) for ref in args.runs]
    if len(records) < 2:
        raise UserError("runs compare: give at least two runs")
    print_table(compare_rows(records))
    return 0

