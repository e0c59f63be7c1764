"""Tokenization in parallel worker processes, through the `tokenizers` library directly.

The transformers tokenizer call costs several times the Rust `encode_batch` itself, so workers
hold a `tokenizers.Tokenizer` rebuilt from the model's own definition (same normalizer,
pre-tokenizer, special tokens and truncation) and return flat int32 arrays, which pickle cheaply.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from ..interrupts import held_interrupts
from .chunking import chunk_bounds

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class Tokenized:
    """Token ids of a list of texts: row i is flat[offsets[i]:offsets[i+1]]."""

    flat: np.ndarray  # int32 ids, truncated to max_length, special tokens included
    offsets: np.ndarray  # int64, len = rows + 1
    n_tokens: np.ndarray  # int32 full token count (before truncation), special tokens included
    chunks: Chunks | None = None  # when documents are split: which text and span each row is

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def truncated(self) -> np.ndarray:
        return self.n_tokens > self.lengths

    def text_tokens(self) -> np.ndarray:
        """Tokens the model reads per text given: its row's, or the sum of its chunks'."""
        if self.chunks is None:
            return self.lengths
        return np.bincount(self.chunks.source, weights=self.lengths, minlength=self.chunks.texts).astype(np.int64)

    def text_truncated(self) -> np.ndarray:
        """Per text given, whether tokens were cut (never, when texts are split into chunks)."""
        return self.truncated if self.chunks is None else np.zeros(self.chunks.texts, bool)


@dataclass(frozen=True)
class Chunks:
    """Per row of a chunked Tokenized: its text (`source`, an index into the texts given), its
    number within that text (`chunk`, from 0) and its character span [start, end) in it."""

    source: np.ndarray  # int64
    chunk: np.ndarray  # int32
    start: np.ndarray  # int32
    end: np.ndarray  # int32
    texts: int  # how many texts the rows came from

    @staticmethod
    def concat(parts: Sequence[Chunks]) -> Chunks:
        shift = np.cumsum([0] + [p.texts for p in parts[:-1]])
        return Chunks(
            source=np.concatenate([p.source + s for p, s in zip(parts, shift)]),
            chunk=np.concatenate([p.chunk for p in parts]),
            start=np.concatenate([p.start for p in parts]),
            end=np.concatenate([p.end for p in parts]),
            texts=sum(p.texts for p in parts),
        )


def concat(parts: Sequence[Tokenized]) -> Tokenized:
    """One Tokenized from several, rows in order."""
    if len(parts) == 1:
        return parts[0]
    lengths = np.concatenate([p.lengths for p in parts])
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    chunked = [p.chunks for p in parts if p.chunks is not None]
    return Tokenized(
        flat=np.concatenate([p.flat for p in parts]),
        offsets=offsets,
        n_tokens=np.concatenate([p.n_tokens for p in parts]),
        chunks=Chunks.concat(chunked) if chunked else None,
    )


class TextTokenizer:
    """Tokenizes like sentence-transformers (same ids, same truncation) and counts full lengths.

    Each text is tokenized once without special tokens and without truncation; the content is
    then cut to fit and wrapped in the model's special tokens (the prefix and suffix that its
    post-processor adds, found once by probing). Counting the full length this way costs nothing
    extra, where truncating inside the tokenizer would need a second pass over long documents.
    """

    def __init__(self, tokenizer_json: str, max_length: int, truncation_side: str = "right", chunk_overlap: int | None = None,
                 prompt: str = ""):  # fmt: skip
        """`chunk_overlap` set (0 or more): texts longer than `max_length` are split into
        overlapping chunks (see `chunk_bounds`) instead of cut; every token is kept.
        `prompt`: put before every text (before every chunk), as sentence-transformers' prompts."""
        from tokenizers import Tokenizer

        self.max_length = max_length
        self.truncation_side = truncation_side
        self.chunk_overlap = chunk_overlap
        self.prompt = prompt
        self._tok = Tokenizer.from_str(tokenizer_json)
        self._tok.no_padding()
        self._tok.no_truncation()
        self.prefix, self.suffix = special_wrapping(self._tok)
        self._n_special = len(self.prefix) + len(self.suffix)
        if max_length <= self._n_special:
            raise ValueError(f"max_length {max_length} leaves no room beside {self._n_special} special tokens")
        self._encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def __call__(self, texts: list[str]) -> Tokenized:
        if self.chunk_overlap is not None:
            return self._chunked(texts)
        if self.prompt:  # joined as text, as sentence-transformers joins it: the same tokens
            texts = [self.prompt + t for t in texts]
        encodings = self._encode(texts, add_special_tokens=False)
        cap = self.max_length - self._n_special
        if self.truncation_side == "left":
            content = [e.ids[-cap:] if len(e.ids) > cap else e.ids for e in encodings]
        else:
            content = [e.ids[:cap] for e in encodings]
        full = np.fromiter((len(e) for e in encodings), np.int64, count=len(encodings))
        kept = np.fromiter((len(c) for c in content), np.int64, count=len(content))
        flat_content = np.fromiter(chain.from_iterable(content), np.int32, count=int(kept.sum()))
        return self._wrap(flat_content, kept, full)

    def _chunked(self, texts: list[str]) -> Tokenized:
        """Each text as one row or, when longer than the cap, as several overlapping rows."""
        # One pass that tracks character offsets (the fast batch call tracks none): on pydocs
        # this costs less than a fast pass plus a second pass over the long texts. The offsets
        # become Python tuples only for the texts that are split.
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        # every chunk starts with the prompt's tokens; the spans stay those of the document
        prompt = self._tok.encode(self.prompt, add_special_tokens=False).ids if self.prompt else []
        cap = self.max_length - self._n_special - len(prompt)
        if cap < 1:
            raise ValueError(f"the prompt's {len(prompt)} tokens leave no room in rows of {self.max_length} tokens")
        content: list[list[int]] = []
        source, chunk, start, end = [], [], [], []
        for i, (e, text) in enumerate(zip(encodings, texts)):
            ids = e.ids
            if len(ids) <= cap:
                bounds, spans = [(0, len(ids))], [(0, len(text))]
            else:
                offsets = e.offsets
                bounds = chunk_bounds(offsets, text, cap, self.chunk_overlap or 0)
                spans = [(offsets[a][0], offsets[b - 1][1]) for a, b in bounds]
            for c, ((a, b), (lo, hi)) in enumerate(zip(bounds, spans)):
                content.append(prompt + ids[a:b])
                source.append(i)
                chunk.append(c)
                start.append(lo)
                end.append(hi)
        kept = np.fromiter((len(c) for c in content), np.int64, count=len(content))
        flat = np.fromiter(chain.from_iterable(content), np.int32, count=int(kept.sum()))
        out = self._wrap(flat, kept, kept)
        chunks = Chunks(
            source=np.asarray(source, np.int64), chunk=np.asarray(chunk, np.int32), start=np.asarray(start, np.int32),
            end=np.asarray(end, np.int32), texts=len(texts),
        )  # fmt: skip
        return Tokenized(out.flat, out.offsets, out.n_tokens, chunks)

    def _wrap(self, content: np.ndarray, kept: np.ndarray, full: np.ndarray) -> Tokenized:
        """Insert the special tokens around every row's content, vectorized."""
        p, n = len(self.prefix), len(kept)
        lengths = kept + self._n_special
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        content_starts = np.cumsum(kept) - kept
        flat = np.empty(int(offsets[-1]), np.int32)
        # content token g of row i lands at offsets[i] + p + (g - content_starts[i])
        flat[np.repeat(offsets[:-1] + p - content_starts, kept) + np.arange(len(content))] = content
        for k, tid in enumerate(self.prefix):
            flat[offsets[:-1] + k] = tid
        for k, tid in enumerate(self.suffix):
            flat[offsets[:-1] + p + kept + k] = tid
        return Tokenized(flat=flat, offsets=offsets, n_tokens=(full + self._n_special).astype(np.int32))


