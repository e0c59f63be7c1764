"""Recall and bytes per vector of each stored dtype (and of --dim cuts), on one corpus.

Each variant is encoded by `embedkit.encode`, indexed by `embedkit.build_index` (as a user runs
them), then searched with held-out query-like texts (cut from the input with a seed the build's
tuning does not use). The truth is exact search over the float32 vectors of the full model:
recall@10 says what a smaller vector costs in results, against the best the model can do.

Reported per variant: bytes per vector (the `vector` column), the size of vectors.lance, recall@10
of `Retriever.search` (index + rerank against the stored codes), and recall@10 of exact search
over the stored vectors themselves (the quantization's loss alone, without the index). For
binary, also the Hamming alternative: candidates by Hamming distance between sign codes
(faiss IndexBinaryFlat, query signs), the same depth, rescored with the float query.

    python benchmarks/bench_quantized.py [--corpus data/sample.parquet] [--queries 300] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import embedkit  # noqa: E402
from embedkit.index.io import vectors_of  # noqa: E402
from embedkit.index.queries import cut_dimensions, encode_queries, input_sample, pseudo_queries  # noqa: E402
from embedkit.io.shards import read_manifest  # noqa: E402

K = 10
VARIANTS = {  # name: encode options
    "float32": {"dtype": "float32"},
    "float16": {"dtype": "float16"},
    "int8": {"dtype": "int8"},
    "binary": {"dtype": "binary"},
    "float16 --dim 192": {"dtype": "float16", "dim": 192},
    "float16 --dim 96": {"dtype": "float16", "dim": 96},
}


def stored(out: Path) -> tuple[np.ndarray, list, int]:
    """Decoded float vectors of an output, their ids, and the stored bytes per vector."""
    import lance

    table = lance.dataset(str(out / "vectors.lance")).to_table(columns=["id", "vector"])
    vtype = table.schema.field("vector").type
    return vectors_of(table), table.column("id").to_pylist(), vtype.list_size * vtype.value_type.bit_width // 8


def exact_top(q: np.ndarray, x: np.ndarray, ids: list, k: int = K) -> list[set]:
    scores = q @ x.T
    top = np.argsort(-scores, axis=1)[:, :k]
    return [{ids[j] for j in row} for row in top]


def recall(found: list, truth: list[set]) -> float:
    return float(np.mean([len(set(f) & t) / len(t) for f, t in zip(found, truth)]))


def hamming_then_rescore(out: Path, q: np.ndarray, depth: int) -> list[list]:
    """Binary: Hamming candidates of the query's signs, rescored with the float query."""
    import faiss
    import lance

    table = lance.dataset(str(out / "vectors.lance")).to_table(columns=["id", "vector"])
    col = table.column("vector").combine_chunks()
    codes = col.values.to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size).astype(np.uint8)
    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(codes)
    _, cand = index.search(np.packbits(q > 0, axis=1), depth)
    x, ids, _ = stored(out)
    found = []
    for i, row in enumerate(cand):
        row = row[row >= 0]
        best = row[np.argsort(-(x[row] @ q[i]))[:K]]
        found.append([ids[j] for j in best])
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[1] / "data" / "sample.parquet"))
    ap.add_argument("--work", default="/tmp/bench-quantized")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--queries", type=int, default=300)
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    outs = {}
    for name, options in VARIANTS.items():
        out = work / name.replace(" ", "_").replace("-", "")
        embedkit.encode(args.corpus, out, device=args.device, progress=False, **options)
        embedkit.build_index(out, progress=False)
        outs[name] = out
    manifest = read_manifest(outs["float32"])
    texts = pseudo_queries(input_sample(manifest, 4 * args.queries, seed=7), args.queries, seed=7)
    qfull = encode_queries(texts, manifest, args.device)
    xfull, ids_full, _ = stored(outs["float32"])
    truth = exact_top(qfull, xfull, ids_full)
    rows = []
    for name, out in outs.items():
        m = read_manifest(out)
        q = cut_dimensions(qfull, (m["output"].get("dim") or None), True)
        x, ids, width = stored(out)
        r = embedkit.Retriever(out)
        row = {
            "variant": name, "bytes_per_vector": width, "vectors_lance_mb": round(sum(f.stat().st_size for f in (out / "vectors.lance").rglob("*") if f.is_file()) / 1e6, 2),
            "recall_search": round(recall(r.search_vectors(q, k=K).ids, truth), 3), "recall_exact_on_stored": round(recall(exact_top(q, x, ids), truth), 3),
            "nprobe": r.nprobe, "rerank": r.rerank, "index": json.loads((out / "index" / "params.json").read_text())["key"].get("factory"),
        }  # fmt: skip
        if name == "binary":
            row["recall_hamming_then_rescore"] = round(recall(hamming_then_rescore(out, q, r.rerank), truth), 3)
        rows.append(row)
    print(json.dumps({"corpus": args.corpus, "queries": len(texts), "k": K, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
