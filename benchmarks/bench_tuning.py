"""Is the recall a build promises the recall that query-like texts get?

On one corpus (default: the bundled sample), encoded once:

1. `build_index` as a user runs it: tuned on pseudo-queries cut from the input (the default).
2. The same build tuned on stored rows (the input made unreachable in a copy of the output's
   manifest): the old behaviour.

Then *held-out* query-like texts (cut with another seed, so none was tuned on) are encoded and
searched with each build's tuned nprobe and rerank depth, and their recall@k is measured against
exact search over every stored vector. Reported: promised recall, measured held-out recall, and
the setting, for both builds.

    python benchmarks/bench_tuning.py [--corpus data/sample.parquet] [--work /tmp/bt] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import embedkit  # noqa: E402
from embedkit.index.queries import encode_queries, input_sample, pseudo_queries  # noqa: E402
from embedkit.io.shards import read_manifest, write_manifest  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[1] / "data" / "sample.parquet"))
    ap.add_argument("--work", default="/tmp/bench-tuning")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="all-MiniLM-L6-v2", help="the encoder (a folder, or the bundled default)")
    ap.add_argument("--queries", type=int, default=1000, help="held-out query-like texts")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--short", type=int, default=0, help="instead: this many distinct short texts cut from --corpus (bench_first_run's)")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if args.short:
        from bench_first_run import short_corpus

        args.corpus = str(short_corpus(Path(args.corpus), args.short, work))
    out = work / "out"
    embedkit.encode(args.corpus, out, model=args.model, device=args.device, progress=False)
    stored_out = work / "stored"
    shutil.copytree(out, stored_out)
    manifest = read_manifest(stored_out)
    manifest["input"]["path"] = str(work / "gone.parquet")  # the build falls back to stored rows
    write_manifest(stored_out, manifest)
    builds = {"query-like (default)": embedkit.build_index(out, device=args.device, progress=False),
              "stored rows (before)": embedkit.build_index(stored_out, device=args.device, progress=False)}  # fmt: skip

    texts = pseudo_queries(input_sample(read_manifest(out), 4 * args.queries, seed=99), args.queries, seed=99)
    q = encode_queries(texts, read_manifest(out), args.device).astype(np.float32)
    import lance

    table = lance.dataset(str(out / "vectors.lance")).to_table(columns=["id", "vector"])
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    ids = table.column("id").to_pylist()
    exact = np.argsort(-(q @ vectors.T), axis=1, kind="stable")[:, : args.k]
    rows = []
    for name, report in builds.items():
        found = embedkit.Retriever(out, nprobe=report.nprobe, rerank=report.rerank).search_vectors(q, args.k).ids
        pos = {d: i for i, d in enumerate(ids)}
        measured = float(np.mean([len({pos[d] for d in hits} & set(e.tolist())) / args.k for hits, e in zip(found, exact)]))
        rows.append({"build": name, "promised": report.recall, "tuned_on": report.tuning_queries, "nprobe": report.nprobe,
                     "rerank": report.rerank, "held_out_query_like_recall": round(measured, 4),
                     "recall_stored_rows": report.recall_stored_rows})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{len(ids):,} documents, {len(texts):,} held-out query-like texts, recall@{args.k}\n")
    print("| build | tuned on | promised | measured on held-out query-like texts | nprobe | rerank |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['build']} | {r['tuned_on']} | {r['promised']:.3f} | {r['held_out_query_like_recall']:.3f} | {r['nprobe']} | {r['rerank']} |")


if __name__ == "__main__":
    main()
