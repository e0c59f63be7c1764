"""The model loader A/B: embedkit.engine.bert (native) against sentence-transformers (EMBEDKIT_NATIVE=0).

Two questions, on the same machine in one script:

1. **Fixed cost of a fresh process**: a new interpreter per run that imports embedkit, loads the
   model, builds the encoder on the device and encodes --first-docs documents
   (`embedkit.encode_texts`), the loaders alternating, --repeats times each. Reported: process
   wall (start to exit) and the phases measured inside.
2. **Forward rate**: for each of --variants, the same documents tokenized once, packed by
   embedkit's batcher at the model's default budget, then `Encoder.forward` over every batch (a
   first pass over the same shapes as warm-up, then timed). Tokens are the real ones, padding
   excluded; MFU counts the useful FLOPs of a BERT forward at each document's length. Variants:
   `native` (embedkit.engine.bert as an encode runs it: packed batches on CUDA), `native-padded`
   (EMBEDKIT_PACKED=0: padded batches and SDPA), `native-compile` (packed, each layer through
   torch.compile with dynamic shapes; the warm-up pass, compile included, is reported), `st`
   (sentence-transformers' modules). Each row gives the lowest cosine of its vectors to the
   first variant's on the same documents.

    python benchmarks/bench_loader.py --corpus pydocs.parquet --minilm <all-MiniLM-L6-v2 folder> --work /tmp/bl --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

FRESH = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t_torch = time.perf_counter()
import embedkit
from embedkit.engine.models import load_sentence_transformer, resolve_model
from embedkit.engine.encoder import Encoder, choose_device
t_import = time.perf_counter()
model = load_sentence_transformer(resolve_model(sys.argv[1]), "cpu")
t_load = time.perf_counter()
texts = json.loads(open(sys.argv[2]).read())
v = embedkit.encode_texts(texts, model=sys.argv[1], device=sys.argv[4], precision=sys.argv[3])
if sys.argv[4] == "cuda":
    torch.cuda.synchronize()
t_end = time.perf_counter()
print(json.dumps({"import_torch_s": t_torch - t0, "import_embedkit_s": t_import - t_torch, "load_s": t_load - t_import,
                  "encode_first_s": t_end - t_load, "native": bool(getattr(model, "native", False)), "rows": len(v),
                  "imported": [m for m in ("sentence_transformers", "transformers", "scipy", "sklearn", "sympy") if m in sys.modules]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--minilm", default="all-MiniLM-L6-v2")
    ap.add_argument("--models", default="minilm,bert-base")
    ap.add_argument("--first-docs", type=int, default=1000)
    ap.add_argument("--forward-docs", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per loader (0: none)")
    ap.add_argument("--variants", default="native,st", help="forward-rate variants: native, native-padded, native-compile, st")
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to try the script (fp32)")
    args = ap.parse_args()
    import torch
    from bench_encode import _model_folder, _peak_tflops

    work, out = Path(args.work), Path(args.out or args.work)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    texts = pq.read_table(args.corpus, columns=["text"]).column("text").to_pylist()
    texts = (texts * (args.forward_docs // len(texts) + 1))[: args.forward_docs]
    first = work / "first.json"
    first.write_text(json.dumps(texts[: args.first_docs]))
    peak = _peak_tflops(torch, args.device)
    rows: list[dict] = []
    for name in args.models.split(","):
        folder, precision = _model_folder(name, args.minilm, work)
        precision = precision if args.device == "cuda" else "fp32"
        for _ in range(args.repeats):
            for loader in ("native", "st"):
                rows.append(fresh(name, folder, precision, loader, first, args.device))
        reference = None
        for variant in args.variants.split(","):
            try:
                row, vectors = forward_rate(name, folder, precision, variant, texts, peak, args.device)
            except Exception as exc:  # an experimental variant (compile) may fail: record it, go on
                rows.append({"row": "forward", "model": name, "variant": variant, "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            reference = vectors if reference is None else reference
            row["cos_min_vs_first"] = float(torch.nn.functional.cosine_similarity(vectors, reference, dim=-1).min())
            print(json.dumps(row), flush=True)
            rows.append(row)
        (out / "loader.json").write_text(json.dumps({"peak_tflops": peak, "rows": rows}, indent=2))


def fresh(name: str, folder: str, precision: str, loader: str, first: Path, device: str) -> dict:
    env = {**os.environ, "EMBEDKIT_NATIVE": "0" if loader == "st" else "1"}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", FRESH, folder, str(first), precision, device], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    row = {"row": "fresh process", "model": name, "loader": loader, "wall_s": wall, **json.loads(p.stdout.strip().splitlines()[-1])}
    print(json.dumps(row), flush=True)
    return row


def forward_rate(name: str, folder: str, precision: str, variant: str, texts: list[str], peak: float, device: str) -> tuple[dict, object]:
    """One variant's timed passes; returns its row and the vectors of the first batches (fp32, host)."""
    os.environ["EMBEDKIT_NATIVE"] = "0" if variant == "st" else "1"
    os.environ["EMBEDKIT_PACKED"] = "0" if variant == "native-padded" else "1"
    import torch

    from embedkit.engine.batching import pack_batches, pad_rows
    from embedkit.engine.encoder import Encoder, choose_device, default_batch_tokens, model_config
    from embedkit.engine.models import fast_tokenizer_json, load_sentence_transformer, resolve_model
    from embedkit.engine.tokenize import TokenizerPool

    model = load_sentence_transformer(resolve_model(folder), "cpu")
    choice = choose_device(device, precision)
    budget = default_batch_tokens(model_config(model), choice)
    with TokenizerPool(fast_tokenizer_json(model), int(model.max_seq_length), max(1, (os.cpu_count() or 2) - 1)) as pool:
        tok = pool.submit(texts).get()
    lengths = tok.lengths
    batches = [(pad_rows(tok.flat, tok.offsets, b.rows, b.seq_len), lengths[b.rows].astype(np.int32)) for b in pack_batches(lengths, budget)]
    enc = Encoder(model, choice, normalize=True, out_dtype="float16", max_batch_tokens=budget)
    if variant == "native-compile":
        for layer in model[0].auto_model.layers:
            layer.forward_packed = torch.compile(layer.forward_packed, dynamic=True)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run() -> float:
        sync()
        t = time.perf_counter()
        for ids, lens in batches:
            enc.forward(ids, lens)
        sync()
        return time.perf_counter() - t

    warmup = run()  # warm-up over the same shapes
    seconds = min(run(), run())
    with torch.inference_mode():
        vectors = torch.cat([enc.forward(ids, lens).float().cpu() for ids, lens in batches[:8]])
    tokens = int(lengths.sum())
    row = {"row": "forward", "model": name, "variant": variant, "native": bool(getattr(model, "native", False)), "docs": len(texts),
           "packed": bool(getattr(enc, "_packed", False)), "tokens": tokens, "batches": len(batches), "budget": budget,
           "warmup_s": warmup, "seconds": seconds, "tok_s": tokens / seconds}  # fmt: skip
    cfg = model_config(model)
    d, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    flops = float(np.sum(2 * layers * (4 * d * d + 2 * d * inter) * lengths.astype(np.float64) + 4 * layers * d * lengths.astype(np.float64) ** 2))
    row["mfu"] = flops / seconds / (peak * 1e12)
    enc = model = None  # free the device memory before the next loader
    if device == "cuda":
        torch.cuda.empty_cache()
    return row, vectors


if __name__ == "__main__":
    main()
