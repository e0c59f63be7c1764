"""kill -9 of `embedkit encode`, `build-index` and `generate` at chosen points, then the rerun.

Each test kills the real command several times in a row, each time at a different point found by
polling the output folder, and checks after every kill that the output holds only whole shards.
The last rerun must finish with every id exactly once.
"""

from __future__ import annotations

import json
import shutil

import lance
import pyarrow.parquet as pq

import embedkit
import embedkit.io.store

from .faultkit import (
    ENCODE_OPTIONS,
    ROWS,
    SHARD_ROWS,
    assert_exactly_once,
    data_files,
    has_children,
    kill_at,
    read_vectors,
    referenced_files,
    run,
    versions,
)


def test_encode_killed_three_times_then_finished(tmp_path, corpus_file, corpus_table, uninterrupted, cosine, vectors_of):
    """Killed while tokenizing, between writing a shard's fragments and committing them, and
    right after a commit; after each kill only whole shards are visible, and the last rerun
    leaves every id exactly once, equal to an uninterrupted run, with Lance's validation passing."""
    out = tmp_path / "out"
    store = out / "vectors.lance"
    args = ["encode", corpus_file, out, *ENCODE_OPTIONS]
    kills: list[dict] = []

    def after_kill() -> dict:
        """What OUT holds: only whole shards may be visible, each id once, and Lance's check passes."""
        st = embedkit.status(out)
        ids = read_vectors(out).column("id").to_pylist()
        assert st.rows == st.shards_done * SHARD_ROWS, (st, kills)
        assert len(ids) == len(set(ids)) == st.rows, kills
        lance.dataset(str(store)).validate()
        kills.append({"shards_done": st.shards_done, "files": len(data_files(store)),
                      "orphans": len(data_files(store) - referenced_files(store))})  # fmt: skip
        return kills[-1]

    def tokenizing(proc):  # the tokenizer worker is up and nothing is written yet
        return lambda: has_children(proc.pid) and versions(store) >= 1 and not data_files(store)

    def before_commit(proc):  # more data files than commits (version 1 is the empty dataset): one is not committed
        return lambda: 1 <= versions(store) <= len(data_files(store))

    def after_commit(proc):
        committed = versions(store)
        return lambda: versions(store) > committed

    kill_at(args, tmp_path, "tokenizing", tokenizing, lambda: after_kill()["files"] == 0,
            reset=lambda: shutil.rmtree(out))  # fmt: skip
    kill_at(args, tmp_path, "fragments written, not committed", before_commit, lambda: after_kill()["orphans"] >= 1)
    done = kills[-1]["shards_done"]
    kill_at(args, tmp_path, "right after a commit", after_commit, lambda: after_kill()["shards_done"] > done)
    assert kills[-1]["shards_done"] < ROWS // SHARD_ROWS, "the run finished before the last kill"

    rerun = run(*args, "--json")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert summary["shards_skipped"] == kills[-1]["shards_done"]
    assert summary["shards_done"] + summary["shards_skipped"] == summary["shards_total"] == ROWS // SHARD_ROWS
    table = assert_exactly_once(out, corpus_table.column("id").to_pylist())
    assert data_files(store) == referenced_files(store), "uncommitted data files were left behind"
    cos = cosine(vectors_of(table), vectors_of(read_vectors(uninterrupted)))
    assert min(cos.values()) >= 0.999


def test_generate_killed_twice_then_finished(tmp_path, sample):
    """`generate --task score` (the default generator, on CPU): killed between writing a shard's
    rows and committing them, then right after a commit; the rerun finishes every row once."""
    from embedkit.generation.pipeline import GENERATIONS_DIR

    docs = sample.slice(0, 6)
    src, out = tmp_path / "docs.parquet", tmp_path / "out"
    pq.write_table(docs, src)
    store = out / GENERATIONS_DIR
    args = ["generate", src, out, "--task", "score", "--shard-rows", 2, "-q"]
    done: list[int] = []

    def after_kill() -> int:
        ds = lance.dataset(str(store))
        ds.validate()
        committed = embedkit.io.store.VectorStore(out, GENERATIONS_DIR).committed_shards()
        assert ds.count_rows() == 2 * len(committed), committed  # whole shards only
        done.append(len(committed))
        return len(data_files(store) - referenced_files(store))

    written = lambda proc: lambda: 1 <= versions(store) <= len(data_files(store))  # noqa: E731
    kill_at(args, tmp_path, "rows written, not committed", written, lambda: after_kill() >= 1 and done[-1] == 0,
            reset=lambda: shutil.rmtree(out))  # fmt: skip

    def after_commit(proc):
        committed = versions(store)
        return lambda: versions(store) > committed

    kill_at(args, tmp_path, "right after a commit", after_commit, lambda: after_kill() >= 0 and done[-1] >= 1)
    assert done[-1] < 3, done
    rerun = run(*args, "--json")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert (summary["shards_skipped"], summary["shards_done"]) == (done[-1], 3 - done[-1])
    ds = lance.dataset(str(store))
    ds.validate()
    table = ds.to_table()
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(docs.column("id").to_pylist()) and len(set(ids)) == len(ids)
    assert all(lp < 0 for lp in table.column("logprob").to_pylist())
    assert data_files(store) == referenced_files(store)


def test_an_append_killed_mid_run_resumes_with_every_id_once(tmp_path, corpus_file, corpus_table, run_cli, refused):
    """`encode --append` killed between a shard's Lance commit and its ledger record: another
    input is refused until this one is finished; the rerun of the same append leaves every id
    of both inputs exactly once."""
    import pyarrow as pa

    from .faultkit import run_to_kill

    out = tmp_path / "out"
    first = corpus_table.slice(0, 30)
    second = corpus_table.slice(30).set_column(0, "id", pa.array([f"second-{i}" for i in range(len(corpus_table) - 30)]))
    a, b, c = tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "c.parquet"
    pq.write_table(first, a)
    pq.write_table(second, b)
    pq.write_table(pa.table({"id": ["third-0"], "text": ["a third input"]}), c)
    assert run("encode", a, out, *ENCODE_OPTIONS).returncode == 0
    # shards 0-2 are the first input's; the append's second shard is 4
    run_to_kill(["encode", b, out, "--append", *ENCODE_OPTIONS], tmp_path / "killed.log", "commit:4")
    refused(run_cli("encode", c, out, "--append", *ENCODE_OPTIONS), "not fully encoded", "b.parquet")
    # the killed append's input replaced before the rerun: a different input, refused the same way
    pq.write_table(second.set_column(1, "text", pa.array(["edited"] * len(second))), b)
    refused(run_cli("encode", b, out, "--append", *ENCODE_OPTIONS), "not fully encoded", "b.parquet")
    pq.write_table(second, b)
    assert run("encode", b, out, "--append", *ENCODE_OPTIONS).returncode == 0
    assert_exactly_once(out, first.column("id").to_pylist() + second.column("id").to_pylist())
    assert embedkit.status(out).complete
