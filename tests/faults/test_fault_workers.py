"""Faults of multi-worker runs (`--gpus N`, shard tasks on a local Ray, run on the CPU with two
workers): the driver killed (SIGTERM, SIGKILL), a worker killed mid-shard.

Before `--gpus N` ran on Ray, its spawned workers outlived a killed parent and kept committing
into the rerun's output (ids stored twice), and a worker killed mid-shard left the run waiting
for ever.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE, task_pids

import embedkit
from embedkit.io.store import VectorStore

from .faultkit import HANG_GUARD_S, assert_exactly_once, kill_session, run, session_processes, start, versions, wait_for

pytest.importorskip("ray")

ROWS = 120
WORKERS_GONE_S = 20.0  # after the driver died: how long its workers may take to stop
# Ray's node agents write nothing to OUT; after a SIGKILL of the driver they notice that the
# raylet is gone and exit on their own, within about a minute (docs/reliability.md).
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("workers") / "docs.parquet"
    pq.write_table(pq.read_table(SAMPLE).slice(0, ROWS), path)
    return path


def could_commit(sid: int) -> dict[int, str]:
    """The processes of a run's session that are not Ray's node agents."""
    return {pid: cmd for pid, cmd in session_processes(sid).items() if not cmd.startswith(RAY_AGENTS)}


@pytest.mark.slow
def test_workers_die_with_their_driver_and_the_rerun_writes_every_id_once(corpus, tmp_path):
    """`embedkit encode --gpus 2` in its own session: its main process gets SIGTERM after 3
    commits; the rerun gets SIGKILL after 3 more (the main process only, as the OOM killer
    would). After each, no worker may outlive the driver by more than WORKERS_GONE_S (on
    SIGTERM nothing of the run may: Ray is shut down). The last rerun (in one process: the
    same ledger resumes) finishes: every id exactly once, and `status` complete."""
    pytest.importorskip("ray")
    out = tmp_path / "out"
    args = ["encode", corpus, out, "--device", "cpu", "--gpus", "2", "--shard-rows", "10", "--max-seq-length", "64", "-q"]
    commits = lambda: max(0, versions(out / "vectors.lance") - 1)  # noqa: E731  (version 1 is the empty dataset)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        log = tmp_path / f"{sig.name}.log"
        proc = start(args, log)
        try:
            target = commits() + 3
            wait_for(proc, lambda: commits() >= target, log, f"{target} commits", poll=0.01)
            proc.send_signal(sig)
            proc.wait(timeout=60)
            alive = could_commit if sig == signal.SIGKILL else session_processes
            deadline = time.monotonic() + WORKERS_GONE_S
            while alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            left = alive(proc.pid)
            assert not left, f"{len(left)} processes outlived the driver's {sig.name} by {WORKERS_GONE_S} s: {left}"
        finally:
            kill_session(proc)
        assert commits() < ROWS // 10, "the kill must land mid-run"
    rerun = run(*[a for a in args if a not in ("--gpus", "2")])  # a local rerun resumes the same ledger, without a third Ray start
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_exactly_once(out, pq.read_table(corpus).column("id").to_pylist())
    assert embedkit.status(out).complete


@pytest.mark.slow
def test_a_worker_killed_mid_shard_without_reissue_is_retried(local_ray, corpus, tmp_path):
    """One Ray worker dies mid-shard (SIGKILL, as on a preempted or OOM-killed process) in a
    `--gpus 2 --no-reissue` run: its task is retried, the run ends (it used to wait for ever),
    and every id is written once."""
    out = tmp_path / "out"
    result: dict = {}

    def drive() -> None:
        try:
            result["summary"] = embedkit.encode(corpus, out, device="cpu", shard_rows=10, max_seq_length=128, gpus=2, reissue=False,
                                                progress=False)  # fmt: skip
        except BaseException as e:  # surfaced by the assertions below
            result["error"] = e

    driver = threading.Thread(target=drive)
    driver.start()
    killed = None
    deadline = time.time() + HANG_GUARD_S
    while killed is None and driver.is_alive() and time.time() < deadline:
        pids = task_pids()
        if pids and len(VectorStore(out).committed_shards() if (out / "vectors.lance").exists() else {}) >= 1:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    driver.join(timeout=HANG_GUARD_S)
    assert not driver.is_alive(), "the run hangs after a worker died"
    assert killed is not None, "no running task was found to kill"
    assert "error" not in result, result.get("error")
    assert_exactly_once(out, pq.read_table(corpus).column("id").to_pylist())
    assert sorted(VectorStore(out).committed_shards()) == list(range(ROWS // 10))
