"""The prefill's attention alone, on the prompt lengths of a real shard (NVIDIA GPU).

The prompts are the default summarize prompts of --docs pydocs documents (SmolLM2's tokenizer
and chat template), their shared start taken off as the decoder stores it once, sorted by length
and packed end to end into forwards of the decoder's token budget (PREFILL_TOKENS), as the
decoder prefills them. One layer of SmolLM2-135M's shape (3 key heads of 64, 9 query heads),
bf16, random values.

Per forward, summed over all of them (one layer's prefill of the whole shard):
- before: the decoder's path with flash attention's variable-length kernel (its own code: the
  keys/values scattered into the slots, the prefix laid in front of every prompt by a
  concatenation and a gather, then flash);
- `attention.prefill_attention` (the Triton kernel that reads the prefix in place and fills the
  slots itself) at each launch configuration (query rows and keys per block, warps, stages).

Also the largest difference between the two outputs (bf16) and whether the slots hold the same
keys/values.

    python benchmarks/bench_prefill_attention.py --corpus pydocs.parquet --tokenizer <SmolLM2 tokenizer> --docs 20000
"""

from __future__ import annotations

import argparse
import itertools
import json
import types
from pathlib import Path

import pyarrow.parquet as pq
from bench_decode_attention import first_and_median_us
from bench_generate import prompts

