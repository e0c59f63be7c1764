"""In-memory embedding of a list of strings (`embedkit.encode_texts`, the Retriever's queries):
no OUT, no shards; the loaded model is kept for the next call."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import DEFAULT_BATCH_TOKENS, DEFAULT_MODEL
from ..errors import EmbedkitError
from .batching import pack_batches, pad_rows
from .encoder import DeviceChoice, Encoder, choose_device
from .models import (
    embedding_dim,
    fast_tokenizer_json,
    load_sentence_transformer,
    model_max_length,
    resolve_model,
    truncation_side,
)
from .tokenize import TextTokenizer, Tokenized, tokenize_all

_MODEL_CACHE: dict[tuple[str, str, str, int | None], tuple[Encoder, TextTokenizer]] = {}


def encode_texts(
    texts: list[str],
    *,
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    precision: str = "auto",
    normalize: bool = True,
    batch_tokens: int | None = None,
    max_seq_length: int | None = None,
) -> np.ndarray:
    """Embed a list of strings in memory; float32 array of shape (len(texts), dim), input order.

    The model stays loaded between calls with the same model, device, precision and length.

    >>> embedkit.encode_texts(["hello world"]).shape   # doctest: +SKIP
    (1, 384)
    """
    texts = text_list(texts)  # before any model loads: a generator is read once, a str refused
    choice = choose_device(device, precision)
    encoder, tokenizer = cached_model(model, choice, max_seq_length)
    encoder.normalize = normalize  # the cached encoder serves both settings
    tok = tokenize_all(tokenizer, ["" if t is None else t for t in texts])
    return embed_tokenized(encoder, tok, batch_tokens or DEFAULT_BATCH_TOKENS[choice.type])


def embed_tokenized(encoder: Encoder, tok: Tokenized, budget: int) -> np.ndarray:
    """float32 vectors of every row of `tok`, in its order, through batches of `budget` tokens."""
    batches = pack_batches(tok.lengths, budget)
    outputs = [
        encoder.forward(pad_rows(tok.flat, tok.offsets, b.rows, b.seq_len), tok.lengths[b.rows].astype(np.int32))
        for b in batches
    ]
    result = np.zeros((len(tok.lengths), encoder.dim or embedding_dim(encoder.model)), np.float32)
    if batches:
        # one transfer for the whole call instead of one synchronization per batch
        result[np.concatenate([b.rows for b in batches])] = encoder.torch.cat(outputs).float().cpu().numpy()
    return result


def text_list(texts: Any, what: str = "texts") -> list:
    """`texts` as a list of strings (None allowed: it embeds as ""), or a one-line refusal.

    A str is refused rather than read as its characters (one vector per letter), and anything
    else that is not a string, rather than embedding its repr.
    """
    if isinstance(texts, (str, bytes)):
        raise EmbedkitError(f"{what} must be a list of strings, not one {type(texts).__name__}: wrap it as [{texts[:30]!r}]")
    try:
        values = list(texts)
    except TypeError:
        raise EmbedkitError(f"{what} must be a list of strings, not {type(texts).__name__}") from None
    for i, value in enumerate(values):
        if value is not None and not isinstance(value, str):
            raise EmbedkitError(f"{what} must hold strings; item {i} is {type(value).__name__} {value!r:.40}")
    return values


def cached_model(model: str, choice: DeviceChoice, max_seq_length: int | None) -> tuple[Encoder, TextTokenizer]:
    key = (model, choice.device, choice.precision, max_seq_length)
    if key not in _MODEL_CACHE:
        st = load_sentence_transformer(resolve_model(model), "cpu")
        tokenizer = TextTokenizer(fast_tokenizer_json(st), model_max_length(st, max_seq_length), truncation_side(st))
        encoder = Encoder(st, choice, normalize=False, out_dtype="float32", max_batch_tokens=DEFAULT_BATCH_TOKENS[choice.type])
        _MODEL_CACHE[key] = (encoder, tokenizer)
    return _MODEL_CACHE[key]
