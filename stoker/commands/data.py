"""`stoker data prepare|inspect|apply|sample`."""

import argparse
import json
import sys
from pathlib import Path

from stoker.config import load_config


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="prepare datasets")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    prepare = verbs.add_parser("prepare", help="clean, encode and split the config's data into Parquet shards")
    prepare.add_argument("config")
    prepare.set_defaults(handler=_prepare)
    inspect = verbs.add_parser("inspect", help="summarise a prepared dataset: splits, classes, columns, bias report")
    inspect.add_argument("path", help="prepared dataset directory or s3:// prefix (holds manifest.json)")
    inspect.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    inspect.set_defaults(handler=_inspect)
    apply = verbs.add_parser("apply", help="encode new data with a prepared dataset's fitted transform")
    apply.add_argument("prepared", help="prepared dataset directory or s3:// prefix")
    apply.add_argument("input", help="new raw data: file, directory, glob or s3:// URI")
    apply.add_argument("output", help="Parquet file to write")
    apply.set_defaults(handler=_apply)
    from stoker.samples import SAMPLES

    sample = verbs.add_parser(
        "sample", help="write a sample dataset made from data installed packages ship (what each example needs)",
        description="Samples: " + "; ".join(f"{name}: {what}" for name, (what, _) in SAMPLES.items()),
    )
    sample.add_argument("name", choices=list(SAMPLES))
    sample.add_argument("output", help="file (CSV samples) or folder (digit-images, docstrings) to write")
    sample.set_defaults(handler=_sample)


def _prepare(args: argparse.Namespace) -> int:
    from stoker.datasets.prepare import prepare

    run = load_config(args.config)
    if run.data.engine == "ray":
        from stoker.cluster.connect import connect_embedded

        connect_embedded()  # RAY_ADDRESS joins a cluster; otherwise an embedded local one
    manifest = prepare(run.data, progress=lambda line: print(line, flush=True))
    counts = ", ".join(f"{name} {info['rows']}" for name, info in manifest.splits.items())
    dropped = sum(manifest.dropped.values())
    rejected = sum(manifest.rejected.values())
    features = (f"{manifest.num_features} features" if manifest.modality == "tabular"
                else f"{manifest.modality} input {manifest.input_shape}")
    print(f"prepared {run.data.output}: {counts} rows; {features}"
          + (f"; {manifest.num_classes} classes" if manifest.classes is not None else "")
          + (f"; dropped {dropped} rows ({manifest.dropped})" if dropped else "")
          + (f"; rejected {rejected} records ({manifest.rejected}, see rejected/)" if rejected else ""))
    timing = manifest.report.get("timing", {})
    if timing:
        print(f"took {timing['seconds']:.1f}s ({timing['rows_per_s']:,.0f} rows/s)")
    for warning in manifest.warnings:
        print(f"warning: {warning}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from stoker.datasets.manifest import Manifest
    from stoker.datasets.summary import describe

    manifest = Manifest.read(args.path)
    if args.json:
        sys.stdout.write(manifest.to_json())
    else:
        print(describe(manifest, args.path))
    return 0


def _apply(args: argparse.Namespace) -> int:
    from stoker.datasets.apply import apply

    summary = apply(args.prepared, args.input, args.output)
    print(f"wrote {args.output}: {json.dumps(summary)}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from stoker.samples import SAMPLES

    summary = SAMPLES[args.name][1](Path(args.output))
    print(f"wrote {args.output}: {summary}")
    return 0
