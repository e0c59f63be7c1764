"""The Lance store: one commit per shard, the ledger of committed shards beside it, orphan cleanup."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from datetime import timedelta

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lance.dataset import Transaction
from lance.fragment import write_fragments

from embedkit.config import EncodeConfig, RunOptions
from embedkit.encoding.pipeline import run_encode
from embedkit.errors import EmbedkitError
from embedkit.io.store import SHARD_KEY, VectorStore, vectors_schema, vectors_table


def _table(schema: pa.Schema, ids: list[str]) -> pa.Table:
    n = len(ids)
    vectors = np.random.default_rng(n).random((n, 4)).astype(np.float16)
    return vectors_table(schema, pa.array(ids), vectors, np.full(n, 3, np.int32), np.zeros(n, bool))


def test_ledger_lists_each_committed_shard_with_its_rows(tmp_path):
    store = VectorStore(tmp_path)
    schema = vectors_schema(pa.string(), 4, "float16")
    store.create(schema)
    store.commit_shard(0, _table(schema, ["a", "b"]))
    store.commit_fragments(2, store.write_fragments(_table(schema, ["c"])) + store.write_fragments(_table(schema, ["d", "e"])))
    assert store.committed_shards() == {0: 2, 2: 3}
    assert store.row_stats() == (5, {"n_tokens": 15})
    assert store.row_stats(("n_tokens", "no_such_column")) == (5, {"n_tokens": 15})


def test_uncommitted_fragments_are_invisible_then_removed(tmp_path):
    store = VectorStore(tmp_path)
    schema = vectors_schema(pa.string(), 4, "float16")
    store.create(schema)
    store.commit_shard(0, _table(schema, ["a"]))
    store.write_fragments(_table(schema, ["orphan-1", "orphan-2"]))  # a run killed before its commit
    files_before = len(list((tmp_path / "vectors.lance" / "data").iterdir()))
    assert lance.dataset(store.uri).to_table().column("id").to_pylist() == ["a"]
    assert store.remove_uncommitted() > 0
    assert len(list((tmp_path / "vectors.lance" / "data").iterdir())) == files_before - 1
    assert store.committed_shards() == {0: 1}


def test_a_shard_of_many_windows_is_one_commit(tmp_path, small_table):
    inp = tmp_path / "in.parquet"
    pq.write_table(small_table, inp)
    cfg = EncodeConfig(device="cpu", shard_rows=12, window_docs=5, tokenize_workers=0, run=RunOptions(progress=False))
    summary = run_encode(inp, tmp_path / "out", cfg)
    ds = lance.dataset(str(tmp_path / "out" / "vectors.lance"))
    shards = -(-small_table.num_rows // 12)
    assert summary.shards_done == shards
    assert ds.version == 1 + shards  # the empty dataset, then exactly one version per shard
    txs = [t for t in ds.get_transactions(ds.version) if t is not None and SHARD_KEY in t.transaction_properties]
    assert len(txs) == shards
    assert max(len(t.operation.fragments) for t in txs) >= 2  # windows were written as they finished
    ids = ds.to_table().column("id").to_pylist()
    assert sorted(ids) == sorted(small_table.column("id").to_pylist())


# ---- the ledger under Lance maintenance, kills around a commit, and outputs of the old format ----

# Commits one shard of string ids through the store, in a process of its own: with the fault hook
# EMBEDKIT_TEST_KILL_AT it dies by SIGKILL at that point, as a run killed there would.
CHILD = """
import sys
import numpy as np, pyarrow as pa
from embedkit.io.store import VectorStore, vectors_schema, vectors_table
out, shard, ids = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
schema = vectors_schema(pa.string(), 4, "float16")
n = len(ids)
rows = vectors_table(schema, pa.array(ids), np.ones((n, 4), np.float16), np.full(n, 3, np.int32), np.zeros(n, bool))
VectorStore(out).commit_shard(shard, rows)
"""


def _commit_killed(out, shard: int, ids: list[str], phase: str) -> None:
    """Commit `shard` in a child that SIGKILLs itself at `phase` ("intent": its record of intent
    written, the Lance commit not made; "commit": the Lance commit made, the shard not recorded)."""
    env = dict(os.environ, EMBEDKIT_TEST_KILL_AT=f"{phase}:{shard}")
    p = subprocess.run([sys.executable, "-c", CHILD, str(out), str(shard), ",".join(ids)], env=env, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-2000:])


def _maintain(store: VectorStore) -> None:
    """What LanceDB's optimize(cleanup_older_than=0) does: compact, then remove every old version."""
    lance.dataset(store.uri).optimize.compact_files()
    lance.dataset(store.uri).cleanup_old_versions(older_than=timedelta(0))


