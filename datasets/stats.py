"""Partial statistics that merge: what the analyse pass computes per batch and the driver
combines, so no step ever needs all rows at once.

Numeric columns keep count, missing, mean and M2 (Chan et al.'s parallel update), min, max, and
their quantiles: the exact values while there are at most `exact_limit` of them, then a
quantile sketch whose rank-error bound is recorded in the manifest. Categorical columns keep
category counts. Merging is in source order, so every engine gets the same numbers.

Why not Apache DataSketches' KLL: its compactions flip random coins (seeded from the operating
system), so the same data gives a different median on every run and on every engine, and a
prepared dataset would no longer be reproducible. `QuantileSketch` is the same compactor
hierarchy with deterministic, alternating offsets (Manku-Rajagopalan-Lindsay), and it tracks a
hard bound on its rank error instead of a probabilistic one.
"""

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

EXACT_QUANTILE_VALUES = 65_536
"""Present values per column kept exactly for quantiles; beyond this a sketch holds them."""
SKETCH_K = 4_096
"""Values per sketch level: about 0.1% rank error at tens of millions of values, 32 KB a level."""
MODE_CANDIDATES = 100_000
"""Distinct values a numeric `mode` imputation counts exactly; beyond this only the most
frequent half is kept each time it overflows (an approximate mode)."""


class QuantileSketch:
    """Deterministic mergeable quantile sketch: level h holds values of weight 2**h; a full level
    is sorted and every other value (offsets alternating per level) moves up a level."""

    def __init__(self, k: int = SKETCH_K) -> None:
        self.k = k
        self.levels: list[np.ndarray] = []
        self.flips: list[int] = []
        self.n = 0
        self.error = 0  # each compaction at level h moves any rank by at most 2**h

    def update(self, values: np.ndarray) -> None:
        self.n += len(values)
        self._add(0, np.asarray(values, dtype=np.float64))

    def merge(self, other: "QuantileSketch") -> None:
        self.n += other.n
        self.error += other.error
        for level, values in enumerate(other.levels):
            self._add(level, values)

    def _add(self, level: int, values: np.ndarray) -> None:
        while len(self.levels) <= level:
            self.levels.append(np.zeros(0))
            self.flips.append(0)
        self.levels[level] = np.concatenate([self.levels[level], values])
        while level < len(self.levels):
            buffer = self.levels[level]
            if len(buffer) <= self.k:
                level += 1
                continue
            # Above level 0 a buffer is a few runs that are sorted already (each compaction
            # promotes a sorted subsequence): a stable sort (timsort) merges them in linear
            # time, where the default quicksort sorts from scratch. Level 0 holds raw values.
            buffer = np.sort(buffer, kind="stable" if level else None)
            keep = buffer[len(buffer) - len(buffer) % 2:]
            promoted = buffer[self.flips[level]:len(buffer) - len(keep):2]
            self.flips[level] ^= 1
            self.error += 2 ** level
            self.levels[level] = keep
            if level + 1 == len(self.levels):
                self.levels.append(np.zeros(0))
                self.flips.append(0)
            self.levels[level + 1] = np.concatenate([self.levels[level + 1], promoted])
            level += 1

    def quantile(self, q: float) -> float:
        return self.quantiles([q])[0]

    def quantiles(self, qs: list[float]) -> list[float]:
        """Several quantiles from one sort of the sketch (a report asks for five per column)."""
        values = np.concatenate(self.levels)
        weights = np.concatenate([np.full(len(v), 2.0 ** h) for h, v in enumerate(self.levels)])
        order = np.argsort(values, kind="stable")
        cumulative = np.cumsum(weights[order])
        values = values[order]
        indexes = [int(np.searchsorted(cumulative, q * cumulative[-1], side="left")) for q in qs]
        return [float(values[min(index, len(values) - 1)]) for index in indexes]

    @property
    def rank_error(self) -> float:
        """Largest possible |estimated rank - true rank| / n."""
        return self.error / max(self.n, 1)


@dataclass
class NumericSummary:
    count: int = 0
    missing: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = np.inf
    max: float = -np.inf
    exact: list[np.ndarray] = field(default_factory=list)
    sketch: QuantileSketch | None = None
    exact_limit: int = EXACT_QUANTILE_VALUES
    modes: Counter | None = None

    @classmethod
    def of(cls, values: np.ndarray, want_mode: bool = False, exact_limit: int = EXACT_QUANTILE_VALUES) -> "NumericSummary":
        """The summary of one batch of float64 values (NaN = missing)."""
        present = values[~np.isnan(values)]
        out = cls(count=len(present), missing=len(values) - len(present), exact_limit=exact_limit)
        if len(present):
            out.mean = float(present.mean())
            out.m2 = float(((present - out.mean) ** 2).sum())
            out.min, out.max = float(present.min()), float(present.max())
            out.exact = [present]
        if want_mode:
            unique, counts = np.unique(present, return_counts=True)
            out.modes = Counter(dict(zip(unique.tolist(), counts.tolist(), strict=True)))
        out._spill()
        return out

    def merge(self, other: "NumericSummary") -> None:
        total = self.count + other.count
        if other.count:
            delta = other.mean - self.mean
            self.mean += delta * other.count / total
            self.m2 += other.m2 + delta * delta * self.count * other.count / total
            self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.count = total
        self.missing += other.missing
        if other.sketch is not None:
            self._to_sketch()
            self.sketch.merge(other.sketch)
        elif self.sketch is not None:
            for values in other.exact:
                self.sketch.update(values)
        else:
            self.exact += other.exact
        self._spill()
        if other.modes is not None:
            self.modes = (self.modes or Counter()) + other.modes
            if len(self.modes) > MODE_CANDIDATES:
                self.modes = Counter(dict(self.modes.most_common(MODE_CANDIDATES // 2)))

    def _spill(self) -> None:
        if self.sketch is None and sum(len(v) for v in self.exact) > self.exact_limit:
            self._to_sketch()

    def _to_sketch(self) -> None:
        if self.sketch is None:
            self.sketch = QuantileSketch()
            for values in self.exact:
                self.sketch.update(values)
            self.exact = []

    @property
    def approximate(self) -> bool:
        return self.sketch is not None

    @property
    def rank_error(self) -> float | None:
        """Normalised rank error of the quantiles; None while they are exact."""
        return self.sketch.rank_error if self.sketch is not None else None

    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.count)) if self.count else float("nan")

    def quantiles(self, qs: list[float]) -> list[float]:
        if not self.count:
            return [float("nan")] * len(qs)
        if self.sketch is not None:
            return self.sketch.quantiles(qs)
        # Linear interpolation, as numpy's and pandas' defaults: exact small data keeps the
        # numbers it always had.
        return [float(v) for v in np.quantile(np.concatenate(self.exact), qs)]

    def mode(self) -> float | None:
        if not self.modes:
            return None
        best = max(self.modes.values())
        return float(min(v for v, n in self.modes.items() if n == best))


@dataclass
class CategorySummary:
    counts: Counter = field(default_factory=Counter)
    missing: int = 0

    def merge(self, other: "CategorySummary") -> None:
        self.counts.update(other.counts)
        self.missing += other.missing

    def mode(self) -> str | None:
        if not self.counts:
            return None
        best = max(self.counts.values())
        return min(c for c, n in self.counts.items() if n == best)
