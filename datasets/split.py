"""Seeded train/validation/test splits: stratified by class, or grouped by a column."""

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from stoker.datasets.config import SplitConfig
from stoker.errors import UserError


def split_positions(
    labels: pd.Series | None, groups: pd.Series | None, fractions: SplitConfig, stratify: bool,
) -> dict[str, np.ndarray]:
    """Row positions of each split. Labels stratify when given and `stratify` is set."""
    n = len(labels) if labels is not None else len(groups)
    if groups is not None:
        return _grouped(groups, fractions)
    positions = np.arange(n)
    strata = labels.to_numpy() if stratify and labels is not None else None
    try:
        train, rest = train_test_split(
            positions, train_size=fractions.train, random_state=fractions.seed, stratify=strata,
        )
        validation, test = train_test_split(
            rest, train_size=fractions.validation / (fractions.validation + fractions.test),
            random_state=fractions.seed, stratify=strata[rest] if strata is not None else None,
        )
    except ValueError as exc:
        # scikit-learn refuses to stratify classes with fewer rows than splits.
        raise UserError(f"data.split: cannot split {n} rows: {exc}") from None
    return {"train": np.sort(train), "validation": np.sort(validation), "test": np.sort(test)}


def _grouped(groups: pd.Series, fractions: SplitConfig) -> dict[str, np.ndarray]:
    """Whole groups go to one split: groups in a seeded random order fill train, then
    validation, then test, each up to its share of the rows."""
    codes, uniques = pd.factorize(groups, use_na_sentinel=False)
    if len(uniques) < 3:
        raise UserError(
            f"data.split.group_by: {groups.name!r} has {len(uniques)} distinct values; "
            "need at least 3 groups for three splits"
        )
    sizes = np.bincount(codes)
    order = np.random.default_rng(fractions.seed).permutation(len(uniques))
    cumulative = np.cumsum(sizes[order]) / len(groups)
    assignment = np.empty(len(uniques), dtype=np.int8)
    bounds = (fractions.train, fractions.train + fractions.validation)
    # Each split gets at least one group, whatever the group sizes.
    split_of = np.searchsorted(np.asarray(bounds), cumulative - 1e-12, side="left")
    split_of[0] = 0
    split_of[-1] = 2
    if not (split_of == 1).any():
        split_of[len(split_of) - 2] = 1
    assignment[order] = split_of
    row_split = assignment[codes]
    return {name: np.flatnonzero(row_split == i) for i, name in enumerate(("train", "validation", "test"))}
