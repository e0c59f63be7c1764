"""Fused elementwise kernels of the decoder layer: RMSNorm (with the residual add before it),
rotary embedding, and SiLU-and-multiply.

A profile of the packed prefill on the H200 (benchmarks/results/h200-generate-run5-profile.log)
put 0.75 s of 3.6 s of GPU time in the matrix products and most of the rest in these
elementwise steps, each a chain of PyTorch kernels over a broadcast or strided view (rotary:
five kernels per layer; SiLU on a strided half of the gate/up product; norms with their float
casts). Each kernel here reads its inputs once and writes its output once, and rounds where the
model's own PyTorch code rounds (to the activation dtype after each operation). Measured in
bf16 on the H200: the norm and SiLU kernels equal PyTorch on every element checked, the rotary
kernel on 76.7% (the rest by a rounding step; in Triton's CPU interpreter float16 is equal).

On CUDA (or Triton's CPU interpreter, for tests) the Triton kernels run; elsewhere the same
functions run as plain PyTorch, which is also their reference.
"""

from __future__ import annotations

import os
from typing import Any

_KERNELS: dict[str, Any] = {}


def usable(x: Any) -> bool:
    """True where the Triton kernels run: a CUDA tensor (or Triton's CPU interpreter) of fp16/bf16/fp32."""
    import importlib.util

    import torch

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not (x.is_cuda or interpreted) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return importlib.util.find_spec("triton") is not None


# ---- the public functions ------------------------------------------------------------------


def rms_norm(x: Any, weight: Any, eps: float, *, kernel: bool | None = None) -> Any:
    """Llama's RMSNorm over the last dimension: normalize in float32, cast back, scale by weight."""
    if not (usable(x) if kernel is None else kernel):
        return _rms_norm_ref(x, weight, eps)
    rows = x.reshape(-1, x.shape[-1])
    out = _launch_norm(rows, None, weight, eps)[1]
    return out.view(x.shape)


def add_rms_norm(x: Any, delta: Any, weight: Any, eps: float, *, kernel: bool | None = None) -> tuple[Any, Any]:
    """(x + delta, rms_norm(x + delta)): the residual add and the next norm in one pass."""
    if not (usable(x) if kernel is None else kernel):
        s = x + delta
        return s, _rms_norm_ref(s, weight, eps)
    s, out = _launch_norm(x.reshape(-1, x.shape[-1]), delta.reshape(-1, x.shape[-1]), weight, eps)
    return s.view(x.shape), out.view(x.shape)


def rope(x: Any, cos: Any, sin: Any, *, kernel: bool | None = None) -> Any:
    """Rotary embedding, Llama's "rotate half" form: x * cos + rotate_half(x) * sin.

    x: (tokens, heads, head_dim), last dimension contiguous (a view into a wider projection is
    fine); cos, sin: (tokens, head_dim). Returns a contiguous (tokens, heads, head_dim)."""
    if not (usable(x) if kernel is None else kernel):
        return _rope_ref(x, cos, sin)
    import torch
    import triton

    t, h, d = x.shape
    out = torch.empty((t, h, d), dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    cos, sin = cos.contiguous(), sin.contiguous()
    _kernel("rope")[(t,)](
        x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), h,
        HALF=d // 2, BLOCK_H=triton.next_power_of_2(h),
    )  # fmt: skip
    return out


def silu_mul(gate_up: Any, *, kernel: bool | None = None) -> Any:
    """silu(gate) * up of a (..., 2 * inner) gate/up product (gate first): Llama's MLP middle."""
    if not (usable(gate_up) if kernel is None else kernel):
        gate, up = gate_up.chunk(2, -1)
        return _silu(gate) * up
    import torch
    import triton

    inner = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * inner)
    out = torch.empty((rows.shape[0], inner), dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0]:
        block = min(1024, triton.next_power_of_2(inner))
        _kernel("silu_mul")[(rows.shape[0], triton.cdiv(inner, block))](rows, out, rows.stride(0), inner, BLOCK=block)
    return out.view(*gate_up.shape[:-1], inner)


