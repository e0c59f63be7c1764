"""Prompts tokenized ahead of the model, in worker processes.

Tokenizing a shard's prompts is CPU work of the size of its model work's host side: the 20k
pydocs summarize prompts took 0.9-1.2 s on the H200 machine (0.49 s in the Rust batch call on 16
threads, 0.32 s turning its encodings into Python lists, which holds the GIL), in line before
every shard's model work. In a thread beside the decoder it hid that time and the model phase
grew by as much (the decode loop waited for the GIL). Here `engine.tokenize.TokenizerPool`'s
worker processes tokenize the rendered prompts and return flat arrays: the first shard's while
the model loads, each next shard's while the model works on the one before. The ids are the
ones `fit_prompts` would make (the same rendering, the same tokenizer); prompts over the
model's positions are still cut by `fit_prompt` in this process (rare: 21 of 60k pydocs).
"""

from __future__ import annotations

from typing import Any, Callable

import pyarrow as pa

from ..config import GenerateConfig
from ..engine.tokenize import PendingTokens, TokenizerPool, default_workers
from ..io.corpus import Corpus, drop_empty
from ..io.shards import Shard
from .prompts import prompt_special_tokens, render_prompts
from .tasks import prompt_rows

# A module switch so that a benchmark can run the inline path (tokenized in line, shard by shard).
PROMPTS_AHEAD = True
NO_CUT = 1 << 30  # the workers keep every token: the cut to the model's positions is fit_prompt's


def prompt_workers(device_type: str) -> int:
    """Worker processes for the prompts: every core but one beside a GPU; none on a CPU, where
    the model needs the cores (the prompts are then tokenized in this process, shard by shard)."""
    return default_workers("cuda") if device_type == "cuda" else 0


class PromptFeed:
    """The shards of a run read and their prompts tokenized one shard ahead of the model.

    `start(corpus, shards)` reads the first shard and starts its prompts; `take(shard)` returns
    its rows and a function that waits for their prompts' ids, and starts the next shard's. Tasks
    without prompts to render (score) or a chat template that does more than wrap the message
    are only read here; their inputs are made as before."""

    def __init__(self, tok: Any, cfg: GenerateConfig, template: str, workers: int):
        self._tok, self._cfg, self._template = tok, cfg, template
        self._corpus: Corpus | None = None
        self._order: list[int] = []
        self._shards: dict[int, Shard] = {}
        self._ahead: dict[int, tuple[pa.Table, int, PendingTokens | None]] = {}
        self._pool: TokenizerPool | None = None
        backend = getattr(tok, "backend_tokenizer", None)
        renders = render_prompts(tok, template, [prompt_rows(["x"], ["x"], cfg)[0]], chat=True) is not None
        if cfg.task in ("summarize", "classify") and backend is not None and renders:
            self._pool = TokenizerPool(backend.to_str(), NO_CUT, workers, special_tokens=prompt_special_tokens(tok, chat=True))

    def start(self, corpus: Corpus, shards: list[Shard]) -> None:
        """The shards to be taken, in order; the first one's prompts start now."""
        self._corpus = corpus
        self._order = [s.index for s in shards]
        self._shards = {s.index: s for s in shards}
        if shards:
            self._prefetch(shards[0].index)

    def take(self, shard: Shard) -> tuple[pa.Table, int, Callable[[], list[list[int]]] | None]:
        """(the shard's rows, empty texts dropped; how many were dropped; a function that waits
        for the rows' prompt ids, or None); the next shard's prompts start before this returns."""
        if shard.index not in self._ahead:
            self._shards.setdefault(shard.index, shard)
            self._prefetch(shard.index)
        table, empty, pending = self._ahead.pop(shard.index)
        later = self._order[self._order.index(shard.index) + 1 :] if shard.index in self._order else []
        if later and self._pool is not None and self._pool.workers > 0:  # in-process, ahead would only move the work
            self._prefetch(later[0])
        return table, empty, (None if pending is None else lambda: _lists(pending))

    def _prefetch(self, index: int) -> None:
        if index in self._ahead:
            return
        assert self._corpus is not None
        shard = self._shards[index]
        table, empty = drop_empty(self._corpus.read(shard.start, shard.stop), keep_empty=False)
        pending = None
        if self._pool is not None and table.num_rows:
            rows = prompt_rows(table.column("text").to_pylist(), table.column("id").to_pylist(), self._cfg)
            texts = render_prompts(self._tok, self._template, rows, chat=True)
            pending = self._pool.submit(texts) if texts is not None else None
        self._ahead[index] = (table, empty, pending)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._ahead.clear()

    def __enter__(self) -> "PromptFeed":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lists(pending: PendingTokens) -> list[list[int]]:
    """The rows' ids as the Python lists the decoder takes (one conversion of the flat array:
    2.5M ids in about 30 ms)."""
    t = pending.get()
    flat, offsets = t.flat.tolist(), t.offsets.tolist()
    return [flat[a:b] for a, b in zip(offsets, offsets[1:])]
