"""What one attention call costs the first time a process sees its shape, per SDPA backend.

Length-bucketed packing gives a new (rows, seq_len) shape almost every batch. A backend that
builds something per shape (cuDNN attention builds an execution plan) pays it once per shape in
every fresh process. For each backend, this runs a list of such shapes twice in one fresh
process (--backend, one process per backend: a plan cache would carry over) and reports the first
pass against the second: fresh against warm.

    for b in cudnn efficient flash; do python benchmarks/bench_attention_shapes.py --backend $b; done
"""

from __future__ import annotations

import argparse
import json
import time


def shapes(budget: int, lengths: range) -> list[tuple[int, int]]:
    """(rows, seq_len) of packed batches of one token budget, for documents of these lengths."""
    return [(max(1, budget // s), s) for s in lengths]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=("cudnn", "efficient", "flash", "default"), required=True)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--budget", type=int, default=131_072, help="tokens per batch")
    ap.add_argument("--masked", action="store_true", help="a boolean padding mask (flash takes none)")
    args = ap.parse_args()
    import contextlib

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    context = (lambda: contextlib.nullcontext()) if args.backend == "default" else (lambda: sdpa_kernel([chosen[args.backend]]))
    todo = shapes(args.budget, range(9, 257, 6))  # 42 shapes, as length buckets give
    times: dict[str, list[float]] = {"first": [], "second": []}
    for name in times:
        for rows, seq in todo:
            q = torch.randn(rows, args.heads, seq, args.head_dim, device="cuda", dtype=torch.float16)
            mask = torch.ones(rows, 1, 1, seq, device="cuda", dtype=torch.bool) if args.masked else None
            torch.cuda.synchronize()
            t = time.perf_counter()
            with context():  # default: torch's own choice
                torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    first, second = sum(times["first"]), sum(times["second"])
    print(json.dumps({"backend": args.backend, "masked": args.masked, "shapes": len(todo), "first_pass_s": round(first, 4),
                      "second_pass_s": round(second, 4), "fresh_over_warm": round(first / second, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
