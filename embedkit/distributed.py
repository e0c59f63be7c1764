"""Shard tasks on Ray: `--gpus N` on this machine, and `--ray [ADDRESS]` on a cluster.

One scheduler for every multi-worker run. The driver validates the input, writes the manifest
and cleans the store under the output lock (so a second driver on the same OUT is refused),
then submits one task per pending shard, the most tokens first: `num_gpus=1` when encoding on
CUDA, `num_gpus=0` on CPUs. A task runs the ordinary single-device pipeline on its shard and
commits it. Ray retries a task whose worker died or was preempted; a retried task first checks
whether its shard is already committed, so a shard is never written twice. Near the end an
idle slot runs a second copy of the oldest shard still running; a `CommitArbiter` actor gives
the shard's commit to the first copy that asks.

`--gpus N` starts a Ray of this machine for the run (N slots) and shuts it down when the run
ends, also on SIGTERM and Ctrl-C; on a SIGKILL of the driver, Ray's own processes die with it
(kernel fate-sharing), and a task still running commits nothing: the arbiter, an actor of the
driver's job, is gone, and the task checks that its driver still holds OUT's lock before it
commits. A killed driver is resumed by rerunning the same command. `embedkit generate --ray`
does the same with the generative pass, and `embedkit build-index --ray` with the index's add
phase (training and the merge stay on the driver). Ray is imported only here
(`pip install 'embedkit[ray]'`): single-worker runs never import it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import EncodeConfig
from .errors import EmbedkitError
from .status import straggler_tail

TASK_RETRIES = 3
STALL_ENV = "EMBEDKIT_TEST_STALL_SHARD"
_JOB_CACHE: dict = {}  # per Ray worker process: the loaded model, reused by its later tasks


def check_local_workers(workers: int, device_type: str) -> None:
    """Refuse `--gpus N` (N > 1) before anything is written: it needs Ray, and on CUDA N visible GPUs."""
    _import_ray(f"--gpus {workers}")
    if device_type == "cuda":
        import torch

        visible = torch.cuda.device_count()
        if workers > visible:
            raise EmbedkitError(f"--gpus {workers} asked for more GPUs than the {visible} visible")


def run_tasks(input: str | Path, out: Path, cfg: EncodeConfig, job: Any, pending: list, skipped: int) -> Any:
    """Encode `pending` shards (in the given order: the most tokens first) as Ray tasks, on a Ray
    of this machine (`cfg.workers`, --gpus N) or on the cluster at `cfg.ray`; returns the merged
    EncodeSummary. Its device is "N x cuda" / "N x cpu" for --gpus N, "ray (GPU tasks)" for --ray."""
    from .pipeline import EncodeSummary
    from .shards import lock_record

    gpu = job.choice.type == "cuda"
    task_cfg = _task_config(cfg, gpu)
    with _cluster(cfg, gpu) as (ray, ours):
        task = ray.remote(**_task_options(gpu))(encode_shard)
        arbiter = ray.remote(num_cpus=0)(CommitArbiter).remote()
        slots = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 1))
        # this process holds OUT's lock: on this machine, tasks commit only while it does. A
        # cluster's nodes may not share OUT's filesystem (or its locks): there the arbiter, an
        # actor of this driver's job that dies with it, is what stops an orphaned task
        driver = lock_record() if cfg.ray is None else None
        start = time.perf_counter()
        submit = lambda i, copy: task.remote(str(input), str(out), task_cfg, i, copy, arbiter, driver)  # noqa: E731
        run = _follow_tasks(ray, submit, [s.index for s in pending], slots, reissue=cfg.reissue, cancel_at_exit=not ours)
        seconds = time.perf_counter() - start
    device = f"ray ({'GPU' if gpu else 'CPU'} tasks)" if cfg.ray is not None else f"{cfg.workers} x {job.choice.type}"
    summary = EncodeSummary.merged(run.parts, out=str(out), device=device, seconds=seconds, skipped=skipped, total=len(job.shards))
    return replace(summary, reissued=len(run.reissued), tail_seconds=run.tail_seconds)


def _task_options(gpu: bool) -> dict:
    options: dict = {"num_gpus": 1 if gpu else 0, "num_cpus": 1, "max_retries": TASK_RETRIES}
    stall = os.environ.get(STALL_ENV)
    if stall:  # fault injection (tests): the tasks' processes must see it too
        options["runtime_env"] = {"env_vars": {STALL_ENV: stall}}
    return options


def _task_config(cfg: EncodeConfig, gpu: bool) -> EncodeConfig:
    """The single-device config a task runs. Tokenizer processes: none on CPUs (the model needs
    the cores); on GPUs, this machine's cores shared among its N workers, or a cluster node's
    default."""
    workers = cfg.tokenize_workers
    if workers is None and not gpu:
        workers = 0
    elif workers is None and cfg.ray is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = max(1, (cores - 1) // cfg.workers)
    return replace(cfg, workers=1, progress=False, overwrite=False, ray=None, device="cuda" if gpu else "cpu", tokenize_workers=workers)


@contextlib.contextmanager
def _cluster(cfg: EncodeConfig, gpu: bool) -> Iterator[tuple[Any, bool]]:
    """(ray, ours): the Ray that runs the tasks, and whether it was started for this run. The
    cluster at `cfg.ray`; for --gpus N, the Ray this program is already connected to if any
    (left as it is), else one started here and shut down when the run ends."""
    if cfg.ray is not None:
        yield _ray(cfg.ray), False
        return
    ray = _import_ray(f"--gpus {cfg.workers}")
    if ray.is_initialized():
        yield ray, False
        return
    with _local_ray(ray, cfg.workers, gpu):
        yield ray, True


@contextlib.contextmanager
def _local_ray(ray: Any, workers: int, gpu: bool) -> Iterator[None]:
    """A Ray of this machine with `workers` slots, shut down when the run ends.

    SIGTERM becomes an interruption while it runs, so the shutdown happens on `kill` too (Ray's
    own handler would exit at once). On SIGKILL no code runs here: Ray starts its processes
    with a parent-death signal (kernel fate-sharing), so they die with this one.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(address="local", num_cpus=workers, num_gpus=workers if gpu else 0, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.ERROR)  # fmt: skip
        if main:
            signal.signal(signal.SIGTERM, _interrupt)
        yield
    finally:
        ray.shutdown()
        if main:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class CommitArbiter:
    """A Ray actor that gives each shard's commit to one copy of its task: the first to ask.
    A retry of that copy (same shard, same copy number) keeps the right; a re-issued copy that
    asks second is told to drop its fragments. It belongs to the driver's job, so it dies with
    the driver, and a task that asks it afterwards fails instead of committing."""

    def __init__(self) -> None:
        self.holders: dict[int, int] = {}

    def take(self, shard: int, copy: int) -> bool:
        return self.holders.setdefault(shard, copy) == copy


