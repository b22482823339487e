"""Raw table -> cleaned, encoded, split Parquet shards plus manifest.json.

Every statistic (imputation values, standardisation, categories) is fit on the training split
only and saved in the manifest, so validation and test rows never leak into training and the
same transform can be applied to new data later.
"""

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.model_selection import train_test_split

from stoker import __version__
from stoker.datasets.config import DataConfig
from stoker.datasets.io import atomic_directory, detect_format, fingerprint, read_table
from stoker.datasets.manifest import LABEL_COLUMN, SPLITS, Manifest
from stoker.errors import UserError


def prepare(config: DataConfig) -> Manifest:
    """Prepare the dataset described by `config` and return its manifest."""
    source = Path(config.source)
    table = read_table(source, detect_format(source, config.format))
    frame = table.to_pandas()
    if frame.empty:
        raise UserError(f"data.source: {source}: no rows")
    if config.label not in frame.columns:
        raise UserError(
            f"data.label: column {config.label!r} is not in {source} "
            f"(columns: {', '.join(map(str, frame.columns[:20]))})"
        )
    features = config.features or [c for c in frame.columns if c != config.label]
    missing_cols = [c for c in features if c not in frame.columns]
    if missing_cols:
        raise UserError(f"data.features: column {missing_cols[0]!r} is not in {source}")
    if not features:
        raise UserError(f"data.features: {source} has no feature columns besides the label")
    categorical = _categorical_columns(frame, features, config.categorical)
    numeric = [c for c in features if c not in categorical]
    for column in numeric:
        if not pd.api.types.is_numeric_dtype(frame[column]):
            bad = frame[column][pd.to_numeric(frame[column], errors="coerce").isna() & frame[column].notna()]
            raise UserError(
                f"{source}: column {column!r} row {bad.index[0] + 1}: {bad.iloc[0]!r} is not a number "
                f"(list it under data.categorical to encode it)"
            )

    dropped: Counter[str] = Counter()
    frame = _drop(frame, frame[config.label].isna(), "missing_label", dropped)
    if config.missing == "drop":
        frame = _drop(frame, frame[features].isna().any(axis=1), "missing_value", dropped)
    if config.task == "regression" and not pd.api.types.is_numeric_dtype(frame[config.label]):
        raise UserError(f"data.label: column {config.label!r} is not numeric, so task cannot be regression")
    if len(frame) < 3:
        raise UserError(f"{source}: only {len(frame)} rows left after cleaning; need at least 3 to split")

    splits = _split(frame, config)
    train = splits["train"]
    transform = _fit_transform(train, numeric, categorical, config)
    classes = sorted(train[config.label].unique().tolist()) if config.task == "classification" else None
    if classes is not None:
        for name in ("validation", "test"):
            unseen = set(splits[name][config.label].unique().tolist()) - set(classes)
            if unseen:
                raise UserError(
                    f"data.label: class {sorted(unseen)[0]!r} has zero training rows after splitting "
                    f"(it appears only in {name}); add rows of it or drop it"
                )

    encoded = {name: _apply(part, transform, config, classes) for name, part in splits.items()}
    feature_names = [f for f in encoded["train"].column_names if f != LABEL_COLUMN]
    manifest = Manifest(
        stoker_version=__version__,
        source=str(source),
        source_fingerprint=fingerprint(source),
        task=config.task,
        label=config.label,
        classes=classes,
        features=feature_names,
        transform=transform,
        dropped=dict(dropped),
        splits={},
    )
    output = Path(config.output)
    with atomic_directory(output) as staging:
        for name, part in encoded.items():
            files = _write_shards(part, staging / name, config.rows_per_shard)
            manifest.splits[name] = {
                "rows": part.num_rows,
                "files": files,
                "class_counts": _class_counts(part, classes),
            }
        manifest.write(staging)
    return manifest


def _categorical_columns(frame: pd.DataFrame, features: list[str], declared: list[str] | None) -> list[str]:
    if declared is None:
        return [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])]
    unknown = [c for c in declared if c not in features]
    if unknown:
        raise UserError(f"data.categorical: {unknown[0]!r} is not a feature column")
    return list(declared)


