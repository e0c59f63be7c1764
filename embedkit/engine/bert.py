"""A BERT sentence encoder in plain torch, loaded straight from a sentence-transformers folder.

Most embedding models people run offline (all-MiniLM, bge, e5, gte, multi-qa: BERT inside) are a
sentence-transformers folder holding a BERT, a Pooling module and perhaps a Normalize module.
Loading such a folder through `sentence_transformers` imports it and `transformers` (with
scipy, sklearn and torch's compiler stack behind them): about 12 s of every fresh process on the
H200 machine, before the first document is read. This module reads the same files (modules.json,
config.json, sentence_bert_config.json, 1_Pooling/config.json, tokenizer.json, the safetensors
weights) and builds the same computation from torch modules, so a run imports torch,
safetensors and tokenizers only. The query, key and value projections are one fused matrix
product, and padded batches pass a ready boolean mask (no check on the device of whether a
batch has padding).

On CUDA, batches also run *packed* (`embed_packed`): the rows' tokens laid end to end, no padding
at all, every matrix product over real tokens only and attention by flash attention's
variable-length kernel (`torch.nn.attention.varlen`), which takes the rows' boundaries instead
of a mask. The padded path is kept for the CPU (no varlen kernel there) and as the reference
the packed one is checked against.

`native_spec` accepts a folder only when every part is one this module reproduces exactly;
anything else (another architecture, Dense layers, other pooling, tokenizer or config options
that change behaviour) is loaded by sentence-transformers as before. The tests compare the
vectors with sentence-transformers' own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NATIVE_ENV = "EMBEDKIT_NATIVE"  # "0": load every model through sentence-transformers
_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max"}
_OTHER_POOLING = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


@dataclass(frozen=True)
class BertSpec:
    """What a sentence-transformers folder of BERT + Pooling (+ Normalize) holds."""

    folder: Path  # the Transformer module's folder (config, weights, tokenizer)
    config: dict  # config.json
    pooling: str  # "mean", "cls" or "max"
    normalize: bool  # a Normalize module follows the pooling
    max_seq_length: int
    truncation_side: str


def native_spec(root: Path) -> BertSpec | None:
    """The spec of a folder this module can run exactly, else None (sentence-transformers loads it)."""
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None
    modules = _read(root / "modules.json")
    if not isinstance(modules, list) or not 2 <= len(modules) <= 3:
        return None
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or kinds[2:] not in ([], ["Normalize"]):
        return None
    folder = root / modules[0].get("path", "")
    config, st_config = _read(folder / "config.json"), _read(folder / "sentence_bert_config.json")
    pooling = _pooling(_read(root / modules[1].get("path", "") / "config.json"), config)
    if pooling is None or not _plain_bert(config) or not _plain_st_config(st_config):
        return None
    if not (folder / "model.safetensors").is_file() or not (folder / "tokenizer.json").is_file():
        return None
    tok_config = _read(folder / "tokenizer_config.json") or {}
    if not _tokenizer_agrees(folder / "tokenizer.json", tok_config):
        return None
    max_length = _max_seq_length(st_config, tok_config, config)
    if max_length is None:
        return None
    side = tok_config.get("truncation_side", "right")
    return BertSpec(folder, config, pooling, kinds[2:] == ["Normalize"], max_length, side if side in ("left", "right") else "right")


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _plain_bert(config: Any) -> bool:
    """A BERT encoder with absolute positions and exact GELU: what BertEncoder computes."""
    if not isinstance(config, dict) or config.get("model_type") != "bert":
        return False
    if config.get("position_embedding_type", "absolute") != "absolute" or config.get("hidden_act") != "gelu":
        return False
    if config.get("is_decoder") or config.get("add_cross_attention"):
        return False
    need = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size", "max_position_embeddings")
    return all(isinstance(config.get(k), int) and config[k] > 0 for k in need) and config["hidden_size"] % config["num_attention_heads"] == 0


# sentence_bert_config.json keys (both the older and the sentence-transformers 6 layout) with
# the values that leave the Transformer module a plain forward to its token embeddings
_ST_KEYS = {
    "max_seq_length": lambda v: isinstance(v, int) and v > 0,
    "do_lower_case": lambda v: v is False,  # True lowercases texts before the tokenizer
    "transformer_task": lambda v: v == "feature-extraction",
    "module_output_name": lambda v: v == "token_embeddings",
    "modality_config": lambda v: v == {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
}


def _plain_st_config(st_config: Any) -> bool:
    """sentence_bert_config.json holding only keys whose values this module reproduces (any
    other: *_args that change how parts load, other tasks or outputs)."""
    return isinstance(st_config, dict) and all(k in _ST_KEYS and _ST_KEYS[k](v) for k, v in st_config.items())


def _max_seq_length(st_config: dict, tok_config: dict, config: dict) -> int | None:
    """The length sentence-transformers cuts at: its own config's, else the tokenizer's
    model_max_length capped by the model's positions (None when neither is usable)."""
    if "max_seq_length" in st_config:
        return int(st_config["max_seq_length"])
    declared = tok_config.get("model_max_length")
    if not isinstance(declared, int) or declared <= 0 or declared > 1_000_000:  # "unset" is a huge number
        return None
    return min(declared, int(config["max_position_embeddings"]))


