"""The Lance vector store: one commit per finished shard, and the ledger of committed shards.

A shard's rows are written as data fragments first and become visible only through one commit
(whose transaction also names the shard, `embedkit.shard`). So a shard is in or it is not.
Which shards are in is kept in a ledger beside the dataset (ledger.py: OUT/vectors.ledger/, a
small file per shard), not read from the dataset's transactions: Lance maintenance (LanceDB's
`optimize()`, compaction, version cleanup) rewrites fragments and removes old transactions,
and must not make finished shards look unfinished. A commit is announced in the ledger
first (a record of intent naming the shard's data files and rows) and recorded after; an
intent left by a kill between the two is settled under the run's lock by whether its commit
landed (`reconcile`). Fragments written by a killed run belong to no commit; they are invisible
to readers and are deleted by `remove_uncommitted` under the run's lock.

A committed shard whose data files were damaged later (missing, or not the size recorded) no
longer counts as done; the next run removes its fragments in one commit (`embedkit.dropped`)
and redoes it. Storage errors (a full disk, a file-size limit) become one-line
`EmbedkitError`s: what is committed stays, and rerunning resumes.

This module is larger than most (about 590 lines) on purpose: `VectorStore`'s commit,
reconcile, repair and cleanup are one protocol over one invariant (a shard is in exactly when
the ledger records it and its data files are whole), and reading it in one place is how it is
checked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..engine.quantize import METADATA_KEY, Quantization
from ..errors import EmbedkitError, first_line
from .ledger import DropRecord, Ledger, LedgerState, ShardRecord

VECTORS_DIR = "vectors.lance"
GENERATIONS_DIR = "generations.lance"  # what `embedkit generate` writes instead
INDEX_DIR = "index"  # what `embedkit build-index` writes (its files: embedkit.index.state)
SHARD_KEY = "embedkit.shard"
WORKER_KEY = "embedkit.worker"  # host:pid of the process that committed
STARTED_KEY = "embedkit.started"
COMMITTED_KEY = "embedkit.committed"
DROPPED_KEY = "embedkit.dropped"  # shards whose damaged fragments a repair removed (comma-separated)
QUARANTINED_KEY = "embedkit.quarantined"  # JSON list of ids left out of the shard (non-finite vectors)
COMMIT_KEY = "embedkit.commit"  # the id of the commit's record of intent in the ledger
KILL_ENV = "EMBEDKIT_TEST_KILL_AT"  # fault injection (tests): see injected_kill
BASE_COLUMNS = ("id", "vector", "n_tokens", "truncated")  # what every vectors.lance holds, first
CHUNK_COLUMNS = ("chunk", "start", "end")  # then, when documents are split: the chunk and its span
# Fragments of about this many rows: large sequential files for readers and the index build.
MAX_ROWS_PER_FILE = 1 << 20


def vectors_schema(id_type: pa.DataType, dim: int, dtype: str, *, text: bool = False, kept: tuple[pa.Field, ...] = (),
                   chunked: bool = False, quantization: Quantization | None = None) -> pa.Schema:  # fmt: skip
    """id, vector (fixed_size_list<float16|float32>[dim]), n_tokens, truncated; when `chunked`,
    the chunk's number in its document and its character span there (chunk, start, end); then
    the document's `text` (when `text` is true) and the kept input columns, with their types.

    >>> vectors_schema(pa.string(), 4, "float16", text=True).names
    ['id', 'vector', 'n_tokens', 'truncated', 'text']
    >>> vectors_schema(pa.int64(), 4, "float16", chunked=True).names
    ['id', 'vector', 'n_tokens', 'truncated', 'chunk', 'start', 'end']
    """
    if quantization is not None:  # int8 or binary codes; how to read them back is on the field
        value = pa.int8() if quantization.kind == "int8" else pa.uint8()
        vector = pa.field("vector", pa.list_(value, quantization.code_width), metadata={METADATA_KEY: quantization.to_json()})
    else:
        vector = pa.field("vector", pa.list_(pa.float16() if dtype == "float16" else pa.float32(), dim))
    return pa.schema(
        [
            pa.field("id", id_type, nullable=False),
            vector,
            pa.field("n_tokens", pa.int32()),
            pa.field("truncated", pa.bool_()),
            *([pa.field(name, pa.int32()) for name in CHUNK_COLUMNS] if chunked else []),
            *([pa.field("text", pa.string())] if text else []),
            *kept,
        ]
    )


def stored_columns(schema: pa.Schema) -> list[str]:
    """The columns stored beside the vectors: `text` and the kept input columns, in schema order."""
    return [name for name in schema.names[len(BASE_COLUMNS):] if name not in CHUNK_COLUMNS]


def chunk_columns(schema: pa.Schema) -> list[str]:
    """chunk, start and end when the output's documents are split into chunks, else nothing."""
    return [name for name in CHUNK_COLUMNS if name in schema.names]


