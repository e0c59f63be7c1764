"""encode(): vectors in OUT/vectors.lance equal sentence-transformers' own encode, row by row.

The reference is `SentenceTransformer.encode` of the same bundled model; the texts include rows
cut at 256 tokens (and rows of exactly 255, 256, 257 tokens), emoji and mixed scripts.
"""

from __future__ import annotations

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embedkit
from embedkit.io.store import vectors_schema

MAX_SEQ = 256  # all-MiniLM-L6-v2's max_seq_length, special tokens included


@pytest.fixture(scope="module")
def equality_input(tmp_path_factory, equality_table):
    path = tmp_path_factory.mktemp("equality") / "docs.parquet"
    pq.write_table(equality_table, path)
    return path


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, equality_input):
    """dtype -> (summary, output table) for one run per dtype, normalized (the default)."""
    runs = {}
    for dtype in ("float32", "float16"):
        out = tmp_path_factory.mktemp(f"out-{dtype}")
        summary = embedkit.encode(equality_input, out, dtype=dtype, device="cpu", shard_rows=16, progress=False)
        runs[dtype] = (summary, lance.dataset(str(out / "vectors.lance")).to_table())
    return runs


@pytest.fixture(scope="module")
def reference(equality_table, st_reference):
    return st_reference(equality_table, normalize=True)


