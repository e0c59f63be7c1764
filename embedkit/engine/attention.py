"""Decode attention over KV-cache slots: each row reads only its own cached positions.

One decode step has one new token per slot. With a dense attention call every slot reads the
cache up to the longest row's length, so in a batch of mixed lengths most of the bytes moved
are masked out; decoding is bound by exactly those bytes. `slot_attention` reads, for slot s,
positions 0..lengths[s]-1 only:

- on CUDA with fp16/bf16 caches, a Triton kernel (one program per slot and key head; the query
  heads that share a key head are that program's rows; an online softmax over blocks of keys,
  as in flash attention, with fp32 accumulation);
- elsewhere, `scaled_dot_product_attention` with a length mask (the reference the kernel is
  tested against, in Triton's interpreter on CPU).
"""

from __future__ import annotations

import os
from typing import Any

BLOCK_N = 64  # cached positions per inner step of the kernel


def slot_attention(q: Any, keys: Any, values: Any, lengths: Any, scale: float, *, kernel: bool | None = None) -> Any:
    """Attention of one query token per slot over that slot's first `lengths[s]` cached positions.

    q: (slots, kv_heads, group, head_dim), the query heads grouped by the key head they share.
    keys, values: (slots, kv_heads, capacity, head_dim), last dimension contiguous.
    lengths: (slots,) int, at least 1. Returns (slots, kv_heads, group, head_dim) in q's dtype.
    """
    use = triton_usable(q) if kernel is None else kernel
    if use:
        return _triton_attention(q, keys, values, lengths, scale)
    return reference_attention(q, keys, values, lengths, scale)


def reference_attention(q: Any, keys: Any, values: Any, lengths: Any, scale: float, span: int | None = None) -> Any:
    """The same result with a dense, masked attention over the first `span` positions (default: all)."""
    import torch

    span = keys.shape[2] if span is None else span
    visible = torch.arange(span, device=q.device)[None, :] < lengths[:, None]
    return torch.nn.functional.scaled_dot_product_attention(
        q, keys[:, :, :span], values[:, :, :span], attn_mask=visible[:, None, None, :], scale=scale
    )


def triton_usable(q: Any) -> bool:
    """True where the kernel runs: a CUDA tensor (or Triton's CPU interpreter), fp16/bf16/fp32, Triton importable."""
    import torch

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not (q.is_cuda or interpreted) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    import importlib.util

    return importlib.util.find_spec("triton") is not None


_KERNEL = None


def _kernel() -> Any:
    """The Triton kernel, defined on first use (importing Triton is slow and it is optional)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def slot_attention_kernel(
        Q, K, V, O, LENGTHS, scale,
        q_s, q_h, q_g, k_s, k_h, k_n, v_s, v_h, v_n, o_s, o_h, o_g,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        slot = tl.program_id(0)
        head = tl.program_id(1)
        n_valid = tl.load(LENGTHS + slot)
        rows = tl.arange(0, BLOCK_G)
        dims = tl.arange(0, HEAD_DIM)
        cols = tl.arange(0, BLOCK)
        row_ok = rows[:, None] < GROUP
        q = tl.load(Q + slot * q_s + head * q_h + rows[:, None] * q_g + dims[None, :], mask=row_ok, other=0.0)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        k_base = K + slot * k_s + head * k_h
        v_base = V + slot * v_s + head * v_h
        for start in range(0, n_valid, BLOCK):
            pos = start + cols
            ok = pos < n_valid
            k = tl.load(k_base + pos[:, None] * k_n + dims[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(v_base + pos[:, None] * v_n + dims[None, :], mask=ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m = m_new
        out = acc / total[:, None]
        tl.store(O + slot * o_s + head * o_h + rows[:, None] * o_g + dims[None, :], out.to(O.dtype.element_ty), mask=row_ok)

    _KERNEL = slot_attention_kernel
    return _KERNEL


def _triton_attention(q: Any, keys: Any, values: Any, lengths: Any, scale: float) -> Any:
    import torch

    slots, kv_heads, group, head_dim = q.shape
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"the attention kernel needs a power-of-two head_dim of at least 16, not {head_dim}")
    q = q.contiguous()
    out = torch.empty_like(q)
    block_g = max(16, 1 << (group - 1).bit_length())  # tl.dot needs at least 16 rows
    _kernel()[(slots, kv_heads)](
        q, keys, values, out, lengths, scale,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), out.stride(0), out.stride(1), out.stride(2),
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK=BLOCK_N,
    )  # fmt: skip
    return out
