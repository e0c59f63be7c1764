"""The decoder's fused Triton kernels (RMSNorm with the residual add, rotary, SiLU-and-multiply)
against the PyTorch code they replace, in Triton's CPU interpreter (TRITON_INTERPRET=1, set in a
child process because Triton reads it at import), in float32 and float16: the interpreter's
bfloat16 rounding is not the GPU's. On the GPU, benchmarks/bench_generate.py checks bfloat16 and
the decoder with them against the decoder without them.
"""

from __future__ import annotations

import pytest
from conftest import run_interpreted

pytest.importorskip("triton")

CHILD = r"""
import json, torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb
from embedkit.engine import fused
torch.manual_seed(0)
worst = {}
for dtype in (torch.float32, torch.float16):  # the interpreter's bfloat16 rounding is not the GPU's
    name = str(dtype).split(".")[1]
    # RMSNorm, alone and after a residual add, against the model's own module
    norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(96).to(dtype)
    x, d = torch.randn(7, 96).to(dtype), torch.randn(7, 96).to(dtype)
    got = fused.rms_norm(x, norm.weight, norm.variance_epsilon, kernel=True)
    total, after = fused.add_rms_norm(x, d, norm.weight, norm.variance_epsilon, kernel=True)
    worst[f"norm {name}"] = float((got.float() - norm(x).float()).abs().max())
    worst[f"add {name}"] = float((total.float() - (x + d).float()).abs().max())
    worst[f"add_norm {name}"] = float((after.float() - norm(x + d).float()).abs().max())
    # rotary over a strided view (q and k heads of a wider projection), against transformers'
    qkv = torch.randn(5, (3 + 1 + 1) * 16).to(dtype)
    qk = qkv[:, : 4 * 16].view(5, 4, 16)
    angles = torch.randn(5, 8)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    want_q, want_k = apply_rotary_pos_emb(qk[:, :3].transpose(0, 1)[None], qk[:, 3:].transpose(0, 1)[None], cos[None], sin[None])
    want = torch.cat([want_q[0], want_k[0]], 0).transpose(0, 1)
    worst[f"rope {name}"] = float((fused.rope(qk, cos, sin, kernel=True).float() - want.float()).abs().max())
    # SiLU-and-multiply, inner size not a power of two
    gu = torch.randn(3, 2, 2 * 40).to(dtype)
    gate, up = gu.chunk(2, -1)
    worst[f"silu_mul {name}"] = float((fused.silu_mul(gu, kernel=True).float() - (torch.nn.functional.silu(gate) * up).float()).abs().max())
print(json.dumps(worst))
"""


def test_fused_kernels_equal_the_modules_they_replace():
    worst = run_interpreted(CHILD)
    assert len(worst) == 10
    for key, err in worst.items():
        # float16: rounded where PyTorch rounds, so equal; float32: summation order only
        assert err <= (1e-5 if key.endswith("float32") else 0.0), (key, worst)


DECODE_CHILD = r"""
import json, torch
from transformers import LlamaConfig, LlamaForCausalLM
from embedkit.engine.decode import SlotDecoder
# the default model's layer (Llama, grouped keys, SiLU, RMSNorm), small: the interpreter runs
# every kernel launch in Python, and the kernels do not care about the layer count
torch.manual_seed(0)
lm = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).eval()
prompts = [[1, 90, 198, 268, 314, 260, 257], list(range(300, 320))]  # one packed prefill, then decode steps
with_kernels = SlotDecoder(lm, eos_ids={2})
plain = SlotDecoder(lm, eos_ids={2})
plain.fuse_kernels = False
for decoder in (with_kernels, plain):  # the fused kernels alone (tests/test_attention.py covers attention's)
    decoder.kernel = False
print(json.dumps([with_kernels.fuse_kernels, with_kernels.run(prompts, max_new=4, max_slots=2), plain.run(prompts, max_new=4, max_slots=2)]))
"""


@pytest.mark.slow
def test_decoder_with_fused_kernels_gives_the_same_tokens():
    used, fused_tokens, plain_tokens = run_interpreted(DECODE_CHILD)
    assert used and fused_tokens == plain_tokens and all(len(t) == 4 for t in fused_tokens)
