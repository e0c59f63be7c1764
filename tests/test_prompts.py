"""Query and document prompts: the vectors equal sentence-transformers' own `prompt_name` /
`prompt` encodes, search puts the query prompt before queries, the choice is pinned, and a model
with prompts and no choice made says so."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import lance
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import parquet_input
from sentence_transformers import SentenceTransformer

import embedkit
from embedkit.engine.models import resolve_model
from embedkit.errors import EmbedkitError, EmbedkitNotice

N_DOCS = 60
PROMPTS = {"query": "query: ", "document": "passage: "}


def _model_with_prompts(root: Path, default: str | None) -> Path:
    """The bundled default model with e5-style prompts in its sentence-transformers config."""
    src = resolve_model("all-MiniLM-L6-v2").path
    dst = root / f"minilm-prompts-{default}"
    shutil.copytree(src, dst)
    config_path = dst / "config_sentence_transformers.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config.update(prompts=PROMPTS, default_prompt_name=default)
    config_path.write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def prompted_model(tmp_path_factory) -> Path:
    return _model_with_prompts(tmp_path_factory.mktemp("models"), None)


@pytest.fixture(scope="module")
def st_prompted(prompted_model) -> SentenceTransformer:
    return SentenceTransformer(str(prompted_model), device="cpu")


@pytest.fixture(scope="module")
def texts(sample) -> list[str]:
    return sample.column("text").to_pylist()[:N_DOCS]


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory, sample) -> str:
    return parquet_input(tmp_path_factory, sample.slice(0, N_DOCS), "prompt-input")


def stored(out: Path, ids: list) -> np.ndarray:
    table = lance.dataset(str(out / "vectors.lance")).to_table(columns=["id", "vector"])
    where = {d: i for i, d in enumerate(table.column("id").to_pylist())}
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    return vectors[[where[d] for d in ids]]


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@pytest.mark.parametrize("how", [{"prompt_name": "document"}, {"prompt": "Represent this: "}])
def test_document_vectors_equal_sentence_transformers_with_the_same_prompt(tmp_path, docs_file, sample, texts, prompted_model,
                                                                            st_prompted, how):  # fmt: skip
    out = tmp_path / "out"
    embedkit.encode(docs_file, out, model=str(prompted_model), device="cpu", dtype="float32", progress=False, **how)
    want = st_prompted.encode(texts, normalize_embeddings=True, convert_to_numpy=True, **how)
    got = stored(out, sample.column("id").to_pylist()[:N_DOCS])
    assert min_cosine(got, want) > 0.9999
    # and differ from the vectors without the prompt: the prompt did something
    plain = st_prompted.encode(texts[:20], normalize_embeddings=True, convert_to_numpy=True)
    assert min_cosine(got[:20], plain) < 0.999
    manifest = json.loads((out / "embedkit.json").read_text())
    text = how.get("prompt") or PROMPTS[how["prompt_name"]]
    assert manifest["prompts"]["document"] == text and manifest["prompts"]["query"] == "query: "


def test_a_model_with_prompts_and_no_choice_gets_a_notice_and_its_default(tmp_path_factory, tmp_path, docs_file, sample, texts):
    model = _model_with_prompts(tmp_path_factory.mktemp("models-default"), "document")
    with pytest.warns(EmbedkitNotice, match="has prompts.*default prompt 'document'"):
        embedkit.encode(docs_file, tmp_path / "out", model=str(model), device="cpu", dtype="float32", progress=False)
    # sentence-transformers' encode applies default_prompt_name too: the same vectors
    want = SentenceTransformer(str(model), device="cpu").encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert min_cosine(stored(tmp_path / "out", sample.column("id").to_pylist()[:N_DOCS]), want) > 0.9999


def test_a_model_without_prompts_gets_no_notice(tmp_path, docs_file):
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbedkitNotice)
        embedkit.encode(docs_file, tmp_path / "out", device="cpu", progress=False)
    assert json.loads((tmp_path / "out" / "embedkit.json").read_text())["prompts"]["document"] == ""


def test_search_puts_the_query_prompt_before_queries(tmp_path, docs_file, prompted_model, st_prompted):
    out = tmp_path / "out"
    embedkit.encode(docs_file, out, model=str(prompted_model), device="cpu", prompt_name="document", progress=False)
    embedkit.build_index(out, progress=False)
    r = embedkit.Retriever(out)
    queries = ["how do I open a file", "reference counting of objects"]
    got = r.search(queries, k=5)
    want = r.search_vectors(st_prompted.encode(queries, prompt_name="query", normalize_embeddings=True), k=5)
    plain = r.search_vectors(st_prompted.encode(queries, normalize_embeddings=True), k=5)
    assert got.ids == want.ids and np.allclose(got.scores, want.scores, atol=2e-3)
    assert got.scores != plain.scores  # without the prompt the queries are other vectors


def test_query_prompt_choices(tmp_path, docs_file, prompted_model):
    out = tmp_path / "out"
    embedkit.encode(docs_file, out, model=str(prompted_model), device="cpu", query_prompt="search: ", progress=False,
                    prompt_name="document")  # fmt: skip
    assert json.loads((out / "embedkit.json").read_text())["prompts"]["query"] == "search: "
    with pytest.raises(EmbedkitError, match="has no prompt named 'question'"):
        embedkit.encode(docs_file, tmp_path / "o2", model=str(prompted_model), device="cpu", query_prompt_name="question", progress=False)
    with pytest.raises(EmbedkitError, match="not both"):
        embedkit.encode(docs_file, tmp_path / "o3", query_prompt_name="query", query_prompt="q: ", progress=False)


def test_chunks_each_start_with_the_prompt(tmp_path, docs_file, prompted_model, st_prompted):
    from embedkit.engine.models import fast_tokenizer_json, load_sentence_transformer
    from embedkit.engine.tokenize import TextTokenizer

    out = tmp_path / "out"
    s = embedkit.encode(docs_file, out, model=str(prompted_model), device="cpu", prompt_name="document", chunk_tokens=64,
                        progress=False)  # fmt: skip
    st = load_sentence_transformer(resolve_model(str(prompted_model)), "cpu")
    tok = TextTokenizer(fast_tokenizer_json(st), 64, chunk_overlap=0, prompt="passage: ")
    bare = TextTokenizer(fast_tokenizer_json(st), 64, chunk_overlap=0)
    table = pq.read_table(docs_file)
    got = tok(table.column("text").to_pylist())
    prompt_ids = st_prompted.tokenizer("passage: ", add_special_tokens=False)["input_ids"]
    for r in range(len(got.lengths)):
        row = got.flat[got.offsets[r] : got.offsets[r + 1]].tolist()
        assert row[1 : 1 + len(prompt_ids)] == prompt_ids  # after [CLS], every chunk
    assert s.tokens == int(got.lengths.sum()) and s.chunks == len(got.lengths)
    # the prompt takes room in each chunk: more chunks than without it
    assert len(got.lengths) > len(bare(table.column("text").to_pylist()).lengths)


def test_resume_with_another_prompt_is_refused(tmp_path, docs_file, prompted_model, run_cli, refused):
    out = tmp_path / "out"
    ok = run_cli("encode", docs_file, out, "--model", prompted_model, "--prompt-name", "document", "--shard-rows", "40")
    assert ok.returncode == 0, ok.stderr
    refused(run_cli("encode", docs_file, out, "--model", prompted_model, "--prompt", "doc: "), "document prompt ('passage: ' -> 'doc: ')")


def test_cli_prints_the_notice_as_one_line(tmp_path, docs_file, prompted_model):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # a user's default warning filters
    res = subprocess.run([sys.executable, "-m", "embedkit.cli", "encode", docs_file, str(tmp_path / "out"), "--model",
                          str(prompted_model), "-q"], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr
    notes = [line for line in res.stderr.splitlines() if line.strip()]
    assert notes == [f"note: model {prompted_model} has prompts (document, query); documents get no prompt: "
                     "choose with --prompt-name or --prompt"], res.stderr  # fmt: skip


def test_dry_run_counts_the_prompt_tokens(tmp_path, docs_file, prompted_model):
    from embedkit.plan.planning import count_tokens

    s = embedkit.encode(docs_file, tmp_path / "out", model=str(prompted_model), device="cpu", prompt_name="document", progress=False)
    count = count_tokens(docs_file, str(prompted_model), sample=0, prompt_name="document")
    plain = count_tokens(docs_file, str(prompted_model), sample=0)
    assert count.tokens == s.tokens > plain.tokens
