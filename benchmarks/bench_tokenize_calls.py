"""The generator's prompt tokenizing in calls of N texts: time and the process's memory growth.

A tokenizer batch call's encodings (token strings, offsets, masks beside the ids) all live until
its ids are taken; `embedkit.generation.prompts.encode_batch` calls it ENCODE_CHUNK texts at a
time. Run one process per size (the growth is the process's peak resident memory):

    for n in 60000 4096 8192 16384 32768; do
        python benchmarks/bench_tokenize_calls.py --tokenizer <SmolLM2 folder> --corpus pydocs.parquet --chunk $n
    done
"""

from __future__ import annotations

import argparse
import resource
import time

import pyarrow.parquet as pq
from transformers import AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="a folder or name AutoTokenizer loads")
    ap.add_argument("--corpus", required=True, help="a parquet file with a text column")
    ap.add_argument("--docs", type=int, default=60_000)
    ap.add_argument("--chunk", type=int, required=True, help="texts a call")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    texts = pq.read_table(args.corpus, columns=["text"]).column("text").to_pylist()[: args.docs]
    prompts = [tok.apply_chat_template([{"role": "user", "content": "Summarize the following document.\n\n" + t}],
                                       add_generation_prompt=True, tokenize=False) for t in texts]  # fmt: skip
    backend = tok.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best, growth = float("inf"), 0.0
    for rep in range(args.repeats):
        t = time.perf_counter()
        ids: list[list[int]] = []
        for i in range(0, len(prompts), args.chunk):
            ids += [e.ids for e in encode(prompts[i : i + args.chunk], add_special_tokens=False)]
        best = min(best, time.perf_counter() - t)
        if rep == 0:  # later passes reuse the memory the first one took
            growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        del ids
    print(f"chunk {args.chunk}: best {best:.3f} s of {args.repeats}, peak growth on the first pass {growth:.0f} MB")


if __name__ == "__main__":
    main()