@dataclass
class _TaskRun:
    parts: list = field(default_factory=list)
    reissued: set = field(default_factory=set)
    tail_seconds: float = 0.0  # from 95% of shards committed to 100%


def _follow_tasks(ray: Any, submit: Callable[[int, int], Any], order: list[int], slots: int, *, reissue: bool,
                  cancel_at_exit: bool) -> _TaskRun:  # fmt: skip
    """Submit one task per shard and wait for every shard to be committed.

    Once no task waits for a slot and a slot is idle, the oldest shard still running gets a
    second copy (once per shard): the copy that commits first wins, and the other is cancelled.
    A task that fails after Ray's retries fails the run (committed shards are kept).
    `cancel_at_exit`: cancel the tasks still running when this returns or fails (a Ray that is
    not shut down with the run would keep them running).
    """
    run = _TaskRun()
    refs = {submit(i, 0): (i, 0) for i in order}
    try:
        _wait_for_commits(ray, submit, order, slots, reissue, refs, run)
    finally:
        if cancel_at_exit:
            for ref in refs:  # re-issued copies that lost, or every task after a failure
                ray.cancel(ref)
    return run


def _wait_for_commits(ray: Any, submit: Callable[[int, int], Any], order: list[int], slots: int, reissue: bool, refs: dict, run: _TaskRun) -> None:
    outstanding = set(order)
    commit_times: list[float] = []
    # A copy that found its shard already committed (a Ray retry after its worker died, or a
    # re-issued copy that started after the other copy committed) knows the shard's rows but
    # not its tokens: it counts only when no other copy is left to report the real counts.
    found_done: dict[int, dict] = {}
    while outstanding:
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
        for ref in ready:
            shard, _copy = refs.pop(ref)
            part = _get(ray, ref)
            if shard not in outstanding:
                continue
            if part.get("shards_done"):
                found_done[shard] = part
            others = [r for r, (s, _) in refs.items() if s == shard]
            if shard in found_done and (not found_done[shard].get("committed_before") or not others):
                outstanding.discard(shard)
                run.parts.append(found_done.pop(shard))
                commit_times.append(time.monotonic())
                for other in others:
                    # the loser of a re-issued shard: its work is moot. Not force=True: a forced
                    # cancel racing the task's own end has crashed Ray's driver (2.60), and
                    # the loser cannot commit anyway (the arbiter says no)
                    ray.cancel(other)
                    refs.pop(other)
        if reissue and commit_times and outstanding and len(refs) < slots:  # near the end: a slot is idle
            oldest = next((i for i in order if i in outstanding and i not in run.reissued), None)
            if oldest is not None:
                run.reissued.add(oldest)
                refs[submit(oldest, 1)] = (oldest, 1)
        if outstanding and not refs:  # every copy of a shard ended without committing it: never wait forever
            raise EmbedkitError(f"shards {sorted(outstanding)} ended uncommitted; committed shards are kept: rerun the same command")
    run.tail_seconds = straggler_tail(commit_times)


