"""Corpus readers: every input format becomes Arrow tables of (id, text) over row ranges.

A corpus is a sequence of rows with a stable order, so a shard is just a row range and a resumed
run reads exactly the rows it read before. Formats:

- parquet: one file or a folder of ``*.parquet`` files (sorted by path), read by row group;
- Lance: a dataset folder (``*.lance`` or any folder holding ``_versions``), pinned to its version;
- .jsonl / .csv: parsed once by pyarrow and sliced in memory;
- a folder of ``.txt`` files: one document each, id = path relative to the folder.

Columns named in ``Columns.keep`` (``--keep-columns``) follow ``id`` and ``text`` with their input
types; only those columns are read, so an input's other columns cost nothing.

A text column may also hold bytes (binary): they are decoded as UTF-8. A value that is not
text (bytes that are not valid UTF-8, a number or object in a JSON text field) reads as null,
so the pipeline skips and counts it like an empty text and the rest of the shard proceeds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import EmbedkitError, first_line
from .formats import Columns, read_csv, read_jsonl

TEXT_TYPES = (pa.string(), pa.large_string(), pa.string_view())
BINARY_TYPES = (pa.binary(), pa.large_binary(), pa.binary_view())  # decoded as UTF-8, row by row


class Corpus(Protocol):
    """What the pipeline needs from an input."""

    num_rows: int
    id_type: pa.DataType
    kind: str
    kept_fields: tuple[pa.Field, ...]  # the kept columns (Columns.keep) with their input types

    def read(self, start: int, stop: int) -> pa.Table:
        """Rows [start, stop) as a table of `id`, `text` (may hold nulls), then the kept columns."""

    def read_ids(self) -> pa.ChunkedArray:
        """All ids in row order, for the duplicate check."""

    def fingerprint(self, cache: Path | None = None) -> dict:
        """What identifies this input, by content: a rerun on a changed input is refused.
        `cache`: where file hashes are kept between runs (see digest.py)."""


def open_corpus(path: str | os.PathLike, columns: Columns = Columns(), *, follow_symlinks: bool = False) -> Corpus:
    """Open INPUT by its form; raise EmbedkitError with a one-line reason when it cannot be read.

    `follow_symlinks`: a folder of .txt files may hold links to files outside it (refused otherwise)."""
    from ..fsutil import require_local

    require_local(path, "INPUT")
    p = Path(path)
    if not p.exists():
        raise EmbedkitError(f"input not found: {p}")
    if p.is_dir():
        if (p / "_versions").is_dir() or p.suffix == ".lance":
            return LanceCorpus(p, columns)
        parquet, txt = next(p.rglob("*.parquet"), None), next(p.rglob("*.txt"), None)
        if parquet is not None and txt is not None:
            raise EmbedkitError(f"{p} holds both .parquet files ({parquet.relative_to(p)}) and .txt files ({txt.relative_to(p)}); "
                                "point INPUT at a folder of one kind")  # fmt: skip
        if parquet is not None:
            return ParquetCorpus(p, columns)
        if txt is not None:
            if columns.keep:
                raise EmbedkitError(f"{p} is a folder of .txt files, which has no columns to keep; drop --keep-columns")
            return TextFolderCorpus(p, follow_symlinks=follow_symlinks)
        raise EmbedkitError(f"{p} is a folder with no .parquet or .txt files and is not a Lance dataset")
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return ParquetCorpus(p, columns)
    if suffix in (".jsonl", ".ndjson", ".json"):
        return TableCorpus(p, read_jsonl(p, columns), columns, "jsonl")
    if suffix in (".csv", ".tsv"):
        return TableCorpus(p, read_csv(p, columns.text, columns.id or "id"), columns, "csv")
    raise EmbedkitError(
        f"cannot tell the format of {p}: use .parquet, .jsonl, .csv, a Lance dataset or a folder of .txt files"
    )


def _files_fingerprint(kind: str, root: Path, files: list[Path], cache: Path | None, **columns: object) -> dict:
    """Identity of a file-based input: its content digest (see digest.py), row count and columns.
    `path` is recorded to show where the input was, and is not compared: the same content
    staged elsewhere is the same input."""
    from ..digest import content_digest

    return {"kind": kind, "path": str(root.resolve()), "files": len(files), "sha256": content_digest(files, root, cache), **columns}


def _check_columns(schema: pa.Schema, columns: Columns, source: Path) -> str | None:
    """Validate the text column and return the id column to use (None: row numbers)."""
    names = schema.names
    if columns.text not in names:
        raise EmbedkitError(
            f"{source}: no text column {columns.text!r} (columns: {', '.join(names)}); pick one with --text-column"
        )
    text_type = schema.field(columns.text).type
    if text_type not in TEXT_TYPES + BINARY_TYPES and text_type != pa.null():
        raise EmbedkitError(
            f"{source}: column {columns.text!r} holds {text_type}, not text; pick a string column with --text-column"
        )
    missing = [c for c in columns.keep if c not in names]
    if missing:
        raise EmbedkitError(f"{source}: no column {missing[0]!r} to keep (columns: {', '.join(names)})")
    if columns.id is not None:
        if columns.id not in names:
            raise EmbedkitError(f"{source}: no id column {columns.id!r} (columns: {', '.join(names)})")
        return columns.id
    return "id" if "id" in names else None


def _kept_fields(schema: pa.Schema, columns: Columns) -> tuple[pa.Field, ...]:
    return tuple(schema.field(name) for name in columns.keep)


def _id_type(schema: pa.Schema, id_col: str | None, source: Path) -> pa.DataType:
    if id_col is None:
        return pa.int64()
    t = schema.field(id_col).type
    if t == pa.uint64():  # kept as they are: ids at or past 2**63 do not fit int64
        return pa.uint64()
    if pa.types.is_integer(t):
        return pa.int64()
    if t in TEXT_TYPES:
        return pa.string()
    raise EmbedkitError(f"{source}: id column {id_col!r} holds {t}; ids must be integers or strings")


def _normalize(table: pa.Table, text_col: str, id_col: str | None, id_type: pa.DataType, first_row: int,
               keep: tuple[str, ...] = ()) -> pa.Table:  # fmt: skip
    """Project to (id, text, *keep) with the output's id type; row numbers stand in for missing ids."""
    if id_col is None:
        ids = pa.array(range(first_row, first_row + table.num_rows), pa.int64())
    else:
        ids = table.column(id_col).cast(id_type)
    text = table.column(text_col)
    if text.type == pa.null():
        text = pa.nulls(table.num_rows, pa.string())
    elif text.type in BINARY_TYPES:
        text = utf8_or_null(text)
    elif text.type != pa.string():
        text = text.cast(pa.string())
    return pa.table({"id": ids, "text": text, **{name: table.column(name) for name in keep}})


