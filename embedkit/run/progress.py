"""One progress bar for every stage: a tqdm bar on a terminal, silent otherwise.

It counts the stage's unit (documents, shards), and shows tokens/s and shards done when the
stage reports them. Thread-safe: the encode stage updates it from its writer thread.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any


class Progress:
    """`update(n, tokens)` as work lands, `shard_done()` per committed shard; a context manager
    (or `close()`) ends the bar."""

    def __init__(self, total: int, enabled: bool, *, unit: str = "doc", desc: str | None = None, shards: int | None = None):
        self.enabled = enabled and sys.stderr.isatty()
        self.total_shards = shards
        self.shards = 0
        self.tokens = 0
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self.bar: Any = None
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, desc=desc, unit_scale=True, dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int, tokens: int = 0) -> None:
        with self._lock:
            self.tokens += tokens
            if self.bar is not None:
                self.bar.update(n)
                self._postfix()

    def committed(self, part: dict) -> None:
        """A shard task's result landed (the executors' `on_commit`): its `docs`, `tokens` and shard."""
        self.update(int(part.get("docs", 0)), int(part.get("tokens", 0)))
        self.shard_done()

    def shard_done(self) -> None:
        with self._lock:
            self.shards += 1
            if self.bar is not None:
                self._postfix()

    def _postfix(self) -> None:
        parts = []
        if self.tokens:
            parts.append(f"{self.tokens / max(time.perf_counter() - self.t0, 1e-9):,.0f} tok/s")
        if self.total_shards is not None:
            parts.append(f"shards {self.shards}/{self.total_shards}")
        if parts:
            self.bar.set_postfix_str(", ".join(parts), refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Stopwatch:
    """Seconds per named step of a phase, summed over repeats: `mark(step)` charges the time
    since the previous mark (or the start) to `step`; one thread marks, another thread's
    steps come in through `add`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def restart(self) -> None:
        self._last = time.perf_counter()

    def mark(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = self.seconds.get(step, 0.0) + now - self._last
        self._last = now

    def add(self, step: str, seconds: float) -> None:
        self.seconds[step] = self.seconds.get(step, 0.0) + seconds

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}