def _pooling(pool: Any, config: dict | None) -> str | None:
    """"mean", "cls" or "max" from either layout of the Pooling module's config, else None."""
    if not isinstance(pool, dict) or any(pool.get(k) for k in _OTHER_POOLING) or pool.get("include_prompt") is False:
        return None
    if "pooling_mode" in pool:  # sentence-transformers 6
        mode = pool["pooling_mode"]
        modes = [mode] if mode in _POOLING.values() else []
    else:
        modes = [name for key, name in _POOLING.items() if pool.get(key)]
    width = pool.get("embedding_dimension", pool.get("word_embedding_dimension"))
    if len(modes) != 1 or (config and width not in (None, config.get("hidden_size"))):
        return None
    return modes[0]


def _tokenizer_agrees(path: Path, tok_config: dict) -> bool:
    """tokenizer.json as transformers would use it: a BertNormalizer whose lowercasing is what
    tokenizer_config.json says (transformers rebuilds the normalizer when they differ)."""
    tok = _read(path)
    if not isinstance(tok, dict):
        return False
    normalizer = tok.get("normalizer") or {}
    if normalizer.get("type") != "BertNormalizer":
        return True
    same = {"do_lower_case": lambda v: bool(normalizer.get("lowercase")) == bool(v), "strip_accents": lambda v: normalizer.get("strip_accents") == v}
    return all(agrees(tok_config[k]) for k, agrees in same.items() if k in tok_config)


class _Config:
    """The transformer's config: attributes, and `to_dict()` like a transformers config."""

    def __init__(self, d: dict):
        self._d = dict(d)
        self.__dict__.update(d)

    def to_dict(self) -> dict:
        return dict(self._d)


class _Tokenizer:
    """What embedkit reads of a transformers tokenizer: the Rust backend, the side long texts are
    cut on, and the inputs the model takes."""

    model_input_names = ["input_ids", "token_type_ids", "attention_mask"]

    def __init__(self, tokenizer_json: str, truncation_side: str):
        self._json = tokenizer_json
        self.truncation_side = truncation_side

    @property
    def backend_tokenizer(self) -> Any:
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self._json)


def load_native(spec: BertSpec) -> "NativeSentenceModel":
    """A NativeSentenceModel on the CPU, weights in the dtype they are stored in (as
    sentence-transformers loads them)."""
    from safetensors.torch import load_file

    model = NativeSentenceModel(spec)
    model[0].auto_model.load_hf_weights(load_file(str(spec.folder / "model.safetensors")))
    return model.eval()


def key_mask(mask: torch.Tensor, padded: bool) -> torch.Tensor | None:
    """SDPA's boolean (rows, 1, seq, seq) mask of the keys to attend, a view of the (rows, seq)
    `mask`; None without padding (the kernels that take no mask then apply)."""
    b, seq = mask.shape
    return mask[:, None, None, :].expand(b, 1, seq, seq) if padded else None


