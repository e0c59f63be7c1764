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

The prefill (`prefill_attention`) has a kernel of its own: prompts packed end to end, each
token attending to the shared prefix and to its own prompt up to itself, and each prompt's keys
and values written into its slot in the same launch.

Prompts built from one template start with the same tokens (SmolLM2's chat template and the
default summarize prompt: 32 of a mean 116). Those positions can be stored once, as a *prefix*
every slot attends to before its own positions: the kernel reads them first, from one place
that all slots share (so from L2, not from each slot's cache), and the slots' caches hold only
what differs.
"""

from __future__ import annotations

import os
from typing import Any

BLOCK_N = 16  # cached positions per inner step of the kernel
NUM_WARPS = 1  # the kernel's launch configuration for short rows (benchmarks/bench_decode_attention.py, sweeps 5 to 7)
NUM_STAGES = 3
# Long rows leave each program many blocks, where two warps and a deeper pipeline pay: 268-297 us
# against 276-318 us for 32/1/2 and 286-306 us for 16/1/3 a layer, for the 20k shard's 3,068 rows
# of capacity 1,216 (sweeps 5 to 7). Chosen by the group's capacity, known without a sync.
LONG_CAPACITY = 1024  # slots of at least this many positions run LONG_LAUNCH (None: never)
LONG_LAUNCH = (32, 2, 3)  # positions a block, warps, stages
PREFILL_BLOCK_M = 64  # the prefill kernel's query rows per program
PREFILL_BLOCK_N = 32  # and keys per inner step
PREFILL_WARPS = 4
PREFILL_STAGES = 3


def slot_attention(q: Any, keys: Any, values: Any, lengths: Any, scale: float, *, prefix: tuple[Any, Any] | None = None,
                   kernel: bool | None = None, append: tuple[Any, Any] | None = None, span: int | None = None) -> Any:  # fmt: skip
    """Attention of one query token per slot over a shared prefix and that slot's first
    `lengths[s]` cached positions.

    q: (slots, kv_heads, group, head_dim), the query heads grouped by the key head they share.
    keys, values: (slots, kv_heads, capacity, head_dim), last dimension contiguous.
    lengths: (slots,) int, at least 1. prefix: (keys, values) of positions every slot attends
    to before its own, each (prefix_len, kv_heads, head_dim), stored once for all slots (the
    prompt template's shared start). append: the step's own (key, value), each (slots, kv_heads,
    head_dim), first written into the cache at position lengths[s] - 1 (the kernel does it in
    the same launch). span: where the dense reference runs, it attends to the first `span`
    positions of every slot, masked (default: all); the kernel reads each row's own. Returns
    (slots, kv_heads, group, head_dim) in q's dtype.
    """
    use = triton_usable(q) if kernel is None else kernel
    if use:
        return _triton_attention(q, keys, values, lengths, scale, prefix, append)
    if append is not None:  # the reference path: a scatter, then the dense attention
        import torch

        slot = torch.arange(q.shape[0], device=q.device)
        keys[slot, :, lengths - 1] = append[0]
        values[slot, :, lengths - 1] = append[1]
    return reference_attention(q, keys, values, lengths, scale, span=span, prefix=prefix)


def reference_attention(q: Any, keys: Any, values: Any, lengths: Any, scale: float, span: int | None = None,
                        prefix: tuple[Any, Any] | None = None) -> Any:  # fmt: skip
    """The same result with a dense, masked attention over the prefix and the first `span`
    positions of each slot (default: all)."""
    import torch

    span = keys.shape[2] if span is None else span
    keys, values = keys[:, :, :span], values[:, :, :span]
    visible = torch.arange(span, device=q.device)[None, :] < lengths[:, None]
    if prefix is not None and prefix[0].shape[0]:  # the shared positions, in front of every slot's own
        n = q.shape[0]
        keys = torch.cat([prefix[0].transpose(0, 1)[None].expand(n, -1, -1, -1), keys], 2)
        values = torch.cat([prefix[1].transpose(0, 1)[None].expand(n, -1, -1, -1), values], 2)
        visible = torch.cat([torch.ones(n, prefix[0].shape[0], dtype=torch.bool, device=q.device), visible], 1)
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None, None, :], scale=scale)


def kernel_head_dim(head_dim: int) -> bool:
    """Whether the kernels take this head size: a power of two of at least 16 (tl.dot's tiles)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _check_head_dim(head_dim: int) -> None:
    if not kernel_head_dim(head_dim):
        raise ValueError(f"the attention kernels need a power-of-two head_dim of at least 16, not {head_dim}")


def triton_usable(q: Any) -> bool:
    """True where the kernel runs: a CUDA tensor (or Triton's CPU interpreter), fp16/bf16/fp32, Triton importable."""
    import torch

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not (q.is_cuda or interpreted) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _kernel() -> Any:
    """The Triton kernel (its module imports Triton, which is slow and optional: on first use)."""
    from .attention_kernel import slot_attention_kernel

    return slot_attention_kernel


def _triton_attention(q: Any, keys: Any, values: Any, lengths: Any, scale: float, prefix: tuple[Any, Any] | None,
                      append: tuple[Any, Any] | None) -> Any:  # fmt: skip
    import torch

    slots, kv_heads, group, head_dim = q.shape
    _check_head_dim(head_dim)
    if q.stride(-1) != 1:  # the kernel takes any other strides: the decoder's q is a view of its q/k/v product
        q = q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    block_g = max(16, 1 << (group - 1).bit_length())  # tl.dot needs at least 16 rows
    block, warps, stages = LONG_LAUNCH if LONG_CAPACITY and keys.shape[2] >= LONG_CAPACITY else (BLOCK_N, NUM_WARPS, NUM_STAGES)
    pk, pv = prefix if prefix is not None else (keys[0, 0, :0].unsqueeze(1), values[0, 0, :0].unsqueeze(1))  # (0, 1, head_dim): no prefix
    kn, vn = append if append is not None else (keys[:, :, 0], values[:, :, 0])  # not read without APPEND
    if kn.stride(-1) != 1 or vn.stride(-1) != 1:
        kn, vn = kn.contiguous(), vn.contiguous()
    _kernel()[(slots, kv_heads)](
        q, keys, values, out, lengths, pk, pv, kn, vn, pk.shape[0], scale,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), out.stride(0), out.stride(1), out.stride(2),
        pk.stride(0), pk.stride(1), pv.stride(0), pv.stride(1), kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1),
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK=block, APPEND=append is not None,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def prefill_attention(q: Any, k: Any, v: Any, cu: Any, longest: int, scale: float, *, prefix: tuple[Any, Any] | None = None,
                      cache: tuple[Any, Any, Any] | None = None) -> Any:  # fmt: skip
    """Causal attention of prompts packed end to end (the Triton kernel: CUDA or Triton's interpreter).

    q: (tokens, heads, head_dim); k, v: (tokens, kv_heads, head_dim), last dimensions contiguous
    (other strides are taken as they are). cu: (prompts + 1,) int32 offsets of the prompts in the
    packing; longest: the longest prompt's tokens. Token i of a prompt attends to the shared
    `prefix` (keys, values: (n, kv_heads, head_dim) each, stored once) and to its prompt's tokens
    0..i. cache: (keys, values, slots): each prompt's keys and values are also written to
    positions 0..len-1 of slot slots[p] of the caches (slots, kv_heads, capacity, head_dim), in
    the same launch (the decoder needs them there; the two scatters a layer it replaces took a third
    of flash attention's time). Returns (tokens, heads, head_dim) in q's dtype.

    One launch replaces what the decoder did before with flash attention's variable-length
    kernel: two scatters into the cache, and the prefix copied in front of every prompt (a
    concatenation and a gather of keys and values) for each layer.
    """
    import torch
    import triton  # imported already by the kernel's module

    from .attention_kernel import prefill_attention_kernel

    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    _check_head_dim(head_dim)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    pk, pv = prefix if prefix is not None else (k[:0], v[:0])
    ck, cv, slots = cache if cache is not None else (k[None], v[None], cu)  # not written without a cache
    prompts = cu.shape[0] - 1
    grid = (prompts * heads, triton.cdiv(longest, PREFILL_BLOCK_M))
    prefill_attention_kernel[grid](
        q, k, v, out, cu, pk, pv, ck, cv, slots, pk.shape[0], scale, heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        pk.stride(0), pk.stride(1), pv.stride(0), pv.stride(1),
        ck.stride(0), ck.stride(1), ck.stride(2), cv.stride(0), cv.stride(1), cv.stride(2),
        GROUP=heads // kv_heads, HEAD_DIM=head_dim, BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N, WRITE=cache is not None,
        num_warps=PREFILL_WARPS, num_stages=PREFILL_STAGES,
    )  # fmt: skip
    return out
