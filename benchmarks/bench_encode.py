"""Encode throughput: embedkit end to end against SentenceTransformer.encode, in one run.

For each model shape it measures, on the same machine and in this one process:

- SentenceTransformer.encode at batch sizes 32 and 512 (fp16 for MiniLM, bf16 for BERT shapes),
  on the first --st-docs documents (tokenization included, as a user would call it);
- embedkit.encode end to end (read parquet, tokenize in worker processes, pack, encode, write
  Lance) on the same documents, and on the whole corpus (--docs, the corpus repeated as needed).

It prints tokens/s, the ratio embedkit / best SentenceTransformer, and MFU: useful FLOPs (dense
layers 2 * params per token, attention 4 * layers * hidden * length per token) over the peak
bf16 matmul rate measured here at the start. BERT-base and BERT-large shapes use random weights
(throughput does not depend on the values); the MiniLM row uses the real default model.

    python benchmarks/bench_encode.py --corpus pydocs.parquet --docs 200000 --st-docs 50000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHAPES = {
    # name: (hidden, layers, heads, intermediate, precision)
    "bert-base": (768, 12, 12, 3072, "bf16"),
    "bert-large": (1024, 24, 16, 4096, "bf16"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="parquet with a text column")
    ap.add_argument("--docs", type=int, default=200_000, help="documents for the end-to-end run")
    ap.add_argument("--st-docs", type=int, default=50_000, help="documents for the like-for-like comparison")
    ap.add_argument("--models", default="minilm,bert-base,bert-large")
    ap.add_argument("--minilm", default="all-MiniLM-L6-v2", help="path or name of the default model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-sizes", default="32,512")
    ap.add_argument("--forward-experiments", action="store_true",
                    help="also time the forward pass with seq_len padded to 8 and under torch.compile")
    ap.add_argument("--e2e-batch-tokens", default="131072", help="comma-separated budgets for embedkit runs")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args()

    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="embedkit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    full, subset = _corpora(Path(args.corpus), args.docs, args.st_docs, work)
    peak = _peak_tflops(torch, args.device)
    print(f"device {_device_name(torch, args.device)}; measured bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    rows = []
    for name in args.models.split(","):
        folder, precision = _model_folder(name, args.minilm, work)
        rows.extend(_bench_model(name, folder, precision, full, subset, args, peak, work))
    _print_table(rows, peak)
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_tflops": peak, "rows": rows}, indent=2))


def _corpora(src: Path, docs: int, st_docs: int, work: Path) -> tuple[Path, Path]:
    """The corpus repeated to `docs` rows with unique ids, and its first `st_docs` rows."""
    texts = pq.read_table(src, columns=["text"]).column("text").combine_chunks()
    reps = -(-docs // len(texts))
    big = pa.concat_arrays([texts] * reps).slice(0, docs)
    table = pa.table({"id": pa.array([f"d{i}" for i in range(docs)]), "text": big})
    full, subset = work / f"corpus{docs}.parquet", work / f"corpus{st_docs}.parquet"
    pq.write_table(table, full, row_group_size=65_536)
    pq.write_table(table.slice(0, st_docs), subset, row_group_size=65_536)
    return full, subset


def _peak_tflops(torch, device: str) -> float:
    if not device.startswith("cuda"):
        return float("nan")
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 50
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def _device_name(torch, device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def _model_folder(name: str, minilm: str, work: Path) -> tuple[str, str]:
    """A sentence-transformers folder for the shape; BERT shapes get random weights."""
    if name == "minilm":
        from embedkit.engine.models import resolve_model

        src = resolve_model(minilm)
        return str(src.path or src.name), "fp16"
    hidden, layers, heads, inter, precision = SHAPES[name]
    folder = work / f"{name}-random"
    if not (folder / "modules.json").exists():
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.models import Pooling, Transformer
        from transformers import BertConfig, BertModel

        from embedkit.engine.models import resolve_model

        tok_src = resolve_model(minilm).path  # the shapes share MiniLM's (BERT) vocabulary
        hf = work / f"{name}-hf"
        cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter, max_position_embeddings=512)
        BertModel(cfg).save_pretrained(hf)
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (tok_src / f).exists():
                shutil.copy(tok_src / f, hf / f)
        transformer = Transformer(str(hf), max_seq_length=256)
        st = SentenceTransformer(modules=[transformer, Pooling(hidden, "mean")], device="cpu")
        st.save(str(folder))
    return str(folder), precision


def _tokenize(folder: str, texts: list[str]):
    from embedkit.engine.models import fast_tokenizer_json, load_sentence_transformer, resolve_model
    from embedkit.engine.tokenize import TextTokenizer, tokenize_all

    st = load_sentence_transformer(resolve_model(folder), "cpu")
    tok = TextTokenizer(fast_tokenizer_json(st), int(st.max_seq_length))
    return tokenize_all(tok, texts)


def _forward_only(folder: str, precision: str, tok, args, *, compiled: bool = False, round_seq: int = 1) -> float:
    """Seconds for embedkit's Encoder over pre-tokenized, pre-packed batches: the device ceiling.

    Experiments (not used by `embedkit encode`): `compiled` wraps the transformer in
    torch.compile(dynamic=True), timed on a second pass after a full untimed pass that compiles;
    `round_seq` pads every batch's length up to a multiple of it.
    """
    import torch

    from embedkit.config import DEFAULT_BATCH_TOKENS
    from embedkit.engine.batching import pack_batches, pad_rows
    from embedkit.engine.encoder import Encoder, choose_device
    from embedkit.engine.models import load_sentence_transformer, resolve_model

    budget = args.batch_tokens or DEFAULT_BATCH_TOKENS["cuda"]  # set per row by _bench_model
    st = load_sentence_transformer(resolve_model(folder), "cpu")
    enc = Encoder(st, choose_device(args.device, precision), normalize=True, out_dtype="float16", max_batch_tokens=budget)
    if compiled:
        enc._transformer = torch.compile(enc._transformer, dynamic=True)
    batches = []
    for b in pack_batches(tok.lengths, budget):
        seq = -(-b.seq_len // round_seq) * round_seq
        batches.append((pad_rows(tok.flat, tok.offsets, b.rows, seq), tok.lengths[b.rows].astype(np.int32)))
    warm = batches if compiled else batches[:5]
    t = time.perf_counter()
    for ids, lens in warm:
        enc.forward(ids, lens)
    _sync(args.device)
    if compiled:
        print(f"torch.compile warm-up pass: {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    outs = [enc.forward(ids, lens) for ids, lens in batches]
    _sync(args.device)
    seconds = time.perf_counter() - t
    del outs, enc, st
    torch.cuda.empty_cache() if args.device.startswith("cuda") else None
    return seconds


def _flops(folder: str, lengths: np.ndarray) -> float:
    """Useful FLOPs of a forward over documents of these lengths (no padding counted)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)
    d, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    dense_params = layers * (4 * d * d + 2 * d * inter)  # q, k, v, o and the two FFN matrices
    lengths = lengths.astype(np.float64)
    return float(np.sum(2 * dense_params * lengths + 4 * layers * d * lengths**2))


