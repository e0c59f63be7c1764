"""`--ray [ADDRESS]`: the shards of one plan as Ray tasks, on a cluster or a local Ray.

`embedkit generate --ray` does the same with the generative pass, and `embedkit build-index --ray`
with the index's add phase (training and the merge stay on the driver). The driver validates the input, writes the manifest and cleans the store under the output
lock (so a second driver on the same OUT is refused), then submits one task per pending shard:
`num_gpus=1` when encoding on CUDA, `num_gpus=0` on CPU clusters. A task runs the ordinary
single-device pipeline on its shard and commits it. Ray retries a task whose worker died or was
preempted; a retried task first checks whether its shard is already committed, so a shard is
never written twice. A killed driver is resumed by rerunning the same command. Ray is imported
only here (`pip install embedkit[ray]`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .config import EncodeConfig
from .errors import EmbedkitError
from .status import straggler_tail

TASK_RETRIES = 3
STALL_ENV = "EMBEDKIT_TEST_STALL_SHARD"
_JOB_CACHE: dict = {}  # per Ray worker process: the loaded model, reused by its later tasks


def run_ray(input: str | Path, out: Path, cfg: EncodeConfig, job: Any, pending: list, skipped: int, address: str | None) -> Any:
    """Encode `pending` shards (in the given order: the most tokens first) as Ray tasks; returns
    the merged EncodeSummary."""
    from .pipeline import EncodeSummary

    ray = _ray(address)
    gpu = job.choice.type == "cuda"
    options: dict = {"num_gpus": 1 if gpu else 0, "num_cpus": 1, "max_retries": TASK_RETRIES}
    stall = os.environ.get(STALL_ENV)
    if stall:  # fault injection (tests): the tasks' processes must see it too
        options["runtime_env"] = {"env_vars": {STALL_ENV: stall}}
    task = ray.remote(**options)(encode_shard)
    task_cfg = replace(cfg, workers=1, progress=False, overwrite=False, ray=None, device="cuda" if gpu else "cpu",
                       tokenize_workers=cfg.tokenize_workers if cfg.tokenize_workers is not None else (None if gpu else 0))  # fmt: skip
    arbiter = ray.remote(num_cpus=0)(CommitArbiter).remote()
    slots = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 1))
    start = time.perf_counter()
    run = _follow_tasks(ray, lambda i, copy: task.remote(str(input), str(out), task_cfg, i, copy, arbiter), [s.index for s in pending],
                        slots, reissue=cfg.reissue)  # fmt: skip
    summary = EncodeSummary.merged(
        run.parts, out=str(out), device=f"ray ({'GPU' if gpu else 'CPU'} tasks)",
        seconds=time.perf_counter() - start, skipped=skipped, total=len(job.shards),
    )  # fmt: skip
    return replace(summary, reissued=len(run.reissued), tail_seconds=run.tail_seconds)


class CommitArbiter:
    """A Ray actor that gives each shard's commit to one copy of its task: the first to ask.
    A retry of that copy (same shard, same copy number) keeps the right; a re-issued copy that
    asks second is told to drop its fragments."""

    def __init__(self) -> None:
        self.holders: dict[int, int] = {}

    def take(self, shard: int, copy: int) -> bool:
        return self.holders.setdefault(shard, copy) == copy


@dataclass
class _TaskRun:
    parts: list = field(default_factory=list)
    reissued: set = field(default_factory=set)
    tail_seconds: float = 0.0  # from 95% of shards committed to 100%


def _follow_tasks(ray: Any, submit: Callable[[int, int], Any], order: list[int], slots: int, *, reissue: bool) -> _TaskRun:
    """Submit one task per shard and wait for every shard to be committed.

    Once no task waits for a slot and a slot is idle, the oldest shard still running gets a
    second copy (once per shard): the copy that commits first wins, and the other is cancelled.
    A task that fails after Ray's retries fails the run (committed shards are kept).
    """
    run = _TaskRun()
    refs = {submit(i, 0): (i, 0) for i in order}
    try:
        _wait_for_commits(ray, submit, order, slots, reissue, refs, run)
    finally:
        for ref in refs:  # copies still running once every shard is in, or after a failure:
            ray.cancel(ref, force=True)  # none may commit after the driver let go of OUT
    return run


def _wait_for_commits(ray: Any, submit: Callable[[int, int], Any], order: list[int], slots: int, reissue: bool, refs: dict, run: _TaskRun) -> None:
    outstanding = set(order)
    commit_times: list[float] = []
    while outstanding:
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
        for ref in ready:
            shard, _copy = refs.pop(ref)
            part = _get(ray, ref)
            # a retry whose first attempt committed before its worker died returns no counts
            if (part.get("shards_done") or part.get("committed_before")) and shard in outstanding:
                outstanding.discard(shard)
                run.parts.append(part)
                commit_times.append(time.monotonic())
                for other in [r for r, (s, _) in refs.items() if s == shard]:
                    ray.cancel(other, force=True)  # the loser of a re-issued shard: its work is moot
                    refs.pop(other)
        if reissue and commit_times and outstanding and len(refs) < slots:  # near the end: a slot is idle
            oldest = next((i for i in order if i in outstanding and i not in run.reissued), None)
            if oldest is not None:
                run.reissued.add(oldest)
                refs[submit(oldest, 1)] = (oldest, 1)
        if outstanding and not refs:  # every copy of a shard ended without committing it: never wait forever
            raise EmbedkitError(f"shards {sorted(outstanding)} ended uncommitted; committed shards are kept: rerun the same command")
    run.tail_seconds = straggler_tail(commit_times)


def encode_shard(input: str, out: str, cfg: EncodeConfig, index: int, copy: int = 0, arbiter: Any = None) -> dict:
    """One shard, in a Ray worker: skipped if a previous attempt already committed it. With an
    `arbiter` (a CommitArbiter), the shard is committed only if this copy gets the right to."""
    from .encoder import choose_device
    from .pipeline import SUMMED_FIELDS, WorkerHooks, _run_shards, attach_job, open_input
    from .runtime import inherited_settings
    from .store import VectorStore

    inherited_settings()
    if index in VectorStore(Path(out)).committed_shards():
        # a retry of a task whose commit landed before its worker died: it adds nothing
        return {**dict.fromkeys(SUMMED_FIELDS, 0), "seconds": 0.0, "committed_before": True}
    # the stored columns are in the key: a cached corpus reads only the columns its run stored
    key = (input, out, cfg.model, cfg.device, cfg.precision, cfg.max_seq_length, cfg.store_text, cfg.keep_columns)
    if key not in _JOB_CACHE:
        corpus = open_input(input, cfg)
        _JOB_CACHE[key] = (corpus, attach_job(corpus, Path(out), cfg, choose_device(cfg.device, cfg.precision)))
    corpus, job = _JOB_CACHE[key]
    shard = next(s for s in job.shards if s.index == index)
    if copy == 0:
        _injected_stall(index)
    hooks = None
    if arbiter is not None:
        import ray

        hooks = WorkerHooks(events=lambda kind, shard, counts: None, take=lambda i: ray.get(arbiter.take.remote(i, copy)))
    return _run_shards(corpus, job, [shard], cfg, skipped=0, hooks=hooks).to_dict()


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


def _ray(address: str | None) -> Any:
    try:
        import ray
    except ImportError:
        raise EmbedkitError("--ray needs Ray: pip install 'embedkit[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
    return ray


def _get(ray: Any, refs: list) -> list:
    try:
        return ray.get(refs)
    except Exception as e:  # a task that failed after its retries
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise EmbedkitError(f"a Ray task failed ({first}); committed shards are kept: rerun the same command to resume") from None
