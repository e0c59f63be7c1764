"""Growing an index after `encode --append`, against building it anew, on the same vectors.

A corpus is cut into a first input and appends (distinct documents, in order). Each step runs
the CLI as a user would, each command a fresh process: `encode` (then `encode --append`), then
`build-index`, which grows the finished index after an append. At the end a copy of the output
is built anew (`--overwrite`, with the grown index's `--nlist` so the structure is the same)
and the default full build (`--overwrite`, structure chosen for the final size) too. Reported:
every command's wall seconds, the index's own phase seconds, recall@10 on the tuning queries at
the tuned setting, and the anew build's recall at the grown index's setting.

    python benchmarks/bench_grow.py --corpus ../shared/data/pydocs.parquet --first 40000 --append 5000 --appends 2 \\
        [--order shuffled|corpus] [--drift-limit 1.25] [--device cpu] [--max-seq-length 128] [--work /tmp/bench_grow]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> tuple[dict, float, str]:
    """`python -m embedkit.cli ARGS --json` in a fresh process: (its JSON, wall seconds, stderr)."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "embedkit.cli", *args, "--json"], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"embedkit {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]), wall, p.stderr


def cut(corpus: Path, work: Path, first: int, append: int, appends: int, shuffle: bool) -> list[Path]:
    """The first input, then `appends` inputs of `append` rows, ids unique: drawn at random from the
    corpus (`shuffle`: each append like the first input), or in the corpus's order (a corpus
    sorted by source, as pydocs is, then brings other topics in each append: drift)."""
    import numpy as np

    table = pq.read_table(corpus)
    texts = [t for t in table.column("text").to_pylist() if t]
    if shuffle:
        texts = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))]
    need = first + append * appends
    if len(texts) < need:
        raise SystemExit(f"{corpus} has {len(texts):,} texts; {need:,} are needed")
    paths, start = [], 0
    for i, size in enumerate([first] + [append] * appends):
        path = work / f"input-{i}.parquet"
        pq.write_table(pa.table({"id": [f"{i}-{j}" for j in range(size)], "text": texts[start : start + size]}), path)
        paths.append(path)
        start += size
    return paths


def index_row(name: str, report: dict, wall: float, stderr: str = "") -> dict:
    said = [line for line in stderr.splitlines() if "grow" in line or "anew" in line or "drift" in line]
    return {"step": name, "said": said, "n": report["n"], "factory": report["factory"], "grown_from": report.get("grown_from", 0),
            "drift": report.get("drift"), "wall_s": round(wall, 2), "phases_s": report["seconds"],
            "recall": round(report["recall"], 4), "nprobe": report["nprobe"], "rerank": report["rerank"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=REPO / "data" / "sample.parquet")
    ap.add_argument("--first", type=int, default=1_500)
    ap.add_argument("--append", type=int, default=250)
    ap.add_argument("--appends", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-seq-length", type=int, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_grow"))
    ap.add_argument("--order", choices=("shuffled", "corpus"), default="shuffled", help="How the inputs are drawn (see cut()).")
    ap.add_argument("--drift-limit", type=float, default=None, help="Passed to build-index (a high one grows through drift).")
    args = ap.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    inputs = cut(args.corpus, args.work, args.first, args.append, args.appends, args.order == "shuffled")
    out = args.work / "out"
    common = ["--device", args.device] + (["--max-seq-length", str(args.max_seq_length)] if args.max_seq_length else [])
    rows = []
    for i, path in enumerate(inputs):
        summary, wall, _ = cli("encode", str(path), str(out), "--quiet", *common, *(["--append"] if i else []))
        rows.append({"step": f"encode input {i}", "docs": summary["docs"], "wall_s": round(wall, 2)})
        drift = ["--drift-limit", str(args.drift_limit)] if args.drift_limit else []
        report, wall, said = cli("build-index", str(out), "--device", args.device, *drift)
        rows.append(index_row(f"build-index after input {i}", report, wall, said))
    grown = report
    nlist = re.search(r"IVF(\d+)", grown["factory"]).group(1)
    same = args.work / "anew-same-lists"
    shutil.copytree(out, same)
    anew, wall, _ = cli("build-index", str(same), "--quiet", "--device", args.device, "--overwrite", "--nlist", nlist)
    rows.append(index_row("anew, same lists", anew, wall))
    at = {(r["nprobe"], r["rerank"]): r["recall"] for r in anew["recall_table"]}
    rows[-1]["recall_at_grown_setting"] = round(at[grown["nprobe"], grown["rerank"]], 4)
    default = args.work / "anew-default"
    shutil.copytree(out, default)
    full, wall, _ = cli("build-index", str(default), "--quiet", "--device", args.device, "--overwrite")
    rows.append(index_row("anew, default structure", full, wall))
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"summary": {
        "grown_recall": round(grown["recall"], 4), "anew_same_lists_recall_at_grown_setting": rows[-2]["recall_at_grown_setting"],
        "difference": round(grown["recall"] - rows[-2]["recall_at_grown_setting"], 4),
        "last_grow_wall_s": rows[-3]["wall_s"], "anew_default_wall_s": rows[-1]["wall_s"],
    }}))  # fmt: skip


if __name__ == "__main__":
    main()