def vectors_table(schema: pa.Schema, ids: pa.Array, vectors: np.ndarray, n_tokens: np.ndarray, truncated: np.ndarray,
                  columns: pa.Table | None = None) -> pa.Table:  # fmt: skip
    """Assemble a shard's rows; vectors is (rows, dim) in the schema's value type. `columns`
    holds the rows' chunk and stored columns (`chunk_columns`, `stored_columns`), in row order."""
    vtype = schema.field("vector").type
    dim = vtype.list_size
    flat = pa.array(np.ascontiguousarray(vectors).reshape(-1), type=vtype.value_type)
    return pa.table(
        {
            "id": ids.cast(schema.field("id").type),
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
            "n_tokens": pa.array(n_tokens, pa.int32()),
            "truncated": pa.array(truncated, pa.bool_()),
            **{name: columns.column(name) for name in chunk_columns(schema) + stored_columns(schema)},
        },
        schema=schema,
    )


@dataclass
class _View:
    """The ledger against one version of the dataset: the committed shards (damaged ones
    included) and those of them whose data files are damaged."""

    done: dict[int, ShardRecord]
    damaged: set[int]


class VectorStore:
    """OUT/vectors.lance (or generations.lance) and its ledger of committed shards."""

    def __init__(self, out: Path, name: str = VECTORS_DIR):
        from .objstore import out_path

        out = out_path(out)  # a local Path, or an s3:// ObjectPath (Lance opens the URI itself)
        self.path = out / name
        self.uri = str(self.path)
        self.ledger = Ledger(out / ledger_name(name))

    @property
    def ledger_path(self) -> Path:
        """The ledger's folder, beside the dataset (OUT/vectors.ledger)."""
        return self.ledger.folder

    def exists(self) -> bool:
        return (self.path / "_versions").is_dir()

    def dataset(self):  # -> lance.LanceDataset
        import lance

        try:
            return lance.dataset(self.uri)
        except Exception as e:
            first = first_line(e)
            raise EmbedkitError(f"cannot open {self.uri}: {first}; start fresh with --overwrite") from None

    def create(self, schema: pa.Schema) -> None:
        """An empty dataset with the output schema (version 1): every shard is then an append.
        A ledger left from a dataset deleted by hand is cleared first: it described other rows."""
        import lance

        self.ledger.clear()
        try:
            lance.write_dataset(schema.empty_table(), self.uri, schema=schema, mode="create")
        except OSError as e:
            raise self._storage_error(e) from None
        self.ledger.create()

    # ---- reading the ledger ----------------------------------------------------------------

    def committed_shards(self, ds: Any = None) -> dict[int, int]:
        """Shard index -> rows it committed, from the ledger checked against `ds` (an opened
        version of this dataset, else the latest).

        A shard whose data files are damaged (missing or resized since its commit) is left
        out: it is not done, and the next run redoes it (see `drop_damaged`).
        """
        view = self._view(ds)
        return {shard: r.rows for shard, r in sorted(view.done.items()) if shard not in view.damaged}

    def quarantined(self) -> list:
        """Ids left out of committed shards because their vectors were not finite, in shard order."""
        done = self._view().done
        return [i for shard in sorted(done) for i in done[shard].quarantined]

    def commit_log(self) -> list[dict]:
        """Per committed shard: index, rows, worker, started and committed (epoch seconds; None if not recorded)."""
        return [{"shard": shard, "rows": r.rows, "worker": r.worker, "started": r.started, "committed": r.committed}
                for shard, r in sorted(self._view().done.items())]  # fmt: skip

    def _view(self, ds: Any = None) -> _View:
        """The ledger as it stands now. Read-only: a leftover intent is judged, not settled
        (that needs the lock: `reconcile`), and an output of an older embedkit, not yet
        migrated, is read from its transactions."""
        # the ledger first, then the dataset: a commit landing in between is then seen as
        # landed rather than missed
        state = self.ledger.read() if self.ledger.exists() else None
        ds = ds if ds is not None else self.dataset()
        if state is None:
            state = LedgerState(self._replayed(ds), {})
        done, _ = self._resolve(ds, state)
        damaged, _ = self._damage(ds, done)
        return _View(done, damaged)

    # ---- settling the ledger (under the output lock) -----------------------------------------

    def reconcile(self) -> None:
        """Bring the ledger up to date; call only under the output lock, with no writer active.

        An output of an older embedkit (its shards recorded only in Lance's transactions) is
        migrated. Each record of intent a killed run left is settled: the shard recorded as
        committed if its commit landed, the intent removed either way; likewise a repair
        (`drop.json`) that was interrupted. Raises a one-line EmbedkitError where the outcome
        cannot be known.
        """
        if not self.exists():
            return
        if not self.ledger.exists():
            self._migrate()
        self.ledger.remove_temporaries()
        state = self.ledger.read()
        if not state.intents and state.drop is None:
            return
        done, drop_landed = self._resolve(self.dataset(), state)
        if state.drop is not None:
            for shard in state.drop.shards if drop_landed else ():
                self.ledger.remove_record(shard)
            self.ledger.remove_drop()
        for shard in state.intents:
            if shard in done and shard not in state.records:  # its commit landed
                self.ledger.write_record(done[shard])
            self.ledger.remove_intent(shard)

    def _migrate(self) -> None:
        """Write the ledger of an output made before it existed, from the dataset's transactions.
        The marker goes last: a migration killed halfway is done again from the start."""
        records = self._replayed(self.dataset())
        self.ledger.clear()
        for rec in records.values():
            self.ledger.write_record(rec)
        self.ledger.create()

    def _replayed(self, ds: Any) -> dict[int, ShardRecord]:
        """Shard -> record, replaying the transactions oldest first (commits and repairs), as
        embedkit read its ledger before it had files of its own."""
        txs, complete = _history(ds, 0)
        records: dict[int, ShardRecord] = {}
        for tx in reversed(txs):  # pylance lists the latest first
            props = _props(tx)
            if SHARD_KEY in props:
                rec = _record_of(tx, props)
                records[rec.shard] = rec
            for shard in _dropped(props):
                records.pop(shard, None)
        rows = ds.count_rows()
        if not complete and sum(r.rows for r in records.values()) != rows:
            raise EmbedkitError(
                f"{self.uri} was written by an older embedkit, which recorded its finished shards only in Lance's version "
                f"history, and that history has since been removed (by optimize() or cleanup_old_versions); which of its "
                f"{rows:,} rows belong to which shard is unknown: start fresh with --overwrite"
            )  # fmt: skip
        return records

    def _resolve(self, ds: Any, state: LedgerState) -> tuple[dict[int, ShardRecord], bool | None]:
        """The committed shards once the leftovers of killed runs are judged, and whether an
        interrupted repair landed (None: there was none)."""
        referenced = {f.path for frag in ds.get_fragments() for f in frag.data_files()}
        done = dict(state.records)
        drop_landed = None
        if state.drop is not None:
            # a repair removes whole fragments: it landed when none of its files is referenced
            drop_landed = not set(state.drop.files) & referenced
            for shard in state.drop.shards if drop_landed else ():
                done.pop(shard, None)
        unknown = []
        for shard, intent in sorted(state.intents.items()):
            if shard in done:  # recorded after all: the intent is a leftover
                continue
            landed = self._landed(ds, intent, referenced)
            if landed is None:
                unknown.append(intent)
            elif landed:
                done[shard] = landed
        if unknown:
            done.update(self._by_rows(ds, done, unknown))
        return done, drop_landed

    def _landed(self, ds: Any, intent: ShardRecord, referenced: set[str]) -> ShardRecord | bool | None:
        """Whether the commit an intent announced landed: its record if it did, False if it did
        not, None when neither the files nor the history can tell (compacted and cleaned since)."""
        txs, complete = _history(ds, intent.read_version)
        for tx in txs:
            props = _props(tx)
            if props.get(COMMIT_KEY) == intent.commit_id:
                return replace(intent, committed=_float(props.get(COMMITTED_KEY)))
        if any(f in referenced for f in intent.files):  # uuid-named: only this commit can reference them
            return intent
        if complete:  # every commit since the intent was written is known, and none was this one
            return False
        if not intent.files:  # no rows: either answer leaves the same rows, so the shard is done
            return intent
        return None

    def _by_rows(self, ds: Any, done: dict[int, ShardRecord], unknown: list[ShardRecord]) -> dict[int, ShardRecord]:
        """The intents whose commits landed, told by the dataset's row count against the
        ledger's, when exactly one choice of them accounts for the extra rows; else a refusal."""
        extra = ds.count_rows() - sum(r.rows for r in done.values())
        fits = []
        if len(unknown) <= 12:  # a handful at most: one per writer killed at that moment
            fits = [c for n in range(len(unknown) + 1) for c in combinations(unknown, n) if sum(r.rows for r in c) == extra]
        if len(fits) == 1:
            return {r.shard: r for r in fits[0]}
        shards = [r.shard for r in unknown]
        which = f"shard {shards[0]} was" if len(shards) == 1 else f"shards {', '.join(map(str, shards))} were"
        raise EmbedkitError(
            f"cannot tell whether {which} committed before a run was killed: Lance maintenance has since rewritten "
            f"their files and removed the history, and the row count of {self.uri} ({extra:+,} beyond the recorded "
            f"shards) fits {'none' if not fits else 'more than one'} of the answers; start fresh with --overwrite"
        )  # fmt: skip

    # ---- damaged data files ------------------------------------------------------------------

    def _damage(self, ds: Any, done: dict[int, ShardRecord]) -> tuple[set[int], set[str]]:
        """The committed shards that are not whole, and the data files a repair removes.

        A shard is damaged when one of its own files is missing or not the size recorded.
        Compaction merges shards' files into files no shard wrote: when one of those (or a
        remaining file of a shard partly compacted) is damaged, which shards' rows it held is
        unknown, so every shard whose files were rewritten is redone, and every file holding
        their rows goes: nothing is stored twice, nothing is lost.
        """
        files = self._data_files(ds)
        owner = {path: shard for shard, r in done.items() for path in r.files}
        bad = self._bad_files(files, {p: done[s].files[p] for p, s in owner.items()})
        damaged = {owner[p] for p in bad if p in owner}
        moved = {shard for shard, r in done.items() if any(p not in files for p in r.files)}
        if any(p not in owner for p in bad) or damaged & moved:
            damaged |= moved
            drop = {p for p in files if p not in owner or owner[p] in damaged}
        else:
            drop = {p for p in files if p in owner and owner[p] in damaged}
        return damaged, drop

    def _data_files(self, ds: Any) -> dict[str, tuple[int, int | None]]:
        """Referenced data file -> (its fragment's id, the size the manifest records)."""
        return {f.path: (frag.fragment_id, getattr(f, "file_size_bytes", None)) for frag in ds.get_fragments() for f in frag.data_files()}

    def _bad_files(self, files: dict[str, tuple[int, int | None]], recorded: dict[str, int | None]) -> set[str]:
        """The files that are missing, or not the size the manifest or the ledger recorded (a
        stat per file: no data is read)."""
        data = self.path / "data"
        listed = _object_sizes(data)  # one listing on object storage, not a request per file
        if listed is None and not data.is_dir():  # no data folder to stat
            return set()
        bad = set()
        for path, (_, expected) in files.items():
            try:
                size = listed.get(path, -1) if listed is not None else os.stat(data / path).st_size
            except FileNotFoundError:
                size = -1
            if size < 0 or any(want and size != want for want in (expected, recorded.get(path))):
                bad.add(path)
        return bad

    def drop_damaged(self) -> list[int]:
        """Remove every fragment of each damaged shard (see `_damage`) in one commit that
        records those shards as dropped, then forget them (so they are redone); returns the
        shards. Under the output lock, after `reconcile`.

        The repair is announced first (drop.json, naming its files): killed after the Lance
        commit, it is finished by the next `reconcile`; before it, it is found again.
        """
        ds = self.dataset()
        done = self.ledger.read().records
        damaged, drop_files = self._damage(ds, done)
        if not damaged:
            return []
        frags = [f for f in ds.get_fragments() if any(d.path in drop_files for d in f.data_files())]
        self._check_drop_rows(frags, sum(done[s].rows for s in damaged))
        drop = DropRecord(sorted(damaged), sorted(drop_files), uuid.uuid4().hex)
        self.ledger.write_drop(drop)
        if frags:
            self._commit_drop(ds, [f.fragment_id for f in frags], drop)
        injected_kill("drop", drop.shards)
        for shard in drop.shards:
            self.ledger.remove_record(shard)
        self.ledger.remove_drop()
        return drop.shards

    def _check_drop_rows(self, frags: list, rows: int) -> None:
        """The fragments a repair removes must hold exactly the dropped shards' rows: more
        would be rows no shard record accounts for (written by something else)."""
        held = sum(f.metadata.physical_rows for f in frags)
        if held != rows:
            raise EmbedkitError(
                f"{self.uri} has damaged data files whose fragments hold {held:,} rows where the shards to redo had "
                f"{rows:,}; repairing would lose or duplicate rows: start fresh with --overwrite"
            )  # fmt: skip

    def _commit_drop(self, ds: Any, fragment_ids: list[int], drop: DropRecord) -> None:
        import lance
        from lance.dataset import Transaction

        op = lance.LanceOperation.Delete(updated_fragments=[], deleted_fragment_ids=fragment_ids, predicate="embedkit: damaged data files")
        props = {DROPPED_KEY: ",".join(map(str, drop.shards)), COMMIT_KEY: drop.commit_id}
        try:
            lance.LanceDataset.commit(self.uri, Transaction(read_version=ds.version, operation=op, transaction_properties=props))
        except OSError as e:
            raise self._storage_error(e) from None

    # ---- writing ----------------------------------------------------------------------------

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
        """Make a shard's fragments visible in one commit and record the shard; returns the version.

        Three steps, each safe to be killed after: the record of intent (the shard's data
        files, rows, quarantined ids, worker and start), the Lance commit (its transaction names
        the shard and the intent's id), the shard's record. A kill between them leaves an intent
        that `reconcile` settles. The record also keeps the run's timeline (`embedkit status
        OUT --plot`) and the ids left out because their vectors were not finite.
        """
        if not self.ledger.exists():
            raise EmbedkitError(f"{self.uri} has no ledger ({self.ledger_path}); rerun the command that wrote it")
        ds = self.dataset()
        worker = f"{socket.gethostname()}:{os.getpid()}"
        intent = ShardRecord(shard=shard, rows=sum(f.physical_rows for f in fragments), files=self._file_sizes(fragments),
                             commit_id=uuid.uuid4().hex, read_version=ds.version, quarantined=list(quarantined or []),
                             worker=worker, started=started)  # fmt: skip
        self.ledger.write_intent(intent)
        injected_kill("intent", [shard])
        props = {SHARD_KEY: str(shard), WORKER_KEY: worker, COMMIT_KEY: intent.commit_id}
        if started is not None:
            props[STARTED_KEY] = f"{started:.3f}"
        if quarantined:
            props[QUARANTINED_KEY] = json.dumps(list(quarantined))
        version, committed = self._append(fragments, props, ds.version)
        injected_kill("commit", [shard])
        self.ledger.write_record(replace(intent, committed=committed))
        self.ledger.remove_intent(shard)
        return version

    def _file_sizes(self, fragments: list) -> dict[str, int | None]:
        """Data file -> bytes, as Lance recorded it when writing (else from the file itself)."""
        sizes = {}
        for frag in fragments:
            for f in frag.files:
                size = getattr(f, "file_size_bytes", None)
                sizes[f.path] = size if size else (self.path / "data" / f.path).stat().st_size
        return sizes

    def _append(self, fragments: list, props: dict, read_version: int) -> tuple[int, float]:
        """Commit an Append of `fragments`; returns (version, commit time). Several workers may
        commit to one dataset; Lance rebases concurrent appends, and a commit that still loses
        the race is retried on the new latest version."""
        import lance
        from lance.dataset import Transaction

        for attempt in range(20):
            committed = time.time()
            tx = Transaction(read_version=read_version, operation=lance.LanceOperation.Append(fragments),
                             transaction_properties={**props, COMMITTED_KEY: f"{committed:.3f}"})  # fmt: skip
            try:
                return lance.LanceDataset.commit(self.uri, tx).version, round(committed, 3)
            except Exception as e:  # pylance raises several types for a lost race
                if "onflict" not in str(e) and "etry" not in str(e) or attempt == 19:
                    if isinstance(e, OSError):
                        raise self._storage_error(e) from None
                    raise
                time.sleep(0.05 * (attempt + 1))
                read_version = self.dataset().version
        raise AssertionError("unreachable")

    def commit_shard(self, shard: int, table: pa.Table, started: float | None = None, quarantined: list | None = None) -> int:
        """Write and commit a whole shard at once."""
        return self.commit_fragments(shard, self.write_fragments(table), started, quarantined)

    def remove_uncommitted(self) -> int:
        """Settle the ledger (`reconcile`), drop damaged shards (`drop_damaged`, so the run
        redoes them), check that the ledger accounts for every row, and delete data files that
        no version references (left by a killed run); returns bytes freed.

        Only safe while no other writer is active, which the run's lock guarantees. Old versions
        are kept: the ledger does not need them, but a retained history settles a killed run's
        intent without counting rows. Users may remove them (LanceDB's optimize) at any time.
        """
        self.reconcile()
        self.drop_damaged()
        self._check_accounted()
        stats = self.dataset().cleanup_old_versions(retain_versions=1 << 30, delete_unverified=True)
        return int(getattr(stats, "bytes_removed", 0))

    def damaged_files(self, ds: Any = None) -> list[str]:
        """Data files of the latest version (or of `ds`) that are missing or not the size their
        commit recorded (a stat per file, no data read)."""
        return sorted(self._bad_files(self._data_files(ds if ds is not None else self.dataset()), {}))

    def _check_accounted(self) -> None:
        """Before shards are written again: every row of the dataset must belong to a recorded
        shard. More rows than the ledger records (a shard record removed by hand, rows added by
        another tool) would make a redone shard's rows appear twice. Fewer is fine: rows deleted
        by hand are not brought back."""
        rows, recorded = self.dataset().count_rows(), sum(r.rows for r in self.ledger.read().records.values())
        if rows > recorded:
            raise EmbedkitError(f"{self.uri} holds {rows:,} rows but its ledger ({self.ledger_path}) records {recorded:,}; "
                                "resuming could store rows twice: start fresh with --overwrite")  # fmt: skip

    def intact_fragments(self, ds: Any) -> list:
        """The fragments of `ds` whose data files are all present at their recorded size."""
        files = self._data_files(ds)
        bad = {files[p][0] for p in self._bad_files(files, {})}
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


