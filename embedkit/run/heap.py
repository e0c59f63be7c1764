"""The interpreter's cyclic garbage collector during a run: paused, run between shards, counted.

A collection holds the interpreter lock for every thread while it walks the objects it tracks.
A generate run allocates millions of them: the feed's thread builds a shard's prompts (a token
list and a dict per row), the decoder its rows' outputs, Triton its kernels on a fresh process's
first calls. Left automatic, the collector ran about 500 times in a process over 60k pydocs
prompts on the H200 machine, 360 of them after the model's load, 1.0-1.5 s in all; two or three
were full collections of 325-425 ms each. While one runs the decoder cannot queue its next steps
and the GPU drains. With collections off from the run's start, the same CLI ran 10-13% more new
tokens a second after the load (benchmarks.md, generate run 26); they are now off from the
model's load on.

Reference counting still frees everything that is not part of a cycle; `RunCollector.between()`
collects the young generations between shards, where the GPU waits for the next shard anyway,
so that cycles a shard leaves are freed shard by shard and a long run's memory does not grow.
Freezing the heap instead (`gc.freeze`, as some servers do after their start) left these
collections' time unchanged (run 26): most of what they walked was made after the freeze.
"""

from __future__ import annotations

import gc
import time


class RunCollector:
    """Automatic collections off inside the `with` block, young generations collected at each
    `between()`, and the collections made inside the block counted (every thread's, the ones
    `between()` makes included): how many, how many full, the seconds they held the lock.

    A collector the calling program turned off stays off afterwards; one it left on is turned
    back on at the end, even when the block raises."""

    def __init__(self) -> None:
        self.collections = 0
        self.full = 0
        self.seconds = 0.0
        self._started = 0.0
        self._was_enabled = True

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.collections += 1
        self.full += info["generation"] == 2
        self.seconds += time.perf_counter() - self._started

    def between(self) -> None:
        """Collect what the block made since the last `between()` (generations 0 and 1; what
        survives one of these calls moves to the oldest generation, left to the collections
        after the block)."""
        gc.collect(1)

    def __enter__(self) -> "RunCollector":
        self._was_enabled = gc.isenabled()
        gc.callbacks.append(self._callback)
        gc.disable()
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)
        if self._was_enabled:
            gc.enable()

    def stats(self) -> dict:
        return {"collections": self.collections, "full": self.full, "seconds": round(self.seconds, 3)}
