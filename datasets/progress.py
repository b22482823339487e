"""Progress of a long preparation: files and rows read, throughput, stage timings.

Quiet for quick runs: nothing is emitted until `interval` seconds have passed, and then at most
once per interval, so a small dataset prints only the final summary.
"""

import time
from collections.abc import Callable


class Progress:
    def __init__(self, emit: Callable[[str], None] | None = None, total_files: int = 0, interval: float = 2.0) -> None:
        self.emit = emit
        self.total_files = total_files
        self.interval = interval
        self.started = time.perf_counter()
        self._last = self.started
        self.files = self.rows = self.bytes = 0
        self.stages: dict[str, float] = {}
        self._stage_started = self.started

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def file_read(self, item, rows: int) -> None:
        self.files += 1
        self.rows += rows
        self.bytes += item.size
        self._maybe(lambda: (
            f"read {self.files}/{self.total_files} files, {self.rows:,} rows, "
            f"{self.bytes / 2**20 / max(self.elapsed(), 1e-9):.1f} MiB/s"
        ))

    def stage(self, name: str) -> None:
        """Close the current stage's timer and name the next one."""
        now = time.perf_counter()
        self.stages[name] = now - self._stage_started
        self._stage_started = now
        self._maybe(lambda: f"{name} done at {self.elapsed():.1f}s ({self.rows:,} rows)")

    def _maybe(self, message: Callable[[], str]) -> None:
        now = time.perf_counter()
        if self.emit is None or now - self._last < self.interval:
            return
        self._last = now
        self.emit(message())
