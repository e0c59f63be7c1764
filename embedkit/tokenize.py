"""Tokenization in parallel worker processes, through the `tokenizers` library directly.

The transformers tokenizer call costs several times the Rust `encode_batch` itself, so workers
hold a `tokenizers.Tokenizer` rebuilt from the model's own definition (same normalizer,
pre-tokenizer, special tokens and truncation) and return flat int32 arrays, which pickle cheaply.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import warnings
from dataclasses import dataclass
from itertools import chain
from typing import Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class Tokenized:
    """Token ids of a list of texts: row i is flat[offsets[i]:offsets[i+1]]."""

    flat: np.ndarray  # int32 ids, truncated to max_length, special tokens included
    offsets: np.ndarray  # int64, len = rows + 1
    n_tokens: np.ndarray  # int32 full token count (before truncation), special tokens included

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def truncated(self) -> np.ndarray:
        return self.n_tokens > self.lengths


def concat(parts: Sequence[Tokenized]) -> Tokenized:
    """One Tokenized from several, rows in order."""
    if len(parts) == 1:
        return parts[0]
    lengths = np.concatenate([p.lengths for p in parts])
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Tokenized(
        flat=np.concatenate([p.flat for p in parts]),
        offsets=offsets,
        n_tokens=np.concatenate([p.n_tokens for p in parts]),
    )


class TextTokenizer:
    """A `tokenizers.Tokenizer` that truncates like sentence-transformers and counts full lengths."""

    def __init__(self, tokenizer_json: str, max_length: int):
        from tokenizers import Tokenizer

        self.max_length = max_length
        self._trunc = Tokenizer.from_str(tokenizer_json)
        self._trunc.no_padding()
        self._trunc.enable_truncation(max_length)
        self._full = Tokenizer.from_str(tokenizer_json)
        self._full.no_padding()
        self._full.no_truncation()
        self._encode = getattr(self._trunc, "encode_batch_fast", self._trunc.encode_batch)

    def __call__(self, texts: list[str]) -> Tokenized:
        encodings = self._encode(texts)
        id_lists = [e.ids for e in encodings]
        lengths = np.fromiter((len(x) for x in id_lists), np.int64, count=len(id_lists))
        n_tokens = lengths.astype(np.int32)
        # Only a row that came out at exactly max_length can have been cut: count its full length.
        maybe_cut = np.flatnonzero(lengths >= self.max_length)
        if len(maybe_cut):
            full = self._full.encode_batch([texts[i] for i in maybe_cut])
            n_tokens[maybe_cut] = [len(e.ids) for e in full]
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter(chain.from_iterable(id_lists), np.int32, count=int(offsets[-1]))
        return Tokenized(flat=flat, offsets=offsets, n_tokens=n_tokens)


_worker_tokenizer: TextTokenizer | None = None


def _init_worker(tokenizer_json: str, max_length: int) -> None:
    global _worker_tokenizer
    # Each worker is one core's worth of tokenizing; Rust threads inside it would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = TextTokenizer(tokenizer_json, max_length)


def _tokenize_in_worker(texts: list[str]) -> Tokenized:
    assert _worker_tokenizer is not None
    return _worker_tokenizer(texts)


def default_workers(device_type: str) -> int:
    """Worker processes: all cores but one feed a GPU; on a CPU the model needs the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device_type == "cuda":
        return max(1, min(cores - 1, 32))
    return 1


class TokenizerPool:
    """Tokenizes chunks of texts in worker processes (or in-process when workers == 0).

    `submit` returns a handle whose `get()` waits for the result, so a caller can keep several
    windows in flight while the model runs.
    """

    CHUNK = 1024  # texts per task: large enough to amortize pickling, small enough to balance

    def __init__(self, tokenizer_json: str, max_length: int, workers: int):
        self.workers = workers
        self._local = TextTokenizer(tokenizer_json, max_length) if workers == 0 else None
        self._pool = None
        if workers > 0:
            # fork starts workers without re-importing the caller's __main__ (spawn would run a
            # user's top-level script again); workers only use `tokenizers`, never torch.
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            with warnings.catch_warnings():
                # lance warns on any fork once imported; these children never call lance
                warnings.filterwarnings("ignore", message=".*fork-safe.*")
                self._pool = mp.get_context(method).Pool(workers, _init_worker, (tokenizer_json, max_length))

    def submit(self, texts: list[str]) -> "_Pending":
        chunks = [texts[i : i + self.CHUNK] for i in range(0, len(texts), self.CHUNK)] or [[]]
        if self._pool is None:
            assert self._local is not None
            return _Pending(value=concat([self._local(c) for c in chunks]))
        return _Pending(async_result=self._pool.map_async(_tokenize_in_worker, chunks, chunksize=1))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> "TokenizerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Pending:
    def __init__(self, value: Tokenized | None = None, async_result: object = None):
        self._value = value
        self._async = async_result

    def get(self) -> Tokenized:
        if self._value is None:
            self._value = concat(self._async.get())  # type: ignore[union-attr]
        return self._value


def tokenize_all(tokenizer: TextTokenizer, texts: Iterable[str]) -> Tokenized:
    """In-process tokenization of a list, for small in-memory jobs."""
    texts = list(texts)
    return concat([tokenizer(texts[i : i + 4096]) for i in range(0, len(texts), 4096)] or [tokenizer([])])
