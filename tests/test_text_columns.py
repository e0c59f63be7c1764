"""Text and kept columns beside the vectors (`encode --store-text --keep-columns`), in search
results, and out to other tools (`embedkit export`).

Everything is real: the bundled model, Lance outputs, a faiss index, the CLI as a subprocess.
Each input format is encoded once per module, 14 rows at 64 tokens; tests only read those
outputs (or copies).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq
import pytest

import embedkit
from embedkit.errors import EmbedkitError
from embedkit.io.corpus import Columns, open_corpus
from embedkit.io.shards import write_manifest

KEPT = ("title", "rank", "weight")
OPTIONS = {"device": "cpu", "shard_rows": 5, "max_seq_length": 64, "tokenize_workers": 0, "progress": False}


@pytest.fixture(scope="module")
def rich(small_table) -> pa.Table:
    """12 sample rows, a blank and a null text, three columns to keep and one to leave out."""
    part = small_table.slice(0, 12)
    ids = part.column("id").to_pylist() + ["empty:blank", "empty:null"]
    n = len(ids)
    return pa.table({
        "id": ids, "text": part.column("text").to_pylist() + ["  \n ", None], "title": [f"title {i}" for i in range(n)],
        "rank": pa.array(range(n), pa.int32()), "weight": [i / 4 for i in range(n)], "unused": ["not kept"] * n,
    })  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, rich) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text-inputs")
    paths = {"parquet": root / "docs.parquet", "jsonl": root / "docs.jsonl", "lance": root / "docs.lance", "txt": root / "txt"}
    pq.write_table(rich, paths["parquet"], row_group_size=4)
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rich.to_pylist()))
    lance.write_dataset(rich, str(paths["lance"]), max_rows_per_file=6)
    paths["txt"].mkdir()
    (paths["txt"] / "a.txt").write_text("a document")
    return paths


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, inputs) -> Callable[[str], tuple]:
    """fmt -> (summary, OUT) of `encode(..., store_text=True, keep_columns=KEPT)`, run once per format."""
    root = tmp_path_factory.mktemp("text-outputs")
    done: dict[str, tuple] = {}

    def get(fmt: str) -> tuple:
        if fmt not in done:
            out = root / fmt
            done[fmt] = (embedkit.encode(inputs[fmt], out, store_text=True, keep_columns=KEPT, **OPTIONS), out)
        return done[fmt]

    return get


def _stored(out: Path) -> pa.Table:
    return lance.dataset(str(out / "vectors.lance")).to_table()


def _by_id(table: pa.Table, column: str) -> dict:
    return dict(zip(table.column("id").to_pylist(), table.column(column).to_pylist()))


# ---- encode: what is stored --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "lance"])
def test_text_and_kept_columns_are_stored_per_id(encoded, inputs, rich, fmt):
    summary, out = encoded(fmt)
    table = _stored(out)
    assert table.column_names == ["id", "vector", "n_tokens", "truncated", "text", *KEPT]
    assert summary.skipped_empty == 2 and summary.shards_done == 3
    kept_rows = rich.filter(pa.array([not i.startswith("empty:") for i in rich.column("id").to_pylist()]))
    assert _by_id(table, "text") == _by_id(kept_rows, "text")  # the input's text, per id, empties skipped
    for name in KEPT:
        assert _by_id(table, name) == _by_id(kept_rows, name), name
    # with their input types: parquet and Lance keep int32; JSON lines reads integers as int64
    want = pj.read_json(inputs[fmt]).schema if fmt == "jsonl" else rich.schema
    assert [table.schema.field(n).type for n in KEPT] == [want.field(n).type for n in KEPT]
    assert embedkit.status(out).manifest["output"] == {
        "dtype": "float16", "normalize": True, "keep_empty": False, "store_text": True, "keep_columns": list(KEPT),
        "dim": 0, "chunk_tokens": 0, "chunk_overlap": 0,
    }  # fmt: skip


def test_vectors_beside_the_text_are_those_of_a_plain_run(encoded, inputs, tmp_path):
    """The stored columns travel with their rows through the length sort: each vector is its id's."""
    _, out = encoded("parquet")
    plain = tmp_path / "plain"
    embedkit.encode(inputs["parquet"], plain, **OPTIONS)
    assert _stored(plain).column_names == ["id", "vector", "n_tokens", "truncated"]
    a, b = _by_id(_stored(out), "vector"), _by_id(_stored(plain), "vector")
    assert a == b


def test_keep_empty_stores_an_empty_text(inputs, tmp_path):
    embedkit.encode(inputs["parquet"], tmp_path / "out", store_text=True, keep_empty=True, **OPTIONS)
    texts = _by_id(_stored(tmp_path / "out"), "text")
    assert texts["empty:null"] == "" and texts["empty:blank"] == "  \n "


