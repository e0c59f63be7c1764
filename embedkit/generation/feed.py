"""A shard's inputs prepared ahead of the model: its rows read and its prompts tokenized in a thread.

Reading a shard and tokenizing its prompts needs only the tokenizer and the model's config, not
the weights; it costs 1.6-2.0 s of host time for 60k pydocs prompts on the H200 machine, time in
which the GPU had nothing to do. `ShardFeed` runs it in a thread, one shard ahead of the caller:

- the first shard is prepared while the model's weights load (after the tokenizer, whose load
  includes most of transformers' imports);
- on CUDA, shard k+1 is prepared while shard k is on the GPU; on CPU, where the model's work
  already takes every core, a shard is prepared only when the caller asks for it.

The fast tokenizer's batch call runs in Rust with the GIL released, but building the prompts and
the token lists holds it. Measured on the H200 machine (benchmarks.md, generate runs 24 and 25):
the model's load ran 0.5-1.9 s longer beside the first shard's tokenizing, and the decoder
0.7-1.5 s longer over three 20k shards while the later two were tokenized; the run after the
load still gained (about 1 s against preparing later shards only when asked), and a child
process instead of the thread lost more to its own start. Part of that cost was the cyclic
garbage collector's, whose collections (started by the allocations here) held the decoder too;
paused for the run (`run/heap.py`, run 26), the decoder over three 20k shards took 11.7-12.2 s
against 12.3-12.9 s. At most two shards' inputs are
held at once (the caller's and the next). The thread is
a daemon: an interrupted run exits without waiting for a shard nobody will use, and only the
caller commits, so nothing half-prepared is written.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from ..config import GenerateConfig
from ..interrupts import held_interrupts
from ..io.corpus import Corpus, drop_empty
from ..io.shards import Shard
from .tasks import input_tokens, task_inputs, timed

# prepare the next shard while the caller runs the model on this one, by device type: on CPU the
# model's work already uses every core (a test turns it on there to run the path without a GPU)
PREPARE_AHEAD = {"cuda": True, "cpu": False}


@dataclass(frozen=True)
class ShardInputs:
    """A shard's rows with text (empty ones dropped, counted) and what the model reads for each."""

    shard: Shard
    table: pa.Table
    empty: int
    inputs: list
    flags: list[bool]
    prompt_tokens: int
    phases: dict[str, float] = field(default_factory=dict)  # read and inputs seconds, wherever they ran


def prepare_shard(corpus: Corpus, shard: Shard, cfg: GenerateConfig, template: str, tok: Any, config: Any) -> ShardInputs:
    """Read a shard's rows and build the task's inputs for them (`tasks.task_inputs`)."""
    phases: dict[str, float] = {}
    with timed(phases, "read"):
        table, empty = drop_empty(corpus.read(shard.start, shard.stop), keep_empty=False)
    with timed(phases, "inputs"):
        inputs, flags = task_inputs(table.column("text").to_pylist(), table.column("id").to_pylist(), cfg, template, tok, config)
        prompt_tokens = sum(input_tokens(x) for x in inputs)
    return ShardInputs(shard, table, empty, inputs, flags, prompt_tokens, phases)


class ShardFeed:
    """`prepare(shard)` for each shard in order, in a daemon thread; `next()` returns them in order.

    With `ahead`, the shard after the one `next()` returned is prepared at once (while the
    caller works on it); without, only when `next()` asks for it. The first shard is always
    started at construction. An exception raised preparing a shard is raised by the `next()`
    that asks for that shard, after the shards before it were handed out."""

    def __init__(self, prepare: Callable[[Shard], ShardInputs], shards: list[Shard], *, ahead: bool):
        self._prepare, self.shards, self._ahead = prepare, list(shards), ahead
        self._requests: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[tuple[ShardInputs | None, BaseException | None]] = queue.SimpleQueue()
        self._handed = 0  # shards returned by next()
        self.last_wait = 0.0  # seconds the last next() waited for the thread: the preparing left on the caller's path
        self._thread = threading.Thread(target=self._work, name="embedkit-shard-feed", daemon=True)
        with held_interrupts() as interrupted:  # a thread cut off inside start() is left half-made
            self._thread.start()
        if interrupted:
            self.close()
            raise KeyboardInterrupt
        if self.shards:
            self._requests.put(0)

    def _work(self) -> None:
        while True:
            k = self._requests.get()
            if k is None:
                return
            try:
                self._results.put((self._prepare(self.shards[k]), None))
            except BaseException as e:  # raised where the caller asks for this shard
                self._results.put((None, e))

    def next(self) -> ShardInputs:
        """The next shard's inputs (waiting for the thread if they are not ready)."""
        k = self._handed
        if k >= len(self.shards):
            raise IndexError("every shard was handed out")
        if k > 0 and not self._ahead:
            self._requests.put(k)
        t = time.perf_counter()
        prepared, error = self._results.get()
        self.last_wait = time.perf_counter() - t
        self._handed = k + 1
        if error is not None:
            self.close()
            raise error
        if self._ahead and k + 1 < len(self.shards):
            self._requests.put(k + 1)  # prepared while the caller works on this one
        return prepared

    def close(self) -> None:
        """Stop the thread after the shard it is preparing (if any); nothing more is prepared."""
        self._requests.put(None)

    def __enter__(self) -> "ShardFeed":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
