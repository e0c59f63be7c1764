"""The forward pass: padded id matrices in, pooled (optionally normalized) vectors out.

The SentenceTransformer's own modules run (transformer, pooling, any dense or normalize layers),
so vectors are the model's; embedkit only replaces how batches are formed and fed. On CUDA the
weights are cast to fp16/bf16 once (cheaper than autocasting every matmul), ids travel through a
ring of pinned staging buffers with non-blocking copies, and nothing synchronizes until a shard's
vectors are fetched.

Vectors are checked when fetched, before anything is written: a row whose vector holds NaN or
Inf is run again alone in fp32 (a 16-bit forward can overflow where fp32 does not), and a row
still not finite is reported to the caller, which quarantines it.
"""

from __future__ import annotations

import copy
import os
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import EmbedkitError

PACKED_ENV = "EMBEDKIT_PACKED"  # "0": embedkit.engine.bert runs padded batches on CUDA too


@dataclass(frozen=True)
class DeviceChoice:
    """The resolved device and compute precision."""

    device: str  # "cpu" or "cuda:N"
    precision: str  # "fp32", "fp16", "bf16" or "fp8" (linear layers in fp8, the rest in bf16)

    @property
    def type(self) -> str:
        return self.device.split(":")[0]

    def dtype(self) -> Any:
        """The torch dtype the model is cast to (fp8 runs its linear layers in fp8 on top of bf16)."""
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16}[self.precision]


def choose_device(device: str, precision: str) -> DeviceChoice:
    """Resolve `auto` choices; a clear error when CUDA is asked for and absent."""
    import torch

    from ..config import check_device

    check_device(device, precision)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EmbedkitError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        if device == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"
    if precision == "auto":
        precision = "fp16" if device.startswith("cuda") else "fp32"
    if precision == "fp8":
        from .fp8 import check_fp8

        check_fp8(device)
    return DeviceChoice(device=device, precision=precision)


