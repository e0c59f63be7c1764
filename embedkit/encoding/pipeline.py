"""encode(): the encode stage's public API and its shard function.

`run_encode` checks everything that can refuse a run before OUT is touched, prepares the job
(`job.py`), and runs the pending shards here (`runtime.py`) or as shard tasks on the executors
(`run/distributed.py`), which call `encode_shard`.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from ..config import DEFAULT_MODEL, EncodeConfig, RunOptions
from ..digest import INPUT_CACHE
from ..engine.encoder import DeviceChoice, choose_device
from ..engine.models import ModelSource, resolve_model
from ..errors import EmbedkitError
from ..io.corpus import Corpus
from ..io.objstore import out_path
from ..io.shards import MANIFEST, OutputLock, Shard, input_segments, read_manifest, shards_from_manifest, write_manifest
from ..io.store import INDEX_DIR, VECTORS_DIR, VectorStore, ledger_name
from ..plan.planning import default_shard_rows, longest_first
from ..run.outdir import check_out, clear_output, make_out, undo_if_unstarted
from ..run.progress import Progress
from ..run.record import mark, record_run, run_record, start_run
from .job import (
    Job,
    attach_job,
    build_manifest,
    check_ids_against_stored,
    nothing_to_do,
    open_input,
    plan_append,
    prepare_job,
    refuse_differences,
    with_row_offset,
)
from .runtime import Totals, make_summary, run_shards
from .summary import SUMMED_FIELDS, EncodeSummary


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
    window_docs: int = 65_536,
    keep_empty: bool = False,
    allow_duplicate_ids: bool = False,
    max_seq_length: int | None = None,
    overwrite: bool = False,
    append: bool = False,
    progress: bool = True,
    gpus: int | str = 1,
    ray: str | None = None,
    reissue: bool = True,
    store_text: bool = False,
    keep_columns: Sequence[str] = (),
    follow_symlinks: bool = False,
    chunk_tokens: int | None = None,
    chunk_overlap: int = 0,
    dim: int | None = None,
    prompt_name: str | None = None,
    prompt: str | None = None,
    query_prompt_name: str | None = None,
    query_prompt: str | None = None,
) -> EncodeSummary:
    """Embed every row of INPUT into OUT/vectors.lance; resumable, one commit per shard.

    `store_text`: each document's text in a `text` column beside its vector (search shows it,
    LanceDB sees it). `keep_columns`: input columns stored beside the vectors too, with their
    input types. Both are pinned in the manifest: a resume must give the same.
    `follow_symlinks`: a folder of .txt files may hold links to files outside it (refused otherwise).
    `chunk_tokens`: a document longer than this many tokens is split, not cut: into chunks of at
    most that many tokens (special tokens included), each repeating `chunk_overlap` tokens of
    the one before, cut at a sentence end where one is near. Each chunk is a row with the
    document's `id`, its number `chunk` (0, 1, ...) and its character span `start`, `end`.
    `dim`: keep the first `dim` dimensions of each vector, renormalized (Matryoshka models are
    trained for it); search cuts queries the same way.
    `prompt_name` / `prompt`: the model's configured prompt, or a literal prefix, put before
    each document (default: the model's default prompt, as `SentenceTransformer.encode`; a
    model with prompts and no choice gets an `EmbedkitNotice`). `query_prompt_name` /
    `query_prompt`: what `Retriever.search` puts before queries (default: the model's `query`
    prompt when it has one). All are recorded in the manifest.

    `append`: add INPUT to an existing OUT made with the same settings, after the inputs it
    holds (ids unique across inputs; see docs/encode.md, "Growing an output").
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
        tokenize_workers=tokenize_workers, window_docs=window_docs, keep_empty=keep_empty, allow_duplicate_ids=allow_duplicate_ids,
        max_seq_length=max_seq_length, store_text=store_text,
        keep_columns=keep_columns if isinstance(keep_columns, str) else tuple(keep_columns),  # a str is refused by name
        follow_symlinks=follow_symlinks, chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap, dim=dim, prompt_name=prompt_name,
        prompt=prompt, query_prompt_name=query_prompt_name, query_prompt=query_prompt,
        append=append, run=RunOptions(overwrite=overwrite, progress=progress, workers=_worker_count(gpus, device), ray=ray, reissue=reissue),
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
    start_run()
    out = out_path(out)
    # Everything that can refuse the run is checked before OUT is touched or a model loads: a
    # typo must not leave an empty OUT, and a refusal must not wait for a model.
    corpus = open_input(input, cfg)
    if corpus.num_rows == 0:
        raise EmbedkitError("the input has no rows")
    choice = choose_device(cfg.device, cfg.precision)
    if cfg.run.workers > 1 and cfg.run.ray is None:
        from ..run.distributed import check_local_workers

        check_local_workers(cfg.run.workers, choice.type)
    source = resolve_model(cfg.model)  # a hub id resolves to its local copy, or fails in one line
    mark("opened")
    check_out(out)
    created = make_out(out)
    with undo_if_unstarted(out, created), OutputLock(out):
        if cfg.run.overwrite:
            clear_output(out, (VECTORS_DIR, ledger_name(VECTORS_DIR), INDEX_DIR))
        old, store = read_manifest(out), VectorStore(out)
        if old is None and store.exists():
            raise EmbedkitError(f"{out} holds {VECTORS_DIR} but no {MANIFEST}; start fresh with --overwrite")
        shard_rows = cfg.shard_rows or (old["plan"]["shard_rows"] if old else default_shard_rows(corpus.num_rows, choice.type, cfg.run.workers))
        manifest = build_manifest(corpus, cfg, source, shard_rows, choice.precision, cache=out / INPUT_CACHE)
        mark("manifest")
        if cfg.append or (old is not None and len(input_segments(old)) > 1):  # an output of several inputs resumes as an append
            return _append(input, corpus, out, cfg, choice, source, manifest, old, store)
        if old is not None:
            refuse_differences(out, old, manifest)
            if store.exists():
                store.reconcile()  # an older output's ledger migrated, a killed run's last commit settled
                if len(store.committed_shards()) == old["plan"]["shards"]:
                    return nothing_to_do(out, choice, old["plan"]["shards"])
        if store.exists():
            store.remove_uncommitted()  # and drops damaged shards: what is left is done
        return _encode_prepared(input, corpus, out, cfg, choice, source, manifest, old)


