"""export(): an output's rows as JSON lines, CSV or parquet, for tools that do not read Lance.

An embeddings output exports `vectors.lance` (id, vector, n_tokens, truncated, and the text and
kept columns when stored); a generations output (`embedkit generate`) exports
`generations.lance`. Rows are streamed in record batches from the dataset's latest version, so
an output far larger than memory exports in constant memory. That version holds committed
shards only; an unfinished run is refused unless `partial` is given.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..config import EXPORT_FORMATS
from ..errors import EmbedkitError
from .shards import MANIFEST, read_manifest

BATCH_ROWS = 8192  # rows per record batch read and written


@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote: rows, from which dataset, and how much of the run was committed."""

    out: str
    path: str | None  # None: standard output
    format: str
    dataset: str  # vectors.lance or generations.lance
    rows: int
    shards_done: int
    shards_total: int

    @property
    def complete(self) -> bool:
        return self.shards_done == self.shards_total

    def lines(self) -> list[str]:
        part = "" if self.complete else f"; partial: {self.shards_done} of {self.shards_total} shards committed"
        return [f"exported {self.rows} rows of {self.out.rstrip('/')}/{self.dataset} to {self.path or 'stdout'} ({self.format}){part}"]


def export(out: str | Path, path: str | Path | None = None, *, format: str = "jsonl", partial: bool = False) -> ExportSummary:
    """Write OUT's rows to `path` (None: standard output; not for parquet) as jsonl, csv or parquet.

    In csv, list columns (the vector) are one column each holding a JSON list. `partial`:
    export an unfinished output's committed shards instead of refusing it.

    >>> embedkit.io.export("out/", "vectors.parquet", format="parquet")    # doctest: +SKIP
    >>> embedkit.io.export("out/", format="jsonl")                          # doctest: +SKIP
    """
    if format not in EXPORT_FORMATS:
        raise EmbedkitError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, not {format!r}")
    if format == "parquet" and path is None:
        raise EmbedkitError("parquet is not written to standard output; give a file with -o FILE")
    from .objstore import out_path

    out = out_path(out)
    store, manifest = _source(out)
    ds = store.dataset()
    done, total = len(store.committed_shards(ds)), int(manifest["plan"]["shards"])
    if done < total and not partial:
        raise EmbedkitError(f"{out} is unfinished ({done} of {total} shards committed); rerun the command that wrote it "
                            "to finish, or export the committed rows with --partial")  # fmt: skip
    # damaged fragments (a missing or resized data file) cannot be read; their shards are not counted done
    reader = ds.scanner(batch_size=BATCH_ROWS, fragments=store.intact_fragments(ds), scan_in_order=True).to_reader()
    with _sink(path) as sink:
        rows = _WRITERS[format](reader, sink)
    return ExportSummary(str(out), None if path is None else str(path), format, Path(store.uri).name, rows, done, total)


def _source(out: Path) -> tuple[Any, dict]:
    """OUT's store (embeddings, else generations) and manifest; one-line refusals otherwise."""
    from .store import GENERATIONS_DIR, VECTORS_DIR, VectorStore

    if not out.is_dir():
        raise EmbedkitError(f"no such output folder: {out}")
    manifest = read_manifest(out)
    if manifest is None or "plan" not in manifest:
        raise EmbedkitError(f"{out} has no {MANIFEST}: not an embedkit output")
    for name in (VECTORS_DIR, GENERATIONS_DIR):
        store = VectorStore(out, name)
        if store.exists():
            return store, manifest
    raise EmbedkitError(f"{out} holds no {VECTORS_DIR} or {GENERATIONS_DIR} yet")


@contextlib.contextmanager
def _sink(path: str | Path | None) -> Iterator[IO[bytes]]:
    """A binary file to write to. A regular file is written under a temporary name and renamed
    when complete, so a failed export never leaves half a file under the asked name."""
    if path is None:
        sys.stdout.flush()
        yield getattr(sys.stdout, "buffer", None) or _TextOut(sys.stdout)
        sys.stdout.flush()
        return
    target = Path(path)
    if target.is_dir():
        raise EmbedkitError(f"cannot write {target}: it is a folder")
    from ..fsutil import atomic_file

    direct = target.exists() and not target.is_file()  # a device or a pipe: written in place
    try:
        with open(target, "wb") if direct else atomic_file(target) as f:
            yield f
    except OSError as e:
        raise EmbedkitError(f"cannot write {target}: {e.strerror or e}") from None


class _TextOut:
    """A text stream without a binary buffer (a notebook's stdout) seen as a binary file."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.closed = False

    def write(self, data: bytes) -> int:
        self.stream.write(bytes(data).decode("utf-8"))
        return len(data)

    def flush(self) -> None:
        self.stream.flush()


def _write_jsonl(reader: Any, sink: IO[bytes]) -> int:
    """One JSON object per row; values JSON has no type for (dates, decimals) as strings."""
    rows = 0
    for batch in reader:
        names = batch.schema.names
        columns = [_values(batch.column(i)) for i in range(batch.num_columns)]
        lines = (json.dumps(dict(zip(names, row)), ensure_ascii=False, default=str) for row in zip(*columns))
        sink.write("".join(line + "\n" for line in lines).encode("utf-8"))
        rows += batch.num_rows
    return rows


def _write_csv(reader: Any, sink: IO[bytes]) -> int:
    """A header, then one line per row; a list or struct column (the vector) holds JSON text."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    schema = pa.schema([pa.field(f.name, pa.string()) if pa.types.is_nested(f.type) else f for f in reader.schema])
    rows = 0
    with pcsv.CSVWriter(sink, schema) as writer:
        for batch in reader:
            columns = [_json_text(c) if pa.types.is_nested(c.type) else c for c in batch.columns]
            writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
            rows += batch.num_rows
    return rows


def _write_parquet(reader: Any, sink: IO[bytes]) -> int:
    """The dataset's own schema: the vector stays a fixed-size list of its float type."""
    import pyarrow.parquet as pq

    rows = 0
    with pq.ParquetWriter(sink, reader.schema) as writer:
        for batch in reader:
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


_WRITERS: dict[str, Callable[[Any, IO[bytes]], int]] = {"jsonl": _write_jsonl, "csv": _write_csv, "parquet": _write_parquet}


def _values(column: Any) -> list:
    """A column as Python values; a vector column through numpy (Arrow's to_pylist is row by row)."""
    import pyarrow as pa

    t = column.type
    if pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type) and column.null_count == 0:
        return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), t.list_size).tolist()
    return column.to_pylist()


def _json_text(column: Any) -> Any:
    import pyarrow as pa

    return pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in _values(column)], pa.string())
