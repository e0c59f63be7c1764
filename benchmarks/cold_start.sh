#!/usr/bin/env bash
# Is the first encode in a process slower than later ones, and why? Encodes the same corpus in
# fresh processes with the CLI, with and without embedkit's malloc tuning, and reports each
# process's wall time and page faults.
#   bash benchmarks/cold_start.sh CORPUS.parquet MODEL DOCS WORKDIR
set -euo pipefail
corpus=$1 model=$2 docs=$3 work=$4
mkdir -p "$work"
here=$(cd "$(dirname "$0")" && pwd)
python3 - "$corpus" "$docs" "$work" "$here" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from bench_encode import _corpora
full, _ = _corpora(Path(sys.argv[1]), int(sys.argv[2]), 1000, Path(sys.argv[3]))
print("corpus", full)
PY
for tuning in 0 1; do
  rm -rf "$work/out"
  EMBEDKIT_MALLOC_TUNING=$tuning python3 - "$work/corpus$docs.parquet" "$work/out" "$model" "$tuning" <<'PY'
import resource, subprocess, sys, time
corpus, out, model, tuning = sys.argv[1:]
t = time.perf_counter()
r = subprocess.run([sys.executable, "-m", "embedkit.cli", "encode", corpus, out, "--model", model, "--quiet", "--json"],
                   capture_output=True, text=True)
wall = time.perf_counter() - t
use = resource.getrusage(resource.RUSAGE_CHILDREN)
print(r.stdout.strip().splitlines()[-1] if r.returncode == 0 else r.stderr[-2000:])
print(f"malloc tuning {tuning}: process wall {wall:.1f} s, minor page faults {use.ru_minflt:,} (process and its workers), max RSS {use.ru_maxrss / 1e6:.1f} GB", flush=True)
PY
done
