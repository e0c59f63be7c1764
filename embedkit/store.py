"""The Lance vector store: one commit per finished shard, and the ledger of committed shards.

A shard's rows are written as data fragments first and become visible only through one commit
whose transaction carries the shard's index (`embedkit.shard`). So a shard is in or it is not,
and the set of committed shards is read from the dataset's own transactions: there is no second
ledger that could disagree with the data. Fragments written by a killed run belong to no commit;
they are invisible to readers and are deleted by `remove_uncommitted` under the run's lock.

A committed shard whose data files were damaged later (missing, or not the size its commit
recorded) no longer counts as done; the next run removes its fragments in one commit
(`embedkit.dropped`) and redoes it. Storage errors (a full disk, a file-size limit) become
one-line `EmbedkitError`s: what is committed stays, and rerunning resumes.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .errors import EmbedkitError

VECTORS_DIR = "vectors.lance"
GENERATIONS_DIR = "generations.lance"  # what `embedkit generate` writes instead
SHARD_KEY = "embedkit.shard"
WORKER_KEY = "embedkit.worker"  # host:pid of the process that committed
STARTED_KEY = "embedkit.started"
COMMITTED_KEY = "embedkit.committed"
DROPPED_KEY = "embedkit.dropped"  # shards whose damaged fragments a repair removed (comma-separated)
QUARANTINED_KEY = "embedkit.quarantined"  # JSON list of ids left out of the shard (non-finite vectors)
BASE_COLUMNS = ("id", "vector", "n_tokens", "truncated")  # what every vectors.lance holds, first
# Fragments of about this many rows: large sequential files for readers and the index build.
MAX_ROWS_PER_FILE = 1 << 20


def vectors_schema(id_type: pa.DataType, dim: int, dtype: str, *, text: bool = False, kept: tuple[pa.Field, ...] = ()) -> pa.Schema:
    """id, vector (fixed_size_list<float16|float32>[dim]), n_tokens, truncated; then the
    document's `text` (when `text` is true) and the kept input columns, with their input types.

    >>> vectors_schema(pa.string(), 4, "float16", text=True).names
    ['id', 'vector', 'n_tokens', 'truncated', 'text']
    """
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [
            pa.field("id", id_type, nullable=False),
            pa.field("vector", pa.list_(value, dim)),
            pa.field("n_tokens", pa.int32()),
            pa.field("truncated", pa.bool_()),
            *([pa.field("text", pa.string())] if text else []),
            *kept,
        ]
    )


def stored_columns(schema: pa.Schema) -> list[str]:
    """The columns stored beside the vectors: `text` and the kept input columns, in schema order."""
    return schema.names[len(BASE_COLUMNS):]


def vectors_table(schema: pa.Schema, ids: pa.Array, vectors: np.ndarray, n_tokens: np.ndarray, truncated: np.ndarray,
                  columns: pa.Table | None = None) -> pa.Table:  # fmt: skip
    """Assemble a shard's rows; vectors is (rows, dim) in the schema's value type. `columns`
    holds the rows' stored columns (`stored_columns(schema)`), in the same row order."""
    vtype = schema.field("vector").type
    dim = vtype.list_size
    flat = pa.array(np.ascontiguousarray(vectors).reshape(-1), type=vtype.value_type)
    return pa.table(
        {
            "id": ids.cast(schema.field("id").type),
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
            "n_tokens": pa.array(n_tokens, pa.int32()),
            "truncated": pa.array(truncated, pa.bool_()),
            **{name: columns.column(name) for name in stored_columns(schema)},
        },
        schema=schema,
    )


