"""The ledger of committed shards: small JSON files in a folder beside the Lance dataset.

Lance maintenance (LanceDB's `optimize()`, `compact_files`, `cleanup_old_versions`) rewrites
fragments and removes old versions with their transactions, so which shards are done is kept
here, where no Lance operation reaches. Each shard has files of its own, so writers committing
different shards at once never touch the same file:

    OUT/vectors.ledger/ledger.json             the ledger exists (written last when it is created
                                               or migrated: without it the folder is ignored)
    OUT/vectors.ledger/shard-00005.intent.json a commit of shard 5 about to be made
    OUT/vectors.ledger/shard-00005.json        shard 5 is committed
    OUT/vectors.ledger/drop.json               a removal of damaged shards about to be made

Every file is written under a temporary name in the same folder, flushed to disk and renamed
over its final name, so a reader sees a whole file or none. Deciding what a leftover intent
means needs the Lance dataset: that is the store's work (store.py); this module only reads
and writes the files.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import EmbedkitError
from ..fsutil import atomic_write, is_temporary
from .objstore import listdir, remove_tree

LEDGER_FORMAT = 1
MARKER = "ledger.json"
DROP = "drop.json"
_INTENT = ".intent.json"


@dataclass(frozen=True)
class ShardRecord:
    """One shard's commit: its rows, the data files it wrote (name -> bytes when written; None
    when not known, for files recorded by an older embedkit), the ids it quarantined, who made
    it and when (epoch seconds), the commit's id (in its Lance transaction too), and the
    version the commit was read from. As an intent, `committed` is None."""

    shard: int
    rows: int
    files: dict[str, int | None]
    commit_id: str
    read_version: int
    quarantined: list = field(default_factory=list)
    worker: str | None = None
    started: float | None = None
    committed: float | None = None

    @classmethod
    def from_json(cls, d: dict) -> "ShardRecord":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class DropRecord:
    """A removal of damaged shards: the shards, and the data files whose fragments it removes."""

    shards: list[int]
    files: list[str]
    commit_id: str


@dataclass
class LedgerState:
    """Everything the ledger folder holds, read in one pass."""

    records: dict[int, ShardRecord]
    intents: dict[int, ShardRecord]
    drop: DropRecord | None = None


class Ledger:
    """The folder of one dataset's shard records."""

    def __init__(self, folder: Path):
        from .objstore import out_path

        self.folder = out_path(folder)  # a local folder, or a prefix on object storage

    def exists(self) -> bool:
        """True once created or migrated (its marker written); a folder without one is ignored."""
        return (self.folder / MARKER).is_file()

    def create(self) -> None:
        """Mark the folder as the ledger: written after the records a migration wrote."""
        self._write(MARKER, {"format": LEDGER_FORMAT})

    def clear(self) -> None:
        """Remove the folder (the dataset it described is being created anew)."""
        remove_tree(self.folder)

    def read(self) -> LedgerState:
        """Records, intents and a pending drop, from one listing of the folder (listed again
        when a writer replaced a file in between: its intent became its record)."""
        for _ in range(10):
            with contextlib.suppress(FileNotFoundError):
                return self._read_all()
        return self._read_all()

    def _read_all(self) -> LedgerState:
        state = LedgerState({}, {})
        for name in sorted(_listing(self.folder)):
            if name.startswith("shard-") and name.endswith(_INTENT):
                rec = ShardRecord.from_json(self._read(name))
                state.intents[rec.shard] = rec
            elif name.startswith("shard-") and name.endswith(".json"):
                rec = ShardRecord.from_json(self._read(name))
                state.records[rec.shard] = rec
            elif name == DROP:
                state.drop = DropRecord(**self._read(name))
        return state

    def write_intent(self, rec: ShardRecord) -> None:
        self._write(_shard_name(rec.shard) + _INTENT, asdict(rec))

    def write_record(self, rec: ShardRecord) -> None:
        self._write(_shard_name(rec.shard) + ".json", asdict(rec))

    def remove_intent(self, shard: int) -> None:
        self._remove(_shard_name(shard) + _INTENT)

    def remove_record(self, shard: int) -> None:
        self._remove(_shard_name(shard) + ".json")

    def write_drop(self, drop: DropRecord) -> None:
        self._write(DROP, asdict(drop))

    def remove_drop(self) -> None:
        self._remove(DROP)

    def remove_temporaries(self) -> None:
        """Half-written files of killed writers (call under the output lock only)."""
        for name in _listing(self.folder):
            if is_temporary(name):
                with contextlib.suppress(FileNotFoundError):
                    (self.folder / name).unlink()

    def _read(self, name: str) -> dict:
        path = self.folder / name
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise  # a racing writer removed it: the caller reads again
        except (OSError, ValueError) as e:
            raise EmbedkitError(f"{path} is unreadable ({e}); start fresh with --overwrite") from None

    def _write(self, name: str, payload: dict) -> None:
        """Atomically and durably (fsutil.atomic_write: a fresh temporary name in the folder,
        never through a planted link, file and folder flushed before and after the rename)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / name
        try:
            atomic_write(path, json.dumps(payload, sort_keys=True).encode(), durable=True)
        except OSError as e:
            raise EmbedkitError(f"cannot write {path}: {e.strerror or e}; committed shards are kept: free space "
                                "(or fix the path) and rerun the same command to resume") from None  # fmt: skip

    def _remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.folder / name).unlink()


def _shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def _listing(folder: Path) -> list[str]:
    return listdir(folder)
