"""Drift and degradation of a trained run on new data.

The new data is encoded by the run's prepared-dataset transform (`stoker data apply`), so it is
compared with the training split in the space the model saw. Numeric features: population
stability index over the training deciles and the two-sample Kolmogorov-Smirnov test.
Categorical features and the label: PSI over the categories, with an "unseen" bucket. When the
new data is labelled, the run's model (its export, else its best checkpoint) is scored on it
with the trainer's evaluation code and compared with the run's test metrics.
"""

import contextlib
import math
import posixpath
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import stats

from stoker.cluster.config import MonitorConfig
from stoker.datasets.apply import apply
from stoker.datasets.config import S3Config
from stoker.datasets.manifest import LABEL_COLUMN, Manifest
from stoker.datasets.storage import bare_path, exists, filesystem, join, open_uri, storage_errors
from stoker.errors import UserError

BINS = 10
EPSILON = 1e-4  # floor for empty bins so PSI stays finite
UNSEEN = "<unseen>"
ENCODED = "new.parquet"
NEW_SPLIT = "new"


@dataclass
class FeatureDrift:
    feature: str
    kind: str
    psi: float
    ks_statistic: float | None = None
    ks_pvalue: float | None = None
    drifted: bool = False


@dataclass
class MetricChange:
    metric: str
    test: float
    new: float
    drop: float
    degraded: bool