def default_batch_tokens(config: dict, choice: DeviceChoice) -> int:
    """The padded-token budget for a model (its transformer's config, as a dict) on this device
    when the user gives none.

    On CUDA: the largest power of two whose activations fit in a quarter of the free memory,
    capped at DEFAULT_BATCH_TOKENS["cuda"]. A token's peak activation is about three live copies
    of the widest layer output (the feed-forward's intermediate plus the residual stream).
    """
    from ..config import DEFAULT_BATCH_TOKENS

    cap = DEFAULT_BATCH_TOKENS[choice.type]
    if choice.type != "cuda":
        return cap
    import torch

    hidden = int(config.get("hidden_size") or 1024)
    inter = int(config.get("intermediate_size") or 4 * hidden)
    per_token = 3 * (inter + 2 * hidden) * 2  # bytes, 16-bit activations
    free, _ = torch.cuda.mem_get_info(torch.device(choice.device))
    fit = max(1, free // 4 // per_token)
    budget = 1 << (int(fit).bit_length() - 1)
    return int(min(cap, max(16_384, budget)))


# Attention kernels for scaled_dot_product_attention, in order of preference. On CUDA, torch may
# pick cuDNN attention, which builds an execution plan for every new input shape: batches packed
# by length bring a new (rows, seq_len) shape almost every batch, so a fresh process paid a plan
# per batch (H200, torch 2.11: 2.4x slower on 1M pydocs documents, 8x on short texts; warm
# processes had the plans cached). Flash and memory-efficient attention are compiled ahead of
# time for every shape; flash takes no mask, so a padded batch (a boolean mask) goes to the
# memory-efficient kernel. The math backend is the last resort of both: never compiled, always
# available (an unusual head size, fp32 on an old GPU).
ATTENTION_BACKENDS = {
    ("cuda", False): ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    ("cuda", True): ("EFFICIENT_ATTENTION", "MATH"),
}


def attention_backends(device_type: str, padded: bool) -> tuple[str, ...]:
    """The SDPA backends a forward may use, best first; () leaves torch's choice (CPU).

    >>> attention_backends("cuda", padded=True)
    ('EFFICIENT_ATTENTION', 'MATH')
    >>> attention_backends("cpu", padded=True)
    ()
    """
    return ATTENTION_BACKENDS.get((device_type, padded), ())


def attention_context(device_type: str, padded: bool) -> Any:
    """A context that restricts SDPA to attention_backends (a no-op where that is empty)."""
    import contextlib

    names = attention_backends(device_type, padded)
    if not names:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [getattr(SDPBackend, n) for n in names]
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:  # torch before 2.6: no priority order, the same set
        return sdpa_kernel(backends)


def model_config(model: Any) -> dict:
    """The transformer's config of a SentenceTransformer, as a dict ({} when it has none)."""
    config = getattr(getattr(model[0], "auto_model", None), "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else {}


# model -> its weights in fp32 on the host, taken once per loaded model before the first cast to
# 16 bits: a Ray worker builds a new Encoder for every task from a model the first one already
# cast and moved
_FP32_WEIGHTS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


class HostFp32:
    """An fp32 copy of a model on the host, for the rare row that overflows in 16 bits.

    Only the weights are copied up front (a tensor copy, tens of milliseconds); the module tree
    is built from them when a row first needs it. Deep-copying the whole SentenceTransformer
    at start-up took 2.3 s of every fresh process on the H200 machine.
    """

    def __init__(self, model: Any):
        if model not in _FP32_WEIGHTS:
            _FP32_WEIGHTS[model] = {k: v.detach().to("cpu", copy=True).float() for k, v in model.state_dict().items()}
        self._source, self._model = model, None

    def model(self) -> Any:
        if self._model is None:
            m = copy.deepcopy(self._source).float().cpu()
            m.load_state_dict(_FP32_WEIGHTS[self._source])
            self._model = m.eval()
        return self._model


class Encoder:
    """Runs a SentenceTransformer over padded id batches on one device."""

    STAGING = 8  # pinned buffers in flight: how many batches the host may queue ahead of the device

    def __init__(self, model: Any, choice: DeviceChoice, *, normalize: bool, out_dtype: str, max_batch_tokens: int,
                 dim: int | None = None):  # fmt: skip
        """`dim`: keep the first `dim` dimensions of each vector (Matryoshka), before normalizing."""
        import torch

        self.torch = torch
        self.choice = choice
        self.normalize = normalize
        self.dim = dim
        self.out_dtype = torch.float16 if out_dtype == "float16" else torch.float32  # int8/binary: quantized from fp32 later
        compute = choice.dtype()
        # Rows that come out NaN/Inf are retried in fp32 on the host, with the weights as loaded:
        # a 16-bit run keeps an fp32 copy there (the cast below is in place), an fp32 run
        # retries with its own model.
        self._fp32 = HostFp32(model) if compute != torch.float32 else None
        if getattr(model, "_embedkit_fp8", False):  # quantized by an earlier Encoder (a Ray worker builds one per task)
            self.model = model
        else:
            self.model = model.to(device=choice.device, dtype=compute).eval()
            if choice.precision == "fp8":
                from .fp8 import to_fp8

                to_fp8(self.model)  # in place
                self.model._embedkit_fp8 = True
        self.device = torch.device(choice.device)
        input_names = getattr(getattr(model, "tokenizer", None), "model_input_names", []) or []
        self._wants_token_types = "token_type_ids" in input_names
        self._staging: list[Any] = []
        self._events: list[Any] = []
        self._next = 0
        self._transformer: Any = None
        self._rest: list[Any] = []
        self._direct = self._choose_direct()
        if self.device.type == "cuda":
            # one int32 buffer holds a batch's lengths followed by its id matrix
            n = max_batch_tokens + 65_536 + 1
            self._staging = [torch.empty(n, dtype=torch.int32, pin_memory=True) for _ in range(self.STAGING)]
            self._events = [None] * self.STAGING
        self._packed = self._choose_packed()

    def _to_device(self, ids: np.ndarray, lengths: np.ndarray, packed: bool = False) -> tuple[Any, Any]:
        """(ids, lengths) on the device: ids as the padded (rows, seq) matrix, or packed (tokens,)
        with the rows' real tokens end to end."""
        torch = self.torch
        b, seq = ids.shape
        if packed:
            ids = ids[np.arange(seq)[None, :] < lengths[:, None]]
        if self.device.type != "cuda":
            return torch.from_numpy(np.ascontiguousarray(ids)), torch.from_numpy(lengths.astype(np.int32))
        n = ids.size
        slot = self._next
        self._next = (self._next + 1) % self.STAGING
        if self._events[slot] is not None:
            self._events[slot].synchronize()  # the copy that last used this buffer is done
        buf = self._staging[slot]
        if b + n > buf.numel():
            buf = torch.empty(b + n, dtype=torch.int32, pin_memory=True)
            self._staging[slot] = buf
        host = buf.numpy()
        host[:b] = lengths
        host[b : b + n] = ids.reshape(-1)
        dev = buf[: b + n].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[slot] = event
        return (dev[b:] if packed else dev[b:].view(b, seq)), dev[:b]

    def forward(self, ids: np.ndarray, lengths: np.ndarray) -> Any:
        """Vectors for one padded batch, as a (rows, dim) tensor on the device in the output dtype."""
        torch = self.torch
        with torch.inference_mode():
            if self._packed:
                out = self._forward_packed(ids, lengths)
            else:
                ids_t, lens_t = self._to_device(ids, lengths)
                padded = bool(lengths.min() < ids.shape[1])  # known on the host: no device sync
                run = self._forward_direct if self._direct else self._forward_modules
                with attention_context(self.device.type, padded):
                    out = run(ids_t.long(), lens_t, padded)
            if self.dim is not None:
                out = out[:, : self.dim]
            if self.normalize:
                # normalize in fp32: fp16 sums of squares lose digits; a zero vector stays zero
                out = torch.nn.functional.normalize(out.float(), dim=-1)
            return out.to(self.out_dtype)

    def _mask(self, ids: Any, lens: Any) -> Any:
        seq = ids.shape[1]
        return self.torch.arange(seq, device=ids.device)[None, :] < lens[:, None]

    def _forward_modules(self, ids: Any, lens: Any, padded: bool, model: Any = None) -> Any:
        """The SentenceTransformer's own forward over all its modules (`model`: another copy of it)."""
        features = {"input_ids": ids, "attention_mask": self._mask(ids, lens).long()}
        if self._wants_token_types:
            features["token_type_ids"] = self.torch.zeros_like(ids)
        return (model if model is not None else self.model)(features)["sentence_embedding"]

    def _forward_direct(self, ids: Any, lens: Any, padded: bool) -> Any:
        """The transformer called with a ready 4-D mask, then the remaining modules.

        Given a 2-D mask, transformers checks on every call whether any token is padding
        (`mask.all()`), which waits for the device and stops the host from queueing batches
        ahead. A 4-D mask is used as it is; whether the batch has padding is known on the host.
        """
        mask = self._mask(ids, lens)
        if getattr(self.model, "native", False):
            return self.model.embed(ids, mask, padded)
        b, seq = ids.shape
        attn = mask[:, None, None, :].expand(b, 1, seq, seq) if padded else None
        hidden = self._transformer(input_ids=ids, attention_mask=attn, return_dict=True).last_hidden_state
        features = {"input_ids": ids, "attention_mask": mask.long(), "token_embeddings": hidden}
        for module in self._rest:
            features = module(features)
        return features["sentence_embedding"]

    def _forward_packed(self, ids: np.ndarray, lengths: np.ndarray) -> Any:
        """embedkit.engine.bert's packed path: no padding reaches the device."""
        from .bert import PackedRows

        flat, lens_t = self._to_device(ids, lengths, packed=True)
        rows = PackedRows.of(lens_t, int(lengths.sum()), int(lengths.max()))
        return self.model.embed_packed(flat.long(), rows)

    def _choose_packed(self) -> bool:
        """Packed batches for embedkit.engine.bert on CUDA where torch has the varlen kernel, and only
        if they agree with the padded path on a probe batch."""
        torch = self.torch
        if not getattr(self.model, "native", False) or self.device.type != "cuda" or os.environ.get(PACKED_ENV, "1") == "0":
            return False
        from .bert import has_flash_varlen

        if not has_flash_varlen():
            return False
        gen = torch.Generator().manual_seed(0)
        lengths = np.array([7, 3, 5, 1], np.int32)
        ids = torch.randint(low=1000, high=int(self.model[0].auto_model.config.vocab_size), size=(4, 7), generator=gen).numpy().astype(np.int32)
        try:
            with torch.inference_mode(), attention_context(self.device.type, True):
                ids_t = torch.from_numpy(ids).to(self.device).long()
                a = self._forward_direct(ids_t, torch.from_numpy(lengths).to(self.device), True).float()
                b = self._forward_packed(ids, lengths).float()
        except (RuntimeError, NotImplementedError):  # a head size or dtype the kernel lacks
            return False
        return bool((torch.nn.functional.cosine_similarity(a, b, dim=-1) > 0.9999).all())

    def _choose_direct(self) -> bool:
        """Use the direct path only for a plain text transformer, and only if it agrees with the modules."""
        torch = self.torch
        if getattr(self.model, "native", False):  # embedkit.engine.bert: its own padded-batch path
            return True
        first = self.model[0]
        hf = getattr(first, "auto_model", None)
        config = getattr(first, "modality_config", None) or {}
        text = config.get("text", {"method": "forward", "method_output_name": "last_hidden_state"})
        if hf is None or type(first).__name__ != "Transformer" or text.get("method") != "forward":
            return False
        if text.get("method_output_name") not in ("last_hidden_state", ["last_hidden_state"], ("last_hidden_state",)):
            return False
        if getattr(first, "module_output_name", "token_embeddings") != "token_embeddings":
            return False
        # A decoder's attention is causal: the 4-D padding mask would replace its causal mask
        # (every token would see the ones after it), so decoders keep the module path.
        if any(getattr(m, "is_causal", False) is True for m in hf.modules()) or getattr(hf.config, "is_decoder", False):
            return False
        self._transformer, self._rest = hf, list(self.model)[1:]
        gen = torch.Generator().manual_seed(0)
        lens = torch.tensor([7, 3, 5, 1], dtype=torch.int32)
        vocab = int(getattr(hf.config, "vocab_size", 1000))
        # distinct ids: rows of one repeated token attend alike under any mask and prove nothing
        ids = torch.randint(low=min(1000, vocab // 2), high=vocab, size=(4, 7), generator=gen).to(self.device)
        lens = lens.to(self.device)
        try:
            with torch.inference_mode():
                a = self._forward_modules(ids, lens, True).float()
                b = self._forward_direct(ids, lens, True).float()
        except Exception:  # an architecture that does not take a 4-D mask: keep the module path
            return False
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        return bool((cos > 0.9999).all())

    def fetch_checked(self, tensors: list[Any], batches: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, int]:
        """The vectors of `batches` (their `forward` outputs), non-finite rows retried alone in fp32.

        Returns (vectors, positions of rows still not finite, rows retried). A still-bad row's
        vector is left as computed: the caller must not write it.
        """
        torch = self.torch
        if not tensors:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), 0
        host = torch.cat(tensors).cpu().numpy()
        bad = np.flatnonzero(~np.isfinite(host).all(axis=1))
        if len(bad) == 0:
            return host, bad, 0
        ends = np.cumsum([len(ids) for ids, _ in batches])
        still = []
        for row in bad:
            b = int(np.searchsorted(ends, row, side="right"))
            j = int(row - (ends[b - 1] if b else 0))
            ids, lengths = batches[b]
            vector = self._retry_fp32(ids[j : j + 1, : lengths[j]], lengths[j : j + 1])
            if np.isfinite(vector).all():
                host[row] = vector
            else:
                still.append(row)
        return host, np.asarray(still, np.int64), len(bad)

    def _retry_fp32(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One row alone, through the model's modules in fp32, in the output dtype."""
        torch = self.torch
        model = self._fp32.model() if self._fp32 is not None else self.model
        device = torch.device("cpu") if self._fp32 is not None else self.device
        with torch.inference_mode():
            ids_t = torch.from_numpy(np.ascontiguousarray(ids)).long().to(device)
            lens_t = torch.from_numpy(lengths.astype(np.int32)).to(device)
            out = self._forward_modules(ids_t, lens_t, False, model=model).float()
            if self.dim is not None:
                out = out[:, : self.dim]
            if self.normalize:
                out = torch.nn.functional.normalize(out, dim=-1)
            return out.to(self.out_dtype).float().cpu().numpy()[0]