KV_HEADS, GROUP, HEAD_DIM = 3, 3, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--blocks-m", default="32,64,128")
    ap.add_argument("--blocks-n", default="32,64")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from embedkit.engine import attention
    from embedkit.engine.decode import PREFILL_TOKENS, shared_prefix

    texts = pq.read_table(args.corpus, columns=["text"]).column("text").slice(0, args.docs).to_pylist()
    ids = prompts(Path(args.tokenizer), texts)
    n_prefix = len(shared_prefix(ids))
    own = sorted(len(p) - n_prefix for p in ids)
    forwards = pack(own, PREFILL_TOKENS["cuda"])
    g = torch.Generator(device="cuda").manual_seed(0)
    cases = [make_case(torch, g, lengths, n_prefix) for lengths in forwards]
    print(f"{len(ids)} prompts, shared start {n_prefix} tokens, {sum(own):,} own tokens in {len(forwards)} forwards", flush=True)

    before_first, before_us = time_all(torch, cases, lambda c: flash_path(torch, c), args.repeats)
    want = [flash_path(torch, c) for c in cases]
    want_cache = [(c["keys"].clone(), c["values"].clone()) for c in cases]
    results = [{"path": "flash + prefix layout + scatters", "us": before_us, "first_call_s": before_first}]
    print(json.dumps(results[-1]), flush=True)
    combos = itertools.product(*(map(int, a.split(",")) for a in (args.blocks_m, args.blocks_n, args.warps, args.stages)))
    for bm, bn, warps, stages in combos:
        attention.PREFILL_BLOCK_M, attention.PREFILL_BLOCK_N, attention.PREFILL_WARPS, attention.PREFILL_STAGES = bm, bn, warps, stages
        for c in cases:  # the kernel must write the slots itself
            c["keys"].zero_()
            c["values"].zero_()
        try:
            first, us = time_all(torch, cases, lambda c: kernel_path(attention, c), args.repeats)
        except Exception as e:  # a configuration Triton cannot build (shared memory, registers)
            print(f"block_m {bm} block_n {bn} warps {warps} stages {stages}: {str(e).splitlines()[0][:160]}", flush=True)
            continue
        err = max(float((kernel_path(attention, c).float() - w.float()).abs().max()) for c, w in zip(cases, want))
        same = all(bool(torch.equal(c["keys"], k) and torch.equal(c["values"], v)) for c, (k, v) in zip(cases, want_cache))
        results.append({"path": "prefill kernel", "block_m": bm, "block_n": bn, "warps": warps, "stages": stages, "us": us,
                        "first_call_s": first, "max_abs_diff": err, "slots_equal": same})  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    print(f"\none layer's prefill attention over all {len(forwards)} forwards ({sum(own):,} tokens, +{n_prefix} shared each)")
    print("| path | block m | block n | warps | stages | us (all forwards) | x before | max abs diff | slots equal | first call s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in [results[0]] + sorted(results[1:], key=lambda r: r["us"])[:10]:
        cfg = " | ".join(str(r.get(k, "-")) for k in ("block_m", "block_n", "warps", "stages"))
        print(f"| {r['path']} | {cfg} | {r['us']:,.0f} | {before_us / r['us']:.2f}x | {r.get('max_abs_diff', '-')} | "
              f"{r.get('slots_equal', '-')} | {r['first_call_s']:.2f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"prefix": n_prefix, "forwards": len(forwards), "results": results}, indent=1))


def pack(lengths: list[int], budget: int) -> list[list[int]]:
    """Lengths cut into runs of at most `budget` tokens, in order, as the decoder's prefill packs them."""
    out, run, tokens = [], [], 0
    for n in lengths:
        if run and tokens + n > budget:
            out.append(run)
            run, tokens = [], 0
        run.append(n)
        tokens += n
    return out + ([run] if run else [])


def make_case(torch, g, lengths: list[int], n_prefix: int) -> dict:
    """One forward's inputs as the decoder has them: q, k and v views of one product, the prompts'
    offsets, their slots (one each, in order) in a cache as long as the longest prompt."""
    total, rows = sum(lengths), len(lengths)

    def rand(*shape):
        return torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16)

    qkv = rand(total, KV_HEADS * GROUP + 2 * KV_HEADS, HEAD_DIM)
    lens = torch.tensor(lengths, device="cuda", dtype=torch.int32)
    cu = torch.zeros(rows + 1, dtype=torch.int32, device="cuda")
    torch.cumsum(lens, 0, out=cu[1:])
    row = torch.repeat_interleave(torch.arange(rows, device="cuda"), lens.long(), output_size=total)
    position = torch.arange(total, device="cuda") - cu[:-1].long()[row]
    capacity = max(lengths)
    return {"q": qkv[:, : KV_HEADS * GROUP], "k": qkv[:, KV_HEADS * GROUP : KV_HEADS * (GROUP + 1)], "v": qkv[:, KV_HEADS * (GROUP + 1) :],
            "cu": cu, "lens": lens, "row": row, "position": position, "total": total, "longest": capacity,
            "slots": torch.arange(rows, device="cuda"), "keys": torch.zeros(rows, KV_HEADS, capacity, HEAD_DIM, device="cuda", dtype=torch.bfloat16),
            "values": torch.zeros(rows, KV_HEADS, capacity, HEAD_DIM, device="cuda", dtype=torch.bfloat16),
            "prefix": (rand(n_prefix, KV_HEADS, HEAD_DIM), rand(n_prefix, KV_HEADS, HEAD_DIM)), "n_prefix": n_prefix}  # fmt: skip


def flash_path(torch, c: dict):
    """The decoder's prefill attention before the kernel: its own methods, on a stand-in for the decoder."""
    from embedkit.engine.decode import SlotDecoder

    me = types.SimpleNamespace(torch=torch, prefix_len=c["n_prefix"], varlen=True, scale=HEAD_DIM**-0.5, group=GROUP)
    me._packed_attention = types.MethodType(SlotDecoder._packed_attention, me)
    slot = c["slots"][c["row"]]
    c["keys"][slot, :, c["position"]] = c["k"]
    c["values"][slot, :, c["position"]] = c["v"]
    layout = SlotDecoder._with_prefix_layout(me, c["cu"], c["lens"], c["row"], c["position"], c["total"]) if c["n_prefix"] else None
    return me._packed_attention(c["q"], c["k"], c["v"], c["cu"], c["lens"], c["longest"], (c["prefix"], layout) if layout else None)


def kernel_path(attention, c: dict):
    return attention.prefill_attention(c["q"], c["k"], c["v"], c["cu"], c["longest"], HEAD_DIM**-0.5,
                                       prefix=c["prefix"] if c["n_prefix"] else None, cache=(c["keys"], c["values"], c["slots"]))  # fmt: skip


def time_all(torch, cases: list[dict], call, repeats: int) -> tuple[float, float]:
    """(seconds of the first pass over the forwards, median microseconds of the next `repeats` passes)."""

    def all_forwards():
        for c in cases:
            call(c)

    return first_and_median_us(torch, all_forwards, repeats)


if __name__ == "__main__":
    main()