def test_readers_read_only_the_columns_asked_for(inputs):
    for fmt in ("parquet", "jsonl", "lance"):
        assert open_corpus(inputs[fmt]).read(0, 6).column_names == ["id", "text"]
        assert open_corpus(inputs[fmt], Columns(keep=("rank",))).read(3, 9).column_names == ["id", "text", "rank"]


def test_a_resume_with_other_stored_columns_is_refused(encoded, inputs, run_cli, refused):
    _, out = encoded("parquet")
    manifest = (out / "embedkit.json").read_text()
    refused(run_cli("encode", inputs["parquet"], out, "--device", "cpu", "--max-seq-length", "64", "--keep-columns", "title"),
            "store text (True -> False); kept columns (title,rank,weight -> title)", "--overwrite")  # fmt: skip
    assert (out / "embedkit.json").read_text() == manifest


@pytest.mark.parametrize(
    "fmt, keep, needles",
    [
        pytest.param("parquet", "title,nope", ["no column 'nope' to keep", "columns: id, text"], id="missing"),
        pytest.param("jsonl", "nope", ["no column 'nope' to keep"], id="missing-jsonl"),
        pytest.param("parquet", "vector", ["--keep-columns 'vector' clashes with the output's own column"], id="clash"),
        pytest.param("parquet", "text", ["'text' clashes", "--store-text stores the text"], id="clash-text"),
        pytest.param("parquet", "id", ["'id' clashes"], id="clash-id"),
        pytest.param("parquet", "score", ["'score' clashes with the score of search hits"], id="clash-score"),
        pytest.param("parquet", "rank,rank", ["names 'rank' twice"], id="twice"),
        pytest.param("txt", "title", ["folder of .txt files, which has no columns to keep"], id="txt-folder"),
    ],
)
def test_keep_columns_refusals(inputs, tmp_path, run_cli, refused, fmt, keep, needles):
    refused(run_cli("encode", inputs[fmt], tmp_path / "out", "--device", "cpu", "--keep-columns", keep), *needles)
    assert not (tmp_path / "out").exists()  # refused before OUT was made


# ---- search ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, encoded) -> Path:
    out = tmp_path_factory.mktemp("text-index") / "out"
    shutil.copytree(encoded("parquet")[1], out)
    embedkit.build_index(out, device="cpu", progress=False)
    return out


def test_retriever_returns_the_stored_text_and_columns(indexed, rich):
    texts, ranks = _by_id(rich, "text"), _by_id(rich, "rank")
    doc = rich.column("id")[3].as_py()
    res = embedkit.Retriever(indexed).search([texts[doc], "how do I report a bug"], k=4)
    assert res.ids[0][0] == doc and res.scores[0][0] > 0.99  # the text itself, cut as the documents were
    for q in range(2):
        assert res.texts[q] == [texts[i] for i in res.ids[q]]
        assert res.columns["rank"][q] == [ranks[i] for i in res.ids[q]]
    assert set(res.columns) == {"title", "rank", "weight"}


