"""`embedkit generate` as a user runs it: the CLI in fresh processes, each timed whole from outside.

Writes the first --docs rows of --corpus as a parquet file (ids d0, d1, ...), then runs
`embedkit generate FILE OUT --model MODEL -q --json` --rows times, each in a new Python process
started from a scratch working folder (so that the embedkit imported is the one on --code's
path, not a checkout in the working folder). Each row reports the process's wall seconds, the
run's own seconds after the model's load, new tokens/s over both, and the summary's phases and
decoder counters.

--code takes one or more embedkit source folders (the folder that holds `embedkit/`), rows
alternating between them, to compare two versions on one machine start:

    python benchmarks/bench_generate.py ... --model <folder>   # bench_generate.random_model makes a random-weights folder
    python benchmarks/bench_generate_cli.py --corpus pydocs.parquet --docs 60000 --model <folder> --rows 4 \
        --code .:/tmp/old --json results.json [--shard-rows 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

RUN = "import sys; from embedkit.cli import main; sys.argv = ['embedkit'] + sys.argv[1:]; main()"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="a parquet file with a text column")
    ap.add_argument("--docs", type=int, default=60_000)
    ap.add_argument("--model", required=True, help="a transformers folder (the default generator needs none)")
    ap.add_argument("--rows", type=int, default=2, help="processes per --code folder")
    ap.add_argument("--code", default=".", help="embedkit source folders, separated by ':', alternated row by row")
    ap.add_argument("--shard-rows", type=int, default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="embedkit-bench-cli-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"docs-{args.docs}.parquet"
    texts = pq.read_table(args.corpus, columns=["text"]).column("text").slice(0, args.docs)
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts}), src)
    codes = [str(Path(c).resolve()) for c in args.code.split(":")]
    rows = []
    for i in range(args.rows * len(codes)):
        code = codes[i % len(codes)] if (i // len(codes)) % 2 == 0 else codes[::-1][i % len(codes)]  # ABBA order
        rows.append(run_once(src, work / "out", code, args))
        r = rows[-1]
        print(f"{i + 1} {r['code']}: process {r['process_s']:.2f} s, run {r['seconds']:.2f} s, {r['new_tok_s_after_load']:,.0f} new tok/s "
              f"after the load, {r['new_tok_s_process']:,.0f} over the process; phases {r['phases']}", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"corpus": args.corpus, "docs": args.docs, "model": args.model, "shard_rows": args.shard_rows,
                                               "rows": rows}, indent=1))  # fmt: skip


def run_once(src: Path, out: Path, code: str, args) -> dict:
    """One `embedkit generate` process over src into a fresh out; its summary and wall seconds."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", RUN, "generate", str(src), str(out), "--model", args.model, "-q", "--json"]
    if args.shard_rows:
        cmd += ["--shard-rows", str(args.shard_rows)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([code, *filter(None, [os.environ.get("PYTHONPATH")])])}
    with tempfile.TemporaryDirectory() as scratch:  # `python -c` puts its working folder first on sys.path
        t = time.perf_counter()
        done = subprocess.run(cmd, env=env, cwd=scratch, capture_output=True, text=True)
        wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"embedkit generate failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    s = json.loads(done.stdout)
    return {"code": code, "process_s": wall, "seconds": s["seconds"], "new_tokens": s["new_tokens"],
            "new_tok_s_after_load": s["new_tokens"] / s["seconds"], "new_tok_s_process": s["new_tokens"] / wall,
            "phases": s["phases"], "decode": s.get("decode", {}), "collector": s.get("collector", {}), "docs": s["docs"], "shards_done": s["shards_done"]}  # fmt: skip


if __name__ == "__main__":
    main()
