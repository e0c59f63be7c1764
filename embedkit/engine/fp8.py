"""`--precision fp8`: the linear layers' matrix products in fp8 (e4m3), through torchao.

Hopper and Ada GPUs (compute capability 8.9 and newer) run fp8 matrix products at about twice
their bf16 rate. torchao's float8 inference path quantizes each linear layer's weight once
(per output row, with its own scale) and each activation on the fly (per token row), and calls
the fp8 matrix product (`torch._scaled_mm`) with those scales. Everything else (embeddings,
norms, attention, softmax, pooling, the LM head) stays in bf16: those are where 8 bits lose the
most and gain the least.

The scaling is torchao's, not written here. torchao is optional (`pip install 'embedkit[fp8]'`):
it is imported only when fp8 is asked for, and a machine that cannot run fp8 is told so in one
line before any model is loaded.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from ..errors import EmbedkitError

MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9), Hopper (9.0) and newer
ALIGN = 16  # torch._scaled_mm needs both dimensions of the weight to be multiples of 16


def check_fp8(device: str) -> None:
    """Refuse fp8 where it cannot run: not CUDA, a GPU older than compute capability 8.9, no torchao."""
    if not device.startswith("cuda"):
        raise EmbedkitError("--precision fp8 needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper); this run is on the CPU")
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    if not fp8_capable((major, minor)):
        name = torch.cuda.get_device_name(device)
        raise EmbedkitError(f"--precision fp8 needs compute capability 8.9 or newer (Ada, Hopper); {name} is {major}.{minor}: use bf16")
    if importlib.util.find_spec("torchao") is None:
        raise EmbedkitError("--precision fp8 needs torchao: pip install 'embedkit[fp8]'")


def fp8_capable(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability has fp8 tensor cores.

    >>> fp8_capable((9, 0)), fp8_capable((8, 9)), fp8_capable((8, 0))
    (True, True, False)
    """
    return tuple(capability) >= MIN_CAPABILITY


def quantizable(module: Any) -> bool:
    """A linear layer whose weight fp8 matrix products take (both dimensions multiples of 16)."""
    import torch

    return isinstance(module, torch.nn.Linear) and module.in_features % ALIGN == 0 and module.out_features % ALIGN == 0


def to_fp8(model: Any, skip: tuple[str, ...] = ()) -> int:
    """Quantize `model`'s linear layers in place (but those whose names start with one of `skip`):
    fp8 weights, scaled per output row, and fp8 activations scaled per row at each call.
    Returns how many layers were quantized; the model must already be on its GPU, in bf16."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    chosen: list[str] = []

    def keep(module: Any, name: str) -> bool:
        ok = quantizable(module) and not any(name == s or name.startswith(s + ".") for s in skip)
        if ok:
            chosen.append(name)
        return ok

    # set_inductor_config=False: torchao would otherwise change torch.compile's process-wide
    # settings, which are the caller's (embedkit compiles nothing)
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False), filter_fn=keep)
    return len(chosen)


def plain_weight(weight: Any) -> Any:
    """A linear layer's weight as a plain tensor of its compute dtype (an fp8 weight dequantized)."""
    dequantize = getattr(weight, "dequantize", None)
    if dequantize is not None and type(weight).__name__ not in ("Parameter", "Tensor"):
        return dequantize()
    return weight