def _append(input: str | Path, corpus: Corpus, out: Path, cfg: EncodeConfig, choice: DeviceChoice, source: ModelSource,
            new: dict, old: dict | None, store: VectorStore) -> EncodeSummary:  # fmt: skip
    """`encode --append`: INPUT's shards after those of the inputs OUT holds (or the rest of
    them, when INPUT is one of those). Its manifest entry is written before the first shard, so
    a killed append resumes when the same command is rerun."""
    manifest, segment = plan_append(out, old, store, new, corpus)
    if cfg.shard_rows and cfg.shard_rows != manifest["plan"]["shard_rows"]:
        raise EmbedkitError(f"{out} is cut into shards of {manifest['plan']['shard_rows']:,} rows; an appended input uses the same "
                            "(drop --shard-rows)")  # fmt: skip
    if manifest is not old and not cfg.append:
        raise EmbedkitError(f"{out} holds other inputs than this one; pass --append to add it, or --overwrite to start fresh")
    corpus = with_row_offset(corpus, segment)
    mine = shards_from_manifest(manifest, segment)
    if manifest is old:  # an input OUT holds: resume it, or nothing to do
        store.reconcile()
        if all(s.index in store.committed_shards() for s in mine):
            return nothing_to_do(out, choice, len(mine))
    else:
        check_ids_against_stored(corpus, store, cfg.allow_duplicate_ids)
        write_manifest(out, manifest)
    store.remove_uncommitted()
    return _encode_prepared(input, corpus, out, cfg, choice, source, copy.deepcopy(manifest), manifest, segment)


def _encode_prepared(input: str | Path, corpus: Corpus, out: Path, cfg: EncodeConfig, choice: DeviceChoice, source: ModelSource,
                     manifest: dict, old: dict | None, segment: dict | None = None) -> EncodeSummary:  # fmt: skip
    """Load the model, finish the checks, and run the pending shards (here, or as Ray tasks)."""
    job = prepare_job(corpus, out, cfg, choice, source, manifest, old, segment)
    mark("prepared")  # the model loaded, the ids checked, the store ready
    done = job.store.committed_shards()
    pending = [s for s in job.shards if s.index not in done]
    skipped = len(job.shards) - len(pending)
    if not pending:
        return make_summary(job, Totals(), 0.0, skipped=skipped)
    if cfg.run.ray is not None or cfg.run.workers > 1:
        summary = _run_as_tasks(input, out, cfg, job, longest_first(corpus, job, pending), skipped=skipped)
    else:
        summary = run_shards(corpus, job, pending, cfg, skipped=skipped)
    mark("encoded")
    # what this run took, beside what a dry run predicted for it (`embedkit status`)
    entry = run_record(summary.seconds, summary.tokens, summary.docs, summary.shards_done, summary.device)
    record_run(out, "encode", (segment or manifest).get("input"), entry)
    return summary


