"""The encode stage's run on one device: corpus -> tokenize (workers) -> pack -> forward -> one
Lance commit per shard.

Three threads of work overlap: a producer thread reads shards, hands windows of texts to the
tokenizer workers and packs what comes back into padded batches; the main thread feeds batches
to the model without waiting on the device; a writer thread fetches each window's vectors and
writes them as Lance fragments while later windows compute, and commits each finished shard.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from ..config import EncodeConfig
from ..engine.batching import pack_batches, pad_rows
from ..engine.encoder import Encoder, default_batch_tokens, model_config
from ..engine.tokenize import Tokenized, TokenizerPool, default_workers
from ..interrupts import held_interrupts
from ..io.corpus import Corpus, drop_empty
from ..io.shards import Shard
from ..io.store import CHUNK_COLUMNS, vectors_table
from ..run.progress import Progress
from .job import Job, carried_columns
from .summary import EncodeSummary

PREFETCH_WINDOWS = 2  # tokenized windows kept ready ahead of the model


FIRST_WINDOW = 4096  # documents in the run's first window (later windows double up to window_docs)


@dataclass
class _Window:
    """A tokenized, packed slice of a shard, rows in the order the batches take them."""

    shard: Shard
    rows: pa.Table  # id, then any columns stored beside the vectors (carried_columns)
    n_tokens: np.ndarray
    truncated: np.ndarray
    batches: list[tuple[np.ndarray, np.ndarray]]  # (padded ids, lengths)
    tokens: int
    padded_tokens: int
    skipped_empty: int
    docs: int  # the input's documents in it (fewer than rows when documents are split into chunks)


@dataclass
class _ShardStart:
    shard: Shard


@dataclass
class _ShardEnd:
    shard: Shard


@dataclass
class Totals:
    docs: int = 0
    chunks: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    truncated: int = 0
    skipped_empty: int = 0
    shards_done: int = 0
    input_wait: float = 0.0
    retried: int = 0
    quarantined_ids: list = field(default_factory=list)


@dataclass(frozen=True)
class TokenizerSpec:
    """What the tokenizer workers need: the model's `tokenizers` definition, the length cut and
    side, the chunks' overlap when long texts are split rather than cut, and the document prompt."""

    json: str
    max_length: int
    truncation_side: str
    chunk_overlap: int | None = None
    prompt: str = ""


class _Feed:
    """The tokenizer pool and the producer thread: shards read, tokenized and packed into a queue
    `prefetch` items deep. The pool forks before the model moves to the GPU: children of a CUDA
    process must not inherit its context."""

    def __init__(self, corpus: Corpus, pending: list[Shard], cfg: EncodeConfig, spec: TokenizerSpec, budget: Callable[[], int], workers: int,
                 prefetch: int):  # fmt: skip
        self.pool = TokenizerPool(spec.json, spec.max_length, workers, spec.truncation_side, spec.chunk_overlap, spec.prompt)
        self.items: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        try:
            # after the fork: sizing the budget from free device memory creates the CUDA context
            self.budget = budget()
            thread = threading.Thread(target=_produce, args=(corpus, pending, self.pool, cfg, self.budget, self.items, self.stop),
                                      daemon=True, name="embedkit-producer")  # fmt: skip
            with held_interrupts() as interrupted:  # a thread cut off inside start() cannot be joined
                thread.start()
                self.thread = thread
            if interrupted:
                raise KeyboardInterrupt
        except BaseException:  # a Ctrl-C here must not leave the workers to the interpreter's exit
            self.close()
            raise

    def close(self) -> None:
        """Stop the producer and the workers (idempotent)."""
        self.stop.set()
        _drain(self.items)
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.pool.close()


def _job_spec(job: "Job") -> TokenizerSpec:
    return TokenizerSpec(job.tokenizer_json, job.max_length, job.truncation_side, job.chunk_overlap, job.prompt)


def run_shards(corpus: Corpus, job: Job, pending: list[Shard], cfg: EncodeConfig, skipped: int,
                may_commit: Callable[[int], bool] | None = None) -> EncodeSummary:  # fmt: skip
    """Encode the pending shards on one device; reading and tokenizing overlap moving the model there.

    `may_commit(shard)`, asked before each commit (a shard task of a multi-worker run): False
    leaves the shard's fragments uncommitted, because another copy of it has the commit.
    """
    totals = Totals()
    workers = cfg.tokenize_workers if cfg.tokenize_workers is not None else default_workers(job.choice.type)
    budget = lambda: cfg.batch_tokens or default_batch_tokens(model_config(job.model), job.choice)  # noqa: E731
    feed = _Feed(corpus, pending, cfg, _job_spec(job), budget, workers, PREFETCH_WINDOWS + 2)
    try:
        encoder = Encoder(job.model, job.choice, normalize=cfg.normalize, out_dtype=cfg.dtype, max_batch_tokens=feed.budget,
                          dim=cfg.dim)  # fmt: skip
        # the clock starts once the model and the pool are ready (one-time costs, not per token)
        start = time.perf_counter()
        with Progress(sum(s.rows for s in pending), cfg.run.progress, shards=len(pending)) as bar:
            _consume(feed.items, encoder, job, totals, bar, may_commit)
    finally:
        feed.close()
    return make_summary(job, totals, time.perf_counter() - start, skipped=skipped)


