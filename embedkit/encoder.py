"""The forward pass: padded id matrices in, pooled (optionally normalized) vectors out.

The SentenceTransformer's own modules run (transformer, pooling, any dense or normalize layers),
so vectors are the model's; embedkit only replaces how batches are formed and fed. On CUDA the
weights are cast to fp16/bf16 once (cheaper than autocasting every matmul), ids travel through a
ring of pinned staging buffers with non-blocking copies, and nothing synchronizes until a shard's
vectors are fetched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import EmbedkitError


@dataclass(frozen=True)
class DeviceChoice:
    """The resolved device and compute precision."""

    device: str  # "cpu" or "cuda:N"
    precision: str  # "fp32", "fp16" or "bf16"

    @property
    def type(self) -> str:
        return self.device.split(":")[0]


def choose_device(device: str, precision: str) -> DeviceChoice:
    """Resolve `auto` choices; a clear error when CUDA is asked for and absent."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EmbedkitError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        if device == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"
    if precision == "auto":
        precision = "fp16" if device.startswith("cuda") else "fp32"
    return DeviceChoice(device=device, precision=precision)


class Encoder:
    """Runs a SentenceTransformer over padded id batches on one device."""

    STAGING = 4  # pinned buffers in flight: enough to overlap copies with compute

    def __init__(self, model: Any, choice: DeviceChoice, *, normalize: bool, out_dtype: str, max_batch_tokens: int):
        import torch

        self.torch = torch
        self.choice = choice
        self.normalize = normalize
        self.out_dtype = torch.float16 if out_dtype == "float16" else torch.float32
        compute = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[choice.precision]
        self.model = model.to(device=choice.device, dtype=compute).eval()
        self.device = torch.device(choice.device)
        input_names = getattr(getattr(model, "tokenizer", None), "model_input_names", []) or []
        self._wants_token_types = "token_type_ids" in input_names
        self._staging: list[Any] = []
        self._events: list[Any] = []
        self._next = 0
        if self.device.type == "cuda":
            # one int32 buffer holds a batch's lengths followed by its id matrix
            n = max_batch_tokens + 65_536 + 1
            self._staging = [torch.empty(n, dtype=torch.int32, pin_memory=True) for _ in range(self.STAGING)]
            self._events = [None] * self.STAGING

    def _to_device(self, ids: np.ndarray, lengths: np.ndarray) -> tuple[Any, Any]:
        torch = self.torch
        b, seq = ids.shape
        if self.device.type != "cuda":
            return torch.from_numpy(ids), torch.from_numpy(lengths.astype(np.int32))
        slot = self._next
        self._next = (self._next + 1) % self.STAGING
        if self._events[slot] is not None:
            self._events[slot].synchronize()  # the copy that last used this buffer is done
        buf = self._staging[slot]
        if b + b * seq > buf.numel():
            buf = torch.empty(b + b * seq, dtype=torch.int32, pin_memory=True)
            self._staging[slot] = buf
        host = buf.numpy()
        host[:b] = lengths
        host[b : b + b * seq] = ids.reshape(-1)
        dev = buf[: b + b * seq].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[slot] = event
        return dev[b:].view(b, seq), dev[:b]

    def forward(self, ids: np.ndarray, lengths: np.ndarray) -> Any:
        """Vectors for one padded batch, as a (rows, dim) tensor on the device in the output dtype."""
        torch = self.torch
        with torch.inference_mode():
            ids_t, lens_t = self._to_device(ids, lengths)
            seq = ids_t.shape[1]
            mask = (torch.arange(seq, device=ids_t.device)[None, :] < lens_t[:, None]).long()
            features = {"input_ids": ids_t.long(), "attention_mask": mask}
            if self._wants_token_types:
                features["token_type_ids"] = torch.zeros_like(features["input_ids"])
            out = self.model(features)["sentence_embedding"]
            if self.normalize:
                # normalize in fp32: fp16 sums of squares lose digits; a zero vector stays zero
                out = torch.nn.functional.normalize(out.float(), dim=-1)
            return out.to(self.out_dtype)

    def fetch(self, tensors: list[Any]) -> np.ndarray:
        """Concatenate device tensors and bring them to the host (one synchronization)."""
        torch = self.torch
        if not tensors:
            return np.zeros((0, 0), np.float32)
        vec = torch.cat(tensors)
        finite = torch.isfinite(vec).all(dim=1)
        host = vec.cpu().numpy()
        bad = np.flatnonzero(~finite.cpu().numpy())
        if len(bad):
            raise NonFiniteVectors(bad)
        return host


class NonFiniteVectors(EmbedkitError):
    """The model produced NaN or Inf for some rows (their positions in the fetched block)."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows
        super().__init__(f"the model produced NaN/Inf vectors for {len(rows)} rows")