def test_search_prints_the_text_on_one_line(indexed, rich, run_cli):
    doc = rich.column("id")[3].as_py()
    text = _by_id(rich, "text")[doc]
    r = run_cli("search", indexed, text, "-k", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    width = int(os.environ.get("COLUMNS", "100"))
    assert len(lines) == 4 and lines[0].startswith(f"query: {' '.join(text.split())[:width - 10]}")
    assert lines[1].startswith("   1. ") and f"  {doc}  " in lines[1]
    assert all(len(line) <= max(width, 100) for line in lines)
    shown = lines[1].split(f"  {doc}  ", 1)[1]
    flat = " ".join(text.split())
    assert flat.startswith(shown.removesuffix("…")) and (shown == flat or shown.endswith("…"))


def test_search_json_is_one_line_per_query(indexed, rich, run_cli):
    queries = [_by_id(rich, "text")[rich.column("id")[5].as_py()], "how do I report a bug"]
    r = run_cli("search", indexed, *queries, "-k", "3", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    rows = [json.loads(line) for line in lines]
    assert [row["query"] for row in rows] == queries
    texts, titles = _by_id(rich, "text"), _by_id(rich, "title")
    for row in rows:
        assert len(row["hits"]) == 3
        for hit in row["hits"]:
            assert list(hit) == ["id", "score", "text", *KEPT]
            assert hit["text"] == texts[hit["id"]] and hit["title"] == titles[hit["id"]]
    assert rows[0]["hits"][0]["id"] == rich.column("id")[5].as_py()


# ---- export ---------------------------------------------------------------------------------


def _vectors(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def _check_rows(got: dict, table: pa.Table) -> None:
    """id -> exported row against the stored table: vectors equal, text and columns equal."""
    stored = {r["id"]: r for r in table.to_pylist()}
    assert set(got) == set(stored)
    for doc, row in got.items():
        want = stored[doc]
        np.testing.assert_array_equal(_vectors(row["vector"]), _vectors(want["vector"]))
        for name in ("n_tokens", "truncated", "text", *KEPT):
            assert row[name] == want[name], (doc, name)


def test_export_jsonl_to_stdout(indexed, run_cli):
    r = run_cli("export", indexed)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 12 and list(rows[0]) == ["id", "vector", "n_tokens", "truncated", "text", *KEPT]
    _check_rows({row["id"]: row for row in rows}, _stored(indexed))
    assert r.stderr.strip() == f"exported 12 rows of {indexed / 'vectors.lance'} to stdout (jsonl)"


def test_export_csv_holds_the_vector_as_a_json_list(indexed, run_cli):
    r = run_cli("export", indexed, "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 12
    parsed = {
        row["id"]: {**row, "vector": json.loads(row["vector"]), "n_tokens": int(row["n_tokens"]), "truncated": row["truncated"] == "true",
                    "rank": int(row["rank"]), "weight": float(row["weight"])}
        for row in rows
    }  # fmt: skip
    _check_rows(parsed, _stored(indexed))


def test_export_parquet_keeps_the_schema(indexed, tmp_path):
    path = tmp_path / "rows.parquet"
    s = embedkit.export(indexed, path, format="parquet")
    assert (s.rows, s.shards_done, s.shards_total, s.dataset) == (12, 3, 3, "vectors.lance")
    got, stored = pq.read_table(path), _stored(indexed)
    assert got.schema.equals(stored.schema)
    _check_rows({r["id"]: r for r in got.to_pylist()}, stored)
    assert [p.name for p in tmp_path.iterdir()] == ["rows.parquet"]  # no temporary file left


@pytest.mark.slow  # loads the generator too
def test_export_of_a_generations_output(tmp_path, rich, run_cli):
    src, out = tmp_path / "docs.parquet", tmp_path / "gen"
    pq.write_table(rich.slice(0, 2), src)
    embedkit.generate(src, out, task="classify", labels=("yes", "no"), device="cpu", progress=False)
    stored = lance.dataset(str(out / "generations.lance")).to_table()
    r = run_cli("export", out)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows == stored.to_pylist()  # id, label, label_logprobs (a list), truncated
    c = run_cli("export", out, "--format", "csv")
    assert c.returncode == 0, c.stderr
    back = [{**row, "label_logprobs": json.loads(row["label_logprobs"])} for row in csv.DictReader(io.StringIO(c.stdout))]
    assert [(b["id"], b["label"], b["label_logprobs"]) for b in back] == [(s["id"], s["label"], s["label_logprobs"]) for s in rows]
    assert "generations.lance" in c.stderr


@pytest.fixture
def unfinished(tmp_path, encoded) -> Path:
    """A copy of an output whose plan has one more shard than is committed."""
    out = tmp_path / "unfinished"
    shutil.copytree(encoded("parquet")[1], out)
    manifest = json.loads((out / "embedkit.json").read_text())
    manifest["plan"]["shards"] += 1
    write_manifest(out, manifest)
    return out


def test_export_of_an_unfinished_output_needs_partial(unfinished, run_cli, refused, tmp_path):
    refused(run_cli("export", unfinished), "is unfinished (3 of 4 shards committed)", "--partial")
    path = tmp_path / "part.jsonl"
    r = run_cli("export", unfinished, "--partial", "-o", path)
    assert r.returncode == 0, r.stderr
    assert "partial: 3 of 4 shards committed" in r.stderr.strip().splitlines()[-1]
    assert len(path.read_text().splitlines()) == 12
    with pytest.raises(EmbedkitError, match="unfinished"):
        embedkit.export(unfinished, tmp_path / "x.jsonl")


def _no_output(tmp: Path, out: Path) -> list:
    return [tmp / "nope"]


def _not_an_output(tmp: Path, out: Path) -> list:
    (tmp / "folder").mkdir()
    return [tmp / "folder"]


REFUSALS = [
    pytest.param(_no_output, [], ["no such output folder", "nope"], id="no-such-out"),
    pytest.param(_not_an_output, [], ["has no embedkit.json: not an embedkit output"], id="not-an-output"),
    pytest.param(None, ["--format", "xml"], ["--format must be one of jsonl, csv, parquet, not 'xml'"], id="unknown-format"),
    pytest.param(None, ["--format", "parquet"], ["parquet is not written to standard output", "-o FILE"], id="parquet-to-stdout"),
    pytest.param(None, ["-o", "/proc/no/such/x.jsonl"], ["cannot write /proc/no/such/x.jsonl"], id="unwritable"),
    pytest.param(None, ["-o", "."], ["cannot write .: it is a folder"], id="folder"),
]


@pytest.mark.parametrize("make, args, needles", REFUSALS)
def test_export_refusals(make, args, needles, indexed, tmp_path, run_cli, refused):
    target = make(tmp_path, indexed) if make else [indexed]
    refused(run_cli("export", *target, *args), *needles)
