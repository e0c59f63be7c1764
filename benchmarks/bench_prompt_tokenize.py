"""Tokenizing summarize prompts: the Rust batch call with character offsets against the one
without (`encode_batch_fast`, what `generation.prompts.encode_batch` uses where it exists).

The prompts are the default summarize prompt over the first --docs documents of --corpus in the
tokenizer's chat template, as `generate` builds them; both calls run alternately --repeats times
in this process, and the ids must be equal.

    python benchmarks/bench_prompt_tokenize.py --corpus pydocs.parquet --tokenizer <SmolLM2 tokenizer folder> --docs 20000
"""

from __future__ import annotations

import argparse
import json
import time

import pyarrow.parquet as pq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the default generator's)")
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from embedkit.generation.pipeline import DEFAULT_PROMPTS
    from embedkit.generation.prompts import _chat_wrapper

    folder = args.tokenizer
    if folder is None:
        from embedkit.config import DEFAULT_GENERATOR
        from embedkit.generation.model import resolve_generator

        folder = resolve_generator(DEFAULT_GENERATOR)
    tok = AutoTokenizer.from_pretrained(folder)
    texts = pq.read_table(args.corpus, columns=["text"]).column("text").slice(0, args.docs).to_pylist()
    before, after = _chat_wrapper(tok)
    prompts = [before + DEFAULT_PROMPTS["summarize"].format(text=t, id=i) + after for i, t in enumerate(texts)]
    backend = tok.backend_tokenizer
    seconds: dict[str, list[float]] = {"encode_batch": [], "encode_batch_fast": []}
    ids = {}
    for _ in range(args.repeats):
        for name in seconds:
            t = time.perf_counter()
            ids[name] = [e.ids for e in getattr(backend, name)(prompts, add_special_tokens=False)]
            seconds[name].append(round(time.perf_counter() - t, 3))
    report = {"docs": len(prompts), "tokens": sum(map(len, ids["encode_batch"])), "seconds": seconds,
              "ids_equal": ids["encode_batch"] == ids["encode_batch_fast"]}  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    main()
