"""encode --dtype int8 | binary: the codes of sentence-transformers' `quantize_embeddings`, with
the int8 ranges calibrated on the input and recorded; build-index and search work on them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import lance
import numpy as np
import pytest
from conftest import parquet_input
from sentence_transformers.quantization import quantize_embeddings

import embedkit
from embedkit.errors import EmbedkitError

ROWS = 120


@pytest.fixture(scope="module")
def docs(sample):
    return sample.slice(0, ROWS)


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory, docs) -> str:
    return parquet_input(tmp_path_factory, docs, "quantized-input")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, docs_file) -> dict:
    root = tmp_path_factory.mktemp("quantized")
    made = {}
    for dtype in ("float32", "int8", "binary"):
        embedkit.encode(docs_file, root / dtype, device="cpu", dtype=dtype, shard_rows=30, progress=False)
        made[dtype] = root / dtype
    return made


def codes(out, ids: list) -> np.ndarray:
    table = lance.dataset(str(out / "vectors.lance")).to_table(columns=["id", "vector"])
    where = {d: i for i, d in enumerate(table.column("id").to_pylist())}
    col = table.column("vector").combine_chunks()
    flat = col.values.to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)
    return flat[[where[d] for d in ids]]


def test_int8_codes_are_quantize_embeddings_with_the_recorded_ranges(outputs, docs, st_model):
    manifest = json.loads((outputs["int8"] / "embedkit.json").read_text())
    q = manifest["output"]["quantization"]
    ranges = np.asarray(q["ranges"], np.float32)
    assert q["kind"] == "int8" and ranges.shape == (2, 384) and (ranges[1] >= ranges[0]).all()
    ids = docs.column("id").to_pylist()
    got = codes(outputs["int8"], ids)
    assert got.dtype == np.int8 and got.shape == (ROWS, 384)
    # exactly sentence-transformers' codes of the same float vectors (embedkit's float32 output)
    assert np.array_equal(got, quantize_embeddings(codes(outputs["float32"], ids), "int8", ranges=ranges))
    # and of sentence-transformers' own vectors, which differ from those by about 1e-6: a value
    # on a step boundary (a step is about 0.001) may land one step over
    want = quantize_embeddings(st_model.encode(docs.column("text").to_pylist(), normalize_embeddings=True), "int8", ranges=ranges)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.995, (diff == 0).mean()


def test_binary_codes_are_the_packed_signs(outputs, docs, st_model):
    ids = docs.column("id").to_pylist()
    want = quantize_embeddings(st_model.encode(docs.column("text").to_pylist(), normalize_embeddings=True), "ubinary")
    got = codes(outputs["binary"], ids)
    assert got.dtype == np.uint8 and got.shape == (ROWS, 48)
    same_bits = (np.unpackbits(got, axis=1) == np.unpackbits(want, axis=1)).mean()
    assert same_bits > 0.9999, same_bits


def test_bytes_per_vector(outputs):
    widths = {d: lance.dataset(str(o / "vectors.lance")).schema.field("vector").type for d, o in outputs.items()}
    assert (widths["float32"].list_size, widths["int8"].list_size, widths["binary"].list_size) == (384, 384, 48)


@pytest.mark.parametrize("dtype, overlap", [("int8", 0.9), ("binary", 0.6)])
def test_build_index_and_search_on_codes(outputs, dtype, overlap):
    """Search over the codes finds mostly what search over float32 vectors finds."""
    queries = ["how do I open a file", "reference counting", "unicode strings", "exceptions in C", "the import system"]
    found = {}
    for d in ("float32", dtype):
        embedkit.build_index(outputs[d], progress=False)
        found[d] = embedkit.Retriever(outputs[d]).search(queries, k=10).ids
    shared = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found["float32"], found[dtype])])
    assert shared >= overlap, shared


def test_binary_needs_a_dimension_divisible_by_8(tmp_path, docs_file):
    with pytest.raises(EmbedkitError, match="divisible by 8"):
        embedkit.encode(docs_file, tmp_path / "out", device="cpu", dtype="binary", dim=100, progress=False)


def test_kill_and_resume_keeps_the_ranges(tmp_path, docs_file, outputs, docs):
    """The ranges are fixed before the first shard and read back on resume: the rows written
    after a kill -9 carry the same codes as an uninterrupted run's."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "embedkit.cli", "encode", docs_file, str(out), "--dtype", "int8", "--shard-rows", "30", "-q"]
    killed = subprocess.run(args, env={**os.environ, "EMBEDKIT_TEST_KILL_AT": "commit:2"}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    ids = docs.column("id").to_pylist()
    assert np.array_equal(codes(out, ids), codes(outputs["int8"], ids))
    assert json.loads((out / "embedkit.json").read_text())["output"]["quantization"] == \
        json.loads((outputs["int8"] / "embedkit.json").read_text())["output"]["quantization"]  # fmt: skip
