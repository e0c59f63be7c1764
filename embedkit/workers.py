"""Several device workers on one machine (`--gpus all|N`): one process per GPU, one shared plan.

The parent validates the input, writes the manifest and cleans the store under the output
lock, then starts N worker processes. Each worker loads the model on its own device (or the
CPU), takes shard indices from one shared queue, runs the ordinary single-device pipeline on
them and commits each shard itself: Lance rebases concurrent appends, and `commit_fragments`
retries a commit that lost the race. A shard is still one commit, so a worker killed mid-shard
loses only that shard, and a rerun redoes it. Tokenizer processes are split among workers.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from .config import EncodeConfig
from .errors import EmbedkitError


def run_workers(input: str | Path, out: Path, cfg: EncodeConfig, job: Any, pending: list, skipped: int) -> Any:
    """Encode `pending` shards with cfg.workers processes; returns the merged EncodeSummary."""
    from .pipeline import EncodeSummary

    n = min(cfg.workers, len(pending))
    devices = _devices(job.choice.device, n)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    tok_workers = cfg.tokenize_workers if cfg.tokenize_workers is not None else (
        max(1, (cores - 1) // n) if job.choice.type == "cuda" else 0
    )  # fmt: skip
    worker_cfg = replace(cfg, workers=1, progress=False, overwrite=False, tokenize_workers=tok_workers)
    ctx = mp.get_context("spawn")  # a CUDA process cannot fork workers that use CUDA
    shards: Any = ctx.Queue()
    results: Any = ctx.Queue()
    for s in sorted(pending, key=lambda s: -s.rows):  # largest first: the last shards are short
        shards.put(s.index)
    for _ in range(n):
        shards.put(None)
    start = time.perf_counter()
    # not daemons: a worker starts its own tokenizer processes, which daemons may not
    procs = [ctx.Process(target=_worker, args=(str(input), str(out), worker_cfg, d, shards, results)) for d in devices]
    try:
        with _main_not_reimported():
            for p in procs:
                p.start()
        reports = _collect(procs, results)
    finally:
        _stop(procs)
    errors = [r for r in reports if r[0] == "error"]
    if errors or len(reports) < n:
        dead = [f"worker {i} exited with {p.exitcode}" for i, p in enumerate(procs) if p.exitcode not in (0, None)]
        why = errors[0][1] if errors else "; ".join(dead) or "a worker stopped without reporting"
        raise EmbedkitError(f"{why}; committed shards are kept: rerun the same command to resume")
    return EncodeSummary.merged(
        [r[1] for r in reports], out=str(out), device=f"{n} x {devices[0].split(':')[0]}",
        seconds=time.perf_counter() - start, skipped=skipped, total=len(job.shards),
    )  # fmt: skip


@contextlib.contextmanager
def _main_not_reimported() -> Iterator[None]:
    """Start spawned workers without re-running the caller's script in them.

    `spawn` re-imports the parent's main module in every child, so a user's script without an
    `if __name__ == "__main__":` guard would start encoding again in each worker. The workers
    need nothing from it (their entry point is in this module), so the path and spec that
    multiprocessing reads are hidden while they start.
    """
    main = sys.modules.get("__main__")
    saved = {k: getattr(main, k) for k in ("__file__", "__spec__") if main is not None and hasattr(main, k)}
    try:
        for k in saved:
            if k == "__spec__":
                main.__spec__ = None
            else:
                delattr(main, k)
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


def _devices(device: str, n: int) -> list[str]:
    if not device.startswith("cuda"):
        return ["cpu"] * n
    import torch

    visible = torch.cuda.device_count()
    if n > visible:
        raise EmbedkitError(f"--gpus {n} asked for more GPUs than the {visible} visible")
    return [f"cuda:{i}" for i in range(n)]


def _collect(procs: list, results: Any) -> list[tuple[str, Any]]:
    """Wait for every worker's report; stop waiting for one that died without reporting."""
    reports: list[tuple[str, Any]] = []
    while len(reports) < len(procs):
        try:
            reports.append(results.get(timeout=1.0))
        except queue.Empty:
            if all(not p.is_alive() for p in procs):
                try:  # a report may have arrived just before the last worker ended
                    while True:
                        reports.append(results.get_nowait())
                except queue.Empty:
                    break
    for p in procs:
        p.join(timeout=30)
    return reports


def _stop(procs: list) -> None:
    """Terminate workers still alive (the parent failed or was interrupted): none outlives the run."""
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.terminate()
    for p in procs:
        if p.pid is not None:
            p.join(timeout=10)


def _worker(input: str, out: str, cfg: EncodeConfig, device: str, shards: Any, results: Any) -> None:
    """One device: the single-device pipeline over shards taken from the shared queue."""
    try:
        from .corpus import Columns, open_corpus
        from .encoder import choose_device
        from .pipeline import _run_shards, attach_job
        from .runtime import retain_freed_memory

        retain_freed_memory()
        corpus = open_corpus(input, Columns(cfg.text_column, cfg.id_column))
        job = attach_job(corpus, Path(out), cfg, choose_device(device, cfg.precision))
        by_index = {s.index: s for s in job.shards}

        def take():
            while (i := shards.get()) is not None:
                yield by_index[i]

        summary = _run_shards(corpus, job, take(), cfg, skipped=0)
        results.put(("ok", summary.to_dict()))
    except EmbedkitError as e:
        results.put(("error", str(e)))
    except BaseException as e:  # reported to the parent as one line
        results.put(("error", f"{device} worker failed: {type(e).__name__}: {e}"))
