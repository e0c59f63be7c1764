"""A user's run: `embedkit encode` in a fresh process, against SentenceTransformer.encode at its best.

What a user runs is one CLI command in a new process, so that is the headline here:

1. **Fresh CLI runs** (`python -m embedkit.cli encode CORPUS OUT --json`, one new process each) on
   (a) the pydocs corpus repeated to --docs documents and (b) --short-docs distinct short texts cut
   from pydocs (sentences, headings, list items and word windows; de-duplicated). Each row gives
   the process wall time (start to exit) and the run's own encode seconds (model on the device to
   the last commit), as tokens/s.
2. **The same documents**, a fair ratio: the first --compare-docs documents of each corpus, encoded
   by a fresh CLI process, and by `SentenceTransformer.encode` (fp16 for MiniLM, bf16 for BERT
   shapes, warmed up, tokenization included) at the best batch size of a sweep (--sweep, timed on
   the first --sweep-docs documents). The ratio divides the two on those same documents only.
3. `--profile`: the fresh CLI runs again under `py-spy record --subprocesses --format raw` (the
   folded stacks land in --out as prof-*.txt), to see where the process spends its time.

    python benchmarks/bench_first_run.py --corpus pydocs.parquet --minilm <all-MiniLM-L6-v2 folder> \\
        --work /tmp/bf --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encode import _flops, _model_folder, _peak_tflops, _st_encode  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="pydocs.parquet (a text column)")
    ap.add_argument("--minilm", default="all-MiniLM-L6-v2", help="folder or name of the default model")
    ap.add_argument("--models", default="minilm", help="minilm and/or bert-base, bert-large (random weights)")
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--short-docs", type=int, default=1_000_000)
    ap.add_argument("--compare-docs", type=int, default=100_000)
    ap.add_argument("--sweep", default="32,128,512,1024,2048,4096", help="SentenceTransformer batch sizes")
    ap.add_argument("--sweep-docs", type=int, default=20_000)
    ap.add_argument("--parts", default="cli,compare", help="cli (fresh runs), compare (same docs vs ST), profile")
    ap.add_argument("--loaders", default="native", help="native (embedkit.engine.bert where it applies) and/or st (EMBEDKIT_NATIVE=0): "
                    "fresh CLI runs with each, alternating")
    ap.add_argument("--repeats", type=int, default=1, help="fresh CLI runs per loader")
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", default=None, help="folder for the JSON results and profiles")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out or args.work)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    corpora = {"pydocs": repeated(Path(args.corpus), args.docs, work), "short": short_corpus(Path(args.corpus), args.short_docs, work)}
    parts = set(args.parts.split(","))
    import torch

    peak = _peak_tflops(torch, "cuda") if torch.cuda.is_available() else float("nan")
    print(f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}; bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    rows = []
    for name in args.models.split(","):
        folder, precision = _model_folder(name, args.minilm, work)
        for kind, path in corpora.items():
            if "cli" in parts:
                for _ in range(args.repeats):
                    for loader in args.loaders.split(","):
                        rows.append(fresh_cli(name, folder, kind, path, work, peak, loader))
            if "profile" in parts:
                profiled(name, folder, kind, path, work, out)
            if "compare" in parts:
                rows.append(compare(name, folder, precision, kind, path, args, work))
            (out / "first_run.json").write_text(json.dumps({"peak_tflops": peak, "rows": rows}, indent=2))
    print_table(rows)


# ---- corpora ------------------------------------------------------------------------------------


def repeated(src: Path, docs: int, work: Path) -> Path:
    """pydocs repeated to `docs` documents with unique ids."""
    path = work / f"pydocs-{docs}.parquet"
    if not path.exists():
        texts = pq.read_table(src, columns=["text"]).column("text").combine_chunks()
        big = pa.concat_arrays([texts] * -(-docs // len(texts))).slice(0, docs)
        pq.write_table(pa.table({"id": pa.array([f"d{i}" for i in range(docs)]), "text": big}), path, row_group_size=65_536)
    return path


_SENTENCE = re.compile(r"(?<=[.!?:;])\s+")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")


def short_texts(docs: list[str], want: int, seed: int = 0) -> list[str]:
    """Distinct short texts from documents: lines that are headings or list items, sentences, then
    word windows of 4-14 words until there are `want` (short queries, titles and snippets)."""
    seen: dict[str, None] = {}

    def add(text: str) -> None:
        text = " ".join(text.split())
        if 2 <= len(text.split()) <= 24:
            seen.setdefault(text, None)

    for doc in docs:
        for line in doc.splitlines():
            add(_LIST_ITEM.sub("", line))
            for sentence in _SENTENCE.split(line):
                add(sentence)
    rng = np.random.default_rng(seed)
    words = [d.split() for d in docs]
    counts = np.array([len(w) for w in words])
    while len(seen) < want:  # windows drawn a million at a time: one draw per window was minutes at 10M
        doc = rng.integers(len(words), size=1 << 20)
        size = rng.integers(4, 15, size=1 << 20)
        room = counts[doc] - size
        keep = room > 0
        doc, size, start = doc[keep], size[keep], (rng.random(int(keep.sum())) * room[keep]).astype(np.int64)
        for d, z, a in zip(doc.tolist(), size.tolist(), start.tolist()):
            seen.setdefault(" ".join(words[d][a : a + z]), None)  # already single-spaced, 4-14 words
            if len(seen) >= want:
                break
    texts = list(seen)
    rng.shuffle(texts)
    return texts[:want]


def short_corpus(src: Path, docs: int, work: Path) -> Path:
    path = work / f"short-{docs}.parquet"
    if not path.exists():
        texts = short_texts(pq.read_table(src, columns=["text"]).column("text").to_pylist(), docs)
        pq.write_table(pa.table({"id": pa.array([f"s{i}" for i in range(len(texts))]), "text": pa.array(texts)}), path,
                       row_group_size=65_536)  # fmt: skip
    return path


def head(path: Path, n: int, work: Path) -> Path:
    sub = work / f"{path.stem}-head{n}.parquet"
    if not sub.exists():
        pq.write_table(pq.read_table(path).slice(0, n), sub, row_group_size=65_536)
    return sub


# ---- runs ---------------------------------------------------------------------------------------


def cli_encode(folder: str, corpus: Path, out: Path, prefix: tuple[str, ...] = (), loader: str = "native",
               precision: str | None = None) -> tuple[float, dict]:  # fmt: skip
    """One `embedkit encode` in a new process: (process wall seconds, its JSON summary).
    `loader` "st" loads every model through sentence-transformers (EMBEDKIT_NATIVE=0)."""
    import os
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [*prefix, sys.executable, "-m", "embedkit.cli", "encode", str(corpus), str(out), "--model", folder, "--json", "-q"]
    if precision:
        cmd += ["--precision", precision]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "EMBEDKIT_NATIVE": "0" if loader == "st" else "1"})
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"encode failed: {p.stderr[-3000:]}")
    return wall, json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])  # py-spy prints too


def fresh_cli(name: str, folder: str, kind: str, corpus: Path, work: Path, peak: float, loader: str = "native") -> dict:
    wall, s = cli_encode(folder, corpus, work / f"out-{name}-{kind}", loader=loader)
    row = {"row": "fresh CLI", "model": name, "loader": loader, "corpus": kind, "docs": s["docs"], "tokens": s["tokens"],
           "tokens_per_doc": s["tokens"] / max(1, s["docs"]), "encode_s": s["seconds"], "wall_s": wall,
           "encode_tok_s": s["tokens"] / s["seconds"], "wall_tok_s": s["tokens"] / wall, "docs_per_s": s["docs"] / s["seconds"],
           "input_wait_s": s["input_wait_seconds"], "padding": s["padding_overhead"]}  # fmt: skip
    if name != "minilm" and peak == peak:
        lengths = np.full(s["docs"], row["tokens_per_doc"])  # mean length: attention FLOPs approximate
        row["mfu"] = row["encode_tok_s"] * _flops(folder, lengths) / s["tokens"] / (peak * 1e12)
    print(json.dumps(row), flush=True)
    return row


def profiled(name: str, folder: str, kind: str, corpus: Path, work: Path, out: Path) -> None:
    prof = out / f"prof-{name}-{kind}.txt"
    prefix = ("py-spy", "record", "--subprocesses", "--format", "raw", "--rate", "50", "-o", str(prof), "--")
    wall, s = cli_encode(folder, corpus, work / f"prof-{name}-{kind}", prefix)
    print(json.dumps({"row": "profiled CLI", "model": name, "corpus": kind, "wall_s": wall, "encode_s": s["seconds"],
                      "input_wait_s": s["input_wait_seconds"], "profile": str(prof)}), flush=True)  # fmt: skip


def compare(name: str, folder: str, precision: str, kind: str, corpus: Path, args, work: Path) -> dict:
    """embedkit (fresh CLI) and SentenceTransformer at its best batch size on the same documents."""
    sub = head(corpus, args.compare_docs, work)
    texts = pq.read_table(sub, columns=["text"]).column("text").to_pylist()
    _, s = cli_encode(folder, sub, work / f"cmp-{name}-{kind}")
    tokens = s["tokens"]  # what the model read, after truncation: the same for both
    sweep_texts = texts[: args.sweep_docs]
    sweep_tokens = tokens * len(sweep_texts) / len(texts)  # the sweep only ranks batch sizes
    sweep = {bs: sweep_tokens / _st_encode(folder, precision, sweep_texts, bs, "cuda") for bs in map(int, args.sweep.split(","))}
    best = max(sweep, key=sweep.get)
    st_tok_s = tokens / _st_encode(folder, precision, texts, best, "cuda")
    row = {"row": "same docs", "model": name, "corpus": kind, "docs": len(texts), "tokens": tokens,
           "embedkit_encode_tok_s": tokens / s["seconds"], "st_best_batch": best, "st_tok_s": st_tok_s,
           "st_sweep_tok_s": {str(k): round(v) for k, v in sweep.items()}, "ratio": tokens / s["seconds"] / st_tok_s}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def print_table(rows: list[dict]) -> None:
    print("\n| model | loader | corpus | docs | tokens/doc | encode s | process wall s | encode tok/s | wall tok/s | docs/s | input wait s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in (r for r in rows if r["row"] == "fresh CLI"):
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(f"| {r['model']} | {r.get('loader', 'native')} | {r['corpus']} | {r['docs']:,} | {r['tokens_per_doc']:.1f} | {r['encode_s']:.1f} | {r['wall_s']:.1f} "
              f"| {r['encode_tok_s']:,.0f} | {r['wall_tok_s']:,.0f} | {r['docs_per_s']:,.0f} | {r['input_wait_s']:.1f} | {mfu} |")  # fmt: skip
    print("\n| model | corpus | same docs | embedkit encode tok/s (fresh CLI) | ST best batch | ST tok/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in (r for r in rows if r["row"] == "same docs"):
        print(f"| {r['model']} | {r.get('loader', 'native')} | {r['corpus']} | {r['docs']:,} | {r['embedkit_encode_tok_s']:,.0f} | {r['st_best_batch']} "
              f"| {r['st_tok_s']:,.0f} | {r['ratio']:.1f}x |")  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
