"""`--precision fp8`: the linear layers' matrix products in fp8 (e4m3), through torchao.

Hopper and Ada GPUs (compute capability 8.9 and newer) run fp8 matrix products at about twice
their bf16 rate. torchao's float8 inference path quantizes each linear layer's weight once
(per output row, with its own scale) and each activation on the fly (per token row), and calls
the fp8 matrix product (`torch._scaled_mm`) with those scales. Everything else (embeddings,
norms, attention, softmax, pooling, the LM head) stays in bf16: those are where 8 bits lose the
most and gain the least.

Eager, that path is slower than bf16: the activation's quantization runs as a chain of
separate kernels (absolute value, row maximum, scale, cast), which on the H200 cost more than
the fp8 product saves (a 65,536 x 1,024 by 1,024 x 4,096 product: bf16 0.77 ms, torchao's fp8
eager 1.24 ms, compiled 0.53 ms). So each quantized layer calls one `torch.compile`d function
(dynamic shapes: one compilation serves every batch size), in which the quantization becomes
one fused kernel before the fp8 product, as torchao recommends.

The scaling is torchao's, not written here. torchao is optional (`pip install 'embedkit[fp8]'`):
it is imported only when fp8 is asked for, and a machine that cannot run fp8 is told so in one
line before any model is loaded.
"""

from __future__ import annotations

import functools
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
    # settings, which are the caller's
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False), filter_fn=keep)
    modules = dict(model.named_modules())
    for name in chosen:
        _compile_forward(modules[name])
    return len(chosen)


@functools.cache
def _compiled_linear() -> Any:
    """`F.linear` compiled once per process, with dynamic shapes."""
    import torch

    def fp8_linear(x: Any, weight: Any, bias: Any) -> Any:
        return torch.nn.functional.linear(x, weight, bias)

    return torch.compile(fp8_linear, dynamic=True)


def _compile_forward(module: Any) -> None:
    """The layer's forward through one compiled function shared by every fp8 layer, with
    dynamic shapes: one compilation serves every layer and batch size (with and without a bias).
    The weight and bias go in detached: dynamo keeps a parameter's shape static, which
    recompiled once per layer shape and hit its limit of eight in a process of two models."""
    compiled = _compiled_linear()
    weight = module.weight.detach()
    bias = module.bias.detach() if module.bias is not None else None

    def forward(x: Any) -> Any:
        return compiled(x, weight, bias)

    module.forward = forward


def is_fp8(weight: Any) -> bool:
    """Whether a linear layer's weight was quantized by `to_fp8` (a torchao tensor subclass)."""
    import torch

    return type(weight) not in (torch.Tensor, torch.nn.Parameter) and hasattr(weight, "dequantize")


def plain_weight(weight: Any) -> Any:
    """A linear layer's weight as a plain tensor of its compute dtype (an fp8 weight dequantized)."""
    return weight.dequantize() if is_fp8(weight) else weight