class BertLayer(nn.Module):
    def __init__(self, h: int, heads: int, inter: int, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(h, 3 * h)  # query, key and value in one matrix product
        self.out = nn.Linear(h, h)
        self.ln1 = nn.LayerNorm(h, eps=eps)
        self.up = nn.Linear(h, inter)
        self.down = nn.Linear(inter, h)
        self.ln2 = nn.LayerNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = self.ln1(x + self.out(a.transpose(1, 2).reshape(b, s, h)))
        return self.ln2(x + self.down(F.gelu(self.up(x))))

    def forward_packed(self, x: torch.Tensor, rows: "PackedRows") -> torch.Tensor:
        """The same layer over packed (tokens, hidden) states."""
        t, h = x.shape
        q, k, v = self.qkv(x).view(t, 3, self.heads, h // self.heads).unbind(1)
        a = rows.attention(q, k, v)
        x = self.ln1(x + self.out(a.reshape(t, h)))
        return self.ln2(x + self.down(F.gelu(self.up(x))))


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
    """Flash attention's variable-length forward, (tokens, heads, head_dim) in and out.

    The aten op is called directly: the public wrapper (`torch.nn.attention.varlen.varlen_attn`,
    the same op underneath) imports torch's compiler stack when first imported, 3.9 s of every
    fresh process on the H200 machine (py-spy)."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, False, False)[0]


def has_flash_varlen() -> bool:
    """Whether this torch build has the op (CUDA builds since torch 2.1 do)."""
    return hasattr(torch.ops.aten, "_flash_attention_forward")


@dataclass(frozen=True)
class PackedRows:
    """Where each row of a packed batch lies: rows' tokens end to end, no padding.

    `cu` (rows + 1, int32) are the cumulative lengths flash attention takes, `segment` (tokens,)
    each token's row, `position` (tokens,) each token's position within its row; `max_len` is
    known on the host (the kernel needs it, and reading it from the device would wait)."""

    cu: torch.Tensor
    segment: torch.Tensor
    position: torch.Tensor
    lengths: torch.Tensor
    max_len: int

    @staticmethod
    def of(lengths: torch.Tensor, tokens: int, max_len: int) -> "PackedRows":
        """From the rows' lengths (int32, on the device) and their total and maximum, known on
        the host: nothing here waits for the device."""
        b = lengths.shape[0]
        cu = torch.zeros(b + 1, dtype=torch.int32, device=lengths.device)
        torch.cumsum(lengths, 0, out=cu[1:])
        segment = torch.repeat_interleave(torch.arange(b, device=lengths.device), lengths.long(), output_size=tokens)
        position = torch.arange(tokens, device=lengths.device) - cu[:-1].long()[segment]
        return PackedRows(cu, segment, position, lengths, max_len)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(tokens, heads, head_dim) attention of every token over its own row's tokens."""
        if q.is_cuda:
            return flash_varlen(q, k, v, self.cu, self.max_len)
        return self._padded_attention(q, k, v)

    def _padded_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The reference on devices without a varlen kernel: scatter into a padded batch, SDPA
        with a key mask, gather back."""
        b, (_, heads, d) = self.lengths.shape[0], q.shape
        mask = torch.arange(self.max_len, device=q.device)[None, :] < self.lengths[:, None].long()
        padded = [torch.zeros(b, self.max_len, heads, d, dtype=q.dtype, device=q.device) for _ in range(3)]
        for dst, src in zip(padded, (q, k, v)):
            dst[mask] = src
        pq_, pk, pv = (p.transpose(1, 2) for p in padded)
        out = F.scaled_dot_product_attention(pq_, pk, pv, attn_mask=key_mask(mask, True))
        return out.transpose(1, 2)[mask]

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row mean of packed (tokens, width) states, summed in fp32."""
        sums = torch.zeros(self.lengths.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        sums.index_add_(0, self.segment, x.float())
        return (sums / self.lengths.clamp(min=1)[:, None].float()).to(x.dtype)

    def max(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.full((self.lengths.shape[0], x.shape[1]), -1e9, dtype=x.dtype, device=x.device)
        return out.scatter_reduce(0, self.segment[:, None].expand_as(x), x, "amax", include_self=True)

    def first(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.cu[:-1].long()]


class BertEncoder(nn.Module):
    """BertModel's encoder (no pooler): embeddings, then the layers; returns the hidden states."""

    def __init__(self, config: dict):
        super().__init__()
        h, eps = config["hidden_size"], float(config.get("layer_norm_eps", 1e-12))
        self.config = _Config(config)
        self.word = nn.Embedding(config["vocab_size"], h)
        self.position = nn.Embedding(config["max_position_embeddings"], h)
        self.token_type = nn.Embedding(int(config.get("type_vocab_size", 2)), h)
        self.ln = nn.LayerNorm(h, eps=eps)
        self.layers = nn.ModuleList(
            BertLayer(h, config["num_attention_heads"], config["intermediate_size"], eps) for _ in range(config["num_hidden_layers"])
        )

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """`mask`: None (no padding) or a boolean (rows, 1, seq, seq) mask of the keys to attend."""
        seq = ids.shape[1]
        # token type 0 for every token, as transformers uses when none are given
        x = self.word(ids) + self.position.weight[:seq] + self.token_type.weight[0]
        x = self.ln(x)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def forward_packed(self, ids: torch.Tensor, rows: PackedRows) -> torch.Tensor:
        """Packed (tokens,) ids in, packed (tokens, hidden) states out."""
        x = self.word(ids) + self.position(rows.position) + self.token_type.weight[0]
        x = self.ln(x)
        for layer in self.layers:
            x = layer.forward_packed(x, rows)
        return x

    def load_hf_weights(self, weights: dict) -> None:
        """Copy a transformers BertModel state dict in (with or without its "bert." prefix)."""
        w = {k.removeprefix("bert."): v for k, v in weights.items()}
        mine = {
            "word.weight": w["embeddings.word_embeddings.weight"],
            "position.weight": w["embeddings.position_embeddings.weight"],
            "token_type.weight": w["embeddings.token_type_embeddings.weight"],
            "ln.weight": w["embeddings.LayerNorm.weight"], "ln.bias": w["embeddings.LayerNorm.bias"],
        }  # fmt: skip
        for i in range(len(self.layers)):
            p = f"encoder.layer.{i}."
            att = p + "attention.self."
            for part in ("weight", "bias"):
                mine[f"layers.{i}.qkv.{part}"] = torch.cat([w[att + n + "." + part] for n in ("query", "key", "value")])
                mine[f"layers.{i}.out.{part}"] = w[p + "attention.output.dense." + part]
                mine[f"layers.{i}.ln1.{part}"] = w[p + "attention.output.LayerNorm." + part]
                mine[f"layers.{i}.up.{part}"] = w[p + "intermediate.dense." + part]
                mine[f"layers.{i}.down.{part}"] = w[p + "output.dense." + part]
                mine[f"layers.{i}.ln2.{part}"] = w[p + "output.LayerNorm." + part]
        dtype = mine["word.weight"].dtype
        self.to(dtype)
        self.load_state_dict(mine, strict=True)

class Transformer(nn.Module):
    """The sentence-transformers Transformer module's part: features in, token embeddings out."""

    def __init__(self, config: dict):
        super().__init__()
        self.auto_model = BertEncoder(config)

    def forward(self, features: dict) -> dict:
        mask = features["attention_mask"].bool()
        return {**features, "token_embeddings": self.auto_model(features["input_ids"], key_mask(mask, not bool(mask.all())))}

class Pooling(nn.Module):
    """sentence-transformers' Pooling for one mode, computed the same way."""

    def __init__(self, mode: str):
        super().__init__()
        self.pooling_mode = mode

    def forward(self, features: dict) -> dict:
        tokens, mask = features["token_embeddings"], features["attention_mask"]
        if self.pooling_mode == "cls":
            out = tokens[:, 0]
        elif self.pooling_mode == "max":
            out = tokens.masked_fill(~mask.bool()[..., None], -1e9).max(dim=1).values
        else:
            expanded = mask.unsqueeze(-1).expand(tokens.size()).to(tokens.dtype)
            out = (tokens * expanded).sum(1) / torch.clamp(expanded.sum(1), min=1e-9)
        return {**features, "sentence_embedding": out}

    def pool_packed(self, tokens: torch.Tensor, rows: PackedRows) -> torch.Tensor:
        """The same pooling over packed (tokens, width) states."""
        if self.pooling_mode == "cls":
            return rows.first(tokens)
        return rows.max(tokens) if self.pooling_mode == "max" else rows.mean(tokens)

class Normalize(nn.Module):
    def forward(self, features: dict) -> dict:
        return {**features, "sentence_embedding": F.normalize(features["sentence_embedding"], p=2, dim=1)}

class NativeSentenceModel(nn.Sequential):
    """BERT + Pooling (+ Normalize), shaped as a SentenceTransformer is where embedkit reads it:
    iterable modules, `tokenizer`, `max_seq_length`, the embedding dimension, and a forward
    from a features dict to `sentence_embedding`."""

    native = True

    def __init__(self, spec: BertSpec):
        modules = [Transformer(spec.config), Pooling(spec.pooling)] + ([Normalize()] if spec.normalize else [])
        super().__init__(*modules)
        self.max_seq_length = spec.max_seq_length
        self.tokenizer = _Tokenizer((spec.folder / "tokenizer.json").read_text(), spec.truncation_side)
        self._dim = int(spec.config["hidden_size"])

    def get_sentence_embedding_dimension(self) -> int:
        return self._dim

    def embed(self, ids: torch.Tensor, mask: torch.Tensor, padded: bool) -> torch.Tensor:
        """Sentence vectors of a padded batch; `padded` (known on the host) says whether the
        boolean (rows, seq) `mask` has any False, so no device sync is needed to decide."""
        features = {"input_ids": ids, "attention_mask": mask.long(), "token_embeddings": self[0].auto_model(ids, key_mask(mask, padded))}
        for module in list(self)[1:]:
            features = module(features)
        return features["sentence_embedding"]

    def embed_packed(self, ids: torch.Tensor, rows: PackedRows) -> torch.Tensor:
        """Sentence vectors of a packed batch: (tokens,) ids, rows as PackedRows."""
        pooled = self[1].pool_packed(self[0].auto_model.forward_packed(ids, rows), rows)
        return F.normalize(pooled, p=2, dim=1) if len(self) > 2 else pooled
