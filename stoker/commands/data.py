"""`stoker data prepare|sample`."""

import argparse
from pathlib import Path

from stoker.config import load_config
from stoker.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="prepare datasets")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    prepare = verbs.add_parser("prepare", help="clean, encode and split the config's data into Parquet shards")
    prepare.add_argument("config")
    prepare.set_defaults(handler=_prepare)
    sample = verbs.add_parser("sample", help="export a dataset bundled with scikit-learn to CSV")
    sample.add_argument("name", choices=sorted(_SAMPLES))
    sample.add_argument("output", help="CSV file to write")
    sample.set_defaults(handler=_sample)


def _prepare(args: argparse.Namespace) -> int:
    from stoker.datasets.prepare import prepare

    run = load_config(args.config)
    manifest = prepare(run.data)
    counts = ", ".join(f"{name} {info['rows']}" for name, info in manifest.splits.items())
    dropped = sum(manifest.dropped.values())
    print(f"prepared {run.data.output}: {counts} rows; {manifest.num_features} features"
          + (f"; {manifest.num_classes} classes" if manifest.classes is not None else "")
          + (f"; dropped {dropped} rows ({manifest.dropped})" if dropped else ""))
    return 0


# Public datasets that ship inside scikit-learn, so the demo needs no download.
_SAMPLES = {
    "digits": "load_digits",
    "breast_cancer": "load_breast_cancer",
    "iris": "load_iris",
    "wine": "load_wine",
    "diabetes": "load_diabetes",
}


def _sample(args: argparse.Namespace) -> int:
    import sklearn.datasets

    from stoker.datasets.io import atomic_file

    frame = getattr(sklearn.datasets, _SAMPLES[args.name])(as_frame=True).frame
    output = Path(args.output)
    if output.suffix.lower() != ".csv":
        raise UserError(f"{output}: the sample is written as CSV; name the file *.csv")
    with atomic_file(output) as tmp:
        frame.to_csv(tmp, index=False)
    print(f"wrote {output}: {len(frame)} rows, {frame.shape[1]} columns (label column: target)")
    return 0
