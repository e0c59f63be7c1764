"""The per-slot decode attention kernel against dense masked attention.

The kernel is Triton; here it runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set in a
child process because Triton reads it at import). The interpreter's bf16 dot products are
wrong (a known limitation of its numpy emulation), so bf16 is checked on GPUs by
benchmarks/bench_generate.py; fp32 and fp16 are checked here.
"""

from __future__ import annotations

import pytest
from conftest import run_interpreted

pytest.importorskip("triton")

CHILD = r"""
import json, sys, torch
from embedkit.engine.attention import slot_attention, reference_attention, BLOCK_N
torch.manual_seed(0)
worst = {}
for dtype in (torch.float32, torch.float16):
    for slots, heads, group, dim, capacity in [(6, 3, 3, 64, 2 * BLOCK_N + 9), (3, 2, 1, 32, BLOCK_N), (2, 1, 4, 16, 5)]:
        q = torch.randn(slots, heads, group, dim)
        k = torch.randn(slots, heads, capacity, dim)
        v = torch.randn(slots, heads, capacity, dim)
        # 1, a block exactly, a block and one, the whole capacity
        lengths = torch.tensor([[1, BLOCK_N, BLOCK_N + 1, capacity][i % 4] for i in range(slots)]).clamp(max=capacity)
        # keys as a strided view of a larger cache, like the decoder's per-layer slices
        big_k = torch.randn(slots, heads, capacity + 7, dim); big_k[:, :, :capacity] = k
        big_v = torch.randn(slots, heads, capacity + 7, dim); big_v[:, :, :capacity] = v
        got = slot_attention(q.to(dtype), big_k.to(dtype)[:, :, :capacity], big_v.to(dtype)[:, :, :capacity], lengths, dim ** -0.5, kernel=True)
        want = reference_attention(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), lengths, dim ** -0.5)
        key = f"{dtype}"
        worst[key] = max(worst.get(key, 0.0), float((got.float() - want).abs().max()))
        # a shared prefix (one block and three positions), stored once, against the same positions in every slot's cache
        n = BLOCK_N + 3
        pk, pv = torch.randn(n, heads, dim), torch.randn(n, heads, dim)
        got = slot_attention(q.to(dtype), big_k.to(dtype)[:, :, :capacity], big_v.to(dtype)[:, :, :capacity], lengths, dim ** -0.5,
                             prefix=(pk.to(dtype), pv.to(dtype)), kernel=True)
        whole_k = torch.cat([pk.transpose(0, 1)[None].expand(slots, -1, -1, -1), k], 2).to(dtype).float()
        whole_v = torch.cat([pv.transpose(0, 1)[None].expand(slots, -1, -1, -1), v], 2).to(dtype).float()
        want = reference_attention(q.to(dtype).float(), whole_k, whole_v, lengths + n, dim ** -0.5)
        worst[key + " prefix"] = max(worst.get(key + " prefix", 0.0), float((got.float() - want).abs().max()))
        # the step's own key and value handed in (append): written at lengths - 1, then attended;
        # with no prefix a row of length 1 attends to its new key alone (no cached block)
        kn, vn = torch.randn(slots, heads, dim), torch.randn(slots, heads, dim)
        last = lengths - 1
        for pre in (None, (pk, pv)):
            ck, cv = big_k.to(dtype).clone(), big_v.to(dtype).clone()
            got = slot_attention(q.to(dtype), ck[:, :, :capacity], cv[:, :, :capacity], lengths, dim ** -0.5, kernel=True,
                                 prefix=None if pre is None else (pk.to(dtype), pv.to(dtype)), append=(kn.to(dtype), vn.to(dtype)))
            rows = torch.arange(slots)
            stored = bool((ck[rows, :, last] == kn.to(dtype)).all() and (cv[rows, :, last] == vn.to(dtype)).all())
            wk, wv = k.clone(), v.clone()
            wk[rows, :, last], wv[rows, :, last] = kn, vn
            n_pre = 0 if pre is None else n
            if pre is not None:
                wk = torch.cat([pk.transpose(0, 1)[None].expand(slots, -1, -1, -1), wk], 2)
                wv = torch.cat([pv.transpose(0, 1)[None].expand(slots, -1, -1, -1), wv], 2)
            want = reference_attention(q.to(dtype).float(), wk.to(dtype).float(), wv.to(dtype).float(), lengths + n_pre, dim ** -0.5)
            name = key + " append" + (" prefix" if pre is not None else "")
            worst[name] = max(worst.get(name, 0.0), float((got.float() - want).abs().max()) if stored else float("inf"))
print(json.dumps(worst))
"""


