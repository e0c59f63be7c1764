"""GPU correctness check: embedkit's CUDA path against SentenceTransformer in fp32.

1. encode_texts on CUDA (fp16 compute) vs SentenceTransformer.encode in fp32 on the same weights.
2. embedkit.encode end to end over several shards: every id once, vectors match the reference.

    python benchmarks/check_gpu.py --model all-MiniLM-L6-v2 --corpus pydocs.parquet
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    import lance
    from sentence_transformers import SentenceTransformer

    import embedkit
    from embedkit.engine.models import resolve_model

    table = pq.read_table(args.corpus, columns=["text"]).slice(0, args.docs)
    texts = table.column("text").to_pylist()
    ref_model = SentenceTransformer(str(resolve_model(args.model).path or args.model), device=args.device).float()
    sample = texts[: min(2000, len(texts))] + ["", "x " * 3000, "emoji 🎉 中文 текст"]
    ref = ref_model.encode(sample, normalize_embeddings=True, batch_size=64)
    ours = embedkit.encode_texts(sample, model=args.model, device=args.device)
    c = cosines(ref, ours)
    print(f"encode_texts cuda fp16 vs ST fp32: min cosine {c.min():.6f}, mean {c.mean():.6f} over {len(c)} texts")
    assert c.min() >= 0.999, "encode_texts disagrees with SentenceTransformer"
    from embedkit.engine.encoder import choose_device
    from embedkit.engine.texts import cached_model

    print("direct transformer path:", cached_model(args.model, choose_device(args.device, "auto"), None)[0]._direct)

    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "in.parquet"
        pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts}), inp, row_group_size=4096)
        s = embedkit.encode(inp, Path(tmp) / "out", model=args.model, device=args.device, shard_rows=max(1, args.docs // 4), progress=False)
        print("encode summary:", *s.lines())
        got = lance.dataset(str(Path(tmp) / "out" / "vectors.lance")).to_table()
        ids = got.column("id").to_pylist()
        assert len(ids) == len(set(ids)) == len(texts), (len(ids), len(set(ids)), len(texts))
        pick = np.random.default_rng(0).choice(len(ids), min(1000, len(ids)), replace=False)
        vecs = np.stack(got.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
        rows = [int(ids[i][1:]) for i in pick]
        ref = ref_model.encode([texts[r] for r in rows], normalize_embeddings=True, batch_size=64)
        c = cosines(ref, vecs[pick])
        print(f"encode() cuda fp16 output vs ST fp32: min cosine {c.min():.6f} over {len(c)} rows; every id once: {len(ids)}")
        assert c.min() >= 0.999
    print("GPU CHECK OK" if args.device != "cpu" else "CHECK OK (cpu)")


if __name__ == "__main__":
    main()