def _drop(frame: pd.DataFrame, mask: pd.Series, reason: str, dropped: Counter) -> pd.DataFrame:
    count = int(mask.sum())
    if count:
        dropped[reason] += count
        frame = frame[~mask]
    if frame.empty:
        raise UserError(f"data.missing: every row was dropped ({reason}); impute instead of dropping")
    return frame


def _split(frame: pd.DataFrame, config: DataConfig) -> dict[str, pd.DataFrame]:
    fractions = config.split
    stratify = config.task == "classification" and fractions.stratify
    labels = frame[config.label]
    try:
        train, rest = train_test_split(
            frame, train_size=fractions.train, random_state=fractions.seed,
            stratify=labels if stratify else None,
        )
        validation, test = train_test_split(
            rest, train_size=fractions.validation / (fractions.validation + fractions.test),
            random_state=fractions.seed, stratify=rest[config.label] if stratify else None,
        )
    except ValueError as exc:
        # scikit-learn refuses to stratify classes with fewer rows than splits.
        raise UserError(f"data.split: cannot split {len(frame)} rows: {exc}") from None
    return {"train": train, "validation": validation, "test": test}


def _fit_transform(train: pd.DataFrame, numeric: list[str], categorical: list[str], config: DataConfig) -> dict:
    """Statistics of the training split that define the transform of every split."""
    numeric_stats = {}
    for column in numeric:
        values = train[column].astype("float64")
        fill = {
            "drop": None, "mean": values.mean(), "median": values.median(),
            "mode": values.mode().iloc[0] if values.notna().any() else 0.0, "constant": config.fill_value,
        }[config.missing]
        std = float(values.std(ddof=0)) if values.notna().any() else 0.0
        numeric_stats[column] = {
            "mean": float(values.mean()) if values.notna().any() else 0.0,
            # A constant column would divide by zero; leaving it unscaled keeps it at 0.
            "std": std if std > 0 else 1.0,
            "min": float(values.min()) if values.notna().any() else None,
            "max": float(values.max()) if values.notna().any() else None,
            "fill": None if fill is None or pd.isna(fill) else float(fill),
        }
    categorical_stats = {}
    for column in categorical:
        values = train[column].astype("string")
        fill = values.mode().iloc[0] if config.missing == "mode" and values.notna().any() else None
        categorical_stats[column] = {
            "categories": sorted(values.dropna().unique().tolist()),
            "fill": fill,
        }
    return {"numeric": numeric_stats, "categorical": categorical_stats}


def _apply(part: pd.DataFrame, transform: dict, config: DataConfig, classes: list | None) -> pa.Table:
    """Encode one split with the training statistics; unknown categories become all zeros."""
    columns: dict[str, np.ndarray] = {}
    for column, stats in transform["numeric"].items():
        values = part[column].astype("float64")
        if stats["fill"] is not None:
            values = values.fillna(stats["fill"])
        columns[column] = ((values.to_numpy() - stats["mean"]) / stats["std"]).astype(np.float32)
    for column, stats in transform["categorical"].items():
        values = part[column].astype("string")
        if stats["fill"] is not None:
            values = values.fillna(stats["fill"])
        for category in stats["categories"]:
            columns[f"{column}={category}"] = (values == category).fillna(False).to_numpy(dtype=np.float32)
    if classes is not None:
        index = {c: i for i, c in enumerate(classes)}
        columns[LABEL_COLUMN] = part[config.label].map(index).to_numpy(dtype=np.int64)
    else:
        columns[LABEL_COLUMN] = part[config.label].to_numpy(dtype=np.float32)
    return pa.table(columns)


def _write_shards(table: pa.Table, directory: Path, rows_per_shard: int) -> list[str]:
    directory.mkdir(parents=True)
    files = []
    for index, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
        name = f"part-{index:05d}.parquet"
        pq.write_table(table.slice(start, rows_per_shard), directory / name)
        files.append(f"{directory.name}/{name}")
    return files


def _class_counts(table: pa.Table, classes: list | None) -> dict[str, int] | None:
    if classes is None:
        return None
    counts = np.bincount(table[LABEL_COLUMN].to_numpy(), minlength=len(classes))
    return {str(c): int(n) for c, n in zip(classes, counts, strict=True)}


__all__ = ["prepare", "SPLITS"]