def _st_encode(folder: str, precision: str, texts: list[str], batch_size: int, device: str) -> float:
    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(folder, device=device)
    st.max_seq_length = 256
    st.to(torch.float16 if precision == "fp16" else torch.bfloat16)
    st.encode(texts[:2048], batch_size=batch_size)  # warm-up: kernels, allocator
    _sync(device)
    t = time.perf_counter()
    st.encode(texts, batch_size=batch_size, normalize_embeddings=True)
    _sync(device)
    seconds = time.perf_counter() - t
    del st
    return seconds


def _embedkit(folder: str, precision: str, corpus: Path, out: Path, args) -> tuple[float, float, dict]:
    import embedkit

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    s = embedkit.encode(
        corpus, out, model=folder, device=args.device, precision=precision, batch_tokens=args.batch_tokens,
        progress=False, max_seq_length=256,
    )  # fmt: skip
    wall = time.perf_counter() - t
    return s.seconds, wall, s.to_dict()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _bench_model(name: str, folder: str, precision: str, full: Path, subset: Path, args, peak: float, work: Path) -> list[dict]:
    """ST baselines once, then embedkit at each --e2e-batch-tokens budget: one row per budget."""
    sub_texts = pq.read_table(subset, columns=["text"]).column("text").to_pylist()
    full_texts = pq.read_table(full, columns=["text"]).column("text").to_pylist()
    full_tok = _tokenize(folder, full_texts)
    sub_len, full_len = full_tok.lengths[: len(sub_texts)], full_tok.lengths
    sub_tokens, full_tokens = int(sub_len.sum()), int(full_len.sum())
    base: dict = {"model": name, "precision": precision, "st_docs": len(sub_texts), "docs": len(full_texts),
                  "tokens_subset": sub_tokens, "tokens_full": full_tokens}  # fmt: skip
    for bs in (int(x) for x in args.batch_sizes.split(",")):
        sec = _st_encode(folder, precision, sub_texts, bs, args.device)
        base[f"st_bs{bs}_tok_s"] = sub_tokens / sec
    best_st = max(v for k, v in base.items() if k.startswith("st_bs"))
    flops_per_token = _flops(folder, full_len) / full_tokens
    base["gflop_per_token"] = flops_per_token / 1e9
    base["st_best_mfu"] = best_st * (_flops(folder, sub_len) / sub_tokens) / (peak * 1e12)
    rows = []
    budgets = [int(x) for x in args.e2e_batch_tokens.split(",")]
    for i, budget in enumerate(budgets):
        args.batch_tokens = budget
        row = dict(base, batch_tokens=budget)
        _embedkit(folder, precision, subset, work / "warm", args)  # warm-up, as for the baseline
        sec, wall, summary = _embedkit(folder, precision, subset, work / f"{name}-sub", args)
        row["embedkit_subset_tok_s"] = sub_tokens / sec
        row["embedkit_subset_wall_s"] = wall
        sec, wall, summary = _embedkit(folder, precision, full, work / f"{name}-full", args)
        row["embedkit_full_tok_s"] = full_tokens / sec
        row["embedkit_full_seconds"] = sec
        row["embedkit_full_wall_s"] = wall
        row["embedkit_padding"] = summary["padding_overhead"]
        row["embedkit_input_wait_s"] = summary["input_wait_seconds"]
        row["forward_only_tok_s"] = full_tokens / _forward_only(folder, precision, full_tok, args)
        if args.forward_experiments and i == len(budgets) - 1:  # once per model: compiling is slow
            row["forward_seq8_tok_s"] = full_tokens / _forward_only(folder, precision, full_tok, args, round_seq=8)
            row["forward_compiled_tok_s"] = full_tokens / _forward_only(folder, precision, full_tok, args, compiled=True)
        row["ratio_vs_best_st"] = row["embedkit_subset_tok_s"] / best_st
        row["embedkit_mfu"] = row["embedkit_full_tok_s"] * flops_per_token / (peak * 1e12)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _print_table(rows: list[dict], peak: float) -> None:
    print()
    print(f"(BERT-base/large rows use random weights; MFU against the measured {peak:.0f} TFLOP/s bf16 matmul peak)")
    head = "| model | prec | batch tokens | ST bs32 tok/s | ST bs512 tok/s | embedkit tok/s (same docs) | x best ST | embedkit tok/s (all docs, end to end) | wall s | padding | input wait s | forward only tok/s | MFU embedkit | MFU best ST |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in rows:
        print(
            f"| {r['model']} | {r['precision']} | {r['batch_tokens']:,} | {r.get('st_bs32_tok_s', float('nan')):,.0f} | {r.get('st_bs512_tok_s', float('nan')):,.0f} "
            f"| {r['embedkit_subset_tok_s']:,.0f} | {r['ratio_vs_best_st']:.1f}x | {r['embedkit_full_tok_s']:,.0f} "
            f"| {r['embedkit_full_wall_s']:.1f} | {100 * r['embedkit_padding']:.1f}% | {r['embedkit_input_wait_s']:.1f} "
            f"| {r['forward_only_tok_s']:,.0f} | {100 * r['embedkit_mfu']:.1f}% | {100 * r['st_best_mfu']:.0f}% |"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