def utf8_or_null(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Bytes decoded as UTF-8 text; a value that is not valid UTF-8 becomes null.

    One invalid document must not stop the run: it reads as a missing text, which the pipeline
    skips and counts. The common all-valid case is one vectorized cast.

    >>> utf8_or_null(pa.array(["café".encode(), "café".encode("latin-1"), None])).to_pylist()
    ['café', None, None]
    """
    try:
        return values.cast(pa.string())
    except pa.ArrowInvalid:  # at least one value is not UTF-8: decode one by one
        return pa.array([_decode_or_none(b) for b in values.to_pylist()], pa.string())


def _decode_or_none(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


class ParquetCorpus:
    """One parquet file or a folder of them, read row group by row group."""

    kind = "parquet"

    def __init__(self, path: Path, columns: Columns):
        import pyarrow.parquet as pq

        self.path = path
        self.files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
        self._meta = []
        schema = None
        for f in self.files:
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:  # pyarrow raises several types for a damaged file
                raise EmbedkitError(f"cannot read parquet file {f}: {first_line(e)}") from None
            self._meta.append(pf.metadata)
            file_schema = pf.schema_arrow
            if schema is None:
                schema = file_schema
                self.id_col = _check_columns(schema, columns, f)
                self.id_type = _id_type(schema, self.id_col, f)
                self.kept_fields = _kept_fields(schema, columns)
            else:
                _same_ids(self.id_col, self.id_type, _check_columns(file_schema, columns, f), file_schema, self.files[0], f)
                _same_kept_types(self.kept_fields, file_schema, self.files[0], f)
        self.text_col = columns.text
        self.keep = columns.keep
        # row offsets of every row group of every file, in order
        self._groups: list[tuple[int, int, int, int]] = []  # (file idx, group idx, first row, n rows)
        row = 0
        for fi, meta in enumerate(self._meta):
            for gi in range(meta.num_row_groups):
                n = meta.row_group(gi).num_rows
                self._groups.append((fi, gi, row, n))
                row += n
        self.num_rows = row
        self._starts = [g[2] for g in self._groups]
        self._cached: tuple[tuple[int, int], pa.Table] | None = None

    def _columns(self) -> list[str]:
        return list(dict.fromkeys([self.text_col] + ([self.id_col] if self.id_col else []) + list(self.keep)))

    def read(self, start: int, stop: int) -> pa.Table:
        import bisect

        parts = []
        # the groups overlapping [start, stop): found by bisection, since a billion-row corpus has
        # tens of thousands of row groups and is read one window at a time
        k = max(0, bisect.bisect_right(self._starts, start) - 1)
        while k < len(self._groups) and self._groups[k][2] < stop:
            fi, gi, first, n = self._groups[k]
            k += 1
            if first + n <= start:
                continue
            t = self._row_group(fi, gi)
            lo, hi = max(start, first) - first, min(stop, first + n) - first
            parts.append(_normalize(t.slice(lo, hi - lo), self.text_col, self.id_col, self.id_type, first + lo, self.keep))
        if not parts:
            return pa.schema([pa.field("id", self.id_type), pa.field("text", pa.string()), *self.kept_fields]).empty_table()
        return pa.concat_tables(parts)

    def _row_group(self, fi: int, gi: int) -> pa.Table:
        """One row group, the last one read kept: consecutive windows often share a group."""
        import pyarrow.parquet as pq

        if self._cached is not None and self._cached[0] == (fi, gi):
            return self._cached[1]
        try:
            t = pq.ParquetFile(self.files[fi]).read_row_group(gi, columns=self._columns())
        except Exception as e:
            raise EmbedkitError(f"cannot read {self.files[fi]} row group {gi}: {first_line(e)}") from None
        self._cached = ((fi, gi), t)
        return t

    def read_ids(self) -> pa.ChunkedArray:
        import pyarrow.parquet as pq

        if self.id_col is None:
            return pa.chunked_array([pa.array(range(self.num_rows), pa.int64())])
        chunks = [pq.read_table(f, columns=[self.id_col]).column(0).cast(self.id_type) for f in self.files]
        return pa.chunked_array([c for ch in chunks for c in ch.chunks], self.id_type)

    def fingerprint(self, cache: Path | None = None) -> dict:
        return _files_fingerprint(self.kind, self.path, self.files, cache, rows=self.num_rows, text_column=self.text_col, id_column=self.id_col)


class LanceCorpus:
    """A Lance dataset, pinned to the version seen when the run was planned."""

    kind = "lance"

    def __init__(self, path: Path, columns: Columns):
        import lance

        self.path = path
        try:
            self.ds = lance.dataset(str(path))
        except Exception as e:
            raise EmbedkitError(f"cannot open Lance dataset {path}: {first_line(e)}") from None
        schema = self.ds.schema
        self.id_col = _check_columns(schema, columns, path)
        self.id_type = _id_type(schema, self.id_col, path)
        self.text_col = columns.text
        self.keep = columns.keep
        self.kept_fields = _kept_fields(schema, columns)
        self.num_rows = self.ds.count_rows()

    def _columns(self) -> list[str]:
        return list(dict.fromkeys([self.text_col] + ([self.id_col] if self.id_col else []) + list(self.keep)))

    def read(self, start: int, stop: int) -> pa.Table:
        t = self.ds.to_table(columns=self._columns(), offset=start, limit=stop - start)
        return _normalize(t, self.text_col, self.id_col, self.id_type, start, self.keep)

    def read_ids(self) -> pa.ChunkedArray:
        if self.id_col is None:
            return pa.chunked_array([pa.array(range(self.num_rows), pa.int64())])
        return self.ds.to_table(columns=[self.id_col]).column(0).cast(self.id_type)

    def fingerprint(self, cache: Path | None = None) -> dict:
        from ..digest import lance_files_digest

        # the data files' names are unique, so they name the rows of this version; a dataset
        # written anew at the same version number has other files
        return {
            "kind": self.kind, "path": str(self.path.resolve()), "version": self.ds.version, "files_sha256": lance_files_digest(self.ds),
            "rows": self.num_rows, "text_column": self.text_col, "id_column": self.id_col,
        }  # fmt: skip


class TableCorpus:
    """A .jsonl or .csv file, parsed once into memory (use parquet for corpora larger than RAM)."""

    def __init__(self, path: Path, table: pa.Table, columns: Columns, kind: str):
        self.path = path
        self.kind = kind
        self.id_col = _check_columns(table.schema, columns, path)
        self.id_type = _id_type(table.schema, self.id_col, path)
        self.text_col = columns.text
        self.keep = columns.keep
        self.kept_fields = _kept_fields(table.schema, columns)
        self.table = table
        self.num_rows = table.num_rows

    def read(self, start: int, stop: int) -> pa.Table:
        return _normalize(self.table.slice(start, stop - start), self.text_col, self.id_col, self.id_type, start, self.keep)

    def read_ids(self) -> pa.ChunkedArray:
        return self.read(0, self.num_rows).column("id")

    def fingerprint(self, cache: Path | None = None) -> dict:
        return _files_fingerprint(self.kind, self.path, [self.path], cache, rows=self.num_rows, text_column=self.text_col, id_column=self.id_col)


class TextFolderCorpus:
    """A folder of .txt files, one document each; ids are paths relative to the folder."""

    kind = "txt"
    id_type = pa.string()
    kept_fields: tuple[pa.Field, ...] = ()  # one text per file: no other columns

    def __init__(self, path: Path, follow_symlinks: bool = False):
        self.path = path
        self.files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        self.num_rows = len(self.files)
        if not follow_symlinks:
            _refuse_links_out(path, self.files)

    def read(self, start: int, stop: int) -> pa.Table:
        ids, texts = [], []
        for f in self.files[start:stop]:
            try:
                texts.append(f.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as e:
                raise EmbedkitError(f"{f} is not valid UTF-8 (byte {e.start}); convert it or remove it") from None
            except OSError as e:
                raise EmbedkitError(f"cannot read {f}: {e.strerror}") from None
            ids.append(f.relative_to(self.path).as_posix())
        return pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())})

    def read_ids(self) -> pa.ChunkedArray:
        return pa.chunked_array([pa.array([f.relative_to(self.path).as_posix() for f in self.files], pa.string())])

    def fingerprint(self, cache: Path | None = None) -> dict:
        return _files_fingerprint(self.kind, self.path, self.files, cache, rows=self.num_rows)


def _refuse_links_out(folder: Path, files: list[Path]) -> None:
    """A .txt file (or a folder on its way) that links outside INPUT would embed a file nobody
    put in the corpus (in a shared folder, anyone's): refused unless asked for."""
    root = folder.resolve()
    for f in files:
        target = f.resolve()
        if not target.is_relative_to(root):
            raise EmbedkitError(f"{f} links to {target}, outside {folder}; copy it in, or pass --follow-symlinks to read it")


def _same_ids(id_col: str | None, id_type: pa.DataType, other_col: str | None, schema: pa.Schema, first: Path, source: Path) -> None:
    """Every file of a parquet folder has the same id column, of the same kind: otherwise some
    rows would get their ids and others row numbers, or ids of two types."""
    if other_col != id_col:
        has, lacks = (first, source) if id_col else (source, first)
        raise EmbedkitError(f"{has} has an id column {id_col or other_col!r} and {lacks} has none; give every file the same columns")
    other_type = _id_type(schema, other_col, source)
    if other_type != id_type:
        raise EmbedkitError(f"id column {id_col!r} holds {_kind(id_type)} in {first} but {_kind(other_type)} in {source}; "
                            "make the ids one type")  # fmt: skip


def _kind(t: pa.DataType) -> str:
    return "integers" if pa.types.is_integer(t) else "strings"


def _same_kept_types(fields: tuple[pa.Field, ...], schema: pa.Schema, first: Path, source: Path) -> None:
    """A kept column has one type in every file of a parquet folder (it is stored with that type)."""
    for f in fields:
        other = schema.field(f.name).type
        if other != f.type:
            raise EmbedkitError(f"column {f.name!r} to keep holds {f.type} in {first} but {other} in {source}")


def find_first_duplicate(ids: pa.ChunkedArray) -> tuple[object, list[int]] | None:
    """The first id (in row order) that occurs more than once, with the rows it occurs in."""
    import pyarrow.compute as pc

    if ids.null_count:
        first_null = pc.index(pc.is_null(ids), True).as_py()
        raise EmbedkitError(f"row {first_null} has a null id; every row needs an id")
    counts = pc.value_counts(ids)
    dup_values = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(dup_values) == 0:
        return None
    mask = pc.is_in(ids, value_set=dup_values)
    first_row = pc.index(mask, True).as_py()
    value = ids[first_row].as_py()
    rows = pc.indices_nonzero(pc.equal(ids, pa.scalar(value, ids.type))).to_pylist()
    return value, rows[:5]


def drop_empty(table: pa.Table, keep_empty: bool) -> tuple[pa.Table, int]:
    """(rows, how many were dropped): null or whitespace-only texts are dropped and counted, or
    with `keep_empty` kept as "" (both stages read rows through this)."""
    text = table.column("text")
    empty = pc.or_kleene(pc.is_null(text), pc.equal(pc.utf8_trim_whitespace(text), "")).fill_null(True)
    n_empty = int(pc.sum(empty).as_py() or 0)
    if n_empty == 0:
        return table, 0
    if keep_empty:
        return table.set_column(table.schema.get_field_index("text"), "text", pc.fill_null(text, "")), 0
    return table.filter(pc.invert(empty)), n_empty


class RowOffset:
    """A corpus whose row-number ids start at `offset` (an input without an id column, appended
    to an output after `offset` rows of other inputs: its ids continue their numbering)."""

    def __init__(self, corpus: Corpus, offset: int):
        self._corpus, self.offset = corpus, offset

    def __getattr__(self, name: str) -> Any:
        return getattr(self._corpus, name)

    def read(self, start: int, stop: int) -> pa.Table:
        table = self._corpus.read(start, stop)
        at = table.schema.get_field_index("id")
        return table.set_column(at, table.schema.field(at), pc.add(table.column(at), pa.scalar(self.offset, table.schema.field(at).type)))

    def read_ids(self) -> pa.ChunkedArray:
        return pc.add(self._corpus.read_ids(), self.offset)

