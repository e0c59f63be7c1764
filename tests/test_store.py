"""The Lance store: one commit per shard, the ledger read from transactions, orphan cleanup."""

from __future__ import annotations

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedkit.config import EncodeConfig
from embedkit.pipeline import run_encode
from embedkit.store import SHARD_KEY, VectorStore, vectors_schema, vectors_table


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
    # every version survives the cleanup: their transactions are the ledger
    assert store.committed_shards() == {0: 1}


def test_a_shard_of_many_windows_is_one_commit(tmp_path, small_table):
    inp = tmp_path / "in.parquet"
    pq.write_table(small_table, inp)
    cfg = EncodeConfig(device="cpu", shard_rows=12, window_docs=5, tokenize_workers=0, progress=False)
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