def ledger_name(name: str) -> str:
    """The ledger folder of a dataset folder: vectors.lance -> vectors.ledger.

    >>> ledger_name("generations.lance")
    'generations.ledger'
    """
    return name.removesuffix(".lance") + ".ledger"


def _history(ds: Any, since: int) -> tuple[list, bool]:
    """The transactions of the versions after `since`, latest first, and whether all of them
    are still there (Lance's version cleanup removes old versions with their transactions)."""
    wanted = ds.version - since
    if wanted <= 0:
        return [], True
    txs = ds.get_transactions(wanted)
    return [t for t in txs if t is not None], len(txs) == wanted and all(t is not None for t in txs)


def _record_of(tx: Any, props: dict) -> ShardRecord:
    """A shard's record from its commit's transaction (outputs of an older embedkit)."""
    frags = tx.operation.fragments
    return ShardRecord(
        shard=int(props[SHARD_KEY]), rows=sum(f.physical_rows for f in frags),
        files={f.path: getattr(f, "file_size_bytes", None) or None for frag in frags for f in frag.files},
        commit_id=props.get(COMMIT_KEY) or str(getattr(tx, "uuid", "")), read_version=int(tx.read_version),
        quarantined=json.loads(props.get(QUARANTINED_KEY, "[]")), worker=props.get(WORKER_KEY),
        started=_float(props.get(STARTED_KEY)), committed=_float(props.get(COMMITTED_KEY)),
    )  # fmt: skip


