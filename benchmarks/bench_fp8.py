"""`--precision fp8` against bf16 (and fp16) on a GPU of compute capability 8.9+: speed, and
whether the outputs stay right.

Parts (`--parts`, comma-separated):

- **encode**: `embedkit encode` in a fresh process per run (the CLI, as a user runs it) on the
  pydocs corpus repeated to --docs documents, for each model of --models at its 16-bit
  precision(s) and at fp8, alternating; tokens/s of the run's encode seconds and of the process
  wall. MiniLM is the default model (real weights); BERT-base and BERT-large shapes have random
  weights (speed does not depend on the values).
- **vectors**: the bundled sample's documents and query-like texts (sentences and headings cut
  from the same documents, not stored rows) encoded at fp32, bf16 and fp8 on the GPU: each
  row's cosine to its fp32 vector, and recall@10 of an exact search over the documents with
  fp8 (or bf16) vectors against the fp32 search's top 10.
- **generate**: the generator (--generator, real SmolLM2 weights) over --gen-docs prompts,
  greedy, bf16 against fp8: the share of new tokens equal to bf16's at the same position, the
  share of rows identical, and the mean absolute gap of the score task's mean log-probability.
  The throughput rows are benchmarks/bench_generate.py's, with `--precisions bf16,fp8`.

    python benchmarks/bench_fp8.py --corpus pydocs.parquet --minilm <MiniLM folder> --generator <SmolLM2 folder> \\
        --docs 500000 --work /tmp/b8 --out results/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encode import _model_folder  # noqa: E402
from bench_first_run import cli_encode, repeated, short_texts  # noqa: E402

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample.parquet"
BASELINES = {"minilm": ("fp16", "bf16"), "bert-base": ("bf16",), "bert-large": ("bf16",)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="pydocs.parquet (a text column)")
    ap.add_argument("--minilm", default="all-MiniLM-L6-v2")
    ap.add_argument("--models", default="minilm,bert-base,bert-large")
    ap.add_argument("--docs", type=int, default=500_000, help="documents of the encode runs (pydocs repeated)")
    ap.add_argument("--repeats", type=int, default=1, help="fresh runs per model and precision")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--generator", default=None, help="a transformers folder of the generator (real weights)")
    ap.add_argument("--gen-docs", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--parts", default="vectors,encode,generate")
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out or args.work)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"docs": args.docs}
    parts = args.parts.split(",")

    def save() -> None:
        (out / "fp8.json").write_text(json.dumps(report, indent=2))

    if "vectors" in parts:
        report["vectors"] = [vector_agreement(name, args, work) for name in args.models.split(",")]
        save()
    if "encode" in parts:
        corpus = repeated(Path(args.corpus), args.docs, work)
        report["encode"] = encode_rows(args, corpus, work)
        save()
    if "generate" in parts and args.generator:
        report["generate"] = generate_agreement(args)
        print(json.dumps(report["generate"]), flush=True)
        save()
    print_tables(report)


# ---- encode speed ---------------------------------------------------------------------------


def encode_rows(args, corpus: Path, work: Path) -> list[dict]:
    rows = []
    for name in args.models.split(","):
        folder, _ = _model_folder(name, args.minilm, work)
        for _ in range(args.repeats):
            for precision in (*BASELINES[name], "fp8"):  # alternating: drift between runs hits both
                wall, s = cli_encode(folder, corpus, work / f"out-{name}-{precision}", prefix=(), loader="native", precision=precision)
                row = {"model": name, "precision": precision, "docs": s["docs"], "tokens": s["tokens"], "encode_s": s["seconds"],
                       "wall_s": wall, "encode_tok_s": s["tokens"] / s["seconds"], "wall_tok_s": s["tokens"] / wall}  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


# ---- vectors against fp32 -------------------------------------------------------------------


def vector_agreement(name: str, args, work: Path) -> dict:
    import torch

    import embedkit

    folder, _ = _model_folder(name, args.minilm, work)
    docs = [t for t in pq.read_table(SAMPLE, columns=["text"]).column("text").to_pylist() if t and t.strip()]
    queries = short_texts(docs, args.queries)[: args.queries]
    vecs = {}
    for precision in ("fp32", "bf16", "fp8"):
        d = embedkit.encode_texts(docs, model=folder, device="cuda", precision=precision)
        q = embedkit.encode_texts(queries, model=folder, device="cuda", precision=precision)
        vecs[precision] = (_unit(d), _unit(q))
    ref_d, ref_q = vecs["fp32"]
    truth = _top(ref_q, ref_d, 10)
    row: dict = {"model": name, "docs": len(docs), "queries": len(queries)}
    for precision in ("bf16", "fp8"):
        d, q = vecs[precision]
        cos = np.concatenate([(d * ref_d).sum(1), (q * ref_q).sum(1)])
        got = _top(q, d, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)])
        row[precision] = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "cosine_p1": float(np.percentile(cos, 1)),
                          "recall_at_10": float(recall)}  # fmt: skip
    print(json.dumps(row), flush=True)
    torch.cuda.empty_cache()
    return row


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _top(q: np.ndarray, d: np.ndarray, k: int) -> np.ndarray:
    scores = q @ d.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


# ---- generate: fp8 against bf16 -------------------------------------------------------------


def generate_agreement(args) -> dict:
    from embedkit.config import DEFAULT_PROMPTS, GenerateConfig
    from embedkit.engine.decode import SlotDecoder
    from embedkit.engine.encoder import DeviceChoice
    from embedkit.generation.model import load_generator
    from embedkit.generation.tasks import continuation_logprobs, task_inputs

    texts = pq.read_table(args.corpus, columns=["text"]).column("text").to_pylist()[: args.gen_docs]
    ids = [str(i) for i in range(len(texts))]
    out: dict = {"prompts": len(texts), "max_new_tokens": args.max_new_tokens}
    tokens, scores = {}, {}
    for precision in ("bf16", "fp8"):
        lm, tok, _ = load_generator(args.generator, DeviceChoice("cuda:0", precision))
        prompts, _ = task_inputs(texts, ids, GenerateConfig(task="summarize"), DEFAULT_PROMPTS["summarize"], tok, lm.config)
        decoder = SlotDecoder(lm, eos_ids={tok.eos_token_id})
        t = time.perf_counter()
        tokens[precision] = decoder.run(prompts, max_new=args.max_new_tokens, max_slots=4096)
        out[f"{precision}_decoder_s"] = time.perf_counter() - t
        pairs, _ = task_inputs(texts, ids, GenerateConfig(task="score"), DEFAULT_PROMPTS["score"], tok, lm.config)
        lps = continuation_logprobs(lm, pairs, 131_072)
        scores[precision] = np.array([lp.mean() if len(lp) else 0.0 for lp in lps])
        del lm, decoder
    a, b = tokens["bf16"], tokens["fp8"]
    same = sum(sum(x == y for x, y in zip(r, s)) for r, s in zip(a, b))
    out.update(
        new_tokens_bf16=sum(len(r) for r in a), equal_tokens_share=same / max(1, sum(len(r) for r in a)),
        identical_rows_share=sum(r == s for r, s in zip(a, b)) / len(a), first_token_equal_share=sum(r[:1] == s[:1] for r, s in zip(a, b)) / len(a),
        score_mean_logprob_abs_gap=float(np.abs(scores["bf16"] - scores["fp8"]).mean()),
        score_mean_logprob_bf16=float(scores["bf16"].mean()),
    )  # fmt: skip
    return out


def print_tables(report: dict) -> None:
    if report.get("vectors"):
        print("\n| model | precision | cosine to fp32, mean | min | 1st percentile | recall@10 against fp32's search |")
        print("|---|---|---|---|---|---|")
        for r in report["vectors"]:
            for p in ("bf16", "fp8"):
                v = r[p]
                print(f"| {r['model']} | {p} | {v['cosine_mean']:.5f} | {v['cosine_min']:.4f} | {v['cosine_p1']:.4f} | {v['recall_at_10']:.4f} |")
    if report.get("encode"):
        print("\n| model | precision | docs | tokens | encode s | encode tok/s | process s | x 16-bit (encode s) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in report["encode"]:
            base = [x for x in report["encode"] if x["model"] == r["model"] and x["precision"] == BASELINES[r["model"]][-1]]
            ratio = np.mean([x["encode_tok_s"] for x in base]) if base else float("nan")
            print(f"| {r['model']} | {r['precision']} | {r['docs']:,} | {r['tokens']:,} | {r['encode_s']:.1f} | {r['encode_tok_s']:,.0f} | "
                  f"{r['wall_s']:.1f} | {r['encode_tok_s'] / ratio:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