def special_wrapping(tok: object) -> tuple[list[int], list[int]]:
    """The special-token ids the post-processor puts before and after a single text's tokens."""
    probe = "embedkit probe text"
    plain = tok.encode(probe, add_special_tokens=False).ids  # type: ignore[attr-defined]
    wrapped = tok.encode(probe, add_special_tokens=True).ids  # type: ignore[attr-defined]
    for i in range(len(wrapped) - len(plain) + 1):
        if wrapped[i : i + len(plain)] == plain:
            return list(wrapped[:i]), list(wrapped[i + len(plain) :])
    raise ValueError("cannot locate the text inside the tokenizer's special-token template")


_worker_tokenizer: TextTokenizer | None = None


def _init_worker(tokenizer_json: str, max_length: int, truncation_side: str, chunk_overlap: int | None, prompt: str) -> None:
    global _worker_tokenizer
    # Ctrl-C reaches the whole process group: the parent stops the pool, and a worker printing
    # its own KeyboardInterrupt traceback would only bury the parent's one-line message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked by the parent around the fork (see _no_sigint)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    # Each worker is one core's worth of tokenizing; Rust threads inside it would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Workers run ahead of the device in bursts; at a lower priority they never take the core
    # of the thread that feeds the device (a stalled feeder idles the GPU, a late worker does not).
    try:
        os.nice(10)
    except OSError:
        pass
    _worker_tokenizer = TextTokenizer(tokenizer_json, max_length, truncation_side, chunk_overlap, prompt)