def _object_sizes(folder: Any) -> dict[str, int] | None:
    """name -> bytes of every object under an object-storage folder; None for a local folder."""
    from .objstore import ObjectPath

    return folder.sizes() if isinstance(folder, ObjectPath) else None


def injected_kill(phase: str, shards: list[int]) -> None:
    """EMBEDKIT_TEST_KILL_AT="PHASE:SHARD": the process SIGKILLs itself at PHASE of that shard:
    "intent" (recorded, not committed), "commit" (committed in Lance, not recorded), "drop" (a
    repair's Lance commit made, its shards not yet forgotten), "merge" (build-index: the merged
    lists written, merged.index not; shard 0), "swap" (a grown index: its first file moved into
    place, the rest not; shard 0). A fault-injection hook for the fault suite, for
    phases too short to catch from outside; unset in normal runs."""
    spec = os.environ.get(KILL_ENV, "")
    at, _, shard = spec.partition(":")
    if spec and at == phase and shard.strip().isdigit() and int(shard) in shards:
        os.kill(os.getpid(), signal.SIGKILL)


def _float(text: str | None) -> float | None:
    return float(text) if text is not None else None


def _props(tx: Any) -> dict:
    return (getattr(tx, "transaction_properties", None) or {}) if tx is not None else {}


def _dropped(props: dict) -> list[int]:
    return [int(s) for s in props.get(DROPPED_KEY, "").split(",") if s]


def storage_reason(e: OSError) -> str:
    """The operating system's words for a failed write, without Lance's source locations.

    >>> storage_reason(OSError("LanceError(IO): File too large (os error 27), /src/writer.rs:254:9"))
    'File too large (os error 27)'
    """
    if e.strerror:
        return e.strerror
    text = first_line(e)
    if text.startswith("LanceError(") and "): " in text:
        text = text.split("): ", 1)[1]
    return text.split(", /", 1)[0]
