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
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from .config import EncodeConfig
from .errors import EmbedkitError
from .status import straggler_tail

COMMIT_TOKENS = ".embedkit-commits"  # one empty file per committed shard, during a multi-worker run
STRAGGLER_GRACE_S = 2.0  # after the last commit: how long a worker busy with a duplicate may take to report
IDLE_REPORT_S = 120.0  # after the last commit: how long a worker holding nothing (still starting, say) may take


def run_workers(input: str | Path, out: Path, cfg: EncodeConfig, job: Any, pending: list, skipped: int) -> Any:
    """Encode `pending` shards with cfg.workers processes; returns the merged EncodeSummary."""
    from .pipeline import SUMMED_FIELDS, EncodeSummary

    n = min(cfg.workers, len(pending))
    devices = _devices(job.choice.device, n)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    tok_workers = cfg.tokenize_workers if cfg.tokenize_workers is not None else (
        max(1, (cores - 1) // n) if job.choice.type == "cuda" else 0
    )  # fmt: skip
    worker_cfg = replace(cfg, workers=1, progress=False, overwrite=False, tokenize_workers=tok_workers)
    tokens = out / COMMIT_TOKENS
    shutil.rmtree(tokens, ignore_errors=True)  # under the output lock: no other run is writing
    tokens.mkdir()
    ctx = mp.get_context("spawn")  # a CUDA process cannot fork workers that use CUDA
    shards: Any = ctx.Queue()
    results: Any = ctx.Queue()
    for s in pending:  # in the caller's order: the most tokens first
        shards.put(s.index)
    start = time.perf_counter()
    # not daemons: a worker starts its own tokenizer processes, which daemons may not
    procs = [ctx.Process(target=_worker, args=(str(input), str(out), worker_cfg, d, w, shards, results)) for w, d in enumerate(devices)]
    try:
        with _main_not_reimported():
            for p in procs:
                p.start()
        run = _coordinate(procs, shards, results, {s.index for s in pending}, reissue=cfg.reissue)
    finally:
        _stop(procs)
        shutil.rmtree(tokens, ignore_errors=True)
    errors = [r for r in run.reports if r[0] == "error"]
    if errors or run.outstanding:
        dead = [f"worker {i} exited with {p.exitcode}" for i, p in enumerate(procs) if p.exitcode not in (0, None)]
        why = errors[0][1] if errors else "; ".join(dead) or "a worker stopped without reporting"
        raise EmbedkitError(f"{why}; committed shards are kept: rerun the same command to resume")
    totals = {f: sum(c.get(f, 0) for c in run.counts) for f in SUMMED_FIELDS}
    totals["input_wait_seconds"] = sum(r[1]["input_wait_seconds"] for r in run.reports if r[0] == "ok")
    each = tuple(run.parts())
    return EncodeSummary(
        out=str(out), device=f"{n} x {devices[0].split(':')[0]}", seconds=time.perf_counter() - start, shards_skipped=skipped,
        shards_total=len(job.shards), parts=each, reissued=len(run.reissued), tail_seconds=run.tail_seconds, **totals,
    )  # fmt: skip


@dataclass
class _Run:
    outstanding: set
    reports: list = field(default_factory=list)
    counts: list = field(default_factory=list)  # per committed shard (first commit only)
    reissued: set = field(default_factory=set)
    tail_seconds: float = 0.0  # from 95% of shards committed to 100%
    ready_at: dict = field(default_factory=dict)  # worker -> when its model was ready
    won: dict = field(default_factory=dict)  # worker -> [tokens of its winning commits, when the last landed]

    def parts(self) -> list[dict]:
        """Each worker's tokens and seconds from its model being ready to its last winning
        commit. Taken from the events, not the workers' final reports: a worker stopped while
        busy with a duplicate never sends one."""
        return [{"tokens": t, "seconds": round(last - self.ready_at[w], 2)} for w, (t, last) in sorted(self.won.items()) if w in self.ready_at]


def _coordinate(procs: list, shards: Any, results: Any, pending: set, *, reissue: bool) -> _Run:
    """Follow the workers' events until every shard is committed; re-issue stragglers.

    Once every shard has been taken and a worker holds nothing, the oldest shard still running
    elsewhere is queued again (once): whichever worker commits it first wins, the other's
    fragments are dropped. When all shards are committed, workers still busy (with a duplicate)
    get STRAGGLER_GRACE_S to report and are then stopped; a worker that holds nothing (one still
    loading its model when the shards ran out) is waited for: it only has to see the end.
    """
    run = _Run(outstanding=set(pending))
    total = len(pending)
    claimed: dict[int, tuple[int, float]] = {}  # shard -> (worker, when), first claim
    held: dict[int, set] = {i: set() for i in range(len(procs))}
    commit_times: list[float] = []
    finished_at = None
    reported: set = set()
    while len(run.reports) < len(procs):
        if finished_at is not None:
            waited = time.monotonic() - finished_at
            busy = any(held[w] for w in range(len(procs)) if w not in reported)
            if waited > IDLE_REPORT_S or (busy and waited > STRAGGLER_GRACE_S):
                break
        try:
            msg = results.get(timeout=0.5)
        except queue.Empty:
            if all(not p.is_alive() for p in procs):
                break
            continue
        kind = msg[0]
        if kind in ("ok", "error"):
            run.reports.append(msg[:2])
            reported.add(msg[2])
            continue
        _, worker, shard, payload = msg
        if kind == "ready":
            run.ready_at[worker] = time.monotonic()
        elif kind == "claim":
            claimed.setdefault(shard, (worker, payload))
            held[worker].add(shard)
        elif kind in ("commit", "lost"):
            held[worker].discard(shard)
            if kind == "commit" and shard in run.outstanding:
                run.outstanding.discard(shard)
                run.counts.append(payload)
                commit_times.append(time.monotonic())
                run.won[worker] = [run.won.get(worker, [0, 0.0])[0] + payload["tokens"], commit_times[-1]]
            if not run.outstanding and finished_at is None:
                finished_at = time.monotonic()
                for _ in procs:
                    shards.put(None)
            elif reissue and not held[worker] and len(claimed) == total:
                _reissue_oldest(run, claimed, held, worker, shards)
    run.tail_seconds = straggler_tail(commit_times)
    return run


def _reissue_oldest(run: _Run, claimed: dict, held: dict, idle: int, shards: Any) -> None:
    """Queue again the oldest outstanding shard held by another worker (each shard at most once)."""
    candidates = [s for s in run.outstanding if s not in run.reissued and any(s in h for w, h in held.items() if w != idle)]
    if candidates:
        oldest = min(candidates, key=lambda s: claimed[s][1])
        run.reissued.add(oldest)
        shards.put(oldest)


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


def _stop(procs: list) -> None:
    """Terminate workers still alive (the parent failed or was interrupted): none outlives the run."""
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.terminate()
    for p in procs:
        if p.pid is not None:
            p.join(timeout=10)


def _worker(input: str, out: str, cfg: EncodeConfig, device: str, worker: int, shards: Any, results: Any) -> None:
    """One device: the single-device pipeline over shards taken from the shared queue."""
    try:
        from .encoder import choose_device
        from .pipeline import WorkerHooks, _run_shards, attach_job, open_input
        from .runtime import inherited_settings

        inherited_settings()
        corpus = open_input(input, cfg)
        job = attach_job(corpus, Path(out), cfg, choose_device(device, cfg.precision))
        by_index = {s.index: s for s in job.shards}
        tokens = Path(out) / COMMIT_TOKENS
        stall = _injected_stall(worker)

        def take():
            nonlocal stall
            while (i := shards.get()) is not None:
                if (tokens / f"shard-{i}").exists():
                    continue  # a re-issued shard that its first worker has committed meanwhile
                results.put(("claim", worker, i, time.time()))
                if stall:
                    time.sleep(stall)  # fault injection (tests): this worker stalls on its first shard
                    stall = 0.0
                yield by_index[i]

        hooks = WorkerHooks(events=lambda kind, shard, counts: results.put((kind, worker, shard, counts)), take=lambda i: take_commit_token(tokens, i))
        summary = _run_shards(corpus, job, take(), cfg, skipped=0, hooks=hooks)
        results.put(("ok", summary.to_dict(), worker))
    except EmbedkitError as e:
        results.put(("error", str(e), worker))
    except BaseException as e:  # reported to the parent as one line
        results.put(("error", f"{device} worker failed: {type(e).__name__}: {e}", worker))


def take_commit_token(tokens: Path, shard: int) -> bool:
    """Atomically claim the right to commit `shard`; False when another worker has it."""
    try:
        os.close(os.open(tokens / f"shard-{shard}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _injected_stall(worker: int) -> float:
    """EMBEDKIT_TEST_STALL="W:SECONDS": worker W sleeps SECONDS after taking its first shard.
    A fault-injection hook for the straggler tests; unset in normal runs."""
    spec = os.environ.get("EMBEDKIT_TEST_STALL", "")
    w, _, seconds = spec.partition(":")
    return float(seconds) if spec and w.strip() == str(worker) else 0.0
