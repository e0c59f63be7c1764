"""encode --chunk-tokens: long documents split into overlapping chunks, none of their text lost;
each chunk a row with its document's id, its number and its character span; search by document."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import lance
import numpy as np
import pyarrow as pa
import pytest
from conftest import MAX_SEQ, parquet_input

import embedkit
from embedkit.config import DEFAULT_MODEL
from embedkit.engine.chunking import chunk_bounds
from embedkit.engine.models import fast_tokenizer_json
from embedkit.engine.tokenize import TextTokenizer
from embedkit.errors import EmbedkitError

CHUNK, OVERLAP = 64, 8


@pytest.fixture(scope="module")
def tokenizer_json(st_model) -> str:
    return fast_tokenizer_json(st_model)


@pytest.fixture(scope="module")
def docs(sample) -> pa.Table:
    """160 documents of the sample, long ones among them (each over 64 tokens is split)."""
    return sample.slice(0, 160)


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory, docs) -> str:
    return parquet_input(tmp_path_factory, docs, "chunk-input")


@pytest.fixture(scope="module")
def chunked(tmp_path_factory, docs_file):
    out = tmp_path_factory.mktemp("chunked") / "out"
    summary = embedkit.encode(docs_file, out, device="cpu", chunk_tokens=CHUNK, chunk_overlap=OVERLAP, store_text=True,
                              shard_rows=100, progress=False)  # fmt: skip
    return out, summary


def rows_of(out) -> pa.Table:
    return lance.dataset(str(out / "vectors.lance")).to_table()


# ---- the split -------------------------------------------------------------------------------


def test_chunks_cover_every_token_within_the_cap_and_overlap(tokenizer_json, docs):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_padding()
    tok.no_truncation()
    texts = docs.column("text").to_pylist()
    split = 0
    for text in texts:
        offsets = tok.encode(text, add_special_tokens=False).offsets
        bounds = chunk_bounds(offsets, text, CHUNK - 2, OVERLAP)
        assert bounds[0][0] == 0 and bounds[-1][1] == len(offsets)  # first token to last
        for (a, b), (c, d) in zip(bounds, bounds[1:]):
            assert c > a and d > b  # moving forward
            assert c <= b, "a gap between chunks loses tokens"
            assert b - c <= OVERLAP  # repeats at most the overlap
        assert all(0 < b - a <= CHUNK - 2 for a, b in bounds)
        split += len(bounds) > 1
    assert split > 20  # the sample has long documents: the test exercised the cuts


def test_a_cut_falls_on_a_sentence_end_when_one_is_in_the_second_half():
    text = "Alpha beta gamma. Delta epsilon zeta eta theta iota kappa lambda."
    words = [(i, i + len(w)) for i, w in _words(text)]
    bounds = chunk_bounds(words, text, cap=6, overlap=0)
    assert text[words[bounds[0][1] - 1][1] - 1] == "."  # the first chunk ends with "gamma."
    assert bounds[0] == (0, 3)


def _words(text: str):
    i = 0
    for w in text.split(" "):
        yield i, w
        i += len(w) + 1


def test_chunked_tokenizer_keeps_every_token_and_the_spans_point_at_them(tokenizer_json, docs):
    texts = docs.column("text").to_pylist()
    plain = TextTokenizer(tokenizer_json, 100_000)  # nothing cut: the whole content of each text
    split = TextTokenizer(tokenizer_json, CHUNK, chunk_overlap=0)
    whole, got = plain(texts), split(texts)
    c = got.chunks
    assert c is not None and c.texts == len(texts) and len(c.source) > len(texts)
    assert not got.truncated.any() and got.lengths.max() <= CHUNK
    assert np.array_equal(got.text_tokens() - 2 * np.bincount(c.source), whole.lengths - 2)  # every content token, once
    for i in range(len(texts)):
        rows = np.flatnonzero(c.source == i)
        assert c.chunk[rows].tolist() == list(range(len(rows)))
        content = np.concatenate([got.flat[got.offsets[r] + 1 : got.offsets[r + 1] - 1] for r in rows])
        assert np.array_equal(content, whole.flat[whole.offsets[i] + 1 : whole.offsets[i + 1] - 1])
        assert c.start[rows[0]] == 0 and c.end[rows[-1]] <= len(texts[i])
        assert (c.start[rows] < c.end[rows]).all() or len(texts[i]) == 0


# ---- encode ----------------------------------------------------------------------------------


def test_every_document_is_encoded_whole_as_chunk_rows(chunked, docs, tokenizer_json):
    out, summary = chunked
    table = rows_of(out)
    assert summary.docs == docs.num_rows and summary.chunks == table.num_rows > docs.num_rows
    assert summary.truncated == 0 and not any(table.column("truncated").to_pylist())
    pairs = list(zip(table.column("id").to_pylist(), table.column("chunk").to_pylist()))
    assert len(set(pairs)) == len(pairs)  # each (id, chunk) once
    by_doc: dict = {}
    for d, c in pairs:
        by_doc.setdefault(d, []).append(c)
    assert set(by_doc) == set(docs.column("id").to_pylist())
    assert all(sorted(cs) == list(range(len(cs))) for cs in by_doc.values())
    assert max(table.column("n_tokens").to_pylist()) <= CHUNK
    # the tokens encoded are those of the chunks: every token of every document, overlaps again
    want = TextTokenizer(tokenizer_json, CHUNK, chunk_overlap=OVERLAP)(docs.column("text").to_pylist())
    assert summary.tokens == int(want.lengths.sum()) == sum(table.column("n_tokens").to_pylist())


def test_chunk_vectors_equal_sentence_transformers_on_the_chunk_text(chunked, docs, st_model, tokenizer_json):
    """A chunk's vector is the model's vector of its span of text, wherever the span's own
    tokenization gives the chunk's tokens (a span that begins mid-word, after an overlap, does not)."""
    out, _ = chunked
    table = rows_of(out)
    split = TextTokenizer(tokenizer_json, CHUNK, chunk_overlap=OVERLAP)(docs.column("text").to_pylist())
    doc_ids = docs.column("id").to_pylist()
    ids_of = {(doc_ids[s], int(c)): split.flat[split.offsets[r] : split.offsets[r + 1]].tolist()
              for r, (s, c) in enumerate(zip(split.chunks.source, split.chunks.chunk))}  # fmt: skip
    spans = [t[a:b] for t, a, b in zip(*(table.column(n).to_pylist() for n in ("text", "start", "end")))]
    alone = TextTokenizer(tokenizer_json, CHUNK)(spans)
    keys = list(zip(table.column("id").to_pylist(), table.column("chunk").to_pylist()))
    same = [i for i, key in enumerate(keys) if alone.flat[alone.offsets[i] : alone.offsets[i + 1]].tolist() == ids_of[key]]
    assert len(same) > 0.6 * len(spans), (len(same), len(spans))
    want = st_model.encode([spans[i] for i in same], normalize_embeddings=True, convert_to_numpy=True)
    got = np.stack(table.column("vector").to_numpy(zero_copy_only=False)[same]).astype(np.float32)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.99, cos.min()