def test_ledger_survives_compaction_and_version_cleanup(tmp_path):
    store = VectorStore(tmp_path)
    schema = vectors_schema(pa.string(), 4, "float16")
    store.create(schema)
    store.commit_shard(0, _table(schema, ["a", "b"]), started=100.0)
    store.commit_shard(1, _table(schema, ["c"]), started=101.0, quarantined=["nan-1"])
    store.commit_fragments(2, [])  # a shard of only empty texts: no rows, still done
    log = store.commit_log()
    _maintain(store)
    ds = lance.dataset(store.uri)
    assert len(ds.get_fragments()) == 1 and len(ds.versions()) == 1  # rewritten, and the history is gone
    assert store.committed_shards() == {0: 2, 1: 1, 2: 0}
    assert store.quarantined() == ["nan-1"]
    assert store.commit_log() == log and [e["started"] for e in log] == [100.0, 101.0, None]
    store.remove_uncommitted()  # the next run's start: nothing is dropped, nothing redone
    assert store.committed_shards() == {0: 2, 1: 1, 2: 0}
    assert sorted(ds.to_table().column("id").to_pylist()) == ["a", "b", "c"]


def test_a_kill_around_the_lance_commit_is_resolved(tmp_path):
    """Shard 1 killed right after its Lance commit, shard 2 right before it: read as committed
    and not committed, from the files the current version references and the commit history;
    then, once compaction and cleanup have removed both, from the dataset's row count."""
    store = VectorStore(tmp_path / "out")
    schema = vectors_schema(pa.string(), 4, "float16")
    store.create(schema)
    store.commit_shard(0, _table(schema, ["a", "b"]))
    _commit_killed(store.path.parent, 1, ["c", "d", "e"], "commit")
    _commit_killed(store.path.parent, 2, ["f", "g"], "intent")
    assert lance.dataset(store.uri).count_rows() == 5
    assert store.committed_shards() == {0: 2, 1: 3}

    maintained = VectorStore(tmp_path / "maintained")
    shutil.copytree(store.path.parent, maintained.path.parent)
    _maintain(maintained)
    assert maintained.committed_shards() == {0: 2, 1: 3}  # 5 rows: shard 1's 3 are in, shard 2's 2 are not

    for s in (store, maintained):  # under the run's lock: the outcome is written down, the records of intent go
        s.remove_uncommitted()
        _maintain(s)
        assert s.committed_shards() == {0: 2, 1: 3}
        s.commit_shard(2, _table(schema, ["f", "g"]))  # the rerun redoes shard 2
        assert sorted(lance.dataset(s.uri).to_table().column("id").to_pylist()) == list("abcdefg")
        assert s.committed_shards() == {0: 2, 1: 3, 2: 2}


def test_an_unknowable_kill_is_refused_in_one_line(tmp_path):
    """Two shards of equal rows killed around their commits, then the history removed: which of
    them landed cannot be told from 2 extra rows. The store refuses rather than guess."""
    store = VectorStore(tmp_path)
    schema = vectors_schema(pa.string(), 4, "float16")
    store.create(schema)
    store.commit_shard(2, _table(schema, ["e"]))
    _commit_killed(tmp_path, 0, ["a", "b"], "commit")
    _commit_killed(tmp_path, 1, ["c", "d"], "intent")
    assert store.committed_shards() == {0: 2, 2: 1}  # with the history, it is known
    _maintain(store)  # shard 0's file merged with shard 2's: its own name is gone
    with pytest.raises(EmbedkitError, match=r"cannot tell whether shards 0, 1 .*--overwrite") as e:
        store.remove_uncommitted()
    assert "\n" not in str(e.value)
    assert lance.dataset(store.uri).count_rows() == 3  # nothing was dropped or redone