def _run_as_tasks(input: str | Path, out: Path, cfg: EncodeConfig, job: "Job", pending: list[Shard], skipped: int) -> EncodeSummary:
    """The pending shards (in the given order: the most tokens first) as shard tasks on a Ray of
    this machine (--gpus N) or the cluster at --ray; the merged summary. Its device is
    "N x cuda" / "N x cpu" for --gpus N, "ray (GPU tasks)" for --ray."""
    from ..run.distributed import run_shard_tasks

    gpu = job.choice.type == "cuda"
    with Progress(sum(s.rows for s in pending), cfg.run.progress, shards=len(pending)) as bar:
        run = run_shard_tasks(encode_shard, (str(input), str(out), _task_config(cfg, gpu)), [s.index for s in pending], gpu=gpu,
                              workers=cfg.run.workers, address=cfg.run.ray, reissue=cfg.run.reissue, on_commit=bar.committed)  # fmt: skip
    device = f"ray ({'GPU' if gpu else 'CPU'} tasks)" if cfg.run.ray is not None else f"{cfg.run.workers} x {job.choice.type}"
    summary = EncodeSummary.merged(run.parts, out=str(out), device=device, seconds=run.seconds, skipped=skipped, total=len(job.shards))
    return replace(summary, reissued=len(run.reissued), tail_seconds=run.tail_seconds)


def _task_config(cfg: EncodeConfig, gpu: bool) -> EncodeConfig:
    """The single-device config a shard task runs. Tokenizer processes: none on CPUs (the model
    needs the cores); on GPUs, this machine's cores shared among its N workers, or a cluster
    node's default."""
    workers = cfg.tokenize_workers
    if workers is None and not gpu:
        workers = 0
    elif workers is None and cfg.run.ray is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = max(1, (cores - 1) // cfg.run.workers)
    return replace(cfg, device="cuda" if gpu else "cpu", tokenize_workers=workers, run=RunOptions(progress=False))


def encode_shard(input: str, out: str, cfg: EncodeConfig, index: int, copy: int = 0, arbiter: Any = None, driver: str | None = None) -> dict:
    """One shard, as a Ray task: skipped if a previous attempt already committed it. With an
    `arbiter` (a CommitArbiter), the shard is committed only if this copy gets the right to, and
    with `driver` (the run's lock record) only while that run still holds OUT's lock. Returns
    the shard's summary as a dict, with the `worker` (host:pid) that ran it."""
    from ..engine.runtime import inherited_settings
    from ..run.distributed import TASK_CACHE, commit_allowed, injected_stall, worker_name

    inherited_settings()
    rows = VectorStore(out_path(out)).committed_shards().get(index)
    if rows is not None:
        # a retry of a task whose commit landed before its worker died, or a re-issued copy
        # that started after the other copy committed: its rows come from the ledger, its
        # tokens are not known (0)
        # (with --chunk-tokens the ledger's rows are chunks, and the documents are not known either)
        counts = {"chunks": rows} if cfg.chunk_tokens is not None else {"docs": rows}
        return {**dict.fromkeys(SUMMED_FIELDS, 0), **counts, "shards_done": 1, "seconds": 0.0, "committed_before": True,
                "worker": worker_name()}  # fmt: skip
    # the whole config is in the key (a frozen dataclass): a worker process that served another
    # run keeps no corpus or job made with other columns, chunking, prompts, dims or dtype
    key = ("encode", input, out, cfg)
    if key not in TASK_CACHE:
        corpus = open_input(input, cfg)
        TASK_CACHE[key] = (corpus, attach_job(corpus, out_path(out), cfg, choose_device(cfg.device, cfg.precision)))
    corpus, job = TASK_CACHE[key]
    if job.segment is not None:
        corpus = with_row_offset(corpus, job.segment)
    shard = next(s for s in job.shards if s.index == index)
    if copy == 0:
        injected_stall(index)
    may_commit = None if arbiter is None else (lambda i: commit_allowed(arbiter, i, copy, out_path(out), driver))
    summary = run_shards(corpus, job, [shard], cfg, skipped=0, may_commit=may_commit)
    return {**summary.to_dict(), "worker": worker_name()}




