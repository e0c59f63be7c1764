"""corpus.py: every input format, column choice, row-number ids, empty texts, duplicate ids.

Readers are checked directly (no model); each format is also encoded end to end and its vectors
matched by id against sentence-transformers.
"""

from __future__ import annotations

import json

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embedkit
from embedkit.errors import EmbedkitError
from embedkit.io.corpus import find_first_duplicate, open_corpus

FORMATS = ["parquet", "parquet_dir", "jsonl", "csv", "lance", "txt"]
KINDS = {"parquet": "parquet", "parquet_dir": "parquet", "jsonl": "jsonl", "csv": "csv", "lance": "lance", "txt": "txt"}


def _expected_ids(fmt: str, small_table: pa.Table, txt_id) -> list:
    ids = small_table.column("id").to_pylist()
    return [txt_id(i) for i in ids] if fmt == "txt" else ids


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_yields_every_row_in_order(corpora, small_table, txt_id, fmt):
    corpus = open_corpus(corpora[fmt])
    assert corpus.kind == KINDS[fmt]
    assert corpus.num_rows == small_table.num_rows
    assert corpus.id_type == pa.string()
    # read in uneven ranges that cross row groups, files and fragments
    parts = [corpus.read(a, b) for a, b in [(0, 3), (3, 9), (9, 14), (14, 20)]]
    table = pa.concat_tables(parts)
    assert table.schema.names == ["id", "text"]
    want = dict(zip(small_table.column("id").to_pylist(), small_table.column("text").to_pylist()))
    expected_ids = _expected_ids(fmt, small_table, txt_id)
    if fmt == "txt":  # sorted by path, not by the sample's order
        assert table.column("id").to_pylist() == sorted(expected_ids)
        by_path = {txt_id(i): t for i, t in want.items()}
        assert dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist())) == by_path
    else:
        assert table.column("id").to_pylist() == expected_ids
        assert table.column("text").to_pylist() == list(want.values())
    assert sorted(corpus.read_ids().to_pylist()) == sorted(expected_ids)