def test_kernel_equals_dense_masked_attention():
    worst = run_interpreted(CHILD)
    assert worst["torch.float32"] < 1e-5 and worst["torch.float32 prefix"] < 1e-5, worst
    assert worst["torch.float16"] < 2e-3 and worst["torch.float16 prefix"] < 2e-3, worst
    # the step's key and value handed to the kernel: stored in the cache (else inf) and attended
    assert worst["torch.float32 append"] < 1e-5 and worst["torch.float32 append prefix"] < 1e-5, worst
    assert worst["torch.float16 append"] < 2e-3 and worst["torch.float16 append prefix"] < 2e-3, worst


def test_reference_with_a_prefix_equals_the_prefix_in_every_slot():
    """The reference path (CPU decoding) with the prefix stored once, against the prefix's
    positions copied in front of each slot's own."""
    import torch

    from embedkit.engine.attention import reference_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(4, 2, 3, 16), torch.randn(4, 2, 9, 16), torch.randn(4, 2, 9, 16)
    pk, pv = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    lengths = torch.tensor([1, 4, 9, 6])
    got = reference_attention(q, k, v, lengths, 0.25, span=9, prefix=(pk, pv))
    whole_k = torch.cat([pk.transpose(0, 1)[None].expand(4, -1, -1, -1), k], 2)
    whole_v = torch.cat([pv.transpose(0, 1)[None].expand(4, -1, -1, -1), v], 2)
    want = reference_attention(q, whole_k, whole_v, lengths + 5, 0.25)
    assert torch.allclose(got, want, atol=1e-6)


PREFILL_CHILD = r"""
import json, torch
from embedkit.engine.attention import prefill_attention, PREFILL_BLOCK_M, PREFILL_BLOCK_N
torch.manual_seed(0)
worst = {}
heads, kv_heads, dim = 6, 2, 32
# a prompt of 1 token, one of a key block exactly, one past a query block, a short one
lengths = [1, PREFILL_BLOCK_N, PREFILL_BLOCK_M + 5, 3]
cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
tokens = int(cu[-1])
for dtype in (torch.float32, torch.float16):
    # q as a strided view of a q/k/v product, like the decoder's
    qkv = torch.randn(tokens, heads + 2 * kv_heads, dim)
    q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    for n_prefix in (0, PREFILL_BLOCK_N + 3):
        pk, pv = torch.randn(n_prefix, kv_heads, dim), torch.randn(n_prefix, kv_heads, dim)
        capacity = max(lengths) + 4
        ck = torch.full((6, kv_heads, capacity, dim), 7.0, dtype=dtype)
        cv = torch.full((6, kv_heads, capacity, dim), 7.0, dtype=dtype)
        slots = torch.tensor([4, 0, 2, 5])
        got = prefill_attention(q.to(dtype), k.to(dtype), v.to(dtype), cu, max(lengths), dim ** -0.5,
                                prefix=(pk.to(dtype), pv.to(dtype)) if n_prefix else None, cache=(ck, cv, slots))
        err, stored = 0.0, True
        for b, n in enumerate(lengths):
            rows = slice(int(cu[b]), int(cu[b + 1]))
            kk = torch.cat([pk, k[rows]]).to(dtype).float().transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
            vv = torch.cat([pv, v[rows]]).to(dtype).float().transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
            mask = torch.ones(n, n_prefix + n, dtype=torch.bool)
            mask[:, n_prefix:] = torch.ones(n, n, dtype=torch.bool).tril()
            want = torch.nn.functional.scaled_dot_product_attention(q[rows].to(dtype).float().transpose(0, 1), kk, vv, attn_mask=mask,
                                                                    scale=dim ** -0.5).transpose(0, 1)
            err = max(err, float((got[rows].float() - want).abs().max()))
            s = int(slots[b])
            stored &= bool((ck[s, :, :n] == k[rows].to(dtype).transpose(0, 1)).all() and (cv[s, :, :n] == v[rows].to(dtype).transpose(0, 1)).all())
            stored &= bool((ck[s, :, n:] == 7).all())  # nothing past the prompt
        stored &= bool((ck[[1, 3]] == 7).all())  # slots no prompt was given are untouched
        worst[f"{dtype} prefix {n_prefix}"] = err if stored else float("inf")
print(json.dumps(worst))
"""


