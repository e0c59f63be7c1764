"""Encode on one GPU against every GPU of the machine (`--gpus N`), same corpus, fresh processes.

Each run is the real CLI in a new process (`embedkit encode CORPUS OUT --gpus K --json`), so the
times include process start, model load and CUDA start-up, exactly as a user pays them. The
outputs are then compared: the same ids, each once, and vectors equal within fp16 tolerance.

    python benchmarks/bench_scale.py --corpus pydocs.parquet --model <folder> --docs 2000000 --gpus 1,2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encode import _corpora  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--docs", type=int, default=2_000_000)
    ap.add_argument("--shard-rows", type=int, default=125_000)
    ap.add_argument("--gpus", default="1,2", help="comma-separated worker counts; the first is the baseline")
    ap.add_argument("--no-compare", action="store_true", help="skip reading both outputs back to compare them")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="embedkit-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus, _ = _corpora(Path(args.corpus), args.docs, 1000, work)
    rows = []
    for k in (int(x) for x in args.gpus.split(",")):
        out = work / f"out-gpus{k}"
        cmd = [sys.executable, "-m", "embedkit.cli", "encode", str(corpus), str(out), "--model", args.model, "--gpus", str(k),
               "--shard-rows", str(args.shard_rows), "--overwrite", "--quiet", "--json"]  # fmt: skip
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if r.returncode != 0:
            print(r.stderr[-3000:], flush=True)
            continue
        s = json.loads(r.stdout.strip().splitlines()[-1])
        # encoding rate once models are loaded: one process's own rate, or the sum of the workers'
        steady = sum(p["tokens"] / p["seconds"] for p in s["parts"]) if s.get("parts") else s["tokens_per_second"]
        rows.append({"gpus": k, "process_wall_s": round(wall, 1), "run_s": round(s["seconds"], 1), "docs": s["docs"], "tokens": s["tokens"],
                     "tokens_per_second": s["tokens_per_second"], "steady_tokens_per_second": round(steady), "parts": s.get("parts", []),
                     "wall_tokens_per_second": round(s["tokens"] / wall), "out": str(out)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    print("\n| GPUs | docs | tokens | encoding tok/s (models loaded) | speed-up | process wall s | speed-up (wall) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        r["speedup_steady"] = round(r["steady_tokens_per_second"] / base["steady_tokens_per_second"], 2)
        r["speedup_wall"] = round(base["process_wall_s"] / r["process_wall_s"], 2)
        print(f"| {r['gpus']} | {r['docs']:,} | {r['tokens']:,} | {r['steady_tokens_per_second']:,.0f} | {r['speedup_steady']}x | "
              f"{r['process_wall_s']} | {r['speedup_wall']}x |")  # fmt: skip
    for r in rows[1:] if not args.no_compare else []:
        r["same_content"] = compare(Path(base["out"]), Path(r["out"]))
        print(f"{r['gpus']} GPUs against {base['gpus']}: {r['same_content']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def compare(a: Path, b: Path) -> dict:
    """Same ids, each once, and the cosine of each id's two vectors."""
    import lance
    import pyarrow.compute as pc

    def read(out: Path):
        t = lance.dataset(str(out / "vectors.lance")).to_table(columns=["id", "vector"])
        t = t.take(pc.sort_indices(t, sort_keys=[("id", "ascending")]))
        ids = t.column("id").to_pylist()
        vec = np.stack(t.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
        return ids, vec

    ia, va = read(a)
    ib, vb = read(b)
    if ia != ib:
        return {"same_ids": False, "rows": [len(ia), len(ib)], "unique": [len(set(ia)), len(set(ib))]}
    cos = (va * vb).sum(1) / np.maximum(np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1), 1e-30)
    return {"same_ids": True, "rows": len(ia), "unique": len(set(ia)), "min_cosine": float(cos.min()), "identical_rows": int((va == vb).all(1).sum())}


if __name__ == "__main__":
    main()