def _tokenize_in_worker(texts: list[str]) -> Tokenized:
    assert _worker_tokenizer is not None
    return _worker_tokenizer(texts)


def default_workers(device_type: str) -> int:
    """Worker processes: all cores but one feed a GPU; on a CPU the model needs the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device_type == "cuda":
        return max(1, min(cores - 1, 32))
    return 1


@contextlib.contextmanager
def _no_sigint() -> Iterator[list[int]]:
    """Ctrl-C held back while the pool is built; yields the interrupts seen meanwhile.

    A Ctrl-C landing in a child between the fork and `_init_worker` would print a traceback from
    the child's at-fork handlers, so SIGINT is blocked in this thread around the forks (the
    children and the pool's threads inherit the mask; each worker ignores SIGINT and unblocks
    it). The kernel still hands the signal to another thread of this process, and Python would
    then raise in `Pool.__init__`: `held_interrupts` records it instead, for the caller to close
    the finished pool and re-raise.
    """
    # The mask is lifted inside the held region: a SIGINT left pending by the mask is delivered
    # then, and must still be recorded rather than raised.
    with held_interrupts() as seen:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if hasattr(signal, "pthread_sigmask") else None
        try:
            yield seen
        finally:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)


class TokenizerPool:
    """Tokenizes chunks of texts in worker processes (or in-process when workers == 0).

    `submit` returns a handle whose `get()` waits for the result, so a caller can keep several
    windows in flight while the model runs.
    """

    CHUNK = 1024  # texts per task: large enough to amortize pickling, small enough to balance

    def __init__(self, tokenizer_json: str, max_length: int, workers: int, truncation_side: str = "right",
                 chunk_overlap: int | None = None, prompt: str = ""):  # fmt: skip
        self.workers = workers
        self._local = TextTokenizer(tokenizer_json, max_length, truncation_side, chunk_overlap, prompt) if workers == 0 else None
        self._pool = None
        if workers > 0:
            # fork starts workers without re-importing the caller's __main__ (spawn would run a
            # user's top-level script again); workers only use `tokenizers`, never torch.
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            with warnings.catch_warnings():
                # lance warns on any fork once imported; these children never call lance
                warnings.filterwarnings("ignore", message=".*fork-safe.*")
                with _no_sigint() as interrupted:
                    self._pool = mp.get_context(method).Pool(workers, _init_worker,
                                                             (tokenizer_json, max_length, truncation_side, chunk_overlap, prompt))  # fmt: skip
            if interrupted:
                self.close()
                raise KeyboardInterrupt

    def submit(self, texts: "pa.Array | list[str]") -> "_Pending":
        """Start tokenizing; `texts` is an Arrow string array or a list (None counts as "")."""
        n = len(texts)
        # Small windows (the run's first) are cut finer so that every worker gets a part.
        step = max(128, min(self.CHUNK, -(-n // max(1, self.workers))))
        # Convert to Python strings a chunk at a time: one large conversion would hold the GIL
        # long enough to starve the thread that feeds the device.
        chunks = [_as_strings(texts[i : i + step]) for i in range(0, n, step)] or [[]]
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


def _as_strings(texts: object) -> list[str]:
    values = texts.to_pylist() if hasattr(texts, "to_pylist") else list(texts)  # type: ignore[attr-defined]
    return ["" if t is None else t for t in values]


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
