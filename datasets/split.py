"""Seeded train/validation/test splits: stratified by class, or grouped by a column."""

import hashlib

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


# ------------------------------------------------------------------- streaming (hash) splits
#
# A row's split is decided by a 64-bit seeded hash `u` of its key (source file and row number,
# or its group's value), compared with two cut-offs per class: `u < t1` is train, `u < t2`
# validation, otherwise test. The same row gets the same `u` on every engine and machine, and
# no step needs the rows themselves or a shuffle. The cut-offs come from the kept rows' `u`:
# small datasets get exact cut-offs from every row's `u` (each class's split sizes within one
# row of the fractions); large ones from a per-class histogram of `u` over CUT_BINS equal bins
# (mergeable, bounded memory): each cut-off is the bin edge whose cumulative count is nearest
# the class's target, so a class's split sizes are off by at most half the rows of the bin the
# target falls in (about n / (2 * CUT_BINS) rows: 0.012% of the class, plus a few rows).

_ALL = (1 << 64) - 1
SPLIT_CODES = ("train", "validation", "test")
CUT_BINS = 4096
"""Bins of the per-class histogram of `u` that large datasets' cut-offs are chosen from (a
power of two: a row's bin is the top bits of its `u`); 32 KB per class."""


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of 64-bit integers."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _salt(seed: int, text: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest(), "little"))


def row_hashes(seed: int, relative: str, rows: np.ndarray) -> np.ndarray:
    """`u` of rows `rows` (0-based, in the file) of the source file named `relative`."""
    with np.errstate(over="ignore"):
        return _mix(rows.astype(np.uint64) + _salt(seed, relative))


def value_hashes(seed: int, values: pd.Series) -> np.ndarray:
    """`u` of group (or class) values: equal values, equal hashes, whatever the file."""
    key = hashlib.blake2b(str(seed).encode(), digest_size=8).hexdigest()
    # Hash each distinct value once (a batch has few classes, and groups repeat).
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    text = pd.Series(uniques).astype("string").fillna("\0<missing>").to_numpy(dtype=object)
    return _mix(pd.util.hash_array(text, hash_key=key))[codes]


def fixed_thresholds(fractions: SplitConfig) -> dict:
    t1 = min(int(fractions.train * 2**64), _ALL)
    t2 = min(int((fractions.train + fractions.validation) * 2**64), _ALL)
    return {None: (t1, t2)}


def assign(u: np.ndarray, classes: np.ndarray | None, thresholds: dict) -> np.ndarray:
    """Split code per row (0 train, 1 validation, 2 test) from `u` and its class's thresholds
    (key None: the same for every class)."""
    codes = np.full(len(u), 2, dtype=np.int8)
    if None in thresholds:
        groups = [(np.ones(len(u), dtype=bool), thresholds[None])]
    else:
        groups = [(classes == np.uint64(c), t) for c, t in thresholds.items()]
    for mask, (t1, t2) in groups:
        codes[mask & (u < np.uint64(t2))] = 1
        codes[mask & (u < np.uint64(t1))] = 0
    return codes


def exact_thresholds(u: np.ndarray, classes: np.ndarray | None, names: dict, fractions: SplitConfig) -> dict:
    """Thresholds that give each class (or, without classes, the whole) round(n * fraction)
    rows per split: within one row of the fractions."""
    if classes is None:
        return {None: _cuts(u, fractions)}
    out = {}
    for code in np.unique(classes):
        values = u[classes == code]
        if len(values) < 2 and len(names) > 1:
            raise UserError(
                f"data.split: cannot split {len(u)} rows: class {names[int(code)]!r} has only {len(values)} "
                "row; stratifying needs at least 2 per class (add rows, drop the class, or set "
                "data.split.stratify: false)"
            )
        out[int(code)] = _cuts(values, fractions)
    return out


def _cuts(u: np.ndarray, fractions: SplitConfig) -> tuple[int, int]:
    values = np.sort(u)
    n = len(values)
    cuts = [int(np.floor(n * b + 0.5)) for b in (fractions.train, fractions.train + fractions.validation)]
    return tuple(int(values[c]) if c < n else _ALL for c in cuts)