@pytest.mark.parametrize("dtype, min_cos", [("float32", 0.99999), ("float16", 0.999)])
def test_vectors_equal_sentence_transformers(encoded, reference, vectors_of, cosine, dtype, min_cos):
    summary, table = encoded[dtype]
    got = vectors_of(table)
    assert set(got) == set(reference)  # every id exactly once
    cos = cosine(got, reference)
    worst = min(cos, key=cos.get)
    assert cos[worst] >= min_cos, (worst, cos[worst])
    norms = np.linalg.norm(np.stack(list(got.values())), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-3 if dtype == "float16" else 1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_output_schema(encoded, dtype):
    _, table = encoded[dtype]
    assert table.schema.equals(vectors_schema(pa.string(), 384, dtype))
    value = pa.float16() if dtype == "float16" else pa.float32()
    assert table.schema.field("vector").type == pa.list_(value, 384)


def test_token_counts_and_truncation(encoded, equality_table, full_token_count):
    summary, table = encoded["float32"]
    texts = dict(zip(equality_table.column("id").to_pylist(), equality_table.column("text").to_pylist()))
    full = {i: full_token_count(t) for i, t in texts.items()}
    rows = {r["id"]: r for r in table.select(["id", "n_tokens", "truncated"]).to_pylist()}
    for doc_id, n in full.items():
        assert rows[doc_id]["n_tokens"] == n, doc_id
        assert rows[doc_id]["truncated"] == (n > MAX_SEQ), (doc_id, n)
    long_ids = [i for i, n in full.items() if n > MAX_SEQ]
    # the fixture holds long sample rows, 257 tokens, and long emoji / mixed-script texts
    assert {"u:long-emoji", "u:long-mixed"} <= set(long_ids)
    assert any(n == MAX_SEQ + 1 for n in full.values()) and any(n == MAX_SEQ for n in full.values())
    assert all(rows[i]["n_tokens"] > MAX_SEQ for i in long_ids)
    assert summary.truncated == len(long_ids)
    assert summary.tokens == sum(min(n, MAX_SEQ) for n in full.values())  # what the model read


def test_summary_counts(encoded, equality_table):
    summary, _ = encoded["float16"]
    n = equality_table.num_rows
    assert summary.docs == n
    assert summary.skipped_empty == 0
    assert summary.shards_total == -(-n // 16)
    assert summary.shards_done == summary.shards_total and summary.shards_skipped == 0
    assert summary.padded_tokens >= summary.tokens
    assert summary.tokens_per_second > 0
    d = summary.to_dict()
    assert d["docs"] == n and d["tokens"] == summary.tokens and "tokens_per_second" in d
    st = embedkit.status(summary.out)
    assert st.complete and st.rows == n and st.shards_done == summary.shards_total


def test_no_normalize_equals_sentence_transformers_unnormalized(
    tmp_path, equality_input, equality_table, st_reference, vectors_of
):
    summary = embedkit.encode(equality_input, tmp_path, dtype="float32", normalize=False, device="cpu", progress=False)
    got = vectors_of(lance.dataset(str(tmp_path / "vectors.lance")).to_table())
    want = st_reference(equality_table, normalize=False)
    assert set(got) == set(want)
    ids = sorted(want)
    np.testing.assert_allclose(np.stack([got[i] for i in ids]), np.stack([want[i] for i in ids]), rtol=1e-4, atol=2e-5)
    assert embedkit.status(tmp_path).manifest["output"]["normalize"] is False
    assert summary.docs == len(ids)


@pytest.mark.parametrize("normalize", [False, True])
def test_normalize_flag_on_a_model_without_normalize_layer(
    tmp_path, unnormalized_model_dir, small_table, vectors_of, normalize
):
    """Without the model's own Normalize layer, embedkit's normalize decides the vector length."""
    from sentence_transformers import SentenceTransformer

    src = tmp_path / "docs.parquet"
    pq.write_table(small_table, src)
    model = str(unnormalized_model_dir)
    embedkit.encode(src, tmp_path / "out", model=model, dtype="float32", normalize=normalize, device="cpu", progress=False)
    got = vectors_of(lance.dataset(str(tmp_path / "out" / "vectors.lance")).to_table())
    ref = SentenceTransformer(str(unnormalized_model_dir), device="cpu")
    texts = small_table.column("text").to_pylist()
    want = dict(zip(small_table.column("id").to_pylist(), ref.encode(texts, normalize_embeddings=normalize)))
    ids = sorted(want)
    a, b = np.stack([got[i] for i in ids]), np.stack([want[i] for i in ids]).astype(np.float64)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    norms = np.linalg.norm(a, axis=1)
    if normalize:
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    else:
        assert np.all(np.abs(norms - 1.0) > 0.05), norms  # raw mean pooling is far from unit length


@pytest.mark.parametrize("normalize", [True, False])
def test_encode_texts_equals_sentence_transformers(st_model, equality_table, normalize):
    texts = equality_table.column("text").to_pylist()
    got = embedkit.encode_texts(texts, device="cpu", normalize=normalize)
    want = st_model.encode(texts, normalize_embeddings=normalize, batch_size=32)
    assert got.shape == (len(texts), 384) and got.dtype == np.float32
    cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.99999, int(cos.argmin())
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=1e-4)


def test_encode_texts_keeps_input_order_and_small_batches(st_model):
    """Rows come back in input order even when packing reorders them into many small batches."""
    texts = ["a longer sentence about the python standard library and its modules", "short", "", "mid sized 🙂"]
    got = embedkit.encode_texts(texts, device="cpu", batch_tokens=8)
    want = st_model.encode(texts, normalize_embeddings=True)
    cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.99999
    assert embedkit.encode_texts([], device="cpu").shape == (0, 384)


def test_max_seq_length_override_equals_sentence_transformers(
    tmp_path, equality_input, equality_table, st_model, full_token_count, vectors_of, cosine, read_output
):
    embedkit.encode(equality_input, tmp_path, max_seq_length=128, dtype="float32", device="cpu", progress=False)
    table = read_output(tmp_path)
    texts = equality_table.column("text").to_pylist()
    st_model.max_seq_length = 128
    try:
        want = dict(zip(equality_table.column("id").to_pylist(), st_model.encode(texts, normalize_embeddings=True)))
    finally:
        st_model.max_seq_length = MAX_SEQ
    assert min(cosine(vectors_of(table), want).values()) >= 0.99999
    full = dict(zip(want, map(full_token_count, texts)))
    for r in table.select(["id", "n_tokens", "truncated"]).to_pylist():
        assert (r["n_tokens"], r["truncated"]) == (full[r["id"]], full[r["id"]] > 128), r["id"]
    assert embedkit.status(tmp_path).manifest["model"]["max_seq_length"] == 128


@pytest.mark.parametrize("workers", [0, 2])
def test_many_windows_and_tiny_batches_keep_ids_with_their_vectors(
    tmp_path, equality_input, reference, workers, vectors_of, cosine, read_output
):
    """Shards cut into windows of 7 docs, packed into batches of <= 300 tokens, in and out of process."""
    from embedkit.config import EncodeConfig, RunOptions
    from embedkit.encoding.pipeline import run_encode

    cfg = EncodeConfig(
        device="cpu", dtype="float32", shard_rows=20, window_docs=7, batch_tokens=300, tokenize_workers=workers,
        run=RunOptions(progress=False),
    )  # fmt: skip
    summary = run_encode(equality_input, tmp_path, cfg)
    assert summary.docs == len(reference)
    assert min(cosine(vectors_of(read_output(tmp_path)), reference).values()) >= 0.99999


# ---- the attention kernel ---------------------------------------------------------------------

ATTENTION_CASES = [
    # CUDA without padding: flash first (no mask); with padding the memory-efficient kernel takes
    # the boolean mask; math last; never cuDNN, which plans each new shape
    ("cuda", False, ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")),
    ("cuda", True, ("EFFICIENT_ATTENTION", "MATH")),
    # the CPU keeps torch's own choice
    ("cpu", False, ()),
    ("cpu", True, ()),
]


@pytest.mark.parametrize("device, padded, expected", ATTENTION_CASES)
def test_attention_backends_table(device, padded, expected):
    from embedkit.engine.encoder import attention_backends

    assert attention_backends(device, padded) == expected
    assert all("CUDNN" not in name for name in attention_backends(device, padded))


def test_attention_context_restricts_sdpa_and_keeps_its_result():
    """Inside the CUDA context of a padded batch, SDPA may use the listed kernels only (on this
    CPU: math), and computes what it computes outside it."""
    import torch

    from embedkit.engine.encoder import attention_context

    def flags() -> tuple:
        b = torch.backends.cuda
        return b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled()

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g) for _ in range(3))
    mask = torch.arange(9)[None, None, None, :] < torch.tensor([9, 5])[:, None, None, None]
    free = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    before = flags()
    with attention_context("cuda", padded=True):
        assert flags() == (False, False, True, True)  # cuDNN and flash off; memory-efficient and math on
        inside = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert flags() == before  # restored on exit
    torch.testing.assert_close(inside, free)


@pytest.mark.gpu
def test_a_cuda_encode_runs_no_cudnn_attention(equality_table):
    """Profiled on a GPU: the forward's attention kernels are flash or memory-efficient ones."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    texts = equality_table.column("text").to_pylist()[:64]
    embedkit.encode_texts(texts, device="cuda")  # load and warm
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        embedkit.encode_texts(texts, device="cuda")
        torch.cuda.synchronize()
    names = [e.name.lower() for e in prof.key_averages()]
    assert not any("cudnn" in n and ("attn" in n or "attention" in n or "fmha" in n) for n in names), names
    assert any("fmha" in n or "flash" in n or "efficient" in n for n in names), names