@dataclass(frozen=True)
class _Commit:
    """What one shard's commit recorded."""

    rows: int
    files: list[str]
    quarantined: list


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

        try:
            lance.write_dataset(schema.empty_table(), self.uri, schema=schema, mode="create")
        except OSError as e:
            raise self._storage_error(e) from None

    def committed_shards(self, ds: Any = None) -> dict[int, int]:
        """Shard index -> rows it committed, read from the dataset's transactions (of `ds`, an
        opened version of this dataset, else the latest).

        A shard whose data files are damaged (missing or resized since its commit) is left
        out: it is not done, and the next run redoes it (see `remove_uncommitted`).
        """
        ds = ds if ds is not None else self.dataset()
        ledger = self._ledger(ds)
        damaged = self._damaged_shards(ds, ledger)
        return {shard: c.rows for shard, c in ledger.items() if shard not in damaged}

    def quarantined(self) -> list:
        """Ids left out of committed shards because their vectors were not finite, in shard order."""
        ledger = self._ledger(self.dataset())
        return [i for shard in sorted(ledger) for i in ledger[shard].quarantined]

    def _ledger(self, ds: Any) -> dict[int, _Commit]:
        """Shard -> its commit (rows, data file names, quarantined ids), replaying commits and
        repairs oldest first."""
        ledger: dict[int, _Commit] = {}
        for tx in _oldest_first(ds):
            props = _props(tx)
            if SHARD_KEY in props:
                frags = tx.operation.fragments
                files = [f.path for frag in frags for f in frag.files]
                quarantined = json.loads(props.get(QUARANTINED_KEY, "[]"))
                ledger[int(props[SHARD_KEY])] = _Commit(sum(f.physical_rows for f in frags), files, quarantined)
            for shard in _dropped(props):
                ledger.pop(shard, None)
        return ledger

    def _damaged_files(self, ds: Any) -> dict[str, int]:
        """Data file name -> fragment id, for referenced files that are missing or not the size
        their commit recorded (a stat per file: no data is read)."""
        data = self.path / "data"
        if not data.is_dir():  # not a local dataset: nothing to stat
            return {}
        bad = {}
        for frag in ds.get_fragments():
            for f in frag.data_files():
                expected = getattr(f, "file_size_bytes", None)
                try:
                    size = os.stat(data / f.path).st_size
                except FileNotFoundError:
                    size = -1
                if size < 0 or (expected and size != expected):
                    bad[f.path] = frag.fragment_id
        return bad

    def _damaged_shards(self, ds: Any, ledger: dict[int, _Commit]) -> set[int]:
        bad = self._damaged_files(ds)
        if not bad:
            return set()
        return {shard for shard, c in ledger.items() if any(f in bad for f in c.files)}

    def drop_damaged(self) -> list[int]:
        """Remove every fragment of each shard with a damaged data file, in one commit that
        records those shards as dropped (so they are redone); returns the shards."""
        import lance
        from lance.dataset import Transaction

        ds = self.dataset()
        ledger = self._ledger(ds)
        shards = sorted(self._damaged_shards(ds, ledger))
        if not shards:
            return []
        files = {f for shard in shards for f in ledger[shard].files}
        ids = sorted({frag.fragment_id for frag in ds.get_fragments() for f in frag.data_files() if f.path in files})
        op = lance.LanceOperation.Delete(updated_fragments=[], deleted_fragment_ids=ids, predicate="embedkit: damaged data files")
        tx = Transaction(read_version=ds.version, operation=op, transaction_properties={DROPPED_KEY: ",".join(map(str, shards))})
        try:
            lance.LanceDataset.commit(self.uri, tx)
        except OSError as e:
            raise self._storage_error(e) from None
        return shards

    def write_fragments(self, table: pa.Table) -> list:
        """Write rows as data fragments that no version references yet (invisible to readers)."""
        from lance.fragment import write_fragments

        try:
            return write_fragments(table, self.uri, schema=table.schema, max_rows_per_file=MAX_ROWS_PER_FILE)
        except OSError as e:
            raise self._storage_error(e) from None

    def _storage_error(self, e: OSError) -> EmbedkitError:
        """A write that storage refused (full disk, file-size limit, read-only): one line, and
        the promise a rerun keeps, since nothing uncommitted is ever visible."""
        return EmbedkitError(f"cannot write to {self.uri}: {storage_reason(e)}; committed shards are kept: "
                             "free space (or fix the path) and rerun the same command to resume")  # fmt: skip

    def commit_fragments(self, shard: int, fragments: list, started: float | None = None, quarantined: list | None = None) -> int:
        """Make a shard's fragments visible in one commit that records the shard; returns the version.

        The commit also records who committed it and when the shard started and ended (epoch
        seconds): the run's timeline (`embedkit status OUT --plot`); and the ids of rows left
        out because their vectors were not finite (`quarantined`).
        """
        import lance
        from lance.dataset import Transaction

        props = {SHARD_KEY: str(shard), WORKER_KEY: f"{socket.gethostname()}:{os.getpid()}"}
        if started is not None:
            props[STARTED_KEY] = f"{started:.3f}"
        if quarantined:
            props[QUARANTINED_KEY] = json.dumps(list(quarantined))

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
                    if isinstance(e, OSError):
                        raise self._storage_error(e) from None
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def commit_shard(self, shard: int, table: pa.Table, started: float | None = None, quarantined: list | None = None) -> int:
        """Write and commit a whole shard at once."""
        return self.commit_fragments(shard, self.write_fragments(table), started, quarantined)

    def commit_log(self) -> list[dict]:
        """Per committed shard: index, rows, worker, started and committed (epoch seconds; None if not recorded)."""
        ds = self.dataset()
        log = []
        for tx in ds.get_transactions(ds.version):
            props = _props(tx)
            if SHARD_KEY in props:
                log.append({
                    "shard": int(props[SHARD_KEY]), "rows": sum(f.physical_rows for f in tx.operation.fragments),
                    "worker": props.get(WORKER_KEY), "started": _float(props.get(STARTED_KEY)), "committed": _float(props.get(COMMITTED_KEY)),
                })  # fmt: skip
        return sorted(log, key=lambda e: e["shard"])

    def remove_uncommitted(self) -> int:
        """Delete data files that no version references (left by a killed run); returns bytes freed.

        Shards whose data files were damaged are dropped first (`drop_damaged`), so the run
        redoes them. Only safe while no other writer is active, which the run's lock
        guarantees. Every version is kept, since the versions' transactions are the ledger of
        committed shards.
        """
        self.drop_damaged()
        stats = self.dataset().cleanup_old_versions(retain_versions=1 << 30, delete_unverified=True)
        return int(getattr(stats, "bytes_removed", 0))

    def damaged_files(self, ds: Any = None) -> list[str]:
        """Data files of the latest version (or of `ds`) that are missing or not the size their
        commit recorded (a stat per file, no data read)."""
        return sorted(self._damaged_files(ds if ds is not None else self.dataset()))

    def intact_fragments(self, ds: Any) -> list:
        """The fragments of `ds` whose data files are all present at their recorded size."""
        bad = set(self._damaged_files(ds).values())
        return [f for f in ds.get_fragments() if f.fragment_id not in bad]

    def row_stats(self, sums: tuple[str, ...] = ("n_tokens",)) -> tuple[int, dict[str, int]]:
        """(rows, {column: sum}) in the latest version, over intact fragments (a damaged one
        cannot be read); columns of `sums` that the dataset lacks are left out."""
        import pyarrow.compute as pc

        ds = self.dataset()
        frags = self.intact_fragments(ds)
        columns = [c for c in sums if c in ds.schema.names]
        rows = sum(f.count_rows() for f in frags)
        totals = dict.fromkeys(columns, 0)
        if rows and columns:
            for f in frags:
                table = f.to_table(columns=columns)
                for c in columns:
                    totals[c] += int(pc.sum(table.column(c)).as_py() or 0)
        return rows, totals


def _float(text: str | None) -> float | None:
    return float(text) if text is not None else None


def _props(tx: Any) -> dict:
    return (getattr(tx, "transaction_properties", None) or {}) if tx is not None else {}


def _oldest_first(ds: Any) -> list:
    """The dataset's transactions in commit order (pylance lists the latest first)."""
    return list(reversed(ds.get_transactions(ds.version)))


def _dropped(props: dict) -> list[int]:
    return [int(s) for s in props.get(DROPPED_KEY, "").split(",") if s]


def storage_reason(e: OSError) -> str:
    """The operating system's words for a failed write, without Lance's source locations.

    >>> storage_reason(OSError("LanceError(IO): File too large (os error 27), /src/writer.rs:254:9"))
    'File too large (os error 27)'
    """
    if e.strerror:
        return e.strerror
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    if text.startswith("LanceError(") and "): " in text:
        text = text.split("): ", 1)[1]
    return text.split(", /", 1)[0]