@dataclass
class _Written:
    """A window's rows, written as Lance fragments but not yet committed."""

    fragments: list[Any]
    docs: int  # the input's documents
    chunks: int  # the rows written when documents are split, else 0
    tokens: int
    padded_tokens: int
    truncated: int
    retried: int = 0
    quarantined: tuple = ()  # ids left out: their vectors stayed NaN/Inf in fp32 too


def _consume(items: queue.Queue, encoder: Encoder, job: Job, totals: Totals, bar: Progress,
             may_commit: Callable[[int], bool] | None = None) -> None:  # fmt: skip
    """Feed batches to the device; the writer thread writes each window, then commits each shard.

    Windows are written as fragments while later windows compute, so a shard's end costs only
    the commit (a manifest update), not the write of all its vectors.
    """
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedkit-writer")
    last_commit: Future | None = None
    written: list[Future] = []
    started = time.time()
    try:
        while True:
            t0 = time.perf_counter()
            item = items.get()
            totals.input_wait += time.perf_counter() - t0
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, _ShardStart):
                written = []
                started = time.time()  # the device starts this shard: its timeline's start
            elif isinstance(item, _Window):
                totals.skipped_empty += item.skipped_empty
                if item.batches:
                    outputs = [encoder.forward(ids, lengths) for ids, lengths in item.batches]
                    written.append(writer.submit(_write_window, encoder, job, item, outputs))
                bar.update(item.docs + item.skipped_empty, item.tokens)
            elif isinstance(item, _ShardEnd):
                if last_commit is not None:
                    last_commit.result()  # surface a failed commit before going on
                last_commit = writer.submit(_commit_shard, job, item.shard, written, totals, bar, started, may_commit)
                written = []
        if last_commit is not None:
            last_commit.result()
    finally:
        writer.shutdown(wait=True)


def _write_window(encoder: Encoder, job: Job, window: _Window, outputs: list[Any]) -> _Written:
    """Fetch a window's vectors and write them as uncommitted fragments.

    Checked before the write: a row whose vector is NaN/Inf was run again alone in fp32 by the
    encoder; one still not finite is quarantined (left out, its id kept for the shard's commit).
    """
    vectors, bad, retried = encoder.fetch_checked(outputs, window.batches)
    rows, n_tokens, truncated = window.rows, window.n_tokens, window.truncated
    quarantined: tuple = ()
    if len(bad):
        keep = np.ones(len(vectors), bool)
        keep[bad] = False
        quarantined = tuple(rows.column("id").take(pa.array(bad)).to_pylist())
        rows, vectors, n_tokens, truncated = rows.filter(pa.array(keep)), vectors[keep], n_tokens[keep], truncated[keep]
    if job.quantization is not None:  # --dtype int8 / binary: the codes are stored, after the finiteness check
        vectors = job.quantization.encode(vectors)
    table = vectors_table(job.schema, rows.column("id"), vectors, n_tokens, truncated, columns=rows)
    chunked = job.chunk_overlap is not None  # a document is counted once, whatever its chunks
    return _Written(
        fragments=job.store.write_fragments(table) if table.num_rows else [], docs=window.docs if chunked else table.num_rows,
        chunks=table.num_rows if chunked else 0, tokens=window.tokens,
        padded_tokens=window.padded_tokens, truncated=int(truncated.sum()), retried=retried, quarantined=quarantined,
    )  # fmt: skip


def _commit_shard(job: Job, shard: Shard, written: list[Future], totals: Totals, bar: Progress, started: float | None = None,
                  may_commit: Callable[[int], bool] | None = None) -> None:  # fmt: skip
    """Commit all of a shard's fragments as one Lance transaction: the shard is in, or it is not."""
    parts: list[_Written] = [f.result() for f in written]
    fragments = [frag for part in parts for frag in part.fragments]
    if may_commit is not None and not may_commit(shard.index):
        # re-issued, and the other copy has the commit: these fragments stay unreferenced
        # (invisible; the next run's cleanup deletes them)
        return
    if not fragments:  # a shard of only empty texts still commits, so the ledger shows it done
        fragments = job.store.write_fragments(job.schema.empty_table())
    quarantined = [i for p in parts for i in p.quarantined]
    job.store.commit_fragments(shard.index, fragments, started, quarantined)
    totals.retried += sum(p.retried for p in parts)
    totals.quarantined_ids += quarantined
    totals.docs += sum(p.docs for p in parts)
    totals.chunks += sum(p.chunks for p in parts)
    totals.tokens += sum(p.tokens for p in parts)
    totals.padded_tokens += sum(p.padded_tokens for p in parts)
    totals.truncated += sum(p.truncated for p in parts)
    totals.shards_done += 1
    bar.shard_done()


