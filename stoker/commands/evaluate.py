"""`stoker evaluate RUN --data PATH`: metrics of an exported model on a prepared dataset."""

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("evaluate", help="evaluate an exported model on a prepared dataset")
    parser.add_argument("run", help="run name, run directory or export directory")
    parser.add_argument("--data", required=True, help="prepared dataset directory (with manifest.json)")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--storage", default="runs", help="directory holding run directories (default: runs)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stoker.cluster.connect import connect_embedded
    from stoker.errors import UserError
    from stoker.trainer.evaluate import evaluate_export
    from stoker.trainer.export import MODEL_JSON, find_run

    target = Path(args.run)
    if not (target / MODEL_JSON).is_file():
        export = find_run(args.run, args.storage) / "export"
        if not (export / MODEL_JSON).is_file():
            raise UserError(f"{args.run}: no exported model; run `stoker export {args.run}` first")
        target = export
    if not (Path(args.data) / "manifest.json").is_file():
        raise UserError(f"--data: no prepared dataset at {args.data} (manifest.json missing)")
    connect_embedded()
    result = evaluate_export(target, Path(args.data), args.split)
    for warning in result["warnings"]:
        print(f"stoker: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['split']} split of {result['data']} ({result['rows']} rows): "
              + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
    return 0