def test_prefill_kernel_equals_causal_attention_and_fills_the_slots():
    """The prefill kernel (packed prompts, a shared prefix stored once) against per-prompt
    masked attention; each prompt's keys and values land in its slot and nowhere else."""
    worst = run_interpreted(PREFILL_CHILD)
    assert len(worst) == 4, worst
    for name, err in worst.items():
        assert err < (1e-5 if "float32" in name else 2e-3), worst


DECODE_CHILD = r"""
import json, torch
from transformers import LlamaConfig, LlamaForCausalLM
from embedkit.engine.decode import SlotDecoder
# the default model's layer (Llama, grouped keys), small: the interpreter runs every kernel
# launch in Python, and the kernel does not care about the layer count or the width
torch.manual_seed(0)
lm = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).eval()
start = [1, 90, 198, 268, 314, 260, 257, 40, 41, 42]  # a shared start, stored once as the prefix
prompts = [start + [93, 28, 95], start + [7], start + list(range(300, 380))]  # the last over a key block
with_kernel = SlotDecoder(lm, eos_ids={2})
assert with_kernel.kernel and with_kernel.prefill_kernel
dense = SlotDecoder(lm, eos_ids={2})  # the references: dense masked decode attention, the padded prefill
dense.kernel = dense.prefill_kernel = False
whole = SlotDecoder(lm, eos_ids={2})  # every slot holding its whole prompt
whole.kernel, whole.prefill_kernel, whole.share_prefix = False, False, False
for decoder in (with_kernel, dense, whole):  # the attention kernel alone (tests/test_fused.py covers the others)
    decoder.fuse_kernels = False
got = [d.run(prompts, max_new=4, max_slots=2) for d in (with_kernel, dense, whole)]
assert with_kernel.stats["prefix_tokens"] == len(start) and whole.stats["prefix_tokens"] == 0
print(json.dumps(got))
"""


@pytest.mark.slow
def test_decoder_with_the_kernel_gives_the_dense_tokens():
    kernel, dense, whole = run_interpreted(DECODE_CHILD)
    assert kernel == dense == whole and all(len(t) for t in kernel)


ODD_HEAD_CHILD = r"""
import json, torch
from transformers import LlamaConfig, LlamaForCausalLM
from embedkit.engine.decode import SlotDecoder
torch.manual_seed(0)
# heads of 24: no power of two, so neither kernel takes them (they raised before)
lm = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)).eval()
prompts = [[1, 5, 9, 12], [1, 5, 7]]
odd = SlotDecoder(lm, eos_ids={2})
assert odd.head_dim == 24 and not odd.kernel and not odd.prefill_kernel
got = odd.run(prompts, max_new=3, max_slots=2)
with torch.inference_mode():
    want = []
    for p in prompts:
        out = lm.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                          max_new_tokens=3, eos_token_id=2, pad_token_id=0)
        new = out[0, len(p):].tolist()
        want.append(new[: new.index(2)] if 2 in new else new)
print(json.dumps([got, want]))
"""


def test_a_head_size_the_kernels_cannot_take_decodes_on_the_dense_paths():
    """Where Triton runs (its interpreter here), a model whose head size is no power of two
    decodes through the reference paths, the tokens transformers' greedy decoding gives."""
    got, want = run_interpreted(ODD_HEAD_CHILD)
    assert got == want and all(len(t) for t in got)
