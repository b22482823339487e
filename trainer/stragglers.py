"""Stragglers: a rank whose steps take 1.3x the median of the others' for a minute is named in
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
cadence, so every rank joins the same gathers.
"""

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

SLOW_RATIO = 1.3
"""A rank is slow when its seconds per step are at least this times the median of the other
ranks' (with two ranks: the other one's)."""
SLOW_FOR_S = 60.0
"""...for at least this long without a break before it is named."""
GATHER_EVERY = 50
"""Micro-steps between gathers: one all-gather of a float per rank and one host sync, as the
loop's NaN check (NAN_CHECK_EVERY)."""


@dataclass(frozen=True)
class Straggler:
    rank: int
    ratio: float
    """Its seconds over the median's, summed over the slow stretch."""
    span_s: float
    """How long the stretch has lasted."""

    def line(self, name: str) -> str:
        return (f"stoker: {name} is a straggler: its steps took {self.ratio:.2f}x the median "
                f"over the last {self.span_s:.0f} s")


@dataclass
class _Stretch:
    start: float
    own_s: float = 0.0
    median_s: float = 0.0
    named: bool = False


class StragglerDetector:
    """Per-rank seconds per step, sampled over time, in; ranks slow for `for_s`, out."""

    def __init__(self, ratio: float = SLOW_RATIO, for_s: float = SLOW_FOR_S) -> None:
        self.ratio, self.for_s = ratio, for_s
        self._stretches: dict[int, _Stretch] = {}

    def add(self, start: float, end: float, seconds: Sequence[float]) -> list[Straggler]:
        """One sample: `seconds[rank]` per step over the interval (start, end]. Returns the ranks
        whose slow stretch reached `for_s` with this sample (each stretch is named once; a rank
        that recovers and slows down again is named again)."""
        named = []
        for rank, own in enumerate(seconds):
            others = [s for r, s in enumerate(seconds) if r != rank]
            median = statistics.median(others) if others else 0.0
            if median <= 0 or own < self.ratio * median:
                self._stretches.pop(rank, None)
                continue
            stretch = self._stretches.setdefault(rank, _Stretch(start))
            stretch.own_s += own
            stretch.median_s += median
            if not stretch.named and end - stretch.start >= self.for_s:
                stretch.named = True
                named.append(Straggler(rank, stretch.own_s / stretch.median_s, end - stretch.start))
        return named

    def slow(self) -> list[int]:
        """Ranks named and still slow."""
        return sorted(rank for rank, stretch in self._stretches.items() if stretch.named)


class StragglerWatch:
    """One rank's side: times its training forward passes (module hooks, so the step loop needs
    one call per micro-step) and, every `every` micro-steps, all-gathers each rank's seconds per
    step; rank 0 runs the detector and prints a line for each straggler it names."""

    def __init__(self, module: torch.nn.Module, rank: int, world_size: int, device: torch.device,
                 name=lambda rank: f"rank {rank}", every: int = GATHER_EVERY) -> None:
        self.rank, self.world_size, self.device, self.name, self.every = rank, world_size, device, name, every
        self.detector = StragglerDetector() if rank == 0 else None
        self._forward_s = 0.0
        self._began = 0.0
        self._steps = 0
        self._since = time.monotonic()
        self._epoch: set[int] = set()
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
            print(straggler.line(self.name(straggler.rank)), flush=True)
        self._epoch.update(self.detector.slow())

    def take_epoch(self) -> list[int]:
        """The ranks (rank 0 only) that were named stragglers at some point since the last call."""
        ranks, self._epoch = sorted(self._epoch), set()
        return ranks
