"""The interpreter's cyclic garbage collector, kept off a run's path and counted.

A full collection walks every container object the interpreter tracks, holding the interpreter
lock for all threads while it does. After torch, transformers and a model are loaded that is
over 400k objects, 100-175 ms a full collection on this project's 2-core machine; a shard's
inputs built in the feed's thread (20k prompts' token lists and row dicts) allocate enough to
start about one of them each. While one runs, the decoder cannot queue its next steps and the
GPU drains.

`frozen_heap()` moves everything alive at its start out of the collector's reach (`gc.freeze`,
as long-running inference servers do after their start) so that a full collection during the
run walks only what the run itself made; its end gives the objects back, so the interpreter's
own collection at exit still frees them (nanobind, torch's Triton bindings, reports the ones a
frozen heap keeps at exit as leaks). Objects the run makes are collected as before. A heap that
the calling program froze itself is left as it is.
`CollectorTime` counts the collections made during a block and the seconds they held the lock.
"""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Objects alive now are not walked by the collector until the block ends (they are still
    freed when their last reference goes); at the end they are handed back to it. When the
    calling program has frozen objects itself, nothing is done: `gc.unfreeze` would undo its
    freeze too."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class CollectorTime:
    """Collections of the cyclic collector during a `with` block, in every thread: how many, how
    many were full (oldest generation), and the seconds they took."""

    def __init__(self) -> None:
        self.collections = 0
        self.full = 0
        self.seconds = 0.0
        self._start = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        self.collections += 1
        self.full += info["generation"] == 2
        self.seconds += time.perf_counter() - self._start

    def __enter__(self) -> "CollectorTime":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def stats(self) -> dict:
        return {"collections": self.collections, "full": self.full, "seconds": round(self.seconds, 3)}