@dataclass
class MonitorReport:
    run: str
    data: str
    rows: int
    imputed_rows: int = 0
    unknown_labels: int = 0
    model: str = ""
    features: list[FeatureDrift] = field(default_factory=list)
    label: FeatureDrift | None = None
    metrics: list[MetricChange] = field(default_factory=list)
    drifted_fraction: float = 0.0
    data_drift: bool = False
    degraded: bool = False

    @property
    def breached(self) -> bool:
        return self.data_drift or self.degraded

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "breached": self.breached}


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index of two histograms (counts or fractions over the same bins)."""
    ref = np.maximum(reference / max(reference.sum(), 1), EPSILON)
    cur = np.maximum(current / max(current.sum(), 1), EPSILON)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def numeric_drift(name: str, reference: np.ndarray, current: np.ndarray, limits: MonitorConfig) -> FeatureDrift:
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, BINS + 1)))
    if len(edges) < 2:
        # A constant training column: any spread in the new data is drift.
        value = float(edges[0]) if len(edges) else 0.0
        ref_hist = np.array([len(reference), 0])
        cur_hist = np.array([np.sum(np.isclose(current, value)), np.sum(~np.isclose(current, value))])
    else:
        inner = edges[1:-1]  # open-ended outer bins catch values outside the training range
        ref_hist = np.bincount(np.searchsorted(inner, reference, side="right"), minlength=len(inner) + 1)
        cur_hist = np.bincount(np.searchsorted(inner, current, side="right"), minlength=len(inner) + 1)
    score = psi(ref_hist.astype(float), cur_hist.astype(float))
    ks = stats.ks_2samp(reference, current)
    drifted = score > limits.psi or (ks.pvalue < limits.ks_pvalue and ks.statistic > limits.ks_statistic)
    return FeatureDrift(name, "numeric", score, float(ks.statistic), float(ks.pvalue), bool(drifted))


def categorical_drift(name: str, reference: dict[str, float], current: dict[str, float], limits: MonitorConfig) -> FeatureDrift:
    keys = sorted(set(reference) | set(current))
    score = psi(np.array([reference.get(k, 0.0) for k in keys]), np.array([current.get(k, 0.0) for k in keys]))
    return FeatureDrift(name, "categorical", score, drifted=bool(score > limits.psi))


def read_frame(path: str, s3: S3Config | None = None) -> pd.DataFrame:
    """New data as a table: a CSV file, a Parquet file or a directory of Parquet files, local
    or on S3 (a URI stays a string: `Path` would turn `s3://b/k` into `s3:/b/k`)."""
    suffix = posixpath.splitext(path.rstrip("/"))[1].lower()
    with storage_errors("--data", path):
        fs = filesystem(path, s3)
        try:
            if suffix in (".parquet", ".pq") or fs.isdir(bare_path(path)):
                return pq.read_table(bare_path(path), filesystem=fs).to_pandas()
            if suffix in (".csv", ".txt", ".tsv"):
                with open_uri(path, s3, key="--data") as handle:
                    return pd.read_csv(handle, sep="\t" if suffix == ".tsv" else ",")
        except (pa.ArrowInvalid, pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise UserError(f"--data: {path}: cannot read: {str(exc).splitlines()[0]}") from None
    raise UserError(f"--data: {path}: expected a .csv or .parquet file or a directory of Parquet files")


def check_schema(frame: pd.DataFrame, manifest: Manifest, source: str) -> None:
    """The new data must hold every raw feature the training data had, with the same kind."""
    for column in manifest.transform["numeric"]:
        if column not in frame.columns:
            raise UserError(f"{source}: column {column!r} is missing; the training data ({manifest.source}) has it")
        if not pd.api.types.is_numeric_dtype(frame[column]):
            raise UserError(f"{source}: column {column!r} holds non-numeric values, but it was numeric in training")
    for column in manifest.transform["categorical"]:
        if column not in frame.columns:
            raise UserError(f"{source}: column {column!r} is missing; the training data ({manifest.source}) has it")


def monitor(run_dir: Path, data: str, limits: MonitorConfig, s3: S3Config | None = None) -> MonitorReport:
    """Drift of `data` against the run's training split and, when `data` has labels, the
    run's model scored on it against its test metrics. `data` and the run's prepared dataset
    are local paths or `s3://` URIs, read with the run's `data.s3` options (`s3`).

    Scoring reads through Ray Data (the trainer's evaluation code): with labelled data it joins
    the connected Ray cluster, or starts the embedded one.
    """
    from stoker.trainer.run_dir import Records

    data = str(data)
    dataset = Records(run_dir).dataset()
    if dataset is None:
        raise UserError(f"{run_dir}: not a run directory (no dataset record); nothing to monitor against")
    prepared = str(dataset["path"])
    manifest = Manifest.read(prepared, s3)
    if not exists(data, s3, key="--data"):
        raise UserError(f"--data: {data}: no such file or directory")
    tabular = manifest.modality == "tabular"
    if tabular:
        # Checked on the raw table: the transform coerces text in a numeric column to NaN and
        # imputes it, which would hide a schema change.
        frame = read_frame(data, s3)
        if frame.empty:
            raise UserError(f"--data: {data}: no rows")
        check_schema(frame, manifest, data)
    with tempfile.TemporaryDirectory(prefix="stoker-monitor-") as scratch:
        encoded_dir = Path(scratch) / "encoded"
        encoded_dir.mkdir()
        # `stoker data apply`: the same fitted transform as every split of the training data.
        applied = apply(prepared, data, encoded_dir / ENCODED, s3=s3)
        encoded = pq.read_table(encoded_dir / ENCODED).to_pandas()
        report = MonitorReport(run=run_dir.name, data=data, rows=applied["rows"],
                               imputed_rows=applied["imputed_rows"], unknown_labels=applied["unknown_labels"])
        train = read_train_split(prepared, manifest, s3) if tabular else None
        if train is not None:
            report.features = feature_drift(manifest, train, encoded, limits)
        if LABEL_COLUMN in encoded.columns:
            report.label = label_drift(manifest, train, encoded[LABEL_COLUMN].to_numpy(), limits)
            report.model, report.metrics = degradation(run_dir, manifest, encoded, encoded_dir, Path(scratch), limits)
    drifted = sum(f.drifted for f in report.features)
    report.drifted_fraction = drifted / max(len(report.features), 1)
    report.data_drift = bool(drifted and report.drifted_fraction > limits.max_drifted_fraction) or bool(
        report.label and report.label.drifted)
    report.degraded = any(m.degraded for m in report.metrics)
    return report


def read_train_split(prepared: str, manifest: Manifest, s3: S3Config | None = None) -> pd.DataFrame:
    files = [bare_path(join(prepared, f)) for f in manifest.splits["train"]["files"]]
    with storage_errors("data.output", prepared):
        return pq.ParquetDataset(files, filesystem=filesystem(prepared, s3)).read().to_pandas()


def feature_drift(manifest: Manifest, train: pd.DataFrame, encoded: pd.DataFrame, limits: MonitorConfig) -> list[FeatureDrift]:
    """Both sides as the model sees them: encoded by the transform, float32 like the shards."""
    found = []
    for column in manifest.transform["numeric"]:
        found.append(numeric_drift(column, train[column].to_numpy(np.float64), encoded[column].to_numpy(np.float64), limits))
    ordinal = manifest.transform.get("encoding", "onehot") == "ordinal"
    for column, column_stats in manifest.transform["categorical"].items():
        categories = column_stats["categories"]
        found.append(categorical_drift(column, category_counts(train, column, categories, ordinal),
                                       category_counts(encoded, column, categories, ordinal), limits))
    return found


def category_counts(table: pd.DataFrame, column: str, categories: list[str], ordinal: bool) -> dict[str, float]:
    """Rows per category of an encoded column; unknown categories are -1 (ordinal) or an
    all-zero one-hot row, and land in the unseen bucket."""
    if ordinal:
        codes = table[column].to_numpy(np.int64)
        counts = {c: float(np.sum(codes == i)) for i, c in enumerate(categories)}
    else:
        counts = {c: float(table[f"{column}={c}"].sum()) for c in categories}
    return {**counts, UNSEEN: float(len(table) - sum(counts.values()))}


def label_drift(manifest: Manifest, train: pd.DataFrame | None, labels: np.ndarray,
                limits: MonitorConfig) -> FeatureDrift | None:
    if manifest.classes is not None:
        reference = {str(c): float(n) for c, n in (manifest.class_counts or {}).items()}
        codes = labels.astype(np.int64)
        current = {str(c): float(np.sum(codes == i)) for i, c in enumerate(manifest.classes)}
        current[UNSEEN] = float(np.sum(codes < 0))
        return categorical_drift(manifest.label, reference, current, limits)
    if train is None or LABEL_COLUMN not in train.columns:
        return None
    values = labels.astype(np.float64)
    return numeric_drift(manifest.label, train[LABEL_COLUMN].to_numpy(np.float64), values[~np.isnan(values)], limits)


def degradation(run_dir: Path, manifest: Manifest, encoded: pd.DataFrame, encoded_dir: Path, scratch: Path,
                limits: MonitorConfig) -> tuple[str, list[MetricChange]]:
    """Score the run's model on the labelled rows and compare with its test metrics.

    The encoded rows become a one-split prepared dataset (the training manifest with a `new`
    split), which is what the trainer's `evaluate_export` reads; rows whose label the model
    cannot score (a class it never saw, a missing target) are left out and counted.
    """
    from stoker.trainer.evaluate import evaluate_export
    from stoker.trainer.export import MODEL_JSON, export_run
    from stoker.trainer.metrics import metric_mode
    from stoker.trainer.ranking import gain
    from stoker.trainer.run_dir import FINAL, Records

    records = Records(run_dir)
    final = records.final()
    if final is None:
        raise UserError(f"{run_dir}: the run has no {FINAL} (it did not finish); nothing to compare against")
    test = final.get("test") or {}
    labels = encoded[LABEL_COLUMN].to_numpy()
    scorable = labels >= 0 if manifest.classes is not None else ~np.isnan(labels.astype(np.float64))
    if not scorable.any():
        return "", []
    pq.write_table(pa.Table.from_pandas(encoded[scorable], preserve_index=False), encoded_dir / ENCODED)
    replace(manifest, splits={NEW_SPLIT: {"rows": int(scorable.sum()), "files": [ENCODED]}}).write(encoded_dir)
    # The run's export when it has one (what `stoker export` shipped), else its best checkpoint.
    model_dir = records.export
    if not (model_dir / MODEL_JSON).is_file():
        # DeepSpeed's zero_to_fp32 prints progress; stdout is the report (one JSON line with --json).
        with contextlib.redirect_stdout(sys.stderr):
            model_dir = export_run(run_dir, scratch / "export", "best")
    scores = evaluate_export(model_dir, encoded_dir, NEW_SPLIT)["metrics"]
    changes = []
    for name, value in scores.items():
        if name not in test or not (math.isfinite(value) and math.isfinite(test[name])):
            continue  # e.g. ROC AUC of data holding a single class
        drop = gain(test[name], value, metric_mode(name))  # how much the test score beats this one
        changes.append(MetricChange(name, test[name], value, drop, bool(drop > limits.max_metric_drop)))
    model = "export" if model_dir == records.export else "best checkpoint"
    return model, changes


def format_report(report: MonitorReport, limits: MonitorConfig, top: int = 10) -> str:
    lines = [f"monitor {report.run} on {report.data} ({report.rows} rows)"]
    if report.imputed_rows:
        lines.append(f"rows with missing values filled from the training statistics: {report.imputed_rows}")
    ranked = sorted(report.features, key=lambda f: f.psi, reverse=True)
    drifted = [f for f in ranked if f.drifted]
    lines.append(f"features drifted: {len(drifted)}/{len(ranked)} (allowed fraction {limits.max_drifted_fraction:g}; "
                 f"PSI > {limits.psi:g} or KS p < {limits.ks_pvalue:g} with D > {limits.ks_statistic:g})")
    for f in (drifted or ranked)[:top]:
        ks = f"  KS D {f.ks_statistic:.3f} p {f.ks_pvalue:.2g}" if f.ks_statistic is not None else ""
        lines.append(f"  {'DRIFT' if f.drifted else 'ok   '} {f.feature:<30} PSI {f.psi:.3f}{ks}")
    if report.label:
        lines.append(f"label {report.label.feature}: PSI {report.label.psi:.3f}{'  DRIFT' if report.label.drifted else ''}")
    if report.unknown_labels:
        lines.append(f"rows with a label the model never saw (not scored): {report.unknown_labels}")
    if report.model:
        lines.append(f"model ({report.model}) on the labelled rows vs the run's test metrics:")
    for m in report.metrics:
        lines.append(f"{'DEGRADED' if m.degraded else 'ok'} {m.metric}: test {m.test:.4f} -> new {m.new:.4f} "
                     f"(worse by {m.drop:+.4f}, allowed {limits.max_metric_drop:g})")
    verdict = "BREACH" if report.breached else "OK"
    reasons = [r for r, flag in (("data drift", report.data_drift), ("degradation", report.degraded)) if flag]
    lines.append(f"{verdict}" + (f": {', '.join(reasons)}" if reasons else ""))
    return "\n".join(lines)
