"""`stoker evaluate RUN --data PATH`: metrics of an exported model on a prepared dataset."""

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("evaluate", help="evaluate an exported model on a prepared dataset")
    parser.add_argument("run", help="run name, run directory (a path or s3:// URI), the run's config file or "
                                    "export directory")
    parser.add_argument("--data", required=True, help="prepared dataset: directory or s3:// prefix (with manifest.json)")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--storage", default="runs",
                        help="directory or s3:// prefix holding run directories (default: runs)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stoker.commands.export import locate_run
    from stoker.config import recorded_run
    from stoker.datasets.config import S3Config
    from stoker.datasets.manifest import Manifest
    from stoker.errors import UserError
    from stoker.trainer.evaluate import evaluate_export
    from stoker.trainer.export import MODEL_JSON, find_run
    from stoker.trainer.run_dir import Records

    target = Path(args.run)
    if not (target / MODEL_JSON).is_file():
        # A run on S3 (or given by its config) is exported to its local run directory, or
        # for S3 the local staging copy of it (`stoker export`'s default).
        located = locate_run(args.run, args.storage)
        export = Records(located.local if located is not None else find_run(args.run, args.storage)).export
        if not (export / MODEL_JSON).is_file():
            raise UserError(f"{args.run}: no exported model; run `stoker export {args.run}` first")
        target = export
    # --data is a local path or an s3:// URI, read with the run's data.s3 options (the export
    # carries the run's config).
    run = recorded_run(target)
    s3 = run.data.s3 if run is not None else S3Config()
    Manifest.read(args.data, s3, key="--data")  # a missing dataset: one line naming --data
    result = evaluate_export(target, args.data, args.split, s3=s3)
    for warning in result["warnings"]:
        print(f"stoker: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['split']} split of {result['data']} ({result['rows']} rows): "
              + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
    return 0
