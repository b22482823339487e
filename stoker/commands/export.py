"""`stoker export RUN`: one safetensors file + config + data transforms from a run's checkpoint."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export", help="consolidate a run's checkpoint into model.safetensors + config")
    parser.add_argument("run", help="run name (under --storage), run directory (a path or s3:// URI) or the run's config file")
    parser.add_argument("--storage", default="runs",
                        help="directory or s3:// prefix holding run directories (default: runs)")
    parser.add_argument("--output", help="export directory (default: <run dir>/export; for a run on S3, "
                                         "the local staging copy of its run directory)")
    parser.add_argument("--checkpoint", choices=["best", "latest"], default="best",
                        help="the best epoch by train.metric (default) or the latest")
    parser.set_defaults(handler=_export)


def locate_run(ref: str, storage: str):
    """The `RunDir` (stoker.trainer.run_dir) of the run `ref` names when that is a run
    config file or a run on S3; None for a local run name or directory (`find_run` finds those)."""
    from pathlib import Path

    from stoker.trainer.run_dir import find_on_s3, locate

    if ref.endswith((".yaml", ".yml")) and Path(ref).is_file():
        from stoker.config import load_config

        run = load_config(ref)
        return find_on_s3(run.name, run.storage, run.data.s3) or locate(run.storage, run.name, run.data.s3)
    return find_on_s3(ref, storage)


def _export(args: argparse.Namespace) -> int:
    import contextlib
    import json
    import os
    import sys
    from pathlib import Path

    from stoker.errors import UserError
    from stoker.trainer.export import MODEL_JSON, export_run, find_run
    from stoker.trainer.run_dir import fetched_for_export

    if args.output and args.output.startswith("s3://"):
        raise UserError("--output: the export is written to a local directory; s3:// is not supported")
    target = locate_run(args.run, args.storage)
    output_arg = Path(args.output) if args.output else None
    # stdout carries stoker's own line: DeepSpeed's log lines (its logger is bound to the stream
    # that is stdout when it is first imported, here) go to stderr, its progress bar nowhere.
    os.environ.setdefault("TQDM_DISABLE", "1")
    with contextlib.redirect_stdout(sys.stderr):
        if target is not None and target.remote:
            # Only the chosen checkpoint (and the run's records) is downloaded, to a temporary
            # directory; the export is written locally.
            with fetched_for_export(target, args.checkpoint) as run_dir:
                output = export_run(run_dir, output_arg or target.records.export, args.checkpoint)
        else:
            if target is not None and not target.records.exists():
                raise UserError(f"{args.run}: no run directory at {target.local} (has it trained?)")
            run_dir = target.local if target is not None else find_run(args.run, args.storage)
            output = export_run(run_dir, output_arg, args.checkpoint)
    meta = json.loads((output / MODEL_JSON).read_text())
    name = target.uri if target is not None else run_dir.name
    print(f"exported {name} epoch {meta['epoch']} ({args.checkpoint} checkpoint, {meta['checkpoint']}) "
          f"to {output}")
    return 0
