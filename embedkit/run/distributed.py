"""Shard tasks on Ray: `--gpus N` on this machine, and `--ray [ADDRESS]` on a cluster.

One scheduler for every multi-worker run. The driver validates the input, writes the manifest
and cleans the store under the output lock (so a second driver on the same OUT is refused),
then submits one task per pending shard, the most tokens first: `num_gpus=1` on CUDA,
`num_gpus=0` on CPUs. A stage hands `run_shard_tasks` its own shard function (encode's
`encoding/pipeline.encode_shard`, generate's `generation/pipeline.generate_shard_task`, the
index build's `index/add.index_shard_task`), which runs the ordinary single-device code on its
shard and commits it; this module imports no stage. Ray retries a task whose worker died or was
preempted; a retried task first checks
whether its shard is already committed, so a shard is never written twice. Near the end an
idle slot runs a second copy of the oldest shard still running; a `CommitArbiter` actor gives
the shard's commit to the first copy that asks.

`--gpus N` starts a Ray of this machine for the run (N slots) and shuts it down when the run
ends, also on SIGTERM and Ctrl-C; on a SIGKILL of the driver, Ray's own processes die with it
(kernel fate-sharing), and a task still running commits nothing: the arbiter, an actor of the
driver's job, is gone, and the task checks that its driver still holds OUT's lock before it
commits. A killed driver is resumed by rerunning the same command. `embedkit build-index
--ray` runs the index's add phase through the same runner (training and the merge stay on the
driver). Ray is imported only here
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import EmbedkitError, first_line

TASK_RETRIES = 3
STALL_ENV = "EMBEDKIT_TEST_STALL_SHARD"
TASK_CACHE: dict = {}  # per Ray worker process: what a stage's tasks load once (its model), reused by later tasks


def straggler_tail(commit_times: list[float]) -> float:
    """Seconds from 95% of shards committed to 100% (commit times in any order; 0 for fewer than 2)."""
    if len(commit_times) < 2:
        return 0.0
    ends = sorted(commit_times)
    return ends[-1] - ends[max(0, int(0.95 * len(ends)) - 1)]


def check_local_workers(workers: int, device_type: str) -> None:
    """Refuse `--gpus N` (N > 1) before anything is written: it needs Ray, and on CUDA N visible GPUs."""
    _import_ray(f"--gpus {workers}")
    if device_type == "cuda":
        import torch

        visible = torch.cuda.device_count()
        if workers > visible:
            raise EmbedkitError(f"--gpus {workers} asked for more GPUs than the {visible} visible")


@dataclass
class TaskRun:
    """What a run of shard tasks returns: the tasks' parts (one per committed shard), the shards
    re-issued, the tail (from 95% of shards committed to 100%) and the wall seconds."""

    parts: list = field(default_factory=list)
    reissued: set = field(default_factory=set)
    tail_seconds: float = 0.0
    seconds: float = 0.0


def run_shard_tasks(task: Callable[..., dict], args: tuple, order: list[int], *, gpu: bool, workers: int, address: str | None,
                    reissue: bool, on_commit: Callable[[dict], None] | None = None) -> TaskRun:  # fmt: skip
    """Run `task(*args, shard, copy, arbiter, driver)` as a Ray task per shard of `order` (the
    most tokens first), on a Ray of this machine with `workers` slots (--gpus N) or on the
    cluster at `address` (--ray), and wait until every shard is committed.

    A stage gives its own shard function (module-level, so Ray pickles it by reference); it
    commits its shard only when `commit_allowed(arbiter, shard, copy, out, driver)` says so.
    `parts` are the dicts the committing copies returned; `on_commit(part)` is called as each
    lands (the driver's progress bar).
    """
    from ..io.shards import lock_record

    with _cluster(address, workers, gpu) as (ray, ours):
        remote = ray.remote(**_task_options(gpu))(task)
        arbiter = ray.remote(num_cpus=0)(CommitArbiter).remote()
        slots = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 1))
        # this process holds OUT's lock: on this machine, tasks commit only while it does. A
        # cluster's nodes may not share OUT's filesystem (or its locks): there the arbiter, an
        # actor of this driver's job that dies with it, is what stops an orphaned task
        driver = lock_record() if address is None else None
        start = time.perf_counter()
        submit = lambda i, copy: remote.remote(*args, i, copy, arbiter, driver)  # noqa: E731
        run = _follow_tasks(ray, submit, order, slots, reissue=reissue, cancel_at_exit=not ours, on_commit=on_commit)
        run.seconds = time.perf_counter() - start
    return run


def _task_options(gpu: bool) -> dict:
    options: dict = {"num_gpus": 1 if gpu else 0, "num_cpus": 1, "max_retries": TASK_RETRIES}
    stall = os.environ.get(STALL_ENV)
    if stall:  # fault injection (tests): the tasks' processes must see it too
        options["runtime_env"] = {"env_vars": {STALL_ENV: stall}}
    return options


@contextlib.contextmanager
def _cluster(address: str | None, workers: int, gpu: bool) -> Iterator[tuple[Any, bool]]:
    """(ray, ours): the Ray that runs the tasks, and whether it was started for this run. The
    cluster at `address`; for --gpus N, the Ray this program is already connected to if any
    (left as it is), else one started here and shut down when the run ends."""
    if address is not None:
        yield _ray(address), False
        return
    ray = _import_ray(f"--gpus {workers}")
    if ray.is_initialized():
        yield ray, False
        return
    with _local_ray(ray, workers, gpu):
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


def _follow_tasks(ray: Any, submit: Callable[[int, int], Any], order: list[int], slots: int, *, reissue: bool,
                  cancel_at_exit: bool, on_commit: Callable[[dict], None] | None = None) -> TaskRun:  # fmt: skip
    """Submit one task per shard and wait for every shard to be committed.

    Once no task waits for a slot and a slot is idle, the oldest shard still running gets a
    second copy (once per shard): the copy that commits first wins, and the other is cancelled.
    A task that fails after Ray's retries fails the run (committed shards are kept).
    `cancel_at_exit`: cancel the tasks still running when this returns or fails (a Ray that is
    not shut down with the run would keep them running).
    """
    run = TaskRun()
    refs = {submit(i, 0): (i, 0) for i in order}
    try:
        _wait_for_commits(ray, submit, order, slots, reissue, refs, run, on_commit)
    finally:
        if cancel_at_exit:
            for ref in refs:  # re-issued copies that lost, or every task after a failure
                ray.cancel(ref)
    return run


def _wait_for_commits(ray: Any, submit: Callable[[int, int], Any], order: list[int], slots: int, reissue: bool, refs: dict, run: TaskRun,
                      on_commit: Callable[[dict], None] | None = None) -> None:  # fmt: skip
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
                if on_commit is not None:
                    on_commit(run.parts[-1])
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


def worker_name() -> str:
    """host:pid of this process: who ran a shard task."""
    return f"{socket.gethostname()}:{os.getpid()}"


def commit_allowed(arbiter: Any, shard: int, copy: int, out: Path, driver: str | None) -> bool:
    """Whether this copy commits its shard: false when the arbiter gave the commit to the other
    copy. A task that has outlived its run raises instead, and so writes nothing: the arbiter
    is gone with the driver's job (Ray raises), or OUT's lock is no longer the driver's."""
    import ray

    from ..io.shards import held_by

    if not ray.get(arbiter.take.remote(shard, copy)):
        return False
    if driver is not None and not held_by(out, driver):
        raise EmbedkitError(f"{out} is no longer held by the run that started this task ({driver}); shard {shard} is left to a rerun")
    return True


def injected_stall(shard: int) -> None:
    """EMBEDKIT_TEST_STALL_SHARD="N:SECONDS": the first copy of shard N sleeps SECONDS before it
    starts. A fault-injection hook for the straggler tests; unset in normal runs."""
    spec = os.environ.get(STALL_ENV, "")
    n, _, seconds = spec.partition(":")
    if spec and n.strip() == str(shard):
        time.sleep(float(seconds))


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
        first = first_line(e)
        raise EmbedkitError(f"a Ray task failed ({first}); committed shards are kept: rerun the same command to resume") from None
