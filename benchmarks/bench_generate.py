"""Summarize throughput: embedkit's generate against transformers' `generate`, in one run.

A model of SmolLM2-135M's shape (random weights unless --model is given: throughput does not
depend on the values) summarizes --docs pydocs paragraphs with --max-new-tokens new tokens.

- transformers: `model.generate(do_sample=False)` at each --batch-sizes, with the default
  dynamic cache and with `cache_implementation="static"` (which compiles the decode step; timed
  after a warm-up run on the same batch shapes).
- embedkit: `embedkit.generate(task="summarize")` end to end (read parquet, prompt, decode,
  write Lance) at each batch size.

Prints generated tokens/s for each and the ratio of embedkit to the best transformers row.

    python benchmarks/bench_generate.py --corpus pydocs.parquet --docs 20000 --batch-sizes 32,256,1024
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="32,256,1024")
    ap.add_argument("--model", default=None, help="a transformers folder (default: SmolLM2-135M shape, random weights)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-static", action="store_true", help="skip the static-cache baseline")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="embedkit-bench-gen-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = Path(args.model) if args.model else random_model(work)
    corpus = work / f"docs{args.docs}.parquet"
    texts = pq.read_table(args.corpus, columns=["text"]).column("text").combine_chunks().slice(0, args.docs)
    pq.write_table(pa.table({"id": pa.array([f"d{i}" for i in range(len(texts))]), "text": texts}), corpus)
    print(f"model {folder} ({'random weights' if not args.model else 'as given'}); {len(texts)} docs", flush=True)
    rows = []
    for bs in (int(x) for x in args.batch_sizes.split(",")):
        rows.append(bench_transformers(folder, texts.to_pylist(), bs, args, static=False))
        if not args.no_static:
            rows.append(bench_transformers(folder, texts.to_pylist(), bs, args, static=True))
        rows.append(bench_embedkit(folder, corpus, bs, args, work))
        print(json.dumps(rows[-1]), flush=True)
    best = max(r["new_tok_s"] for r in rows if r["engine"] != "embedkit")
    print("\n| engine | cache | batch | new tokens | seconds | new tok/s | x best transformers |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['cache']} | {r['batch']} | {r['new_tokens']:,} | {r['seconds']:.1f} | {r['new_tok_s']:,.0f} | {r['new_tok_s'] / best:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def random_model(work: Path) -> Path:
    """SmolLM2-135M's shape with random weights, and the default model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from embedkit.generation import resolve_generator

    folder = work / "smollm2-135m-random"
    if (folder / "config.json").exists():
        return folder
    tok_src = resolve_generator("SmolLM2-135M-Instruct")
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tok_src).save_pretrained(folder)
    return folder


def prompts(tok, texts: list[str]) -> list[list[int]]:
    from embedkit.generation import prompt_ids

    return [prompt_ids(tok, f"Summarize in one sentence:\n{t}", chat=True) for t in texts]


def bench_transformers(folder: Path, texts: list[str], batch: int, args, static: bool) -> dict:
    """transformers' generate over the same prompts, grouped by length, greedy, bf16."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from embedkit.generation import left_pad

    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(args.device).eval()
    ids = prompts(tok, texts)
    order = np.argsort([len(p) for p in ids], kind="stable")
    batches = [order[s : s + batch] for s in range(0, len(order), batch)]
    extra = {"cache_implementation": "static"} if static else {}

    def run(selected) -> int:
        new = 0
        for rows in selected:
            x, m = left_pad([ids[r] for r in rows], tok.pad_token_id)
            width = x.shape[1]
            with torch.inference_mode():
                out = model.generate(input_ids=x.to(args.device), attention_mask=m.to(args.device), do_sample=False,
                                     max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id, **extra)  # fmt: skip
            new += int((out[:, width:] != tok.pad_token_id).sum())
        return new

    if static:
        run(batches)  # warm-up: compiles the decode step for these shapes
    sync(args.device)
    t = time.perf_counter()
    new = run(batches)
    sync(args.device)
    seconds = time.perf_counter() - t
    return {"engine": "transformers", "cache": "static" if static else "dynamic", "batch": batch, "new_tokens": new,
            "seconds": seconds, "new_tok_s": new / seconds}  # fmt: skip


def bench_embedkit(folder: Path, corpus: Path, batch: int, args, work: Path) -> dict:
    import embedkit

    out = work / f"gen-{batch}"
    shutil.rmtree(out, ignore_errors=True)
    s = embedkit.generate(corpus, out, task="summarize", model=str(folder), device=args.device, max_new_tokens=args.max_new_tokens,
                          batch_size=batch, progress=False)  # fmt: skip
    return {"engine": "embedkit", "cache": "-", "batch": batch, "new_tokens": s.new_tokens, "seconds": s.seconds,
            "new_tok_s": s.new_tokens / s.seconds}  # fmt: skip


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