# ---- references (plain PyTorch: what the model's modules compute) ---------------------------


def _rms_norm_ref(x: Any, weight: Any, eps: float) -> Any:
    import torch

    return weight * torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rope_ref(x: Any, cos: Any, sin: Any) -> Any:
    import torch

    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _silu(x: Any) -> Any:
    import torch

    return torch.nn.functional.silu(x)


# ---- Triton ---------------------------------------------------------------------------------


def _launch_norm(x: Any, delta: Any, weight: Any, eps: float) -> tuple[Any, Any]:
    import torch
    import triton

    rows, width = x.shape
    out = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    total = torch.empty((rows, width), dtype=x.dtype, device=x.device) if delta is not None else x
    if rows:
        _kernel("norm")[(rows,)](
            x, delta if delta is not None else x, weight, total, out, x.stride(0),
            delta.stride(0) if delta is not None else 0, width, eps,
            ADD=delta is not None, BLOCK=triton.next_power_of_2(width),
        )  # fmt: skip
    return total, out


def _kernel(name: str) -> Any:
    """The Triton kernels, defined on first use (importing Triton is slow and it is optional)."""
    if _KERNELS:
        return _KERNELS[name]
    import triton
    import triton.language as tl

    @triton.jit
    def norm_kernel(X, D, W, S, OUT, x_row, d_row, width, eps, ADD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < width
        x = tl.load(X + row * x_row + cols, mask=ok, other=0.0)
        if ADD:  # the residual add, rounded to the activation dtype as PyTorch's add is
            x = (x.to(tl.float32) + tl.load(D + row * d_row + cols, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(S + row * width + cols, x, mask=ok)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / width
        normed = (xf * tl.math.rsqrt(var + eps)).to(x.dtype)  # cast back, then scale: as LlamaRMSNorm
        w = tl.load(W + cols, mask=ok, other=0.0)
        tl.store(OUT + row * width + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype), mask=ok)

    @triton.jit
    def rope_kernel(X, COS, SIN, OUT, x_tok, x_head, c_tok, heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        tok = tl.program_id(0)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, HALF)[None, :]
        ok = h < heads
        base = X + tok * x_tok + h * x_head
        x1 = tl.load(base + d, mask=ok, other=0.0)
        x2 = tl.load(base + HALF + d, mask=ok, other=0.0)
        c1 = tl.load(COS + tok * c_tok + d).to(tl.float32)
        c2 = tl.load(COS + tok * c_tok + HALF + d).to(tl.float32)
        s1 = tl.load(SIN + tok * c_tok + d).to(tl.float32)
        s2 = tl.load(SIN + tok * c_tok + HALF + d).to(tl.float32)
        dt = x1.dtype
        a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
        # x * cos + rotate_half(x) * sin, rounded after each product and the sum, as PyTorch does
        out1 = ((a1 * c1).to(dt).to(tl.float32) + (-a2 * s1).to(dt).to(tl.float32)).to(dt)
        out2 = ((a2 * c2).to(dt).to(tl.float32) + (a1 * s2).to(dt).to(tl.float32)).to(dt)
        dst = OUT + tok * heads * 2 * HALF + h * 2 * HALF
        tl.store(dst + d, out1, mask=ok)
        tl.store(dst + HALF + d, out2, mask=ok)

    @triton.jit
    def silu_mul_kernel(GU, OUT, gu_row, inner, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < inner
        g = tl.load(GU + row * gu_row + cols, mask=ok, other=0.0)
        u = tl.load(GU + row * gu_row + inner + cols, mask=ok, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # SiLU, rounded as PyTorch's silu returns it
        tl.store(OUT + row * inner + cols, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=ok)

    _KERNELS.update(norm=norm_kernel, rope=rope_kernel, silu_mul=silu_mul_kernel)
    return _KERNELS[name]
