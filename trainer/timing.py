"""Where a training pass's wall time goes, per worker: waiting for batches, forward+backward,
the optimizer step, and everything else (the remainder, so the four always sum to the pass).

perf_counter only, and no device sync: on CPU every op has finished when the call returns, so
the figures are honest. On a GPU, kernels run asynchronously and the time lands wherever the
host next waits for the device (usually the next batch's wait or the step), so the split is
only indicative there; a sync per phase would make it honest and cost throughput, so none is
added.
"""

import time


class StepTimes:
    """Accumulates forward+backward and step seconds over one pass; the loop marks the phase
    boundaries (`begin`, `computed`, `stepped`) around each micro-step."""

    def __init__(self) -> None:
        self.compute_s = 0.0
        self.step_s = 0.0
        self._mark = 0.0

    def begin(self) -> None:
        self._mark = time.perf_counter()

    def computed(self) -> None:
        now = time.perf_counter()
        self.compute_s += now - self._mark
        self._mark = now

    def stepped(self) -> None:
        self.step_s += time.perf_counter() - self._mark

    def metrics(self, wait_s: float, total_s: float) -> dict[str, float]:
        """The epoch record's breakdown: `time_other_s` is what the rest leave of `total_s`."""
        return {"time_wait_s": wait_s, "time_compute_s": self.compute_s, "time_step_s": self.step_s,
                "time_other_s": max(total_s - wait_s - self.compute_s - self.step_s, 0.0)}
