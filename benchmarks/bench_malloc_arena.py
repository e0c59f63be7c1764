"""Prompt tokenization under glibc malloc settings: as is, embedkit's tuning with one arena, and
the tuning with glibc's default arenas. Each setting needs a fresh process (mallopt applies to
the whole process), so run it once per mode:

    for m in plain one-arena arenas; do python benchmarks/bench_malloc_arena.py $m --corpus pydocs.parquet --tokenizer <SmolLM2 tokenizer>; done

It times `fit_prompts` (the default summarize prompt in the chat template, 20k documents, the
fast tokenizer's parallel batch call) twice and `decode_batch` of 64 tokens per row once.
"""

from __future__ import annotations

import argparse
import time

import pyarrow.parquet as pq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["plain", "one-arena", "arenas"])
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--docs", type=int, default=20_000)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from embedkit.config import DEFAULT_PROMPTS
    from embedkit.engine.runtime import retain_freed_memory
    from embedkit.generation.prompts import decode_batch, fit_prompts

    if args.mode != "plain":
        retain_freed_memory(single_arena=args.mode == "one-arena")
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    texts = pq.read_table(args.corpus, columns=["text"]).column("text").to_pylist()[: args.docs]
    rows = [{"text": t, "id": i} for i, t in enumerate(texts)]
    times = []
    for _ in range(2):
        t = time.perf_counter()
        ids = fit_prompts(tok, DEFAULT_PROMPTS["summarize"], rows, 8128, True)
        times.append(round(time.perf_counter() - t, 2))
    t = time.perf_counter()
    decode_batch(tok, [p[:64] for p, _ in ids])
    print(f"malloc {args.mode}: fit_prompts {len(rows)} x2 {times} s; decode_batch {len(rows)} x 64 {time.perf_counter() - t:.2f} s", flush=True)


if __name__ == "__main__":
    main()
