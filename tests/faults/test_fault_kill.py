"""kill -9 of `embedkit encode`, `build-index` and `generate` at chosen points, then the rerun.

Each test kills the real command several times in a row, each time at a different point found by
polling the output folder, and checks after every kill that the output holds only whole shards.
The last rerun must finish with every id exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path

import lance
import numpy as np
import pytest

import embedkit

from .faultkit import (
    ENCODE_OPTIONS,
    ROWS,
    SHARD_ROWS,
    assert_exactly_once,
    data_files,
    has_children,
    kill_group,
    kill_when,
    read_vectors,
    referenced_files,
    run,
    start,
    versions,
)


def _killed_encode(args: list, out: Path, log: Path, ready_factory, what: str) -> dict:
    """Run the encode command, SIGKILL it when `ready_factory(proc)()` holds; what OUT holds then."""
    proc = start(args, log)
    try:
        kill_when(proc, ready_factory(proc), log, what)
    finally:
        kill_group(proc)
    store = out / "vectors.lance"
    st = embedkit.status(out)
    ids = read_vectors(out).column("id").to_pylist()
    return {
        "what": what, "shards_done": st.shards_done, "rows": st.rows, "ids": ids,
        "orphans": len(data_files(store) - referenced_files(store)),
    }  # fmt: skip


def test_encode_killed_three_times_then_finished(tmp_path, corpus_file, corpus_table, uninterrupted, cosine, vectors_of):
    """Killed while tokenizing, between writing a shard's fragments and committing them, and
    right after a commit; after each kill only whole shards are visible, and the last rerun
    leaves every id exactly once, equal to an uninterrupted run, with Lance's validation passing."""
    out = tmp_path / "out"
    store = out / "vectors.lance"
    args = ["encode", corpus_file, out, *ENCODE_OPTIONS]

    def tokenizing(proc):  # the tokenizer worker is up and nothing is written yet
        return lambda: has_children(proc.pid) and versions(store) >= 1 and not data_files(store)

    def before_commit(proc):  # more data files than commits (version 1 is the empty dataset): one is not committed
        return lambda: 1 <= versions(store) <= len(data_files(store))

    def after_commit(proc):
        committed = versions(store)
        return lambda: versions(store) > committed

    kills = []
    for i, (ready, what) in enumerate([(tokenizing, "tokenizing"), (before_commit, "fragments written, not committed"),
                                       (after_commit, "right after a commit")]):  # fmt: skip
        kills.append(_killed_encode(args, out, tmp_path / f"kill-{i}.log", ready, what))
        k = kills[-1]
        # only whole shards are visible, each id once
        assert k["rows"] == k["shards_done"] * SHARD_ROWS, k
        assert len(k["ids"]) == len(set(k["ids"])) == k["rows"], k
        lance.dataset(str(store)).validate()
    assert kills[0]["shards_done"] == 0 and kills[0]["orphans"] == 0, kills[0]
    assert kills[1]["orphans"] >= 1, ("the kill did not land between a fragment write and its commit", kills[1])
    assert kills[2]["shards_done"] > kills[1]["shards_done"], kills[2]
    assert kills[2]["shards_done"] < ROWS // SHARD_ROWS, "the run finished before the last kill"

    rerun = run(*args, "--json")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert summary["shards_skipped"] == kills[2]["shards_done"]
    assert summary["shards_done"] + summary["shards_skipped"] == summary["shards_total"] == ROWS // SHARD_ROWS
    table = assert_exactly_once(out, corpus_table.column("id").to_pylist())
    assert data_files(store) == referenced_files(store), "uncommitted data files were left behind"
    cos = cosine(vectors_of(table), vectors_of(read_vectors(uninterrupted)))
    assert min(cos.values()) >= 0.999


def test_generate_killed_twice_then_finished(tmp_path, sample):
    """`generate --task score` (the default generator, on CPU): killed between writing a shard's
    rows and committing them, then right after a commit; the rerun finishes every row once."""
    from embedkit.generation import GENERATIONS_DIR

    docs = sample.slice(0, 6)
    src, out = tmp_path / "docs.parquet", tmp_path / "out"
    import pyarrow.parquet as pq

    pq.write_table(docs, src)
    store = out / GENERATIONS_DIR
    args = ["generate", src, out, "--task", "score", "--shard-rows", 2, "-q"]
    done = []
    for i, (ready, what) in enumerate([
        (lambda: 1 <= versions(store) <= len(data_files(store)), "rows written, not committed"),
        (lambda: versions(store) > done[-1] + 1, "right after a commit"),
    ]):  # fmt: skip
        log = tmp_path / f"kill-{i}.log"
        proc = start(args, log)
        try:
            kill_when(proc, ready, log, what)
        finally:
            kill_group(proc)
        ds = lance.dataset(str(store))
        ds.validate()
        committed = embedkit.store.VectorStore(out, GENERATIONS_DIR).committed_shards()
        assert ds.count_rows() == 2 * len(committed), (what, committed)  # whole shards only
        done.append(len(committed))
    assert done[0] == 0 and 1 <= done[1] < 3, done
    rerun = run(*args, "--json")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert (summary["shards_skipped"], summary["shards_done"]) == (done[1], 3 - done[1])
    ds = lance.dataset(str(store))
    ds.validate()
    table = ds.to_table()
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(docs.column("id").to_pylist()) and len(set(ids)) == len(ids)
    assert all(lp < 0 for lp in table.column("logprob").to_pylist())
    assert data_files(store) == referenced_files(store)