def test_a_json_array_file_reads_like_json_lines(tmp_path, corpora, small_table):
    """A .json file holding one array of objects (what many tools export) is read as its rows."""
    path = tmp_path / "docs.json"
    path.write_text(json.dumps(small_table.to_pylist(), indent=1))
    assert open_corpus(path).read(0, small_table.num_rows).to_pylist() == open_corpus(corpora["jsonl"]).read(0, small_table.num_rows).to_pylist()
    for body, needle in [('[{"id": "a", "text": "x"}, 3]', "element 2 is not an object"), ("[1, 2", "as a JSON array"), ("[]", "holds no rows")]:
        path.write_text(body)
        with pytest.raises(EmbedkitError, match=needle):
            open_corpus(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_encodes_to_the_reference(
    tmp_path, corpora, small_table, small_reference, txt_id, vectors_of, cosine, read_output, fmt
):
    summary = embedkit.encode(corpora[fmt], tmp_path, device="cpu", shard_rows=8, progress=False)
    table = read_output(tmp_path)
    got = vectors_of(table)  # fails on a repeated id
    assert sorted(got) == sorted(_expected_ids(fmt, small_table, txt_id))
    assert table.schema.field("id").type == pa.string()
    want = small_reference if fmt != "txt" else {txt_id(i): v for i, v in small_reference.items()}
    assert min(cosine(got, want).values()) >= 0.999
    assert summary.docs == small_table.num_rows and summary.shards_total == 3
    assert embedkit.status(tmp_path).manifest["input"]["kind"] == KINDS[fmt]


@pytest.fixture(scope="module")
def renamed(tmp_path_factory, small_table):
    """Integer ids in `doc_id`, the text in `body`, and a decoy `text` column that must be ignored."""
    n = small_table.num_rows
    table = pa.table(
        {
            "doc_id": pa.array(range(1000, 1000 + n), pa.int32()),
            "body": small_table.column("text"),
            "text": pa.array([f"decoy {i}" for i in range(n)]),
        }
    )
    path = tmp_path_factory.mktemp("renamed") / "renamed.parquet"
    pq.write_table(table, path)
    return path


def test_text_and_id_columns(tmp_path, renamed, small_table, small_reference, vectors_of, cosine, read_output):
    embedkit.encode(renamed, tmp_path, text_column="body", id_column="doc_id", device="cpu", progress=False)
    table = read_output(tmp_path)
    assert table.schema.field("id").type == pa.int64()  # integer ids widen to int64
    got = vectors_of(table)
    want = {1000 + k: v for k, v in enumerate(small_reference.values())}
    assert min(cosine(got, want).values()) >= 0.999


@pytest.mark.parametrize("fmt", ["parquet", "parquet_dir", "jsonl", "csv", "lance"])
def test_absent_id_column_gives_row_numbers(
    tmp_path, small_table, small_reference, vectors_of, cosine, read_output, fmt
):
    texts = small_table.select(["text"])
    src = tmp_path / "src"
    if fmt == "parquet":  # row numbers continue across row groups
        src = src.with_suffix(".parquet")
        pq.write_table(texts, src, row_group_size=6)
    elif fmt == "parquet_dir":  # row numbers continue across files
        src.mkdir()
        pq.write_table(texts.slice(0, 7), src / "a.parquet")
        pq.write_table(texts.slice(7), src / "b.parquet")
    elif fmt == "jsonl":
        src = src.with_suffix(".jsonl")
        src.write_text("".join(json.dumps(r) + "\n" for r in texts.to_pylist()))
    elif fmt == "csv":
        import pyarrow.csv as pcsv

        src = src.with_suffix(".csv")
        pcsv.write_csv(texts, src)
    else:
        src = src.with_suffix(".lance")
        lance.write_dataset(texts, str(src), max_rows_per_file=6)
    embedkit.encode(src, tmp_path / "out", device="cpu", shard_rows=6, progress=False)
    table = read_output(tmp_path / "out")
    assert table.schema.field("id").type == pa.int64()
    got = vectors_of(table)
    assert sorted(got) == list(range(small_table.num_rows))
    want = dict(enumerate(small_reference.values()))  # row i holds the sample's row i
    assert min(cosine(got, want).values()) >= 0.999


EMPTY_TEXTS = [("a", "first text"), ("b", None), ("c", ""), ("d", "   "), ("e", "\n\t "), ("f", "last text")]


@pytest.fixture(scope="module")
def with_empties(tmp_path_factory):
    path = tmp_path_factory.mktemp("empties") / "empties.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in EMPTY_TEXTS))
    return path


def test_empty_texts_are_skipped_and_counted(tmp_path, with_empties, read_output):
    summary = embedkit.encode(with_empties, tmp_path, device="cpu", shard_rows=4, progress=False)
    assert summary.skipped_empty == 4
    assert summary.docs == 2
    assert sorted(read_output(tmp_path).column("id").to_pylist()) == ["a", "f"]
    assert embedkit.status(tmp_path).complete


def test_empty_texts_kept_with_keep_empty(tmp_path, with_empties, st_model, vectors_of, cosine, read_output):
    summary = embedkit.encode(with_empties, tmp_path, device="cpu", keep_empty=True, dtype="float32", progress=False)
    assert summary.skipped_empty == 0
    assert summary.docs == len(EMPTY_TEXTS)
    got = vectors_of(read_output(tmp_path))
    # a null text is embedded as ""
    texts = ["" if t is None else t for _, t in EMPTY_TEXTS]
    want = dict(zip([i for i, _ in EMPTY_TEXTS], st_model.encode(texts, normalize_embeddings=True)))
    assert min(cosine(got, want).values()) >= 0.99999


def test_a_shard_of_only_empty_texts_still_commits(tmp_path, read_output):
    src = tmp_path / "docs.jsonl"
    rows = [{"id": 1, "text": "x y"}, {"id": 2, "text": " "}, {"id": 3, "text": None}, {"id": 4, "text": "z"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = embedkit.encode(src, tmp_path / "out", device="cpu", shard_rows=1, progress=False)
    assert (summary.shards_done, summary.skipped_empty, summary.docs) == (4, 2, 2)
    assert sorted(read_output(tmp_path / "out").column("id").to_pylist()) == [1, 4]
    st = embedkit.status(tmp_path / "out")
    assert st.complete and st.shards_done == 4


def test_csv_numeric_looking_texts_stay_text(tmp_path):
    """A CSV text column whose values look like numbers is still text, not an int column."""
    src = tmp_path / "numbers.csv"
    src.write_text("id,text\na,2024\nb,3.14\nc,42\n")
    table = open_corpus(src).read(0, 3)
    assert table.column("text").to_pylist() == ["2024", "3.14", "42"]


def test_jsonl_all_null_text_column_reads_as_empty(tmp_path):
    src = tmp_path / "nulls.jsonl"
    src.write_text('{"id": "x", "text": null}\n{"id": "y", "text": null}\n')
    table = open_corpus(src).read(0, 2)
    assert table.column("text").type == pa.string()
    assert table.column("text").to_pylist() == [None, None]


def test_txt_folder_rejects_invalid_utf8(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    corpus = open_corpus(tmp_path)
    with pytest.raises(EmbedkitError, match="bad.txt is not valid UTF-8"):
        corpus.read(0, 2)


def test_unknown_format_and_empty_folder(tmp_path):
    (tmp_path / "x.xlsx").write_bytes(b"")
    with pytest.raises(EmbedkitError, match="cannot tell the format"):
        open_corpus(tmp_path / "x.xlsx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmbedkitError, match="no .parquet or .txt files"):
        open_corpus(tmp_path / "empty")


def test_parquet_folder_checks_every_file_for_the_text_column(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["b"], "body": ["y"]}), tmp_path / "b.parquet")
    with pytest.raises(EmbedkitError, match="b.parquet: no text column 'text'"):
        open_corpus(tmp_path)


def test_id_column_of_floats_is_refused(tmp_path):
    pq.write_table(pa.table({"id": [1.5, 2.5], "text": ["x", "y"]}), tmp_path / "f.parquet")
    with pytest.raises(EmbedkitError, match="ids must be integers or strings"):
        open_corpus(tmp_path / "f.parquet")


DUPLICATE_CASES = [
    pytest.param(["a", "b", "c"], None, id="none"),
    pytest.param(["a", "b", "a", "c", "a"], ("a", [0, 2, 4]), id="string"),
    pytest.param([3, 1, 2, 1, 3], (3, [0, 4]), id="first-in-row-order"),
    pytest.param(["x"] * 7, ("x", [0, 1, 2, 3, 4]), id="rows-capped-at-five"),
]


@pytest.mark.parametrize("ids, expected", DUPLICATE_CASES)
def test_find_first_duplicate_table(ids, expected):
    assert find_first_duplicate(pa.chunked_array([pa.array(ids[:2]), pa.array(ids[2:])])) == expected


def test_find_first_duplicate_refuses_null_ids():
    with pytest.raises(EmbedkitError, match="row 1 has a null id"):
        find_first_duplicate(pa.chunked_array([pa.array(["a", None, "b"])]))


def test_parquet_reads_any_row_range_across_groups_and_files(tmp_path, sample):
    """Windows are read one range at a time: every range must equal the same slice of the input."""
    import pyarrow.parquet as pq

    from embedkit.io.corpus import Columns, open_corpus

    rows = sample.slice(0, 40)
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(rows.slice(0, 25), folder / "a.parquet", row_group_size=7)
    pq.write_table(rows.slice(25), folder / "b.parquet", row_group_size=4)
    corpus = open_corpus(folder, Columns())
    want = rows.column("id").to_pylist()
    for start, stop in [(0, 40), (0, 1), (6, 8), (7, 14), (20, 31), (24, 25), (25, 29), (39, 40), (3, 3)]:
        assert corpus.read(start, stop).column("id").to_pylist() == want[start:stop], (start, stop)
    # the same group again (cached) and then an earlier one
    assert corpus.read(8, 10).column("id").to_pylist() == want[8:10]
    assert corpus.read(1, 2).column("id").to_pylist() == want[1:2]