def encode_shard(input: str, out: str, cfg: EncodeConfig, index: int, copy: int = 0, arbiter: Any = None, driver: str | None = None) -> dict:
    """One shard, in a Ray worker: skipped if a previous attempt already committed it. With an
    `arbiter` (a CommitArbiter), the shard is committed only if this copy gets the right to, and
    with `driver` (the run's lock record) only while that run still holds OUT's lock. Returns
    the shard's summary as a dict, with the `worker` (host:pid) that ran it."""
    from .encoder import choose_device
    from .pipeline import SUMMED_FIELDS, _run_shards, attach_job, open_input
    from .runtime import inherited_settings
    from .store import VectorStore

    inherited_settings()
    rows = VectorStore(Path(out)).committed_shards().get(index)
    if rows is not None:
        # a retry of a task whose commit landed before its worker died, or a re-issued copy
        # that started after the other copy committed: its rows come from the ledger, its
        # tokens are not known (0)
        return {**dict.fromkeys(SUMMED_FIELDS, 0), "docs": rows, "shards_done": 1, "seconds": 0.0, "committed_before": True,
                "worker": f"{socket.gethostname()}:{os.getpid()}"}  # fmt: skip
    # the stored columns are in the key: a cached corpus reads only the columns its run stored
    key = (input, out, cfg.model, cfg.device, cfg.precision, cfg.max_seq_length, cfg.store_text, cfg.keep_columns)
    if key not in _JOB_CACHE:
        corpus = open_input(input, cfg)
        _JOB_CACHE[key] = (corpus, attach_job(corpus, Path(out), cfg, choose_device(cfg.device, cfg.precision)))
    corpus, job = _JOB_CACHE[key]
    shard = next(s for s in job.shards if s.index == index)
    if copy == 0:
        _injected_stall(index)
    may_commit = None if arbiter is None else (lambda i: _may_commit(arbiter, i, copy, Path(out), driver))
    summary = _run_shards(corpus, job, [shard], cfg, skipped=0, may_commit=may_commit)
    return {**summary.to_dict(), "worker": f"{socket.gethostname()}:{os.getpid()}"}


def _may_commit(arbiter: Any, shard: int, copy: int, out: Path, driver: str | None) -> bool:
    """Whether this copy commits its shard: false when the arbiter gave the commit to the other
    copy. A task that has outlived its run raises instead, and so writes nothing: the arbiter
    is gone with the driver's job (Ray raises), or OUT's lock is no longer the driver's."""
    import ray

    from .shards import held_by

    if not ray.get(arbiter.take.remote(shard, copy)):
        return False
    if driver is not None and not held_by(out, driver):
        raise EmbedkitError(f"{out} is no longer held by the run that started this task ({driver}); shard {shard} is left to a rerun")
    return True


def _injected_stall(shard: int) -> None:
    """EMBEDKIT_TEST_STALL_SHARD="N:SECONDS": the first copy of shard N sleeps SECONDS before it
    starts. A fault-injection hook for the straggler tests; unset in normal runs."""
    spec = os.environ.get(STALL_ENV, "")
    n, _, seconds = spec.partition(":")
    if spec and n.strip() == str(shard):
        time.sleep(float(seconds))


def run_generate_ray(input: str | Path, out: Path, cfg: Any, template: str, choice: Any, pending: list, skipped: int, total: int) -> Any:
    """`embedkit generate --ray`: one Ray task per pending shard; the merged GenerateSummary."""
    from .generation import summarize_parts

    ray = _ray(cfg.ray)
    gpu = choice.type == "cuda"
    task = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1, max_retries=TASK_RETRIES)(generate_shard_task)
    task_cfg = replace(cfg, ray=None, progress=False, overwrite=False, device="cuda" if gpu else "cpu")
    start = time.perf_counter()
    refs = [task.remote(str(input), str(out), task_cfg, template, choice.precision, s.index) for s in pending]
    parts = _get(ray, refs)
    return summarize_parts(out, cfg, f"ray ({'GPU' if gpu else 'CPU'} tasks)", parts, time.perf_counter() - start, skipped, total)


