"""Dry runs against the runs they predict: tokens and time, each command a fresh process.

For each case, `--dry-run` with OUT (a fresh CLI process, which leaves its prediction in OUT),
then the real command (another fresh process), then `embedkit status OUT --json`, which puts the
recorded prediction beside what the run took. Cases:

- encode: the pydocs corpus repeated to --docs documents, and --short-docs distinct short texts
  cut from it (bench_first_run's corpora);
- build-index: on the first encode's output;
- generate (summarize): the first --gen-docs pydocs documents.

Reported per case: predicted and real tokens, predicted and real seconds (the real run's process,
start to exit, as the CLI records it), the error of each, and the dry run's own cost (its process
wall) as a share of the predicted run.

    python benchmarks/bench_dry_run.py --corpus pydocs.parquet --model <MiniLM folder> --generator <SmolLM2 folder> \\
        --work /tmp/bdr [--device cuda] [--docs 1000000] [--short-docs 1000000] [--gen-docs 20000] [--only encode,index,generate]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_first_run import head, repeated, short_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> tuple[dict, float]:
    """`python -m embedkit.cli ARGS --json` in a new process: (its JSON, process wall seconds)."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "embedkit.cli", *args, "--json"], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"embedkit {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    try:
        return json.loads(p.stdout), wall  # status prints indented JSON
    except ValueError:
        return json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1]), wall


def case(name: str, dry: list[str], real: list[str], out: Path, index: bool = False) -> dict:
    """Dry run, real run, status: one row of the table."""
    d, dry_wall = cli(*dry)
    r, real_wall = cli(*real)
    status, _ = cli("status", str(out))
    c = (status.get("index") or {}).get("dry_run") if index else status.get("dry_run")
    predicted = d.get("expected_seconds", d.get("estimated_total_seconds"))
    row = {
        "case": name, "predicted_tokens": c.get("predicted_tokens") if c else None, "real_tokens": c.get("real_tokens") if c else None,
        "tokens_error": c.get("tokens_error") if c else None, "predicted_s": predicted, "real_s": c.get("real_seconds") if c else None,
        "seconds_error": c.get("seconds_error") if c else None, "real_wall_s": round(real_wall, 2), "dry_run_wall_s": round(dry_wall, 2),
        "dry_run_share": round(dry_wall / predicted, 3) if predicted else None,
        "real_marks": (status.get("manifest", {}).get("runs") or [{}])[-1].get("marks") if not index else None,
        "dry_run": d, "real": r,
    }  # fmt: skip
    print(json.dumps({k: v for k, v in row.items() if k not in ("dry_run", "real")}), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--generator", default=None, help="generate's --model (default: the default generator)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--short-docs", type=int, default=1_000_000)
    ap.add_argument("--gen-docs", type=int, default=20_000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_dry_run"))
    ap.add_argument("--only", default="encode,index,generate")
    ap.add_argument("--index-repeats", type=int, default=1, help="build-index cases in a row on the same vectors (the index removed before each)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    rows = []
    model = ["--model", args.model, "--device", args.device]
    pydocs_out = args.work / "out-pydocs"
    if "encode" in only or "index" in only:
        corpus = repeated(args.corpus, args.docs, args.work)
        shutil.rmtree(pydocs_out, ignore_errors=True)
        rows.append(case(f"encode pydocs x{args.docs:,}", ["encode", str(corpus), str(pydocs_out), "--dry-run", *model],
                         ["encode", str(corpus), str(pydocs_out), "-q", *model], pydocs_out))  # fmt: skip
    if "encode" in only and args.short_docs:
        corpus = short_corpus(args.corpus, args.short_docs, args.work)
        out = args.work / "out-short"
        shutil.rmtree(out, ignore_errors=True)
        rows.append(case(f"encode short texts x{args.short_docs:,}", ["encode", str(corpus), str(out), "--dry-run", *model],
                         ["encode", str(corpus), str(out), "-q", *model], out))  # fmt: skip
    for _ in range(args.index_repeats) if "index" in only else ():
        from embedkit.io.store import INDEX_DIR

        shutil.rmtree(pydocs_out / INDEX_DIR, ignore_errors=True)  # the real build varies run to run: one row per build
        device = ["--device", args.device]
        rows.append(case("build-index on the pydocs output", ["build-index", str(pydocs_out), "--dry-run", *device],
                         ["build-index", str(pydocs_out), "-q", *device], pydocs_out, index=True))  # fmt: skip
    if "generate" in only:
        corpus = head(args.corpus, args.gen_docs, args.work)
        out = args.work / "out-generate"
        shutil.rmtree(out, ignore_errors=True)
        gen = (["--model", args.generator] if args.generator else []) + ["--device", args.device]
        rows.append(case(f"generate summarize x{args.gen_docs:,}", ["generate", str(corpus), str(out), "--dry-run", *gen],
                         ["generate", str(corpus), str(out), "-q", *gen], out))  # fmt: skip
    print("\n| case | tokens predicted | real | error | seconds predicted | real (process) | error | dry run s | share of predicted |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def pct(e):
            return "–" if e is None else f"{100 * e:+.1f}%"

        tokens = f"{r['predicted_tokens']:,.0f} | {r['real_tokens']:,} | {pct(r['tokens_error'])}" if r["predicted_tokens"] else "– | – | –"
        print(f"| {r['case']} | {tokens} | {r['predicted_s']:,.1f} | {r['real_s'] or 0:,.1f} | {pct(r['seconds_error'])} | "
              f"{r['dry_run_wall_s']:,.1f} | {100 * (r['dry_run_share'] or 0):.0f}% |")  # fmt: skip
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
