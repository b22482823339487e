"""Drift and degradation of a trained run on new data.

The reference is the run's training split as prepared (its Parquet shards, encoded with the
manifest's statistics); the new data is read raw and encoded with the same statistics, so both
sides are compared in the space the model saw. Numeric features: population stability index
over the training deciles and the two-sample Kolmogorov-Smirnov test. Categorical features
(one-hot columns `name=value`) and the label: PSI over the categories, with an "unseen" bucket.
Degradation compares metrics measured on the new data against the run's test metrics.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from scipy import stats

from stoker.cluster.config import MonitorConfig
from stoker.datasets.manifest import LABEL_COLUMN, Manifest
from stoker.errors import UserError

BINS = 10
EPSILON = 1e-4  # floor for empty bins so PSI stays finite
LOWER_IS_BETTER = ("loss", "mse", "mae", "rmse", "error")


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


def _encode_numeric(values: pd.Series, stats_: dict, scale: str) -> np.ndarray:
    """Scale raw values as `stoker data prepare` did, rounded to the float32 it stores: the
    training values sit exactly on the bin edges, and float64 neighbours would fall beside them."""
    values = values.astype("float64")
    if stats_["fill"] is not None:
        values = values.fillna(stats_["fill"])
    raw = values.dropna().to_numpy()
    if scale == "standard":
        raw = (raw - stats_["mean"]) / stats_["std"]
    elif scale == "minmax" and stats_.get("min") is not None:
        span = stats_["max"] - stats_["min"]
        raw = (raw - stats_["min"]) / (span if span > 0 else 1.0)
    return raw.astype(np.float32).astype(np.float64)


def read_frame(path: Path) -> pd.DataFrame:
    """New data as a table: a CSV file, a Parquet file or a directory of Parquet files."""
    try:
        if path.is_dir() or path.suffix in (".parquet", ".pq"):
            return pq.read_table(path).to_pandas()
        if path.suffix in (".csv", ".txt", ".tsv"):
            return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise UserError(f"--data: {path}: cannot read: {str(exc).splitlines()[0]}") from None
    raise UserError(f"--data: {path}: expected a .csv or .parquet file or a directory of Parquet files")


def check_schema(frame: pd.DataFrame, manifest: Manifest, source: Path) -> None:
    """The new data must hold every raw feature the training data had, with the same kind."""
    for column in manifest.transform["numeric"]:
        if column not in frame.columns:
            raise UserError(f"{source}: column {column!r} is missing; the training data ({manifest.source}) has it")
        if not pd.api.types.is_numeric_dtype(frame[column]):
            raise UserError(f"{source}: column {column!r} holds non-numeric values, but it was numeric in training")
    for column in manifest.transform["categorical"]:
        if column not in frame.columns:
            raise UserError(f"{source}: column {column!r} is missing; the training data ({manifest.source}) has it")


def monitor(run_dir: Path, data: Path, limits: MonitorConfig, new_metrics: dict[str, float] | None = None) -> MonitorReport:
    dataset = json.loads((run_dir / "dataset.json").read_text())
    prepared = Path(dataset["path"])
    manifest = Manifest.read(prepared)
    if not data.exists():
        raise UserError(f"--data: {data}: no such file or directory")
    frame = read_frame(data)
    if frame.empty:
        raise UserError(f"--data: {data}: no rows")
    check_schema(frame, manifest, data)
    train = pq.ParquetDataset([str(prepared / f) for f in manifest.splits["train"]["files"]]).read().to_pandas()
    report = MonitorReport(run=run_dir.name, data=str(data), rows=len(frame))

    for column, column_stats in manifest.transform["numeric"].items():
        current = _encode_numeric(frame[column], column_stats, manifest.transform.get("scale", "standard"))
        report.features.append(numeric_drift(column, train[column].to_numpy(np.float64), current, limits))
    for column, column_stats in manifest.transform["categorical"].items():
        categories = column_stats["categories"]
        reference = {c: float(train[f"{column}={c}"].sum()) for c in categories}
        values = frame[column].astype("string").fillna(column_stats["fill"] or "<missing>")
        counts = values.value_counts()
        current = {c: float(counts.get(c, 0)) for c in categories}
        current["<unseen>"] = float(len(values) - sum(current.values()))
        report.features.append(categorical_drift(column, reference, current, limits))

    if manifest.label in frame.columns and manifest.classes is not None:
        reference = {str(c): float(n) for c, n in (manifest.splits["train"].get("class_counts") or {}).items()}
        counts = frame[manifest.label].astype(str).value_counts()
        current = {c: float(counts.get(c, 0)) for c in reference}
        current["<unseen>"] = float(len(frame) - sum(current.values()))
        report.label = categorical_drift(manifest.label, reference, current, limits)
    elif manifest.label in frame.columns:
        labels = frame[manifest.label].dropna().to_numpy(np.float64)
        report.label = numeric_drift(manifest.label, train[LABEL_COLUMN].to_numpy(np.float64), labels, limits)

    drifted = sum(f.drifted for f in report.features)
    report.drifted_fraction = drifted / max(len(report.features), 1)
    report.data_drift = bool(drifted and report.drifted_fraction > limits.max_drifted_fraction) or bool(
        report.label and report.label.drifted)

    if new_metrics:
        final = json.loads((run_dir / "final_metrics.json").read_text())
        test = final.get("test") or {}
        for name, value in new_metrics.items():
            if name not in test:
                raise UserError(f"--metrics: {name!r} is not one of the run's test metrics ({', '.join(test)})")
            lower_better = any(word in name for word in LOWER_IS_BETTER)
            drop = (value - test[name]) if lower_better else (test[name] - value)
            report.metrics.append(MetricChange(name, test[name], value, drop, bool(drop > limits.max_metric_drop)))
        report.degraded = any(m.degraded for m in report.metrics)
    return report


def format_report(report: MonitorReport, limits: MonitorConfig, top: int = 10) -> str:
    lines = [f"monitor {report.run} on {report.data} ({report.rows} rows)"]
    ranked = sorted(report.features, key=lambda f: f.psi, reverse=True)
    drifted = [f for f in ranked if f.drifted]
    lines.append(f"features drifted: {len(drifted)}/{len(ranked)} (allowed fraction {limits.max_drifted_fraction:g}; "
                 f"PSI > {limits.psi:g} or KS p < {limits.ks_pvalue:g} with D > {limits.ks_statistic:g})")
    for f in (drifted or ranked)[:top]:
        ks = f"  KS D {f.ks_statistic:.3f} p {f.ks_pvalue:.2g}" if f.ks_statistic is not None else ""
        lines.append(f"  {'DRIFT' if f.drifted else 'ok   '} {f.feature:<30} PSI {f.psi:.3f}{ks}")
    if report.label:
        lines.append(f"label {report.label.feature}: PSI {report.label.psi:.3f}{'  DRIFT' if report.label.drifted else ''}")
    for m in report.metrics:
        lines.append(f"{'DEGRADED' if m.degraded else 'ok'} {m.metric}: test {m.test:.4f} -> new {m.new:.4f} "
                     f"(worse by {m.drop:+.4f}, allowed {limits.max_metric_drop:g})")
    verdict = "BREACH" if report.breached else "OK"
    reasons = [r for r, flag in (("data drift", report.data_drift), ("degradation", report.degraded)) if flag]
    lines.append(f"{verdict}" + (f": {', '.join(reasons)}" if reasons else ""))
    return "\n".join(lines)