def generate_shard_task(input: str, out: str, cfg: Any, template: str, precision: str, index: int) -> dict:
    """One generate shard, in a Ray worker; skipped if a previous attempt committed it."""
    from .corpus import Columns, open_corpus
    from .encoder import DeviceChoice, choose_device
    from .generation import GENERATIONS_DIR, _schema, generate_shard, load_generator
    from .shards import plan_shards, read_manifest
    from .store import VectorStore

    store = VectorStore(Path(out), GENERATIONS_DIR)
    if index in store.committed_shards():
        return {"docs": 0, "prompt": 0, "new": 0, "truncated": 0, "empty": 0, "shards": 0}
    choice = DeviceChoice(choose_device(cfg.device, "fp32").device, precision)
    key = ("generate", input, cfg.model, choice.device, precision)
    if key not in _JOB_CACHE:
        lm, tok, _ = load_generator(cfg.model, choice)
        _JOB_CACHE[key] = (open_corpus(input, Columns(cfg.text_column, cfg.id_column)), lm, tok)
    corpus, lm, tok = _JOB_CACHE[key]
    plan = read_manifest(Path(out))["plan"]
    shard = plan_shards(plan["rows"], plan["shard_rows"])[index]
    return generate_shard(corpus, cfg, template, lm, tok, choice, store, _schema(cfg.task, corpus.id_type), shard)


def add_index_shards_ray(out: str, version: int, todo: list, spec: Any, queries: Any, qvec: Any, address: str, on_done: Any = None) -> None:
    """`embedkit build-index --ray`: the add phase's shards as Ray tasks (`num_gpus=1` when the
    build runs on CUDA). Each task reads its Lance fragments at the pinned version, encodes them
    with the trained quantizer that the driver wrote, and writes its shard file; a retried task
    whose file already landed does nothing. The driver merges afterwards, as without Ray."""
    from dataclasses import replace as dc_replace

    ray = _ray(address)
    gpu = spec.device.startswith("cuda")
    task = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1, max_retries=TASK_RETRIES)(index_shard_task)
    task_spec = dc_replace(spec, device="cuda:0" if gpu else "cpu")  # a GPU task sees its one GPU as cuda:0
    q_ref, v_ref = ray.put(queries), ray.put(qvec)
    refs = [task.remote(out, version, [f.fragment_id for f in frags], i, start, task_spec, q_ref, v_ref) for i, start, frags in todo]
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
            if on_done is not None:
                on_done()
    except Exception as e:  # a task that failed after its retries
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise EmbedkitError(f"a Ray task failed ({first}); finished shards are kept: rerun the same command to resume") from None


def index_shard_task(out: str, version: int, fragment_ids: list[int], i: int, start: int, spec: Any, queries: Any, qvec: Any) -> int:
    """One add shard, in a Ray worker; returns its rows (0 when a previous attempt wrote it)."""
    import faiss
    import lance

    from .index.build import TRAINED, _read_shard, device_codec, write_shard
    from .store import VECTORS_DIR

    if spec.done(i):
        return 0
    key = ("index", spec.folder, version)
    if key not in _JOB_CACHE:  # the trained quantizer and its device codec, once per worker
        trained = faiss.read_index(str(Path(spec.folder).parent / TRAINED))
        _JOB_CACHE[key] = (trained, device_codec(trained, spec, qvec, lambda msg: None))
    trained, codec = _JOB_CACHE[key]
    ds = lance.dataset(str(Path(out) / VECTORS_DIR), version=version)
    x = _read_shard([ds.get_fragment(f) for f in fragment_ids])
    write_shard(spec, trained, codec, i, start, x, queries, qvec)
    return len(x)


def _import_ray(option: str) -> Any:
    try:
        import ray
    except ImportError:
        raise EmbedkitError(f"{option} needs Ray: pip install 'embedkit[ray]'") from None
    return ray


def _ray(address: str | None) -> Any:
    """Ray, connected to the cluster at `address` ("" or None: $RAY_ADDRESS, else a local Ray)
    for the rest of this process, unless the program is connected already."""
    ray = _import_ray("--ray")
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
    return ray


def _get(ray: Any, refs: list) -> list:
    try:
        return ray.get(refs)
    except Exception as e:  # a task that failed after its retries
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise EmbedkitError(f"a Ray task failed ({first}); committed shards are kept: rerun the same command to resume") from None
