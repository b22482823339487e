"""`stoker export RUN`: one safetensors file + config + data transforms from a run's checkpoint."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export", help="consolidate a run's checkpoint into model.safetensors + config")
    parser.add_argument("run", help="run name (under --storage) or run directory")
    parser.add_argument("--storage", default="runs", help="directory holding run directories (default: runs)")
    parser.add_argument("--output", help="export directory (default: <run dir>/export)")
    parser.add_argument("--checkpoint", choices=["best", "latest"], default="best",
                        help="the best epoch by train.metric (default) or the latest")
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    import contextlib
    import json
    import os
    import sys
    from pathlib import Path

    from stoker.trainer.export import MODEL_JSON, export_run, find_run

    run_dir = find_run(args.run, args.storage)
    # stdout carries stoker's own line: DeepSpeed's log lines (its logger is bound to the stream
    # that is stdout when it is first imported, here) go to stderr, its progress bar nowhere.
    os.environ.setdefault("TQDM_DISABLE", "1")
    with contextlib.redirect_stdout(sys.stderr):
        output = export_run(run_dir, Path(args.output) if args.output else None, args.checkpoint)
    meta = json.loads((output / MODEL_JSON).read_text())
    print(f"exported {run_dir.name} epoch {meta['epoch']} ({args.checkpoint} checkpoint, {meta['checkpoint']}) "
          f"to {output}")
    return 0
