"""The columns a run reads, and the parsers of the formats pyarrow reads whole: JSON lines (or
one JSON array of objects) and CSV/TSV."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from ..errors import EmbedkitError, first_line


@dataclass(frozen=True)
class Columns:
    """Which input columns hold the text and the id (None: the default `id` when present), and
    which others to read along (`keep`: stored beside the vectors)."""

    text: str = "text"
    id: str | None = None
    keep: tuple[str, ...] = ()


def read_jsonl(path: Path, columns: Columns) -> pa.Table:
    import pyarrow.json as pj

    if path.stat().st_size == 0:
        raise EmbedkitError(f"{path} is empty")
    if _starts_with(path, b"["):  # one JSON array of objects, not JSON lines: read as a whole
        return _read_json_rows(path, columns, _json_array(path))
    try:
        return pj.read_json(path)
    except Exception as e:
        if "changed from" in str(e):  # a field whose type differs between rows: read them one by one
            return _read_json_rows(path, columns, _json_lines(path))
        raise EmbedkitError(f"cannot parse {path} as JSON lines: {first_line(e)}") from None


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).lstrip().startswith(prefix)


def _json_lines(path: Path) -> Iterator[tuple[str, object]]:
    """(where, value) of each non-blank line of a JSON lines file."""

    with open(path, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"line {n}", json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise EmbedkitError(f"cannot parse {path} as JSON lines: line {n}: {e}") from None


def _json_array(path: Path) -> Iterator[tuple[str, object]]:
    """(where, value) of each element of a file holding one JSON array."""

    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EmbedkitError(f"cannot parse {path} as a JSON array: {e}") from None
    if not isinstance(doc, list):
        raise EmbedkitError(f"cannot parse {path}: expected JSON lines or one array of objects")
    yield from ((f"element {n}", row) for n, row in enumerate(doc, 1))


def _read_json_rows(path: Path, columns: Columns, rows: Iterator[tuple[str, object]]) -> pa.Table:
    """The text, id and kept columns of JSON objects (JSON lines whose fields change type
    between rows, or the elements of a JSON array).

    A text value that is not a string (a number, a boolean, an object) reads as null: that row
    is skipped and counted, the others are kept. Ids must still be all integers or all strings.
    """
    keep = list(dict.fromkeys([columns.text, columns.id or "id", *columns.keep]))
    values: dict[str, list] = {name: [] for name in keep}
    present: set[str] = set()
    for where, row in rows:
        if not isinstance(row, dict):
            raise EmbedkitError(f"cannot parse {path}: {where} is not an object (each row must be {{\"{columns.text}\": ...}})")
        present.update(k for k in keep if k in row)
        for name in keep:
            values[name].append(row.get(name))
    if not values[columns.text]:
        raise EmbedkitError(f"{path} holds no rows")
    values[columns.text] = [v if isinstance(v, str) else None for v in values[columns.text]]
    arrays = {}
    for name in keep:
        if name not in present and name != columns.text:
            continue
        try:
            arrays[name] = pa.array(values[name], pa.string() if name == columns.text else None)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise EmbedkitError(f"{path}: field {name!r} mixes types ({first_line(e)})") from None
    return pa.table(arrays)


def read_csv(path: Path, text_column: str, id_column: str) -> pa.Table:
    import pyarrow.csv as pcsv

    if path.stat().st_size == 0:
        raise EmbedkitError(f"{path} is empty")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # Texts and ids stay as written, even when they look numeric: an inferred integer id turns
    # "007" into 7 (and two ids "7" and "07" into one).
    convert = pcsv.ConvertOptions(column_types={text_column: pa.string(), id_column: pa.string()})
    try:
        return pcsv.read_csv(
            path, parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True), convert_options=convert
        )
    except Exception as e:
        raise EmbedkitError(f"cannot parse {path} as CSV: {first_line(e)}") from None