def _produce(corpus: Corpus, pending: list[Shard], pool: TokenizerPool, cfg: EncodeConfig, budget: int, items: queue.Queue,
             stop: threading.Event) -> None:  # fmt: skip
    """Producer thread: read shards, tokenize windows in the pool, pack them, queue them."""
    put = lambda item: _put(items, item, stop)  # noqa: E731
    try:
        inflight: deque = deque()
        submitted = 0
        carried = carried_columns(cfg)
        for shard in pending:
            inflight.append(_ShardStart(shard))
            # Read window by window: a shard's texts are never all in memory, and the device
            # starts as soon as the first window is tokenized.
            for w, size in _windows(shard.rows, cfg.window_docs, first=submitted == 0):
                table, empty = drop_empty(corpus.read(shard.start + w, shard.start + w + size), cfg.keep_empty)
                texts = table.column("text").combine_chunks()
                inflight.append((shard, table.select(carried), pool.submit(texts), empty))
                submitted += 1
                while sum(isinstance(x, tuple) for x in inflight) > PREFETCH_WINDOWS:
                    _flush_one(inflight, budget, put)
            inflight.append(_ShardEnd(shard))
        while inflight:
            _flush_one(inflight, budget, put)
        put(None)
    except _Stopped:  # the consumer stopped first (an error, Ctrl-C): nothing to hand over
        return
    except BaseException as e:  # handed to the main thread, which raises it
        with contextlib.suppress(_Stopped):
            put(e)


def _windows(rows: int, window: int, first: bool) -> Iterator[tuple[int, int]]:
    """(start, size) of the windows of a shard. The run's first windows are small and grow, so
    the device starts after a few thousand documents are tokenized instead of a full window."""
    size = min(window, FIRST_WINDOW) if first else window
    start = 0
    while start < rows:
        yield start, min(size, rows - start)
        start += size
        size = min(window, size * 2)


def _flush_one(inflight: deque, budget: int, put: Callable[[Any], None]) -> None:
    item = inflight.popleft()
    put(_pack(*item, budget) if isinstance(item, tuple) else item)


def _put(items: queue.Queue, item: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            items.put(item, timeout=0.5)
            return
        except queue.Full:
            continue
    raise _Stopped()


class _Stopped(Exception):
    pass


def _drain(items: queue.Queue) -> None:
    try:
        while True:
            items.get_nowait()
    except queue.Empty:
        pass


def _pack(shard: Shard, rows: pa.Table, pending: Any, skipped_empty: int, budget: int) -> _Window:
    tok: Tokenized = pending.get()
    docs = rows.num_rows
    if docs == 0:  # every text of the window was empty
        none = np.zeros(0, np.int32)
        return _Window(shard, rows, none, none.astype(bool), [], 0, 0, skipped_empty, 0)
    if tok.chunks is not None:  # one row per chunk: its document's columns, then where it lies
        c = tok.chunks
        rows = rows.take(pa.array(c.source))
        for name in CHUNK_COLUMNS:
            rows = rows.append_column(name, pa.array(getattr(c, name), pa.int32()))
    batches = pack_batches(tok.lengths, budget)
    order = np.concatenate([b.rows for b in batches])
    padded = [(pad_rows(tok.flat, tok.offsets, b.rows, b.seq_len), tok.lengths[b.rows].astype(np.int32)) for b in batches]
    return _Window(
        shard=shard,
        rows=rows.take(pa.array(order)),  # the stored columns travel with their ids
        n_tokens=tok.n_tokens[order],
        truncated=tok.truncated[order],
        batches=padded,
        tokens=int(tok.lengths.sum()),
        padded_tokens=sum(b.padded_tokens for b in batches),
        skipped_empty=skipped_empty,
        docs=docs,
    )


def make_summary(job: Job, t: Totals, seconds: float, skipped: int) -> EncodeSummary:
    return EncodeSummary(
        out=str(job.out), device=job.choice.device, docs=t.docs, chunks=t.chunks, tokens=t.tokens, padded_tokens=t.padded_tokens,
        seconds=seconds, truncated=t.truncated, skipped_empty=t.skipped_empty, shards_done=t.shards_done,
        shards_skipped=skipped, shards_total=len(job.shards), input_wait_seconds=round(t.input_wait, 3),
        retried=t.retried, quarantined=len(t.quarantined_ids), quarantined_ids=tuple(t.quarantined_ids),
    )  # fmt: skip

