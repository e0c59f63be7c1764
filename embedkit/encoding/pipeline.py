"""encode(): corpus -> tokenize (workers) -> pack -> forward -> one Lance commit per shard.

Three threads of work overlap: a producer thread reads shards, hands windows of texts to the
tokenizer workers and packs what comes back into padded batches; the main thread feeds batches
to the model without waiting on the device; a writer thread fetches each window's vectors and
writes them as Lance fragments while later windows compute, and commits each finished shard.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from ..config import DEFAULT_MODEL, EncodeConfig
from ..digest import INPUT_CACHE
from ..engine.batching import pack_batches, pad_rows
from ..engine.encoder import DeviceChoice, Encoder, choose_device, default_batch_tokens, model_config
from ..engine.models import (
    ModelSource,
    declared_max_length,
    embedding_dim,
    fast_tokenizer_json,
    load_sentence_transformer,
    model_max_length,
    pooling_mode,
    resolve_model,
    truncation_side,
    weights_hash,
)
from ..engine.tokenize import Tokenized, TokenizerPool, default_workers
from ..errors import EmbedkitError
from ..io.corpus import Columns, Corpus, drop_empty, find_first_duplicate, open_corpus
from ..io.shards import (
    MANIFEST,
    OutputLock,
    RunSummary,
    Shard,
    manifest_differences,
    read_manifest,
    shards_from_manifest,
    write_manifest,
)
from ..io.store import INDEX_DIR, VECTORS_DIR, VectorStore, ledger_name, vectors_schema, vectors_table
from ..plan.planning import default_shard_rows, longest_first
from ..run.outdir import check_out, clear_output, make_out, undo_if_unstarted
from ..version import __version__

PREFETCH_WINDOWS = 2  # tokenized windows kept ready ahead of the model
FIRST_WINDOW = 4096  # documents in the run's first window (later windows double up to window_docs)


SUMMED_FIELDS = ("docs", "tokens", "padded_tokens", "truncated", "skipped_empty", "shards_done", "input_wait_seconds", "retried", "quarantined")


@dataclass(frozen=True)
class EncodeSummary(RunSummary):
    """What a run did. `tokens` counts what the model read (after truncation)."""

    out: str
    device: str
    docs: int
    tokens: int
    padded_tokens: int
    seconds: float
    truncated: int
    skipped_empty: int
    shards_done: int
    shards_skipped: int
    shards_total: int
    input_wait_seconds: float = 0.0  # time the model sat waiting for tokenized input
    # --gpus N or --ray: one part per worker process, its committed tokens and the seconds its
    # shard tasks spent encoding them once the model was loaded (sum over parts of tokens /
    # seconds: the steady rate); `seconds` above is the whole run's wall time, start-up included
    parts: tuple = ()
    reissued: int = 0  # --gpus N or --ray: shards run a second time on an idle worker (first commit wins)
    tail_seconds: float = 0.0  # --gpus N or --ray: time from 95% of shards committed to 100%
    retried: int = 0  # rows whose vectors were not finite, run again alone in fp32
    quarantined: int = 0  # rows still not finite: left out, their ids recorded in their shard's commit
    quarantined_ids: tuple = ()  # this process's quarantined ids (all of them: `embedkit status OUT --json`)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def padding_overhead(self) -> float:
        return self.padded_tokens / self.tokens - 1.0 if self.tokens else 0.0

    @classmethod
    def merged(cls, parts: list[dict], *, out: str, device: str, seconds: float, skipped: int, total: int) -> "EncodeSummary":
        """One summary from shard tasks' `to_dict()`s (their counts add up); `parts` holds one
        entry per worker process (a task's `worker`, host:pid)."""
        # a part that committed nothing (a re-issued copy that lost the race) is left out: its
        # work is counted by the winner; one that found its shard committed by an attempt that
        # died before reporting counts that shard's rows (its tokens are not known)
        parts = [p for p in parts if p.get("shards_done")]
        counts = {f: sum(p[f] for p in parts) for f in SUMMED_FIELDS}
        workers: dict = {}
        for i, p in enumerate(p for p in parts if not p.get("committed_before")):  # no encoding seconds
            tokens, secs = workers.get(p.get("worker", i), (0, 0.0))
            workers[p.get("worker", i)] = (tokens + p["tokens"], secs + p["seconds"])
        each = tuple({"tokens": t, "seconds": round(secs, 2)} for t, secs in workers.values())
        return cls(out=out, device=device, seconds=seconds, shards_skipped=skipped, shards_total=total, parts=each, **counts)

    def rates(self) -> dict:
        return {"tokens_per_second": round(self.tokens_per_second, 1), "padding_overhead": round(self.padding_overhead, 4)}

    def work_line(self, shards: str) -> str:
        return (
            f"{self.docs} docs, {self.tokens} tokens in {self.seconds:.1f} s "
            f"({self.tokens_per_second:,.0f} tokens/s) on {self.device}; "
            f"{self.truncated} truncated, {self.skipped_empty} empty skipped, "
            f"padding {100 * self.padding_overhead:.1f}%, {shards}"
            + (f"; tail {self.tail_seconds:.1f} s, {self.reissued} shards re-issued" if self.parts else "")
            + (f"; non-finite vectors: {self.retried} rows retried in fp32, {self.quarantined} quarantined{_ids(self.quarantined_ids)}"
               if self.retried else "")
        )


def _ids(ids: tuple, shown: int = 10) -> str:
    if not ids:
        return ""
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return f" (ids {', '.join(map(repr, ids[:shown]))}{more})"


def encode(
    input: str | Path,
    out: str | Path,
    *,
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "float16",
    precision: str = "auto",
    normalize: bool = True,
    batch_tokens: int | None = None,
    shard_rows: int | None = None,
    text_column: str = "text",
    id_column: str | None = None,
    tokenize_workers: int | None = None,
    keep_empty: bool = False,
    allow_duplicate_ids: bool = False,
    max_seq_length: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    gpus: int | str = 1,
    ray: str | None = None,
    reissue: bool = True,
    store_text: bool = False,
    keep_columns: Sequence[str] = (),
    follow_symlinks: bool = False,
) -> EncodeSummary:
    """Embed every row of INPUT into OUT/vectors.lance; resumable, one commit per shard.

    `store_text`: each document's text in a `text` column beside its vector (search shows it,
    LanceDB sees it). `keep_columns`: input columns stored beside the vectors too, with their
    input types. Both are pinned in the manifest: a resume must give the same.
    `follow_symlinks`: a folder of .txt files may hold links to files outside it (refused otherwise).

    `gpus`: workers, one per GPU ("all": every visible GPU); on a CPU, that many at once. More
    than one runs the shards as tasks on a Ray of this machine, started for the run and shut
    down with it (`pip install 'embedkit[ray]'`; a program already connected to Ray runs them
    there). `ray`: run the shards as Ray tasks on a cluster ("" for a local Ray or
    $RAY_ADDRESS, else a cluster address). Each task commits its shard itself. `reissue`:
    near the end, a shard still running on one worker also runs on an idle one; the first
    commit wins.

    >>> s = embedkit.encode("docs.parquet", "out/")          # doctest: +SKIP
    >>> s.docs, s.tokens_per_second                           # doctest: +SKIP
    >>> embedkit.encode("docs.parquet", "out/", store_text=True, keep_columns=("url",))  # doctest: +SKIP
    """
    cfg = EncodeConfig(
        model=model, device=device, dtype=dtype, precision=precision, normalize=normalize,
        batch_tokens=batch_tokens, shard_rows=shard_rows, text_column=text_column, id_column=id_column,
        tokenize_workers=tokenize_workers, keep_empty=keep_empty, allow_duplicate_ids=allow_duplicate_ids,
        max_seq_length=max_seq_length, overwrite=overwrite, progress=progress, workers=_worker_count(gpus, device), ray=ray,
        reissue=reissue, store_text=store_text,
        keep_columns=keep_columns if isinstance(keep_columns, str) else tuple(keep_columns),  # a str is refused by name
        follow_symlinks=follow_symlinks,
    )  # fmt: skip
    return run_encode(input, out, cfg)


def _worker_count(gpus: int | str, device: str) -> int:
    """--gpus all|N as a number of worker processes."""
    if isinstance(gpus, str) and gpus.strip().lower() == "all":
        import torch

        if device == "cpu" or not torch.cuda.is_available():
            raise EmbedkitError("--gpus all needs CUDA GPUs; on a CPU give a number of worker processes")
        return torch.cuda.device_count()
    try:
        n = int(gpus)
    except (TypeError, ValueError):
        raise EmbedkitError(f"--gpus must be all or a positive number, not {gpus!r}") from None
    if n < 1:
        raise EmbedkitError(f"--gpus must be all or a positive number, not {gpus!r}")
    return n


def run_encode(input: str | Path, out: str | Path, cfg: EncodeConfig) -> EncodeSummary:
    """encode() with a ready EncodeConfig."""
    out = Path(out)
    # Everything that can refuse the run is checked before OUT is touched or a model loads: a
    # typo must not leave an empty OUT, and a refusal must not wait for a model.
    corpus = open_input(input, cfg)
    if corpus.num_rows == 0:
        raise EmbedkitError("the input has no rows")
    choice = choose_device(cfg.device, cfg.precision)
    if cfg.workers > 1 and cfg.ray is None:
        from ..run.distributed import check_local_workers

        check_local_workers(cfg.workers, choice.type)
    source = resolve_model(cfg.model)  # a hub id resolves to its local copy, or fails in one line
    check_out(out)
    created = make_out(out)
    with undo_if_unstarted(out, created), OutputLock(out):
        if cfg.overwrite:
            clear_output(out, (VECTORS_DIR, ledger_name(VECTORS_DIR), INDEX_DIR))
        old, store = read_manifest(out), VectorStore(out)
        if old is None and store.exists():
            raise EmbedkitError(f"{out} holds {VECTORS_DIR} but no {MANIFEST}; start fresh with --overwrite")
        shard_rows = cfg.shard_rows or (old["plan"]["shard_rows"] if old else default_shard_rows(corpus.num_rows, choice.type, cfg.workers))
        manifest = _manifest(corpus, cfg, source, shard_rows, cache=out / INPUT_CACHE)
        if old is not None:
            _refuse_differences(out, old, manifest)
            if store.exists():
                store.reconcile()  # an older output's ledger migrated, a killed run's last commit settled
                if len(store.committed_shards()) == old["plan"]["shards"]:
                    return _nothing_to_do(out, choice, old["plan"]["shards"])
        if store.exists():
            store.remove_uncommitted()  # and drops damaged shards: what is left is done
        return _encode_prepared(input, corpus, out, cfg, choice, source, manifest, old)


def _encode_prepared(input: str | Path, corpus: Corpus, out: Path, cfg: EncodeConfig, choice: DeviceChoice, source: ModelSource,
                     manifest: dict, old: dict | None) -> EncodeSummary:  # fmt: skip
    """Load the model, finish the checks, and run the pending shards (here, or as Ray tasks)."""
    job = _prepare(corpus, out, cfg, choice, source, manifest, old)
    done = job.store.committed_shards()
    pending = [s for s in job.shards if s.index not in done]
    if not pending:
        return _summary(job, _Totals(), 0.0, skipped=len(done))
    if cfg.ray is not None or cfg.workers > 1:
        return _run_as_tasks(input, out, cfg, job, longest_first(corpus, job, pending), skipped=len(done))
    return _run_shards(corpus, job, pending, cfg, skipped=len(done))


def _run_as_tasks(input: str | Path, out: Path, cfg: EncodeConfig, job: "_Job", pending: list[Shard], skipped: int) -> EncodeSummary:
    """The pending shards (in the given order: the most tokens first) as shard tasks on a Ray of
    this machine (--gpus N) or the cluster at --ray; the merged summary. Its device is
    "N x cuda" / "N x cpu" for --gpus N, "ray (GPU tasks)" for --ray."""
    from ..run.distributed import run_shard_tasks

    gpu = job.choice.type == "cuda"
    run = run_shard_tasks(encode_shard, (str(input), str(out), _task_config(cfg, gpu)), [s.index for s in pending], gpu=gpu,
                          workers=cfg.workers, address=cfg.ray, reissue=cfg.reissue)  # fmt: skip
    device = f"ray ({'GPU' if gpu else 'CPU'} tasks)" if cfg.ray is not None else f"{cfg.workers} x {job.choice.type}"
    summary = EncodeSummary.merged(run.parts, out=str(out), device=device, seconds=run.seconds, skipped=skipped, total=len(job.shards))
    return replace(summary, reissued=len(run.reissued), tail_seconds=run.tail_seconds)


def _task_config(cfg: EncodeConfig, gpu: bool) -> EncodeConfig:
    """The single-device config a shard task runs. Tokenizer processes: none on CPUs (the model
    needs the cores); on GPUs, this machine's cores shared among its N workers, or a cluster
    node's default."""
    workers = cfg.tokenize_workers
    if workers is None and not gpu:
        workers = 0
    elif workers is None and cfg.ray is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = max(1, (cores - 1) // cfg.workers)
    return replace(cfg, workers=1, progress=False, overwrite=False, ray=None, device="cuda" if gpu else "cpu", tokenize_workers=workers)


def encode_shard(input: str, out: str, cfg: EncodeConfig, index: int, copy: int = 0, arbiter: Any = None, driver: str | None = None) -> dict:
    """One shard, as a Ray task: skipped if a previous attempt already committed it. With an
    `arbiter` (a CommitArbiter), the shard is committed only if this copy gets the right to, and
    with `driver` (the run's lock record) only while that run still holds OUT's lock. Returns
    the shard's summary as a dict, with the `worker` (host:pid) that ran it."""
    from ..engine.runtime import inherited_settings
    from ..run.distributed import TASK_CACHE, commit_allowed, injected_stall, worker_name

    inherited_settings()
    rows = VectorStore(Path(out)).committed_shards().get(index)
    if rows is not None:
        # a retry of a task whose commit landed before its worker died, or a re-issued copy
        # that started after the other copy committed: its rows come from the ledger, its
        # tokens are not known (0)
        return {**dict.fromkeys(SUMMED_FIELDS, 0), "docs": rows, "shards_done": 1, "seconds": 0.0, "committed_before": True,
                "worker": worker_name()}  # fmt: skip
    # the stored columns are in the key: a cached corpus reads only the columns its run stored
    key = ("encode", input, out, cfg.model, cfg.device, cfg.precision, cfg.max_seq_length, cfg.store_text, cfg.keep_columns)
    if key not in TASK_CACHE:
        corpus = open_input(input, cfg)
        TASK_CACHE[key] = (corpus, attach_job(corpus, Path(out), cfg, choose_device(cfg.device, cfg.precision)))
    corpus, job = TASK_CACHE[key]
    shard = next(s for s in job.shards if s.index == index)
    if copy == 0:
        injected_stall(index)
    may_commit = None if arbiter is None else (lambda i: commit_allowed(arbiter, i, copy, Path(out), driver))
    summary = _run_shards(corpus, job, [shard], cfg, skipped=0, may_commit=may_commit)
    return {**summary.to_dict(), "worker": worker_name()}


def _nothing_to_do(out: Path, choice: DeviceChoice, shards: int) -> EncodeSummary:
    return EncodeSummary(out=str(out), device=choice.device, docs=0, tokens=0, padded_tokens=0, seconds=0.0, truncated=0,
                         skipped_empty=0, shards_done=0, shards_skipped=shards, shards_total=shards)  # fmt: skip


def _refuse_differences(out: Path, old: dict, manifest: dict) -> None:
    """Refuse a run whose settings differ from those OUT was made with (keys still unknown,
    None until the model is loaded, are left for the second call)."""
    diffs = manifest_differences(old, manifest)
    if old.get("plan") != manifest["plan"]:
        diffs.append(f"shard plan ({old.get('plan')} -> {manifest['plan']})")
    if diffs:
        raise EmbedkitError(f"{out} was written with a different {'; '.join(diffs)}; rerun with --overwrite to start fresh")


def open_input(input: str | Path, cfg: EncodeConfig) -> Corpus:
    """INPUT as the encode reads it: the text and id columns, and the kept ones (nothing else)."""
    return open_corpus(input, Columns(cfg.text_column, cfg.id_column, cfg.keep_columns), follow_symlinks=cfg.follow_symlinks)


def _schema(corpus: Corpus, cfg: EncodeConfig, dim: int) -> pa.Schema:
    return vectors_schema(corpus.id_type, dim, cfg.dtype, text=cfg.store_text, kept=corpus.kept_fields)


def _carried(cfg: EncodeConfig) -> list[str]:
    """The columns a window carries from the reader to the store: the id, and what is stored
    beside the vectors (nothing more unless --store-text or --keep-columns)."""
    return ["id", *(["text"] if cfg.store_text else []), *cfg.keep_columns]


@dataclass
class _Job:
    """Everything a run needs once the output is validated."""

    out: Path
    choice: DeviceChoice
    model: Any
    manifest: dict
    shards: list[Shard]
    store: VectorStore
    schema: pa.Schema
    max_length: int
    tokenizer_json: str
    truncation_side: str


def _prepare(corpus: Corpus, out: Path, cfg: EncodeConfig, choice: DeviceChoice, source: ModelSource, manifest: dict,
             old: dict | None) -> _Job:  # fmt: skip
    """Load the model, complete and check the manifest, create or clean the store."""
    # Load on the CPU: the tokenizer workers fork before the model moves to a GPU.
    st = load_sentence_transformer(source, "cpu")
    max_length = model_max_length(st, cfg.max_seq_length)
    dim = embedding_dim(st)
    manifest["model"].update(dim=dim, max_seq_length=max_length, pooling=pooling_mode(st))
    if manifest["model"]["weights_sha256"] is None:  # a hub model loaded from the hub: hashed from its parameters
        manifest["model"]["weights_sha256"] = weights_hash(source, st)
    if old is not None:
        _refuse_differences(out, old, manifest)
    else:
        if not _ids_are_row_numbers(corpus):
            _check_duplicates(corpus, cfg.allow_duplicate_ids)
        write_manifest(out, manifest)
    schema = _schema(corpus, cfg, dim)
    store = VectorStore(out)
    if not store.exists():  # an existing one was cleaned before the model loaded
        store.create(schema)
    return _Job(
        out=out, choice=choice, model=st, manifest=manifest, shards=shards_from_manifest(manifest), store=store,
        schema=schema, max_length=max_length, tokenizer_json=fast_tokenizer_json(st), truncation_side=truncation_side(st),
    )  # fmt: skip


def attach_job(corpus: Corpus, out: Path, cfg: EncodeConfig, choice: DeviceChoice) -> _Job:
    """A worker's view of an output that the parent has already prepared (manifest, store)."""
    manifest = read_manifest(out)
    if manifest is None:
        raise EmbedkitError(f"{out} has no {MANIFEST}")
    st = load_sentence_transformer(resolve_model(cfg.model), "cpu")
    dim = embedding_dim(st)
    return _Job(
        out=out, choice=choice, model=st, manifest=manifest, shards=shards_from_manifest(manifest), store=VectorStore(out),
        schema=_schema(corpus, cfg, dim), max_length=model_max_length(st, cfg.max_seq_length),
        tokenizer_json=fast_tokenizer_json(st), truncation_side=truncation_side(st),
    )  # fmt: skip


def _manifest(corpus: Corpus, cfg: EncodeConfig, source: ModelSource, shard_rows: int, cache: Path | None = None) -> dict:
    """The manifest as far as it is known without loading the model: `dim` and `pooling` are
    None, and `max_seq_length` too unless given or declared in the model's folder."""
    max_length = cfg.max_seq_length or declared_max_length(source)
    return {
        "embedkit_version": __version__,
        "model": {"name": source.name, "weights_sha256": weights_hash(source), "dim": None, "max_seq_length": max_length, "pooling": None},
        "output": {"dtype": cfg.dtype, "normalize": cfg.normalize, "keep_empty": cfg.keep_empty, "store_text": cfg.store_text,
                   "keep_columns": list(cfg.keep_columns)},
        "input": corpus.fingerprint(cache=cache),
        "plan": {"rows": corpus.num_rows, "shard_rows": shard_rows, "shards": -(-corpus.num_rows // shard_rows)},
    }


def _ids_are_row_numbers(corpus: Corpus) -> bool:
    """Row numbers cannot repeat: no need to read and check them."""
    return corpus.id_type == pa.int64() and getattr(corpus, "id_col", "") is None


def _check_duplicates(corpus: Corpus, allow: bool) -> None:
    dup = find_first_duplicate(corpus.read_ids())
    if dup is not None and not allow:
        value, rows = dup
        raise EmbedkitError(
            f"duplicate id {value!r} (rows {', '.join(map(str, rows))}); fix the input or pass --allow-duplicate-ids"
        )


# ---- the run -------------------------------------------------------------------------------


@dataclass
class _Window:
    """A tokenized, packed slice of a shard, rows in the order the batches take them."""

    shard: Shard
    rows: pa.Table  # id, then any columns stored beside the vectors (_carried)
    n_tokens: np.ndarray
    truncated: np.ndarray
    batches: list[tuple[np.ndarray, np.ndarray]]  # (padded ids, lengths)
    tokens: int
    padded_tokens: int
    skipped_empty: int


@dataclass
class _ShardStart:
    shard: Shard


@dataclass
class _ShardEnd:
    shard: Shard


@dataclass
class _Totals:
    docs: int = 0
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
    """What the tokenizer workers need: the model's `tokenizers` definition, the length cut and side."""

    json: str
    max_length: int
    truncation_side: str


class _Feed:
    """The tokenizer pool and the producer thread: shards read, tokenized and packed into a queue
    `prefetch` items deep. The pool forks before the model moves to the GPU: children of a CUDA
    process must not inherit its context."""

    def __init__(self, corpus: Corpus, pending: list[Shard], cfg: EncodeConfig, spec: TokenizerSpec, budget: Callable[[], int], workers: int,
                 prefetch: int):  # fmt: skip
        self.pool = TokenizerPool(spec.json, spec.max_length, workers, spec.truncation_side)
        # after the fork: sizing the budget from free device memory creates the CUDA context
        self.budget = budget()
        self.items: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=_produce, args=(corpus, pending, self.pool, cfg, self.budget, self.items, self.stop),
                                       daemon=True, name="embedkit-producer")  # fmt: skip
        self.thread.start()

    def close(self) -> None:
        """Stop the producer and the workers (idempotent)."""
        self.stop.set()
        _drain(self.items)
        self.thread.join(timeout=30)
        self.pool.close()


def _job_spec(job: "_Job") -> TokenizerSpec:
    return TokenizerSpec(job.tokenizer_json, job.max_length, job.truncation_side)


def _run_shards(corpus: Corpus, job: _Job, pending: list[Shard], cfg: EncodeConfig, skipped: int,
                may_commit: Callable[[int], bool] | None = None) -> EncodeSummary:  # fmt: skip
    """Encode the pending shards on one device; reading and tokenizing overlap moving the model there.

    `may_commit(shard)`, asked before each commit (a shard task of a multi-worker run): False
    leaves the shard's fragments uncommitted, because another copy of it has the commit.
    """
    totals = _Totals()
    workers = cfg.tokenize_workers if cfg.tokenize_workers is not None else default_workers(job.choice.type)
    budget = lambda: cfg.batch_tokens or default_batch_tokens(model_config(job.model), job.choice)  # noqa: E731
    feed = _Feed(corpus, pending, cfg, _job_spec(job), budget, workers, PREFETCH_WINDOWS + 2)
    try:
        encoder = Encoder(job.model, job.choice, normalize=cfg.normalize, out_dtype=cfg.dtype, max_batch_tokens=feed.budget)
        # the clock starts once the model and the pool are ready (one-time costs, not per token)
        start = time.perf_counter()
        with _Progress(sum(s.rows for s in pending), len(pending), cfg.progress) as bar:
            _consume(feed.items, encoder, job, totals, bar, may_commit)
    finally:
        feed.close()
    return _summary(job, totals, time.perf_counter() - start, skipped=skipped)


@dataclass
class _Written:
    """A window's rows, written as Lance fragments but not yet committed."""

    fragments: list[Any]
    docs: int
    tokens: int
    padded_tokens: int
    truncated: int
    retried: int = 0
    quarantined: tuple = ()  # ids left out: their vectors stayed NaN/Inf in fp32 too


def _consume(items: queue.Queue, encoder: Encoder, job: _Job, totals: _Totals, bar: "_Progress",
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
                bar.update(len(item.n_tokens) + item.skipped_empty, item.tokens)
            elif isinstance(item, _ShardEnd):
                if last_commit is not None:
                    last_commit.result()  # surface a failed commit before going on
                last_commit = writer.submit(_commit_shard, job, item.shard, written, totals, bar, started, may_commit)
                written = []
        if last_commit is not None:
            last_commit.result()
    finally:
        writer.shutdown(wait=True)


def _write_window(encoder: Encoder, job: _Job, window: _Window, outputs: list[Any]) -> _Written:
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
    table = vectors_table(job.schema, rows.column("id"), vectors, n_tokens, truncated, columns=rows)
    return _Written(
        fragments=job.store.write_fragments(table) if table.num_rows else [], docs=table.num_rows, tokens=window.tokens,
        padded_tokens=window.padded_tokens, truncated=int(truncated.sum()), retried=retried, quarantined=quarantined,
    )  # fmt: skip


def _commit_shard(job: _Job, shard: Shard, written: list[Future], totals: _Totals, bar: "_Progress", started: float | None = None,
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
        carried = _carried(cfg)
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
    if rows.num_rows == 0:  # every text of the window was empty
        none = np.zeros(0, np.int32)
        return _Window(shard, rows, none, none.astype(bool), [], 0, 0, skipped_empty)
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
    )


def _summary(job: _Job, t: _Totals, seconds: float, skipped: int) -> EncodeSummary:
    return EncodeSummary(
        out=str(job.out), device=job.choice.device, docs=t.docs, tokens=t.tokens, padded_tokens=t.padded_tokens,
        seconds=seconds, truncated=t.truncated, skipped_empty=t.skipped_empty, shards_done=t.shards_done,
        shards_skipped=skipped, shards_total=len(job.shards), input_wait_seconds=round(t.input_wait, 3),
        retried=t.retried, quarantined=len(t.quarantined_ids), quarantined_ids=tuple(t.quarantined_ids),
    )  # fmt: skip


class _Progress:
    """A tqdm bar on a terminal (docs/s, tokens/s, shards, ETA); silent otherwise."""

    def __init__(self, total_docs: int, total_shards: int, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.total_shards = total_shards
        self.shards = 0
        self.tokens = 0
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self.bar = None
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_docs, unit="doc", unit_scale=True, dynamic_ncols=True, file=sys.stderr)

    def update(self, docs: int, tokens: int) -> None:
        with self._lock:
            self.tokens += tokens
            if self.bar is not None:
                self.bar.update(docs)
                self._postfix()

    def shard_done(self) -> None:
        with self._lock:
            self.shards += 1
            if self.bar is not None:
                self._postfix()

    def _postfix(self) -> None:
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} tok/s, shards {self.shards}/{self.total_shards}", refresh=False)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- in-memory use --------------------------------------------------------------------------
