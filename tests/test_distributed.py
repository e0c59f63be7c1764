"""Shards as Ray tasks on a real local Ray cluster (CPU): results, a killed worker, the lock."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import lance
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE, task_pids

import embedkit
from embedkit.errors import EmbedkitError
from embedkit.io.shards import OutputLock
from embedkit.io.store import VectorStore

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a local Ray cluster and its worker processes: tens of seconds per test on 2 cores

ROWS = 120


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray") / "docs.parquet"
    pq.write_table(pq.read_table(SAMPLE).slice(0, ROWS), path)
    return path


def ids_in(out: Path) -> list:
    return lance.dataset(str(out / "vectors.lance")).to_table(columns=["id"]).column("id").to_pylist()


def test_ray_tasks_encode_every_shard(local_ray, corpus, tmp_path):
    s = embedkit.encode(corpus, tmp_path / "out", device="cpu", shard_rows=20, max_seq_length=64, progress=False, ray="")
    assert (s.docs, s.shards_done, s.shards_total) == (ROWS, 6, 6)
    ids = ids_in(tmp_path / "out")
    assert len(ids) == len(set(ids)) == ROWS
    assert embedkit.status(tmp_path / "out").complete


def test_a_retried_task_whose_shard_landed_reports_its_rows_from_the_ledger(local_ray, corpus, tmp_path):
    """A task retried after its commit landed (its worker died before reporting) commits
    nothing again; it reports the shard as done with the rows the ledger holds (its tokens are
    not known), and no encoding seconds of a worker."""
    from embedkit.config import EncodeConfig, RunOptions
    from embedkit.encoding.pipeline import EncodeSummary, encode_shard

    out = tmp_path / "out"
    embedkit.encode(corpus, out, device="cpu", shard_rows=60, max_seq_length=64, progress=False, ray="")
    versions = len(lance.dataset(str(out / "vectors.lance")).versions())
    cfg = EncodeConfig(device="cpu", shard_rows=60, max_seq_length=64, run=RunOptions(workers=1, progress=False))
    retried = encode_shard(str(corpus), str(out), cfg, 0)
    assert (retried["docs"], retried["shards_done"], retried["tokens"], retried["committed_before"]) == (60, 1, 0, True)
    merged = EncodeSummary.merged([retried], out=str(out), device="cpu", seconds=1.0, skipped=1, total=2)
    assert (merged.docs, merged.shards_done, merged.parts) == (60, 1, ())
    assert len(lance.dataset(str(out / "vectors.lance")).versions()) == versions
    assert len(ids_in(out)) == ROWS


def test_a_copy_that_finds_its_shard_committed_waits_for_the_committer(local_ray):
    """Shard 0's re-issued copy starts after the first copy committed, finds the shard done and
    returns at once, before the first copy reports. The run must wait for the first copy's
    counts instead of counting the shard with 0 tokens (and cancelling the copy that has them)."""
    from embedkit.run.distributed import _follow_tasks

    @ray.remote(num_cpus=0)
    def part(shard: int, copy: int) -> dict:
        if copy == 1:
            return {"docs": 20, "shards_done": 1, "tokens": 0, "committed_before": True}
        if shard == 0:
            time.sleep(3)  # the straggler: its commit has landed, its report is late
        return {"docs": 20, "shards_done": 1, "tokens": 100 + shard}

    run = _follow_tasks(ray, lambda i, copy: part.remote(i, copy), [0, 1], 2, reissue=True, cancel_at_exit=True)
    assert run.reissued == {0}
    assert sorted(p["tokens"] for p in run.parts) == [100, 101]


def test_a_killed_worker_is_retried_and_nothing_is_lost_or_doubled(local_ray, corpus, tmp_path):
    out = tmp_path / "out"
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = embedkit.encode(corpus, out, device="cpu", shard_rows=10, max_seq_length=128, progress=False, ray="")
        except BaseException as e:  # surfaced by the assertions below
            result["error"] = e

    driver = threading.Thread(target=run)
    driver.start()
    killed = None
    deadline = time.time() + 300
    while killed is None and driver.is_alive() and time.time() < deadline:
        pids = task_pids()
        if pids and len(VectorStore(out).committed_shards() if (out / "vectors.lance").exists() else {}) >= 1:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)  # a worker dies mid-shard, as on a preempted node
        time.sleep(0.05)
    driver.join(timeout=600)
    assert killed is not None, "no running task was found to kill"
    assert "error" not in result, result.get("error")
    ids = ids_in(out)
    assert len(ids) == len(set(ids)) == ROWS
    assert sorted(VectorStore(out).committed_shards()) == list(range(ROWS // 10))


# The run must end well before the stall would: a long stall. (Without re-issue the run waits
# for it: tests/test_workers.py checks that through the same executor, with `--gpus 2`.)
STALL_S = 30.0


def test_a_stalled_task_is_overtaken(local_ray, corpus, tmp_path, monkeypatch):
    """The first copy of shard 0 stalls STALL_S seconds (fault injection): an idle slot runs a
    second copy, which commits first, and the run ends well before the stall is over. Every id
    is written exactly once."""
    from embedkit.run.distributed import STALL_ENV

    monkeypatch.setenv(STALL_ENV, f"0:{STALL_S}")
    t = time.perf_counter()
    s = embedkit.encode(corpus, tmp_path / "out", device="cpu", shard_rows=20, max_seq_length=64, progress=False, ray="")
    wall = time.perf_counter() - t
    ids = ids_in(tmp_path / "out")
    assert len(ids) == len(set(ids)) == ROWS and s.docs == ROWS and s.shards_done == ROWS // 20
    assert s.reissued >= 1
    assert wall < STALL_S, wall  # shard 0 was committed by its second copy


def test_a_second_driver_on_the_same_output_is_refused(local_ray, corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out):  # what a running driver holds
        with pytest.raises(EmbedkitError, match="another"):
            embedkit.encode(corpus, out, device="cpu", shard_rows=20, progress=False, ray="")


def test_generate_as_ray_tasks_equals_a_local_run(local_ray, corpus, tmp_path):
    small = tmp_path / "small.parquet"
    pq.write_table(pq.read_table(corpus).slice(0, 12), small)
    options = dict(task="score", device="cpu", shard_rows=4, progress=False)
    local = embedkit.generate(small, tmp_path / "local", **options)
    remote = embedkit.generate(small, tmp_path / "ray", ray="", **options)
    assert (remote.docs, remote.shards_done, remote.shards_total) == (local.docs, 3, 3)

    def scores(out: Path) -> dict:
        t = lance.dataset(str(out / "generations.lance")).to_table()
        ids = t.column("id").to_pylist()
        assert len(ids) == len(set(ids)) == 12
        return dict(zip(ids, t.column("logprob").to_pylist()))

    a, b = scores(tmp_path / "local"), scores(tmp_path / "ray")
    assert a.keys() == b.keys()
    assert max(abs(a[k] - b[k]) for k in a) < 1e-4


def test_a_stalled_generate_task_is_overtaken(local_ray, corpus, tmp_path, monkeypatch):
    """generate --ray runs through encode's shard runner: the first copy of shard 0 stalls (fault
    injection), an idle slot runs a second copy that commits first, the run ends well before
    the stall is over, and every id is scored exactly once."""
    from embedkit.run.distributed import STALL_ENV

    small = tmp_path / "small.parquet"
    pq.write_table(pq.read_table(corpus).slice(0, 8), small)
    monkeypatch.setenv(STALL_ENV, f"0:{STALL_S}")
    t = time.perf_counter()
    s = embedkit.generate(small, tmp_path / "out", task="score", device="cpu", shard_rows=4, progress=False, ray="")
    wall = time.perf_counter() - t
    ids = lance.dataset(str(tmp_path / "out" / "generations.lance")).to_table(columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 8 and (s.docs, s.shards_done) == (8, 2)
    assert wall < STALL_S, wall  # shard 0 was committed by its second copy


def test_index_add_shards_as_ray_tasks_equal_a_local_build(local_ray, tmp_path):
    """build-index --ray: the add shards run as Ray tasks; the index equals a local build's."""
    import shutil

    import numpy as np

    src = tmp_path / "docs.parquet"  # PQ codebooks need at least 256 training vectors
    pq.write_table(pq.read_table(SAMPLE).slice(0, 300), src)
    out = tmp_path / "out"
    embedkit.encode(src, out, device="cpu", shard_rows=50, max_seq_length=64, progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    options = dict(nlist=2, pq_m=8, shard_rows=100, device="cpu", progress=False)
    local = embedkit.build_index(out, **options)
    remote = embedkit.build_index(copy, ray="", **options)
    assert remote.shards_total == local.shards_total == 3
    assert (remote.factory, remote.nprobe, remote.rerank, remote.recall) == (local.factory, local.nprobe, local.rerank, local.recall)
    deadline = time.monotonic() + 10  # task events reach the GCS asynchronously
    while True:
        ran = [e for e in ray.timeline() if str(e.get("name", "")).endswith("index_shard_task")]
        if len(ran) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # one Ray task per add shard, plus at most one re-issued copy per shard near the end (the
    # runner's straggler policy, the same for every stage)
    assert 3 <= len(ran) <= 6
    table = lance.dataset(str(out / "vectors.lance")).to_table(columns=["vector"])
    queries = np.stack(table.column("vector").to_numpy(zero_copy_only=False)[:15]).astype(np.float32)
    a = embedkit.Retriever(out).search_vectors(queries, 5)
    b = embedkit.Retriever(copy).search_vectors(queries, 5)
    assert a.ids == b.ids
