"""What does --chunk-tokens cost against cutting documents at the model's length?

Two measurements on the same documents:

1. The tokenizer alone, in this process, one core: `TextTokenizer` cutting at the model's length
   against the same tokenizer splitting into chunks. Tokenizing is what bounds a fast GPU's
   encode (docs/benchmarks.md), so its rate is what chunking could slow down. Also the padding
   the rows get when packed as a GPU encode packs them (chunks cluster at the chunk length).
2. `embedkit encode` as a user runs it, each a fresh process: without chunking, and with
   --chunk-tokens (default: the model's length) --chunk-overlap. Reported: documents, rows,
   tokens encoded, wall seconds, tokens/s, and the ratio of tokens/s (chunked / cut). Chunking
   encodes more tokens (nothing is cut, overlaps twice): tokens/s is the fair rate, and the
   wall time per document the cost a user pays for keeping every token.

    python benchmarks/bench_chunking.py [--corpus data/sample.parquet] [--device cpu] [--chunk-tokens 256] [--overlap 32]
        [--repeat-to 1000000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from embedkit.engine.models import fast_tokenizer_json, load_sentence_transformer, resolve_model  # noqa: E402
from embedkit.engine.tokenize import TextTokenizer  # noqa: E402


def tokenizer_rates(texts: list[str], model: str, chunk: int, overlap: int, repeat: int = 3) -> dict:
    """Best of `repeat` passes over the texts, cut and chunked; tokens/s and docs/s."""
    st = load_sentence_transformer(resolve_model(model), "cpu")
    spec = fast_tokenizer_json(st)
    out = {}
    for name, tok in (("cut", TextTokenizer(spec, st.max_seq_length)), ("chunked", TextTokenizer(spec, chunk, chunk_overlap=overlap))):
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            got = [tok(texts[i : i + 1024]) for i in range(0, len(texts), 1024)]
            best = min(best, time.perf_counter() - t)
        tokens = sum(int(g.lengths.sum()) for g in got)
        rows = sum(len(g.lengths) for g in got)
        out[name] = {"rows": rows, "tokens": tokens, "seconds": round(best, 3), "tokens_per_s": round(tokens / best),
                     "docs_per_s": round(len(texts) / best), "padding": padding(np.concatenate([g.lengths for g in got]))}  # fmt: skip
    out["tokens_per_s_ratio"] = round(out["chunked"]["tokens_per_s"] / out["cut"]["tokens_per_s"], 3)
    return out


def padding(lengths: np.ndarray, window: int = 65_536, budget: int = 524_288) -> float:
    """Padded tokens over real ones when rows are packed as encode packs them on a large GPU
    (windows of 65,536 rows, batches of up to 524,288 padded tokens): 0.03 is 3% padding."""
    from embedkit.engine.batching import pack_batches

    real = padded = 0
    for i in range(0, len(lengths), window):
        part = lengths[i : i + window]
        real += int(part.sum())
        padded += sum(b.padded_tokens for b in pack_batches(part, budget))
    return round(padded / real - 1, 4)


def encode_run(corpus: str, out: Path, device: str, model: str, extra: list[str]) -> dict:
    """One `embedkit encode` in a fresh process; its JSON summary plus the process wall time."""
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "embedkit.cli", "encode", corpus, str(out), "--device", device, "--model", model,
                           "-q", "--json", *extra], capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"docs": s["docs"], "rows": s.get("chunks") or s["docs"], "tokens": s["tokens"], "encode_s": round(s["seconds"], 2),
            "tokens_per_s": round(s["tokens_per_second"]), "wall_s": round(wall, 2), "truncated": s["truncated"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[1] / "data" / "sample.parquet"))
    ap.add_argument("--work", default="/tmp/bench-chunking")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--docs", type=int, default=0, help="the first N documents only (0: all)")
    ap.add_argument("--no-encode", action="store_true", help="the tokenizer measurement only")
    ap.add_argument("--repeat-to", type=int, default=0,
                    help="encode runs: the corpus repeated to N documents with distinct ids (a GPU needs more than 60k "
                         "documents to reach its rate); the tokenizer measurement keeps the corpus as given")  # fmt: skip
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(args.corpus, columns=["id", "text"])
    if args.docs:
        table = table.slice(0, args.docs)
    corpus = work / "docs.parquet"
    pq.write_table(table, corpus)
    texts = [t or "" for t in table.column("text").to_pylist()]
    report: dict = {"docs": len(texts), "chunk_tokens": args.chunk_tokens, "overlap": args.overlap,
                    "tokenizer": tokenizer_rates(texts, args.model, args.chunk_tokens, args.overlap)}  # fmt: skip
    if not args.no_encode:
        if args.repeat_to:
            from bench_first_run import repeated

            corpus = repeated(corpus, args.repeat_to, work)
            report["encoded_docs"] = args.repeat_to
        cut = encode_run(str(corpus), work / "cut", args.device, args.model, [])
        split = encode_run(str(corpus), work / "chunked", args.device, args.model,
                           ["--chunk-tokens", str(args.chunk_tokens), "--chunk-overlap", str(args.overlap)])  # fmt: skip
        report["encode"] = {"cut": cut, "chunked": split, "tokens_per_s_ratio": round(split["tokens_per_s"] / cut["tokens_per_s"], 3)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
