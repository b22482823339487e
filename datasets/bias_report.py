"""The representation and bias report: class balance per split and per-column distributions."""

import numpy as np
import pandas as pd


def class_balance(counts: dict[str, int] | None, ratio_limit: float, split: str) -> tuple[dict | None, list[str]]:
    """Imbalance ratio (largest / smallest class) of one split, and warnings beyond the limit."""
    if not counts:
        return None, []
    largest = max(counts, key=counts.get)
    smallest = min(counts, key=counts.get)
    low = counts[smallest]
    ratio = float("inf") if low == 0 else counts[largest] / low
    warnings = []
    if low == 0:
        warnings.append(f"{split}: class {smallest!r} has no rows")
    elif ratio > ratio_limit:
        warnings.append(
            f"{split}: class {smallest!r} is under-represented: {low} rows vs {counts[largest]} of "
            f"class {largest!r} (ratio {ratio:.1f} > data.imbalance_warning_ratio {ratio_limit:g}); "
            "consider data.ingest.resample: balance or class weights"
        )
    total = sum(counts.values())
    return {
        "imbalance_ratio": None if low == 0 else round(ratio, 4),
        "largest_class": largest,
        "smallest_class": smallest,
        "shares": {c: round(n / total, 4) if total else 0.0 for c, n in counts.items()},
    }, warnings


def column_distributions(frame: pd.DataFrame, numeric: list[str], categorical: list[str]) -> dict:
    """Raw (pre-transform) distribution of each feature column in one split."""
    out: dict[str, dict] = {}
    if numeric:
        values = frame[numeric].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        with np.errstate(all="ignore"):
            missing = np.isnan(values).sum(axis=0)
            quantiles = np.nanquantile(values, [0.0, 0.25, 0.5, 0.75, 1.0], axis=0) if len(values) else None
            means, stds = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
        for i, column in enumerate(numeric):
            q = quantiles[:, i] if quantiles is not None else [np.nan] * 5
            out[column] = {
                "kind": "numeric", "missing": int(missing[i]),
                **{k: _num(v) for k, v in zip(("min", "p25", "median", "p75", "max"), q, strict=True)},
                "mean": _num(means[i]), "std": _num(stds[i]),
            }
    for column in categorical:
        counts = frame[column].astype("string").value_counts(dropna=True)
        out[column] = {
            "kind": "categorical", "missing": int(frame[column].isna().sum()),
            "distinct": int(len(counts)),
            "top": {str(k): int(v) for k, v in counts.head(10).items()},
        }
    return out


def _num(value) -> float | None:
    value = float(value)
    return None if np.isnan(value) else round(value, 6)