def test_search_returns_each_document_once_with_its_best_chunk(chunked):
    out, _ = chunked
    embedkit.build_index(out, progress=False)
    r = embedkit.Retriever(out)
    queries = ["how do I open a file", "memory allocation in the C API", "unicode string formatting"]
    docs = r.search(queries, k=10)
    rows = r.search(queries, k=10, chunks=True)
    for q in range(len(queries)):
        assert len(docs.ids[q]) == 10 and len(set(docs.ids[q])) == 10  # documents, each once
        assert docs.scores[q] == sorted(docs.scores[q], reverse=True)
        # a document's score is its best chunk's: the best row is the best document
        assert docs.ids[q][0] == rows.ids[q][0] and docs.scores[q][0] == rows.scores[q][0]
        best = {}
        for d, s in zip(rows.ids[q], rows.scores[q]):
            best.setdefault(d, s)
        for d, s in zip(docs.ids[q], docs.scores[q]):
            if d in best:
                assert s == best[d]
        # the hit's text is its chunk's span
        for text, a, b in zip(docs.texts[q], docs.columns["start"][q], docs.columns["end"][q]):
            assert len(text) == b - a
    assert any(len(set(ids)) < len(ids) for ids in rows.ids)  # chunk rows: a document can come twice


def test_cli_search_shows_the_chunk_and_its_span(chunked, run_cli):
    out, _ = chunked
    embedkit.build_index(out, progress=False)
    res = run_cli("search", out, "how do I open a file", "-k", "3")
    assert res.returncode == 0, res.stderr
    hits = [line for line in res.stdout.splitlines() if line.startswith("   ")]
    assert len(hits) == 3 and all(" #" in h and ":" in h.split("[")[1] for h in hits), res.stdout


def test_dry_run_counts_the_tokens_the_chunked_encode_reads(chunked, docs_file):
    from embedkit.plan.planning import count_tokens

    _, summary = chunked
    count = count_tokens(docs_file, DEFAULT_MODEL, sample=0, chunk_tokens=CHUNK, chunk_overlap=OVERLAP)
    assert count.exact and count.tokens == summary.tokens and count.truncated_fraction == 0


# ---- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"chunk_overlap": 4}, "--chunk-overlap needs --chunk-tokens"),
        ({"chunk_tokens": 64, "chunk_overlap": 32}, "less than half"),
        ({"chunk_tokens": 0}, "--chunk-tokens must be a positive number"),
        ({"chunk_tokens": 64, "chunk_overlap": -1}, "--chunk-overlap must be 0 or more"),
        ({"chunk_tokens": MAX_SEQ + 1}, "above the model's max sequence length"),
    ],
)
def test_bad_chunk_options_are_refused(tmp_path, docs_file, options, needle):
    with pytest.raises(EmbedkitError, match=needle):
        embedkit.encode(docs_file, tmp_path / "out", device="cpu", progress=False, **options)
    assert not (tmp_path / "out" / "vectors.lance").exists()


def test_resuming_with_other_chunk_settings_is_refused(chunked, tmp_path, docs_file, run_cli, refused):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(chunked[0], out)
    refused(run_cli("encode", docs_file, out, "--chunk-tokens", "32"), "chunk tokens (64 -> 32)")
    refused(run_cli("encode", docs_file, out), "chunk tokens (64 -> 0)")


# ---- kill -9 and resume ----------------------------------------------------------------------


def test_kill_mid_run_then_resume_keeps_each_chunk_exactly_once(tmp_path, docs_file, chunked):
    """SIGKILL right after shard 1's commit reached Lance, before its record: the rerun redoes
    only what was lost, and the (id, chunk) rows equal those of an uninterrupted run."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "embedkit.cli", "encode", docs_file, str(out), "--chunk-tokens", str(CHUNK),
            "--chunk-overlap", str(OVERLAP), "--store-text", "--shard-rows", "100", "-q"]  # fmt: skip
    env = {**os.environ, "EMBEDKIT_TEST_KILL_AT": "commit:1"}
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    got, want = rows_of(out), rows_of(chunked[0])
    key = lambda t: sorted(zip(t.column("id").to_pylist(), t.column("chunk").to_pylist(), t.column("start").to_pylist()))  # noqa: E731
    assert key(got) == key(want)
    pairs = list(zip(got.column("id").to_pylist(), got.column("chunk").to_pylist()))
    assert len(pairs) == len(set(pairs))
