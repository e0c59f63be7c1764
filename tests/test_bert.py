"""embedkit.engine.bert: BERT + Pooling (+ Normalize) folders run without sentence-transformers, with its vectors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE

import embedkit
from embedkit.config import DEFAULT_MODEL
from embedkit.engine.bert import NATIVE_ENV, native_spec
from embedkit.engine.models import (
    embedding_dim,
    fast_tokenizer_json,
    load_sentence_transformer,
    pooling_mode,
    resolve_model,
    truncation_side,
)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rows = pq.read_table(SAMPLE).column("text").to_pylist()[:48]
    return rows + ["", "a", "word " * 600, "Émile's naïve café, 東京 🙂"]


@pytest.fixture(scope="module")
def default_folder() -> Path:
    return resolve_model(DEFAULT_MODEL).path


def st_model(folder: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_the_default_model_loads_natively_and_reads_as_sentence_transformers_does(default_folder):
    st = st_model(default_folder)
    native = load_sentence_transformer(resolve_model(str(default_folder)), "cpu")
    assert getattr(native, "native", False) and not getattr(st, "native", False)
    assert (embedding_dim(native), native.max_seq_length, pooling_mode(native), truncation_side(native)) == (
        embedding_dim(st), st.max_seq_length, pooling_mode(st), truncation_side(st))  # fmt: skip
    assert json.loads(fast_tokenizer_json(native)) == json.loads(fast_tokenizer_json(st))
    assert sorted(native.state_dict()) != [] and native[0].auto_model.config.to_dict()["hidden_size"] == 384


def test_native_vectors_equal_sentence_transformers(default_folder, texts):
    """fp32 on the CPU, unnormalized output, the texts cut at the model's length as ST cuts them."""
    ours = embedkit.encode_texts(texts, device="cpu", model=str(default_folder))
    ref = st_model(default_folder).encode(texts, convert_to_numpy=True)
    assert ours.shape == ref.shape
    assert cosines(ours, ref).min() >= 0.99999
    assert np.abs(ours - ref).max() < 1e-4


@pytest.fixture(scope="module")
def saved_bert(tmp_path_factory) -> Path:
    """A small random BERT saved by sentence-transformers 6 (its own layout: pooling_mode, no
    max_seq_length in sentence_bert_config.json, a lower-casing tokenizer), with CLS pooling."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling, Transformer
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bert")
    hf, folder = root / "hf", root / "st"
    BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)).save_pretrained(hf)
    tok = resolve_model(DEFAULT_MODEL).path
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tok / name).exists():
            shutil.copy(tok / name, hf / name)
    SentenceTransformer(modules=[Transformer(str(hf), max_seq_length=100), Pooling(64, "cls")], device="cpu").save(str(folder))
    return folder


@pytest.mark.parametrize("mode", ["cls", "max", "mean"])
def test_a_bert_saved_by_sentence_transformers_6_runs_natively_with_its_vectors(saved_bert, texts, tmp_path, mode):
    folder = tmp_path / "m"
    shutil.copytree(saved_bert, folder)
    pool = folder / "1_Pooling" / "config.json"
    pool.write_text(json.dumps({**json.loads(pool.read_text()), "pooling_mode": mode}))
    spec = native_spec(folder)
    assert spec is not None and (spec.pooling, spec.max_seq_length, spec.normalize) == (mode, 100, False)
    st = st_model(folder)
    assert st.max_seq_length == 100
    ours = embedkit.encode_texts(texts, device="cpu", model=str(folder))
    ref = st.encode(texts, convert_to_numpy=True)
    assert cosines(ours, ref).min() >= 0.99999


def _edit(folder: Path, name: str, change) -> None:
    path = folder / name
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.mark.parametrize("change", [
    lambda f: _edit(f, "modules.json", lambda m: m + [{"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]),
    lambda f: _edit(f, "config.json", lambda c: {**c, "model_type": "roberta"}),
    lambda f: _edit(f, "config.json", lambda c: {**c, "hidden_act": "gelu_new"}),
    lambda f: _edit(f, "config.json", lambda c: {**c, "position_embedding_type": "relative_key"}),
    lambda f: _edit(f, "sentence_bert_config.json", lambda c: {**c, "do_lower_case": True}),
    lambda f: _edit(f, "sentence_bert_config.json", lambda c: {**c, "model_args": {"attn_implementation": "eager"}}),
    lambda f: _edit(f, "1_Pooling/config.json", lambda c: {**c, "pooling_mode": "lasttoken"}),
    lambda f: _edit(f, "tokenizer_config.json", lambda c: {**c, "do_lower_case": False}),  # the normalizer lower-cases
    lambda f: (f / "model.safetensors").unlink(),
], ids=["dense", "roberta", "gelu-tanh", "relative-positions", "lower-case-texts", "model-args", "last-token", "tokenizer-disagrees",
        "no-safetensors"])  # fmt: skip
def test_folders_it_cannot_reproduce_are_left_to_sentence_transformers(saved_bert, tmp_path, change):
    folder = tmp_path / "m"
    shutil.copytree(saved_bert, folder)
    assert native_spec(folder) is not None
    change(folder)
    assert native_spec(folder) is None


def test_the_environment_switch_turns_it_off(saved_bert, monkeypatch):
    monkeypatch.setenv(NATIVE_ENV, "0")
    assert native_spec(saved_bert) is None
    assert not getattr(load_sentence_transformer(resolve_model(str(saved_bert)), "cpu"), "native", False)


@pytest.mark.slow  # a fresh interpreter that loads the model
def test_an_encode_imports_neither_sentence_transformers_nor_transformers_nor_the_compiler(tmp_path):
    src = tmp_path / "docs.parquet"
    pq.write_table(pq.read_table(SAMPLE).slice(0, 20), src)
    code = (
        "import sys, embedkit\n"
        f"s = embedkit.encode({str(src)!r}, {str(tmp_path / 'out')!r}, device='cpu', progress=False)\n"
        "print(s.docs, [m for m in ('sentence_transformers', 'transformers', 'scipy', 'sklearn', 'torch._dynamo') if m in sys.modules])\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "20 []"


@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
def test_packed_batches_give_the_padded_batches_vectors(default_folder, texts, mode):
    """The packed path (rows end to end, as CUDA runs them) against the padded one: positions,
    row boundaries and per-row pooling. On the CPU its attention is the padded reference; on
    CUDA the same boundaries go to flash attention's varlen kernel."""
    import torch

    from embedkit.engine.bert import PackedRows

    model = load_sentence_transformer(resolve_model(str(default_folder)), "cpu")
    model[1].pooling_mode = mode
    tok = model.tokenizer.backend_tokenizer
    tok.no_padding()
    rows = [e.ids[:256] for e in tok.encode_batch(texts[40:])]  # short, empty, long and non-ASCII texts
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    seq = int(lengths.max())
    ids = torch.tensor([r + [0] * (seq - len(r)) for r in rows])
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    assert not bool(mask.all())  # the batch has padding, so the padded path masks keys
    with torch.inference_mode():
        padded = model.embed(ids, mask, True)
        packed = model.embed_packed(ids[mask], PackedRows.of(lengths, int(lengths.sum()), seq))
    assert packed.shape == padded.shape
    assert float(torch.nn.functional.cosine_similarity(packed, padded).min()) > 0.99999