def grouped_thresholds(u: np.ndarray, fractions: SplitConfig, column: str) -> dict:
    """Whole groups (rows sharing `u`) in hash order fill train, then validation, then test,
    each up to its share of the rows, and each split gets at least one group."""
    groups, sizes = np.unique(u, return_counts=True)
    if len(groups) < 3:
        raise UserError(
            f"data.split.group_by: {column!r} has {len(groups)} distinct values; need at least 3 groups for three splits"
        )
    cumulative = np.cumsum(sizes) / len(u)
    split_of = np.searchsorted(np.asarray([fractions.train, fractions.train + fractions.validation]),
                               cumulative - 1e-12, side="left")
    split_of[0], split_of[-1] = 0, 2
    if not (split_of == 1).any():
        split_of[int(np.argmax(split_of == 2))] = 1  # the first test group validates instead
    t1 = int(groups[np.argmax(split_of >= 1)])
    t2 = int(groups[np.argmax(split_of >= 2)])
    return {None: (t1, t2)}


# ---------------------------------------------------------------- cut-offs from histograms


class CutHistogram:
    """Per class (key None: every row), how many kept rows have their `u` in each of `bins`
    equal bins of [0, 2^64): mergeable by addition in any order, so every engine and every
    order of files gives the same cut-offs; its size does not grow with the rows."""

    def __init__(self, bins: int = CUT_BINS) -> None:
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"histogram bins must be a power of two, not {bins}")
        self.bins = bins
        self.shift = np.uint64(64 - (bins.bit_length() - 1))
        self.counts: dict[int | None, np.ndarray] = {}

    def add(self, u: np.ndarray, classes: np.ndarray | None, sign: int = 1) -> None:
        """Count (or, `sign` -1, uncount) rows with hashes `u` and class ids `classes`."""
        if not len(u):
            return
        bins = (u >> self.shift).astype(np.int64)
        if classes is None:
            self._add(None, np.bincount(bins, minlength=self.bins), sign)
            return
        # The classes in sorted order, each row's position among them: np.unique's answer,
        # from a hash table over the few classes instead of a sort of every row.
        inverse, codes = pd.factorize(classes, sort=True)
        counts = np.bincount(inverse.reshape(-1) * self.bins + bins, minlength=len(codes) * self.bins)
        for i, code in enumerate(codes):
            self._add(int(code), counts[i * self.bins:(i + 1) * self.bins], sign)

    def _add(self, key, counts: np.ndarray, sign: int) -> None:
        mine = self.counts.get(key)
        if mine is None:
            mine = self.counts[key] = np.zeros(self.bins, dtype=np.int64)
        mine += sign * counts.astype(np.int64)

    def merge(self, other: "CutHistogram") -> None:
        if other.bins != self.bins:
            raise ValueError("histograms of different bins")
        for key, counts in other.counts.items():
            self._add(key, counts, 1)

    def rows(self) -> int:
        return int(sum(int(c.sum()) for c in self.counts.values()))


def histogram_thresholds(histogram: CutHistogram, fractions: SplitConfig, group: str | None = None) -> dict:
    """Cut-offs per class (key None: one pair for every row) at the bin edges whose cumulative
    counts are nearest each class's targets n * train and n * (train + validation); ties go to
    the lower edge. `group`: rows are whole groups (all of a group's rows share `u`, hence a
    bin), and each split must get at least one non-empty bin."""
    if group is not None:
        counts = sum(histogram.counts.values(), np.zeros(histogram.bins, dtype=np.int64))
        return {None: _edge_cuts(counts, fractions, group)}
    return {key: _edge_cuts(counts, fractions) for key, counts in histogram.counts.items()}


def _edge_cuts(counts: np.ndarray, fractions: SplitConfig, group: str | None = None) -> tuple[int, int]:
    bins = len(counts)
    cumulative = np.concatenate([[0], np.cumsum(counts)])  # rows below each edge
    n = int(cumulative[-1])
    edges = []
    for bound in (fractions.train, fractions.train + fractions.validation):
        edges.append(int(np.argmin(np.abs(cumulative - n * bound))))
    if group is not None:
        occupied = np.flatnonzero(counts)
        if len(occupied) < 3:
            raise UserError(f"data.split.group_by: {group!r} has fewer than 3 distinct values (hash bins "
                            f"{len(occupied)}); need at least 3 groups for three splits")
        # Each split gets at least one group: at least one occupied bin below t1, between, above t2.
        edges[0] = int(min(max(edges[0], occupied[0] + 1), occupied[-2]))
        following = occupied[occupied >= edges[0]]
        edges[1] = int(min(max(edges[1], following[0] + 1), occupied[-1]))
    step = 1 << (64 - (bins.bit_length() - 1))
    return tuple(min(e * step, _ALL) for e in edges)
