"""Several worker processes on one output (`--gpus N`), run on the CPU with two processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE, cli_command

import embedkit
from embedkit.errors import EmbedkitError
from embedkit.store import VectorStore

ROWS, SHARD_ROWS = 120, 15  # 8 shards: each of two workers takes several


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("workers") / "docs.parquet"
    pq.write_table(pq.read_table(SAMPLE).slice(0, ROWS), path)
    return path


def stored(out: Path) -> dict:
    table = lance.dataset(str(out / "vectors.lance")).to_table()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id was written twice"
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    return dict(zip(ids, vectors))


@pytest.fixture(scope="module")
def one_and_two(corpus, tmp_path_factory) -> tuple:
    """The corpus (with an int16 column) encoded by one process and by two workers, storing the
    text and that column: (one's summary, two's summary, two's OUT). Each worker loads torch and
    the model itself, so the suite runs one two-worker encode and checks it from several sides."""
    root = tmp_path_factory.mktemp("one-and-two")
    rows = pq.read_table(corpus)
    rows = rows.append_column("n", pa.array(range(ROWS), pa.int16()))
    src = root / "docs.parquet"
    pq.write_table(rows, src)
    options = dict(device="cpu", shard_rows=SHARD_ROWS, max_seq_length=64, store_text=True, keep_columns=("n",), progress=False)
    one = embedkit.encode(src, root / "one", **options)
    two = embedkit.encode(src, root / "two", gpus=2, **options)
    return one, two, root / "two", rows


@pytest.mark.slow  # two spawned workers, each loading torch and the model
def test_two_workers_write_what_one_writes(one_and_two):
    one, two, out, _ = one_and_two
    assert (two.docs, two.tokens, two.shards_done) == (one.docs, one.tokens, ROWS // SHARD_ROWS)
    assert two.device == "2 x cpu"
    # each worker's part counts the shards it committed, also for a worker stopped while busy
    # with a re-issued duplicate (it never sends a final report)
    assert sum(p["tokens"] for p in two.parts) == two.tokens and all(p["seconds"] > 0 for p in two.parts)
    a, b = stored(Path(one.out)), stored(out)
    assert set(a) == set(b) and len(b) == ROWS
    cos = [float(a[k] @ b[k] / np.linalg.norm(a[k]) / np.linalg.norm(b[k])) for k in a]
    assert min(cos) >= 0.9999
    assert embedkit.status(out).complete
    # each shard is one commit carrying its index, whichever worker made it
    assert sorted(VectorStore(out).committed_shards()) == list(range(ROWS // SHARD_ROWS))


@pytest.mark.slow
def test_workers_store_the_text_and_kept_columns(one_and_two):
    """Each worker reads and writes the stored columns of its own shards."""
    _, _, out, rows = one_and_two
    table = lance.dataset(str(out / "vectors.lance")).to_table()
    assert table.schema.field("n").type == pa.int16()
    got = {r["id"]: (r["text"], r["n"]) for r in table.select(["id", "text", "n"]).to_pylist()}
    assert got == {r["id"]: (r["text"], r["n"]) for r in rows.to_pylist()}


@pytest.mark.slow
def test_workers_share_the_shards_and_the_timeline_shows_them(one_and_two, tmp_path, run_cli):
    """A worker holds at most two shards at a time, so both workers get shards, each with a
    tokenizer pool of its own (a worker is not a daemon); `status --plot` draws one bar per
    committed shard on one row per worker."""
    from embedkit.plots import plot_timeline
    from embedkit.status import commit_log

    _, two, out, _ = one_and_two
    log = commit_log(out)
    assert sorted(e["shard"] for e in log) == list(range(ROWS // SHARD_ROWS))
    per_worker = {w: sum(1 for e in log if e["worker"] == w) for w in {e["worker"] for e in log}}
    assert len(per_worker) == 2 and min(per_worker.values()) >= 2, per_worker
    assert len(two.parts) == 2
    assert all(e["committed"] >= e["started"] for e in log)
    drawn = plot_timeline(log, tmp_path / "t.png")
    assert len(drawn["bars"]) == ROWS // SHARD_ROWS and sorted(drawn["workers"]) == sorted(per_worker)
    r = run_cli("status", out, "--plot", tmp_path / "cli.png")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cli.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{ROWS // SHARD_ROWS} shards on 2 workers" in r.stdout


@pytest.mark.slow
def test_killed_multi_worker_run_resumes_exactly_once(corpus, tmp_path):
    out = tmp_path / "out"
    args = [*cli_command(), "encode", str(corpus), str(out), "--device", "cpu", "--gpus", "2", "--shard-rows", "10",
            "--max-seq-length", "64", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(VectorStore(out).committed_shards()) >= 2:
                break
        except Exception:  # the dataset may not exist yet
            pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and both workers
    proc.wait()
    done_before = len(VectorStore(out).committed_shards())
    assert 2 <= done_before < ROWS // 10, "the kill must land mid-run"
    rerun = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["shards_skipped"] == done_before
    assert summary["shards_done"] + summary["shards_skipped"] == ROWS // 10
    assert len(stored(out)) == ROWS


@pytest.mark.parametrize("gpus", ["0", "x", "all"])
def test_bad_gpus_values_are_refused(corpus, tmp_path, gpus):
    with pytest.raises(EmbedkitError, match="--gpus"):
        embedkit.encode(corpus, tmp_path / "o", device="cpu", gpus=gpus, progress=False)


def test_a_worker_takes_a_third_shard_only_after_finishing_one():
    """The read-ahead of a worker claims shards from the shared queue through two permits;
    before it waits for a permit it hands over what it has read (else nothing could finish)."""
    import threading

    from embedkit.pipeline import _claimed

    taken: list[int] = []

    def shared_queue():
        for i in range(5):
            taken.append(i)
            yield i

    claims, stop, handed = threading.Semaphore(2), threading.Event(), []
    shards = _claimed(shared_queue(), claims, stop, lambda: handed.append(list(taken)))
    got = [next(shards), next(shards)]
    waiter = threading.Thread(target=lambda: got.append(next(shards)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and taken == [0, 1] and handed == [[], [0], [0, 1]]
    claims.release()  # the consumer finished a shard
    waiter.join(5)
    assert got == [0, 1, 2] and taken == [0, 1, 2]
    stop.set()
    assert list(shards) == []  # stopped while waiting for a permit: no more shards taken
    assert taken == [0, 1, 2]


# With re-issue the run must end well before the stall would: a long stall. Without, it must
# outlast the stall: a short one is proof enough, and costs a third of the time.
STALL_S = {True: 30.0, False: 10.0}


@pytest.mark.slow
@pytest.mark.parametrize("reissue", [True, False])
def test_a_stalled_worker_is_overtaken(corpus, tmp_path, monkeypatch, reissue):
    """Worker 1 stalls STALL_S[reissue] seconds on its first shard (fault injection). With re-issue the
    other worker also runs that shard, commits it first, and the run ends well before the stall
    is over; without, the run waits for it. Either way every id is written exactly once."""
    monkeypatch.setenv("EMBEDKIT_TEST_STALL", f"1:{STALL_S[reissue]}")
    t = time.perf_counter()
    s = embedkit.encode(corpus, tmp_path / "out", device="cpu", shard_rows=20, max_seq_length=64, gpus=2, reissue=reissue, progress=False)
    wall = time.perf_counter() - t
    assert len(stored(tmp_path / "out")) == ROWS and s.docs == ROWS and s.shards_done == ROWS // 20
    assert sorted(VectorStore(tmp_path / "out").committed_shards()) == list(range(ROWS // 20))
    if reissue:
        assert s.reissued >= 1
        assert wall < STALL_S[True], wall  # the stalled shard was committed by the other worker
    else:
        assert s.reissued == 0
        assert wall > STALL_S[False], wall
    assert not (tmp_path / "out" / ".embedkit-commits").exists()
