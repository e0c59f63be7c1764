"""The queries a build tunes with: texts that look like what users type.

A build tunes nprobe and the rerank depth until its queries reach the target recall, and
promises that recall. Stored rows used as queries are whole documents from the index's own
distribution; users type short questions and keywords, and on real corpora their recall was
lower (0.827 against a promised 0.961 on 117k short texts). So by default the build cuts
pseudo-queries from the input's documents (first sentences of at most 20 words, and word
windows of 3-12 words) and encodes them with the output's model. `--tune-queries FILE` gives
real queries instead. When the input is gone the build tunes on stored rows, and says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EmbedkitError, first_line

WINDOW_WORDS = (3, 12)  # a keyword-style query: this many consecutive words
SENTENCE_WORDS = 20  # a question-style query: a document's first sentence, cut at this many words
SAMPLE_BLOCKS = 32  # random row ranges the input is sampled from
SOURCES = ("query-like texts from the input", "queries from --tune-queries", "stored rows")


@dataclass(frozen=True)
class TuningQueries:
    """Query texts (None for stored rows) and where they came from (one of SOURCES, with a
    reason when the build fell back to stored rows)."""

    texts: list[str] | None
    source: str
    note: str = ""


def pseudo_queries(texts: list[str], n: int, seed: int) -> list[str]:
    """Up to `n` distinct query-like strings cut from `texts`: about half first sentences (at most
    SENTENCE_WORDS words), half windows of WINDOW_WORDS words, from documents taken in a seeded
    random order."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()
    for i in rng.permutation(len(texts)):
        words = (texts[i] or "").split()
        if len(words) < WINDOW_WORDS[0]:
            continue
        if rng.random() < 0.5:
            sentence = re.split(r"(?<=[.!?])\s", " ".join(words), maxsplit=1)[0].split()
            query = sentence[:SENTENCE_WORDS]
        else:
            width = int(rng.integers(WINDOW_WORDS[0], WINDOW_WORDS[1] + 1))
            start = int(rng.integers(0, max(1, len(words) - width + 1)))
            query = words[start : start + width]
        text = " ".join(query)
        if len(query) >= WINDOW_WORDS[0] and text not in seen:
            seen.add(text)
            out.append(text)
            if len(out) == n:
                break
    return out


def input_sample(manifest: dict, rows: int, seed: int) -> list[str] | None:
    """About `rows` texts of the input the output was encoded from, in random blocks; None when
    the input cannot be opened any more (moved, deleted, unreadable)."""
    from ..io.corpus import open_corpus
    from ..io.formats import Columns

    source = manifest.get("input", {})
    try:
        corpus = open_corpus(source["path"], Columns(source.get("text_column") or "text", source.get("id_column")))
    except (EmbedkitError, KeyError, OSError):
        return None
    n = corpus.num_rows
    block = max(1, -(-rows // SAMPLE_BLOCKS))
    starts = np.random.default_rng(seed).choice(max(1, n - block + 1), size=min(SAMPLE_BLOCKS, max(1, n // block)), replace=False)
    texts: list[str] = []
    for start in sorted(int(s) for s in starts):
        texts += [t for t in corpus.read(start, min(n, start + block)).column("text").to_pylist() if t]
    return texts


def read_query_file(path: str | Path, option: str = "--tune-queries") -> list[str]:
    """Queries from a file: .txt (one per line), or parquet/jsonl/csv with a `query` or `text`
    column. Empty lines and values are skipped; a file with none is refused."""
    p = Path(path)
    if not p.is_file():
        raise EmbedkitError(f"{option} file not found: {p}")
    if p.suffix.lower() == ".txt":
        texts = [line.strip() for line in p.read_text(encoding="utf-8", errors="replace").splitlines()]
    else:
        texts = _column_texts(p)
    texts = [t for t in texts if t]
    if not texts:
        raise EmbedkitError(f"{p} holds no queries")
    return texts


def _column_texts(path: Path) -> list[str]:
    from ..io.corpus import open_corpus
    from ..io.formats import Columns

    problems = []
    for column in ("query", "text"):
        try:
            corpus = open_corpus(path, Columns(column, None))
            return [t for t in corpus.read(0, corpus.num_rows).column("text").to_pylist() if t]
        except EmbedkitError as e:
            problems.append(first_line(e))
    raise EmbedkitError(f"cannot read queries from {path}: it needs a `query` or `text` column ({problems[-1]})")


def choose_queries(manifest: dict, tune_file: str | None, n: int, seed: int) -> TuningQueries:
    """The build's tuning queries: the file's, else pseudo-queries from the input, else stored rows."""
    if tune_file is not None:
        return TuningQueries(read_query_file(tune_file)[:n], SOURCES[1])
    texts = input_sample(manifest, 4 * n, seed)
    if texts is None:
        return TuningQueries(None, SOURCES[2], f"the input {manifest.get('input', {}).get('path')} is gone")
    queries = pseudo_queries(texts, n, seed)
    if not queries:
        return TuningQueries(None, SOURCES[2], "the input has no texts of three words or more")
    return TuningQueries(queries, SOURCES[0])


def encode_queries(texts: list[str], manifest: dict, device: str = "auto") -> np.ndarray:
    """Queries encoded for the output's documents: its model, cut length and normalization, and
    its query prompt (recorded by the encode) before each text."""
    from ..engine.texts import encode_texts

    model: Any = manifest.get("model", {})
    output: Any = manifest.get("output", {})
    prompt = (manifest.get("prompts") or {}).get("query") or ""
    normalize = bool(output.get("normalize", True))
    vectors = encode_texts([prompt + ("" if t is None else t) for t in texts], model=model["name"], device=device,
                           normalize=normalize, max_seq_length=model.get("max_seq_length"))  # fmt: skip
    return cut_dimensions(vectors, output.get("dim") or None, normalize)


def cut_dimensions(vectors: np.ndarray, dim: int | None, normalize: bool) -> np.ndarray:
    """The first `dim` dimensions (all when None), renormalized when the output's vectors are:
    what `encode --dim` stores, so queries land in the same space."""
    if dim is None or dim >= vectors.shape[1]:
        return vectors
    cut = np.ascontiguousarray(vectors[:, :dim])
    if normalize:
        norms = np.linalg.norm(cut, axis=1, keepdims=True)
        cut = cut / np.where(norms > 0, norms, 1)  # a zero vector stays zero, as the encoder's
    return cut.astype(np.float32)
