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
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE, cli_command

import embedkit
from embedkit.errors import EmbedkitError
from embedkit.store import VectorStore

ROWS, SHARD_ROWS = 120, 20


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


def test_two_workers_write_what_one_writes(corpus, tmp_path):
    options = dict(device="cpu", shard_rows=SHARD_ROWS, max_seq_length=64, progress=False)
    one = embedkit.encode(corpus, tmp_path / "one", **options)
    two = embedkit.encode(corpus, tmp_path / "two", gpus=2, **options)
    assert (two.docs, two.tokens, two.shards_done) == (one.docs, one.tokens, ROWS // SHARD_ROWS)
    assert two.device == "2 x cpu"
    a, b = stored(tmp_path / "one"), stored(tmp_path / "two")
    assert set(a) == set(b) and len(b) == ROWS
    cos = [float(a[k] @ b[k] / np.linalg.norm(a[k]) / np.linalg.norm(b[k])) for k in a]
    assert min(cos) >= 0.9999
    assert embedkit.status(tmp_path / "two").complete
    # each shard is one commit carrying its index, whichever worker made it
    assert sorted(VectorStore(tmp_path / "two").committed_shards()) == list(range(ROWS // SHARD_ROWS))


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


def test_workers_start_their_own_tokenizer_processes(corpus, tmp_path):
    """Each worker with a tokenizer pool of its own, as on GPUs (workers must not be daemons)."""
    options = dict(device="cpu", shard_rows=SHARD_ROWS, max_seq_length=64, progress=False)
    one = embedkit.encode(corpus, tmp_path / "one", **options)
    two = embedkit.encode(corpus, tmp_path / "two", gpus=2, tokenize_workers=1, **options)
    assert (two.docs, two.tokens) == (one.docs, one.tokens)
    assert len(two.parts) == 2 and sum(p["tokens"] for p in two.parts) == two.tokens
    assert set(stored(tmp_path / "two")) == set(stored(tmp_path / "one"))
