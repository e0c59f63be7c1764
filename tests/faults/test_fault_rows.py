"""Bad rows inside a shard: each one is counted and handled as documented, and the rest of the
shard is embedded as usual.

One parquet file whose text column holds bytes, so it can carry what a real corpus carries:
nulls, empty and whitespace-only texts, a 10 MB document, bytes that are not UTF-8, emoji and
mixed scripts, control characters. And a JSON lines file whose text field is sometimes not a
string. Both go through the real CLI, side by side.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .faultkit import read_vectors, run_all

BIG_BYTES = 10_000_000
EMOJI = "Release party 🎉🚀🔥 with flags 🇫🇷🇯🇵 and a family 👨‍👩‍👧‍👦 at the café"
SCRIPTS = "日本語のテキスト, 中文文本, русский текст, العربية, हिन्दी, ελληνικά, 한국어 and English"
CONTROL = "tab\there, NUL\x00 bell\x07 escape \x1b[31mred\x1b[0m and DEL\x7f inside a sentence"
CONTROL_ONLY = "\x00\x01\x02\x1b\x7f"
# rows the pipeline must skip and count: no usable text
SKIPPED = {"null": None, "empty": b"", "spaces": b"   ", "whitespace": b"\t\n \r\n", "latin-1": "café au lait".encode("latin-1"),
           "cut-euro": "price 5 €".encode()[:-1]}  # fmt: skip


@pytest.fixture(scope="module")
def big_document(sample) -> tuple[str, str, str, int]:
    """(10 MB text, a prefix long enough to be cut the same way, the paragraph, repeats): one sample paragraph
    repeated on separate lines, so its token count is that paragraph's times the repeats."""
    unit = sample.column("text")[7].as_py()
    repeats = -(-BIG_BYTES // (len(unit.encode()) + 1))
    return "\n".join([unit] * repeats), "\n".join([unit] * 40), unit, repeats


@pytest.fixture(scope="module")
def bad_rows(tmp_path_factory, sample, big_document) -> dict:
    """Both inputs encoded by the CLI: their summaries and outputs."""
    root = tmp_path_factory.mktemp("bad-rows")
    good = {f"ok-{i}": sample.column("text")[i].as_py() for i in range(5)}
    texts = {**{k: v.encode() for k, v in good.items()}, **SKIPPED, "big": big_document[0].encode(), "emoji": EMOJI.encode(),
             "scripts": SCRIPTS.encode(), "control": CONTROL.encode(), "control-only": CONTROL_ONLY.encode()}  # fmt: skip
    order = list(texts)[::-1]  # the bad rows between good ones, all in one shard
    parquet = root / "bytes.parquet"
    pq.write_table(pa.table({"id": order, "text": pa.array([texts[k] for k in order], pa.binary())}), parquet)
    jsonl = root / "mixed.jsonl"
    records = [{"id": "s1", "text": good["ok-0"]}, {"id": "number", "text": 5}, {"id": "bool", "text": True},
               {"id": "object", "text": {"k": "v"}}, {"id": "list", "text": ["x"]}, {"id": "s2", "text": good["ok-1"]}]  # fmt: skip
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    outs = [root / "out-bytes", root / "out-jsonl"]
    results = run_all([["encode", parquet, outs[0], "--json", "-q"], ["encode", jsonl, outs[1], "--json", "-q"]])
    return {"texts": {**good, "emoji": EMOJI, "scripts": SCRIPTS, "control": CONTROL, "control-only": CONTROL_ONLY},
            "results": results, "outs": outs}  # fmt: skip


def test_bad_rows_in_a_bytes_column_are_counted_and_the_rest_embedded(bad_rows, big_document, st_model, cosine, vectors_of):
    result = bad_rows["results"][0]
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    # null, empty, whitespace-only and bytes that are not UTF-8: skipped and counted
    assert summary["skipped_empty"] == len(SKIPPED)
    kept = bad_rows["texts"]
    assert summary["docs"] == len(kept) + 1  # and the 10 MB document
    assert (summary["shards_done"], summary["shards_total"]) == (1, 1)
    table = read_vectors(bad_rows["outs"][0])
    rows = {r["id"]: r for r in table.select(["id", "n_tokens", "truncated"]).to_pylist()}
    assert sorted(rows) == sorted([*kept, "big"])
    # the 10 MB document: cut to the model's 256 tokens, its full length still counted
    _, prefix, unit, repeats = big_document
    unit_tokens = len(st_model.tokenizer(unit, add_special_tokens=False)["input_ids"])
    assert rows["big"]["truncated"] and rows["big"]["n_tokens"] == repeats * unit_tokens + 2
    # every kept row has the reference vector (the big one as cut: the same 256 tokens as its prefix)
    want = dict(zip([*kept, "big"], st_model.encode([*kept.values(), prefix], normalize_embeddings=True)))
    cos = cosine(vectors_of(table), want)
    assert min(cos.values()) >= 0.999, cos
    # control characters are dropped by the model's tokenizer: a text of only those embeds as ""
    assert rows["control-only"]["n_tokens"] == 2
    assert np.allclose(vectors_of(table)["control-only"], st_model.encode([""], normalize_embeddings=True)[0], atol=2e-3)


def test_non_string_json_text_values_are_counted_and_the_rest_embedded(bad_rows):
    result = bad_rows["results"][1]
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert (summary["docs"], summary["skipped_empty"]) == (2, 4)  # a number, a boolean, an object, a list
    assert sorted(read_vectors(bad_rows["outs"][1]).column("id").to_pylist()) == ["s1", "s2"]
