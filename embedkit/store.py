"""The Lance vector store: one commit per finished shard, and the ledger of committed shards.

A shard's rows are written as data fragments first and become visible only through one commit
whose transaction carries the shard's index (`embedkit.shard`). So a shard is in or it is not,
and the set of committed shards is read from the dataset's own transactions: there is no second
ledger that could disagree with the data. Fragments written by a killed run belong to no commit;
they are invisible to readers and are deleted by `remove_uncommitted` under the run's lock.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from .errors import EmbedkitError

VECTORS_DIR = "vectors.lance"
SHARD_KEY = "embedkit.shard"
WORKER_KEY = "embedkit.worker"  # host:pid of the process that committed
STARTED_KEY = "embedkit.started"
COMMITTED_KEY = "embedkit.committed"
# Fragments of about this many rows: large sequential files for readers and the index build.
MAX_ROWS_PER_FILE = 1 << 20


def vectors_schema(id_type: pa.DataType, dim: int, dtype: str) -> pa.Schema:
    """id, vector (fixed_size_list<float16|float32>[dim]), n_tokens, truncated."""
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [
            pa.field("id", id_type, nullable=False),
            pa.field("vector", pa.list_(value, dim)),
            pa.field("n_tokens", pa.int32()),
            pa.field("truncated", pa.bool_()),
        ]
    )


def vectors_table(schema: pa.Schema, ids: pa.Array, vectors: np.ndarray, n_tokens: np.ndarray, truncated: np.ndarray) -> pa.Table:
    """Assemble a shard's rows; vectors is (rows, dim) in the schema's value type."""
    vtype = schema.field("vector").type
    dim = vtype.list_size
    flat = pa.array(np.ascontiguousarray(vectors).reshape(-1), type=vtype.value_type)
    return pa.table(
        {
            "id": ids.cast(schema.field("id").type),
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
            "n_tokens": pa.array(n_tokens, pa.int32()),
            "truncated": pa.array(truncated, pa.bool_()),
        },
        schema=schema,
    )


class VectorStore:
    """OUT/vectors.lance."""

    def __init__(self, out: Path, name: str = VECTORS_DIR):
        self.uri = str(Path(out) / name)
        self.path = Path(self.uri)

    def exists(self) -> bool:
        return (self.path / "_versions").is_dir()

    def dataset(self):  # -> lance.LanceDataset
        import lance

        try:
            return lance.dataset(self.uri)
        except Exception as e:
            first = (str(e).strip() or type(e).__name__).splitlines()[0]
            raise EmbedkitError(f"cannot open {self.uri}: {first}; start fresh with --overwrite") from None

    def create(self, schema: pa.Schema) -> None:
        """An empty dataset with the output schema (version 1): every shard is then an append."""
        import lance

        lance.write_dataset(schema.empty_table(), self.uri, schema=schema, mode="create")

    def committed_shards(self) -> dict[int, int]:
        """Shard index -> rows it committed, read from the dataset's transactions."""
        ds = self.dataset()
        done: dict[int, int] = {}
        for tx in ds.get_transactions(ds.version):
            props = getattr(tx, "transaction_properties", None) or {} if tx is not None else {}
            if SHARD_KEY in props:
                rows = sum(f.physical_rows for f in tx.operation.fragments)
                done[int(props[SHARD_KEY])] = rows
        return done

    def write_fragments(self, table: pa.Table) -> list:
        """Write rows as data fragments that no version references yet (invisible to readers)."""
        from lance.fragment import write_fragments

        return write_fragments(table, self.uri, schema=table.schema, max_rows_per_file=MAX_ROWS_PER_FILE)

    def commit_fragments(self, shard: int, fragments: list, started: float | None = None) -> int:
        """Make a shard's fragments visible in one commit that records the shard; returns the version.

        The commit also records who committed it and when the shard started and ended (epoch
        seconds): the run's timeline (`embedkit status OUT --plot`).
        """
        import lance
        from lance.dataset import Transaction

        props = {SHARD_KEY: str(shard), WORKER_KEY: f"{socket.gethostname()}:{os.getpid()}"}
        if started is not None:
            props[STARTED_KEY] = f"{started:.3f}"

        # Several workers may commit to one dataset; Lance rebases concurrent appends, and a
        # commit that still loses the race is retried on the new latest version.
        for attempt in range(20):
            tx = Transaction(
                read_version=self.dataset().version,
                operation=lance.LanceOperation.Append(fragments),
                transaction_properties={**props, COMMITTED_KEY: f"{time.time():.3f}"},
            )
            try:
                return lance.LanceDataset.commit(self.uri, tx).version
            except Exception as e:  # pylance raises several types for a lost race
                if "onflict" not in str(e) and "etry" not in str(e) or attempt == 19:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def commit_shard(self, shard: int, table: pa.Table, started: float | None = None) -> int:
        """Write and commit a whole shard at once."""
        return self.commit_fragments(shard, self.write_fragments(table), started)

    def commit_log(self) -> list[dict]:
        """Per committed shard: index, rows, worker, started and committed (epoch seconds; None if not recorded)."""
        ds = self.dataset()
        log = []
        for tx in ds.get_transactions(ds.version):
            props = getattr(tx, "transaction_properties", None) or {} if tx is not None else {}
            if SHARD_KEY in props:
                log.append({
                    "shard": int(props[SHARD_KEY]), "rows": sum(f.physical_rows for f in tx.operation.fragments),
                    "worker": props.get(WORKER_KEY), "started": _float(props.get(STARTED_KEY)), "committed": _float(props.get(COMMITTED_KEY)),
                })  # fmt: skip
        return sorted(log, key=lambda e: e["shard"])

    def remove_uncommitted(self) -> int:
        """Delete data files that no version references (left by a killed run); returns bytes freed.

        Only safe while no other writer is active, which the run's lock guarantees. Every
        version is kept, since the versions' transactions are the ledger of committed shards.
        """
        stats = self.dataset().cleanup_old_versions(retain_versions=1 << 30, delete_unverified=True)
        return int(getattr(stats, "bytes_removed", 0))

    def row_stats(self) -> tuple[int, int]:
        """(rows, tokens) in the latest version."""
        import pyarrow.compute as pc

        ds = self.dataset()
        rows = ds.count_rows()
        if rows == 0:
            return 0, 0
        tokens = sum(int(pc.sum(b.column(0)).as_py() or 0) for b in ds.to_batches(columns=["n_tokens"]))
        return rows, tokens


def _float(text: str | None) -> float | None:
    return float(text) if text is not None else None
