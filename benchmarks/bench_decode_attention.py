"""The decode attention kernel alone, on the slot lengths of a real shard (NVIDIA GPU).

The lengths are those the decoder meets: the default summarize prompts of --docs pydocs
documents (SmolLM2's tokenizer and chat template), their shared start taken off as the decoder
stores it once, cut into the decoder's groups at --slots slots; each row at a decode progress
drawn uniformly from 0 to max_new - 1 (a group's steps see all of them). One layer of
SmolLM2-135M's shape (3 key heads of 64, 9 query heads), bf16, random values.

For each launch configuration (positions per block, warps, pipeline stages), and with the
step's key/value written by the kernel (`append`) or by a separate scatter first (the decoder
before it): microseconds per call (CUDA events, median of --repeats), and the cached bytes the
call reads divided by that time. A second table: `--first-call` seconds of the first launch of
each configuration in this process (compile or on-disk cache load).

    python benchmarks/bench_decode_attention.py --corpus pydocs.parquet --tokenizer <SmolLM2 tokenizer> --docs 20000
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from bench_generate import prompts

KV_HEADS, GROUP, HEAD_DIM, LAYERS = 3, 3, 64, 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--slots", type=int, default=16_384)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--blocks", default="16,32,64")
    ap.add_argument("--warps", default="1,2,4")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--scatter-too", action="store_true", help="also time each configuration with the step's key/value scattered first")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run in Triton's interpreter (TRITON_INTERPRET=1)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from embedkit.engine import attention
    from embedkit.engine.decode import CACHE_MEMORY_FRACTION, plan_groups, shared_prefix

    texts = pq.read_table(args.corpus, columns=["text"]).column("text").slice(0, args.docs).to_pylist()
    ids = prompts(Path(args.tokenizer), texts)
    prefix = shared_prefix(ids)
    own = sorted(len(p) - len(prefix) for p in ids)
    free = torch.cuda.mem_get_info()[0] if args.device == "cuda" else 1 << 30
    budget = int(free * CACHE_MEMORY_FRACTION) // (LAYERS * KV_HEADS * HEAD_DIM * 2 * 2)
    groups = plan_groups(own, args.max_new, args.slots, budget)
    print(f"{len(ids)} prompts, shared start {len(prefix)} tokens; groups (rows, slots, capacity): "
          f"{[(g.stop - g.start, g.slots, g.capacity) for g in groups]}", flush=True)  # fmt: skip
    configured = (attention.BLOCK_N, attention.NUM_WARPS, attention.NUM_STAGES)  # the short rows' launch, before the sweep sets it
    rng = np.random.default_rng(0)
    g = torch.Generator(device=args.device).manual_seed(0)
    results = []
    for gi, grp in enumerate(groups[:2]):  # the third holds a few dozen very long prompts
        rows = np.array(own[grp.start : grp.start + grp.slots])
        lengths = np.minimum(rows + rng.integers(0, args.max_new, len(rows)), grp.capacity)
        case = make_case(torch, g, lengths, grp.capacity, len(prefix), args.device)
        read = int(lengths.sum()) * KV_HEADS * HEAD_DIM * 2 * 2  # keys and values of every attended own position
        combos = itertools.product(*(map(int, a.split(",")) for a in (args.blocks, args.warps, args.stages)))
        for block, warps, stages in combos:
            attention.BLOCK_N, attention.NUM_WARPS, attention.NUM_STAGES = block, warps, stages
            attention.LONG_CAPACITY = None  # this configuration for every group, long rows too
            for append in (True, False) if args.scatter_too else (True,):
                try:
                    first, us = time_calls(torch, attention, case, append, args.repeats)
                    err = max_error(torch, attention, case, len(prefix))
                except Exception as e:  # a configuration Triton cannot build (shared memory, registers)
                    print(f"group {gi} block {block} warps {warps} stages {stages}: {str(e).splitlines()[0][:160]}", flush=True)
                    continue
                r = {"group": gi, "slots": len(lengths), "capacity": grp.capacity, "mean_length": float(lengths.mean()),
                     "block": block, "warps": warps, "stages": stages, "append": append, "us": us,
                     "gb_s": read / us / 1e3, "first_call_s": first, "max_abs_diff": err}  # fmt: skip
                results.append(r)
                print(json.dumps(r), flush=True)
    for gi in sorted({r["group"] for r in results}):
        mine = sorted((r for r in results if r["group"] == gi), key=lambda r: r["us"])
        print(f"\ngroup {gi}: {mine[0]['slots']} slots, mean length {mine[0]['mean_length']:.0f} (+{len(prefix)} shared)")
        print("| block | warps | stages | step's key/value | us per call | GB/s read | first call s | max abs diff |\n|---|---|---|---|---|---|---|---|")
        shown = mine[:12] + [r for r in mine[12:] if (r["block"], r["warps"], r["stages"], r["append"]) == (*configured, True)]  # and the configured one
        for r in shown:
            how = "in the kernel" if r["append"] else "scatter first"
            print(f"| {r['block']} | {r['warps']} | {r['stages']} | {how} | {r['us']:.1f} | {r['gb_s']:,.0f} | {r['first_call_s']:.2f} | {r['max_abs_diff']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"prefix": len(prefix), "results": results}, indent=1))


def make_case(torch, g, lengths: np.ndarray, capacity: int, n_prefix: int, device: str) -> dict:
    """One layer's decode inputs laid out as the decoder has them (q, and the step's key, views of one product)."""
    n = len(lengths)

    def rand(*shape):
        return torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)

    qk = rand(n, KV_HEADS * GROUP + KV_HEADS, HEAD_DIM)
    return {"q": qk[:, : KV_HEADS * GROUP].reshape(n, KV_HEADS, GROUP, HEAD_DIM), "kn": qk[:, KV_HEADS * GROUP :],
            "vn": rand(n, KV_HEADS, HEAD_DIM), "keys": rand(n, KV_HEADS, capacity, HEAD_DIM),
            "values": rand(n, KV_HEADS, capacity, HEAD_DIM), "lengths": torch.tensor(lengths, device=device),
            "prefix": (rand(n_prefix, KV_HEADS, HEAD_DIM), rand(n_prefix, KV_HEADS, HEAD_DIM)) if n_prefix else None}  # fmt: skip


def max_error(torch, attention, c: dict, n_prefix: int) -> float:
    """Largest absolute difference of the kernel's output (the step's key and value appended, as
    timed: the cache already holds them, so the call is idempotent) against the dense reference in fp32."""
    got = attention.slot_attention(c["q"], c["keys"], c["values"], c["lengths"], HEAD_DIM**-0.5, prefix=c["prefix"], kernel=True,
                                   append=(c["kn"], c["vn"]))  # fmt: skip
    if "want" not in c:
        prefix = tuple(t.float() for t in c["prefix"]) if n_prefix else None
        c["want"] = attention.reference_attention(c["q"].float(), c["keys"].float(), c["values"].float(), c["lengths"], HEAD_DIM**-0.5, prefix=prefix)
    return float((got.float() - c["want"]).abs().max())


def time_calls(torch, attention, c: dict, append: bool, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, median microseconds of the next `repeats`)."""
    cuda = c["q"].is_cuda
    slot = torch.arange(len(c["lengths"]), device=c["q"].device)
    last = c["lengths"] - 1

    def call():
        if not append:  # the decoder before: a scatter of the step's key and value, then the kernel
            c["keys"][slot, :, last] = c["kn"]
            c["values"][slot, :, last] = c["vn"]
        return attention.slot_attention(c["q"], c["keys"], c["values"], c["lengths"], HEAD_DIM**-0.5, prefix=c["prefix"],
                                        kernel=True, append=(c["kn"], c["vn"]) if append else None)  # fmt: skip

    return first_and_median_us(torch, call, repeats, cuda)


def first_and_median_us(torch, call, repeats: int, cuda: bool = True) -> tuple[float, float]:
    """(seconds of the first call, median microseconds of the next `repeats`): CUDA events on a
    GPU, wall time in Triton's interpreter (its smoke run)."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    call()
    sync()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        if not cuda:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e6)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        call()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return first, float(np.median(times))


if __name__ == "__main__":
    main()
