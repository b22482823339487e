"""Stragglers: a rank whose steps take 1.3x the median of the others' over a minute is named in
the run's log, once per slow stretch, and listed in the epoch's record.

What is compared is each rank's own share of a step, its forward pass: in synchronous data
parallelism every rank's step takes as long as the slowest one's, because the others wait for
it in the gradient all-reduce, so whole step times (or forward+backward+step) are nearly equal
on every rank and name nobody. The forward pass has no collective under ZeRO 0-2, so its time
is the rank's own (a slower CPU or GPU, a noisy neighbour, a throttled process); under ZeRO-3
it includes the parameter gathers, and the comparison is weaker. Host clocks only, no device
sync (as stoker.trainer.timing): on a GPU the figures are kernel launches and only indicative.

`StragglerDetector` is the pure rule (samples in, names out); `StragglerWatch` times the
forward passes of one rank and all-gathers every rank's seconds per step at a fixed micro-step
cadence, so every rank joins the same gathers. Rank 0's lines reach the run's output at the end
of the epoch, through its record (stoker.trainer.tracking writes them to events.jsonl, which the
driver says).
"""

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

SLOW_RATIO = 1.3
"""A rank is slow when its seconds per step are at least this times the median of the other
ranks' (with two ranks: the other one's)."""
SLOW_FOR_S = 60.0
"""...summed over the samples of the last this many seconds."""
GATHER_EVERY = 50
"""Micro-steps between gathers: one all-gather of a float per rank and one host sync, as the
loop's NaN check (NAN_CHECK_EVERY)."""


@dataclass(frozen=True)
class Straggler:
    rank: int
    ratio: float
    """Its seconds over the median's, summed over the window."""
    span_s: float
    """The window's length: `for_s` or a little more (whole samples)."""

    def line(self, name: str) -> str:
        return f"{name} is a straggler: its steps took {self.ratio:.2f}x the median over the last {self.span_s:.0f} s"


def medians_of_others(values: Sequence[float]) -> list[float]:
    """For each rank, the median of the other ranks' values (O(n log n) for all of them)."""
    n = len(values)
    if n < 2:
        return [0.0] * n
    order = sorted(range(n), key=values.__getitem__)
    ranked = [values[r] for r in order]
    place = {rank: i for i, rank in enumerate(order)}
    low, high = (n - 2) // 2, (n - 1) // 2  # the middle of the n - 1 others

    def at(i: int, without: int) -> float:
        return ranked[i if i < without else i + 1]

    return [(at(low, place[r]) + at(high, place[r])) / 2 for r in range(n)]


@dataclass(frozen=True)
class _Sample:
    start: float
    own: tuple[float, ...]
    median: tuple[float, ...]


class StragglerDetector:
    """Per-rank seconds per step, sampled over time, in; ranks slow over the last `for_s`, out.

    A rank is slow when, summed over the samples of the last `for_s` seconds, its seconds are at
    least `ratio` times the median of the other ranks' (sample by sample, summed alike). Sums
    over a minute, not every sample on its own: a rank slowed in bursts (a noisy neighbour, a
    throttled process) is slow on average, though a single sample of a small model's short
    forward pass may miss the burst. Each sample costs O(ranks log ranks) on rank 0."""

    def __init__(self, ratio: float = SLOW_RATIO, for_s: float = SLOW_FOR_S) -> None:
        self.ratio, self.for_s = ratio, for_s
        self._window: deque[_Sample] = deque()
        self._own: list[float] = []
        self._median: list[float] = []
        self._named: set[int] = set()

    def add(self, start: float, end: float, seconds: Sequence[float]) -> list[Straggler]:
        """One sample: `seconds[rank]` per step over the interval (start, end]. Returns the ranks
        newly slow over the window that ends with it (a rank stays named while it stays slow,
        and is named again after it has recovered and slowed down again)."""
        if len(seconds) != len(self._own):  # the first sample (a world size is fixed per attempt)
            self._window.clear()
            self._own, self._median = [0.0] * len(seconds), [0.0] * len(seconds)
        sample = _Sample(start, tuple(seconds), tuple(medians_of_others(seconds)))
        self._window.append(sample)
        self._sum(sample, 1)
        while len(self._window) > 1 and self._window[1].start <= end - self.for_s:
            self._sum(self._window.popleft(), -1)  # the rest still covers `for_s`
        span = end - self._window[0].start
        if span < self.for_s:
            return []
        named = []
        for rank, (own, median) in enumerate(zip(self._own, self._median, strict=True)):
            if median > 0 and own >= self.ratio * median:
                if rank not in self._named:
                    self._named.add(rank)
                    named.append(Straggler(rank, own / median, span))
            else:
                self._named.discard(rank)
        return named

    def _sum(self, sample: _Sample, sign: int) -> None:
        for rank in range(len(sample.own)):
            self._own[rank] += sign * sample.own[rank]
            self._median[rank] += sign * sample.median[rank]

    def slow(self) -> list[int]:
        """Ranks named and still slow."""
        return sorted(self._named)


class StragglerWatch:
    """One rank's side: times its training forward passes (module hooks, so the step loop needs
    one call per micro-step) and, every `every` micro-steps, all-gathers each rank's seconds per
    step; rank 0 runs the detector and keeps a line for each straggler it names."""

    def __init__(self, module: torch.nn.Module, rank: int, world_size: int, device: torch.device,
                 name=lambda rank: f"rank {rank}", every: int = GATHER_EVERY) -> None:
        self.rank, self.world_size, self.device, self.name, self.every = rank, world_size, device, name, every
        self.detector = StragglerDetector() if rank == 0 else None
        self._forward_s = 0.0
        self._began = 0.0
        self._steps = 0
        self._since = time.monotonic()
        self._epoch: set[int] = set()
        self._notes: list[str] = []
        if world_size > 1:
            module.register_forward_pre_hook(self._pre)
            module.register_forward_hook(self._post)

    def _pre(self, module, args) -> None:
        if module.training:
            self._began = time.perf_counter()

    def _post(self, module, args, output) -> None:
        if module.training:
            self._forward_s += time.perf_counter() - self._began

    def stepped(self) -> None:
        """After every training micro-step, on every rank: every `every`-th call is a collective."""
        if self.world_size == 1:
            return
        self._steps += 1
        if self._steps % self.every:
            return
        mine = torch.tensor([self._forward_s / self.every], dtype=torch.float64, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)  # sync: every rank, at the same micro-step
        self._forward_s = 0.0
        now, since, self._since = time.monotonic(), self._since, time.monotonic()
        if self.detector is None:
            return
        for straggler in self.detector.add(since, now, torch.cat(gathered).tolist()):
            self._notes.append(straggler.line(self.name(straggler.rank)))
        self._epoch.update(self.detector.slow())

    def take_epoch(self) -> tuple[list[int], list[str]]:
        """Since the last call (rank 0's; empty on the others): the ranks that were stragglers
        at some point, and a line for each one newly named. The lines travel in the epoch's
        record to the driver, which says them (a worker's own output does not reach the user's
        terminal unless `--verbose`)."""
        ranks, notes, self._epoch, self._notes = sorted(self._epoch), self._notes, set(), []
        return ranks, notes