def _old_format_output(uri: str, schema: pa.Schema) -> None:
    """A dataset as embedkit wrote it before the ledger had files of its own: each shard one
    Append whose transaction properties name it, a repair one Delete naming the shards dropped."""
    lance.write_dataset(schema.empty_table(), uri, schema=schema, mode="create")
    for shard, ids in [(0, ["a", "b"]), (1, ["c"]), (2, ["d"])]:
        frags = write_fragments(_table(schema, ids), uri, schema=schema)
        props = {"embedkit.shard": str(shard), "embedkit.worker": "host:1", "embedkit.started": "10.000", "embedkit.committed": "11.000"}
        if shard == 1:
            props["embedkit.quarantined"] = '["q"]'
        lance.LanceDataset.commit(uri, Transaction(read_version=lance.dataset(uri).version, operation=lance.LanceOperation.Append(frags),
                                                   transaction_properties=props))  # fmt: skip
    ds = lance.dataset(uri)
    last = ds.get_fragments()[-1].fragment_id
    op = lance.LanceOperation.Delete(updated_fragments=[], deleted_fragment_ids=[last], predicate="embedkit: damaged data files")
    lance.LanceDataset.commit(uri, Transaction(read_version=ds.version, operation=op, transaction_properties={"embedkit.dropped": "2"}))


def test_old_format_output_is_read_then_migrated(tmp_path):
    store = VectorStore(tmp_path)
    schema = vectors_schema(pa.string(), 4, "float16")
    _old_format_output(store.uri, schema)
    assert store.committed_shards() == {0: 2, 1: 1}  # read from the transactions, nothing written
    assert not store.ledger_path.exists()
    store.remove_uncommitted()  # the first open under a run's lock migrates it
    assert store.ledger_path.is_dir()
    _maintain(store)
    assert store.committed_shards() == {0: 2, 1: 1}
    assert store.quarantined() == ["q"]
    assert [(e["shard"], e["worker"], e["started"], e["committed"]) for e in store.commit_log()] == [(0, "host:1", 10.0, 11.0), (1, "host:1", 10.0, 11.0)]


def test_old_format_output_whose_history_was_removed_is_refused(tmp_path):
    store = VectorStore(tmp_path)
    schema = vectors_schema(pa.string(), 4, "float16")
    _old_format_output(store.uri, schema)
    lance.dataset(store.uri).cleanup_old_versions(older_than=timedelta(0))
    with pytest.raises(EmbedkitError, match="older embedkit.*--overwrite") as e:
        store.committed_shards()
    assert "\n" not in str(e.value)
    with pytest.raises(EmbedkitError, match="older embedkit.*--overwrite"):
        store.remove_uncommitted()
    assert not store.ledger_path.exists()


def test_rows_the_ledger_does_not_record_refuse_the_resume(tmp_path):
    """A shard's record removed by hand: its rows are still in the dataset, so redoing the
    shard would store them twice. The run's start refuses instead."""
    store = VectorStore(tmp_path)
    schema = vectors_schema(pa.string(), 4, "float16")
    store.create(schema)
    store.commit_shard(0, _table(schema, ["a", "b"]))
    store.commit_shard(1, _table(schema, ["c"]))
    (record,) = [p for p in store.ledger_path.iterdir() if p.name.startswith("shard-") and "00001" in p.name]
    record.unlink()
    assert store.committed_shards() == {0: 2}
    with pytest.raises(EmbedkitError, match="holds 3 rows but its ledger .* records 2.*--overwrite"):
        store.remove_uncommitted()
