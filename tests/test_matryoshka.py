"""encode --dim N: the first N dimensions of each vector, renormalized, as sentence-transformers'
`truncate_dim`; searched with queries cut the same way."""

from __future__ import annotations

import json

import lance
import numpy as np
import pytest
from conftest import parquet_input
from sentence_transformers import SentenceTransformer

import embedkit
from embedkit.engine.models import resolve_model
from embedkit.errors import EmbedkitError

DIM = 128


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory, sample) -> str:
    return parquet_input(tmp_path_factory, sample.slice(0, 80), "dim-input")


@pytest.fixture(scope="module")
def st_cut() -> SentenceTransformer:
    return SentenceTransformer(str(resolve_model("all-MiniLM-L6-v2").path), device="cpu", truncate_dim=DIM)


@pytest.fixture(scope="module")
def cut_output(tmp_path_factory, docs_file):
    out = tmp_path_factory.mktemp("dim") / "out"
    embedkit.encode(docs_file, out, device="cpu", dtype="float32", dim=DIM, progress=False)
    return out


def test_vectors_equal_sentence_transformers_truncate_dim(cut_output, sample, st_cut):
    table = lance.dataset(str(cut_output / "vectors.lance")).to_table(columns=["id", "vector"])
    assert table.schema.field("vector").type.list_size == DIM
    texts = dict(zip(sample.column("id").to_pylist(), sample.column("text").to_pylist()))
    ids = table.column("id").to_pylist()
    want = st_cut.encode([texts[i] for i in ids], normalize_embeddings=True, convert_to_numpy=True)
    got = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)  # renormalized after the cut
    assert ((got * want).sum(1)).min() > 0.9999
    manifest = json.loads((cut_output / "embedkit.json").read_text())
    assert manifest["output"]["dim"] == DIM and manifest["model"]["dim"] == 384


def test_search_cuts_the_queries_the_same_way(cut_output, st_cut):
    embedkit.build_index(cut_output, progress=False)
    r = embedkit.Retriever(cut_output)
    queries = ["how do I open a file", "the garbage collector"]
    got = r.search(queries, k=5)
    want = r.search_vectors(st_cut.encode(queries, normalize_embeddings=True), k=5)
    assert got.ids == want.ids and np.allclose(got.scores, want.scores, atol=1e-4)


def test_dim_above_the_model_is_refused(tmp_path, docs_file):
    with pytest.raises(EmbedkitError, match="--dim 385 is above the model's dimension 384"):
        embedkit.encode(docs_file, tmp_path / "out", device="cpu", dim=385, progress=False)
    with pytest.raises(EmbedkitError, match="--dim must be a positive number"):
        embedkit.encode(docs_file, tmp_path / "out", device="cpu", dim=0, progress=False)


def test_rerun_with_another_dim_is_refused(cut_output, docs_file, run_cli, refused):
    refused(run_cli("encode", docs_file, cut_output, "--dim", "64", "--dtype", "float32"), "vector dimensions kept (128 -> 64)")
    refused(run_cli("encode", docs_file, cut_output, "--dtype", "float32"), "vector dimensions kept (128 -> 0)")


def test_status_says_how_many_dimensions_were_kept(cut_output, run_cli):
    res = run_cli("status", cut_output)
    assert res.returncode == 0 and "first 128 of 384 dimensions" in res.stdout, res.stdout
