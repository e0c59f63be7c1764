"""Index build: embedkit vs faiss-cpu's own train/add, same factory string, same threads, same data.

For each N: synthetic clustered unit vectors (a Gaussian mixture, normalized) are written as an
embedkit output (vectors.lance, float16, plus a manifest). Then, in this one process:

- embedkit: `build_index(out)`: train (GPU when present), add per shard, merge on disk, recall
  tuning. Seconds per phase from its report.
- faiss-cpu: `faiss.index_factory(d, <embedkit's factory>)`, `.train()` on a sample of the same
  size, `.add()` of the same vectors read from the same Lance dataset in 1M-row batches, with
  the same number of OpenMP threads.

Both indexes are then searched with plain faiss at embedkit's tuned nprobe (no rerank) on 1,000
fresh queries from the same mixture, against exact top-10 by brute force: recall@10 and QPS.
embedkit's full search (candidates + exact rerank from Lance) is measured too.

    python benchmarks/bench_index.py --n 1000000,10000000 --json results.json

`--real`: real embeddings instead. `real_corpus.py` gathers --n distinct real texts (pydocs
sentences, then the lines, comments and docstrings of the installed Python sources) and holds out
--queries of them; `embedkit encode` embeds the corpus with --model in a fresh process (its
seconds reported), and `build_index` builds as a user runs it (tuned on query-like texts from
the input). The queries are the held-out texts (half whole, half 3-12 word windows cut from
them), never seen by the build; recall@10 is measured against exact search over every stored
vector on the GPU and set beside the recall the build promised. The synthetic vectors stay a
speed-only row: their clusters make recall far easier than real embeddings'.

    python benchmarks/bench_index.py --real --n 10000000 --pydocs pydocs.parquet --model <MiniLM folder> --no-baseline
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="1000000", help="comma-separated vector counts")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--points-per-cluster", type=int, default=1000, help="mixture components = n / this")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-baseline", action="store_true", help="skip faiss-cpu (e.g. when it would take too long)")
    ap.add_argument("--baseline-add-rows", type=int, default=0,
                    help="time faiss-cpu's add on the first R rows only and scale it by N/R (add is per vector, so linear); "
                         "the baseline's recall is then not measured")  # fmt: skip
    ap.add_argument("--baseline-only", action="store_true",
                    help="only faiss-cpu, on the data and index an earlier run left in --work (embedkit's figures read "
                         "from that index's report): for machines whose commands cannot hold both")  # fmt: skip
    ap.add_argument("--baseline-deadline-s", type=float, default=0,
                    help="with --baseline-only: stop faiss-cpu's train after this many seconds of the whole baseline; "
                         "the train time is then a measured lower bound, with k-means' per-iteration time to scale")  # fmt: skip
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--real", action="store_true", help="real embeddings of --n distinct real texts (see above)")
    ap.add_argument("--pydocs", default=None, help="--real: pydocs.parquet, the first source of texts")
    ap.add_argument("--model", default="all-MiniLM-L6-v2", help="--real: the encoder")
    args = ap.parse_args()

    import faiss

    faiss.omp_set_num_threads(args.threads)  # the same threads for embedkit's faiss calls and the baseline
    work = Path(args.work or tempfile.mkdtemp(prefix="embedkit-bench-index-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(x) for x in args.n.split(",")):
        rows.append(bench_one(n, args, work))
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def bench_one(n: int, args, work: Path) -> dict:
    import embedkit
    from embedkit.index.io import load_index

    out = work / f"{'real' if args.real else 'out'}{n}"
    if args.baseline_only:
        return baseline_only(out, n, args)
    t = time.perf_counter()
    if args.real:
        n, queries, extra = make_real_output(out, n, args, work)
    else:
        mix = make_output(out, n, args.dim, max(1, n // args.points_per_cluster), args.device)
        queries, extra = mix.sample(np.random.default_rng(7), args.queries), {"data": "synthetic (speed only)"}
    gen_s = time.perf_counter() - t
    truth = exact_top(out, queries, 10, args.device)

    shutil.rmtree(out / "index", ignore_errors=True)
    t = time.perf_counter()
    report = embedkit.build_index(out, device=args.device, progress=False, log=lambda m: print(m, flush=True))
    ek_wall = time.perf_counter() - t
    row = {
        "n": n, "dim": args.dim, "threads": args.threads, "factory": report.factory, "device": report.device,
        "generate_s": round(gen_s, 1), "embedkit_wall_s": round(ek_wall, 2), "embedkit_phases_s": report.seconds,
        "embedkit_build_s": round(sum(v for k, v in report.seconds.items() if k != "tune"), 2), "embedkit_steps_s": report.steps,
        "nprobe": report.nprobe, "rerank": report.rerank, "embedkit_tuned_recall": report.recall,
        "tuned_on": report.tuning_queries, **extra,
    }  # fmt: skip
    index = load_index(out / "index")
    row["embedkit_recall_norerank"], row["embedkit_qps_norerank"] = search_stats(index, queries, truth, report.nprobe)
    retriever = embedkit.Retriever(out)
    retriever.search_vectors(queries[:10], 10)  # warm the mmap and the vector reader
    t = time.perf_counter()
    res = retriever.search_vectors(queries, 10)
    row["embedkit_qps_rerank"] = round(len(queries) / (time.perf_counter() - t), 1)
    row["embedkit_recall_rerank"] = recall(positions_of(out, res.ids), truth)
    print(json.dumps({k: v for k, v in row.items()}), flush=True)  # embedkit's figures, before the (long) baseline
    if not args.no_baseline:
        base = faiss_baseline(out, report.factory, report_train_size(n, report.factory), args)
        row.update(base["times"])
        if base["index"].ntotal == n:
            row["faiss_recall_norerank"], row["faiss_qps_norerank"] = search_stats(base["index"], queries, truth, report.nprobe)
        row["speedup_build"] = round(row["faiss_build_s"] / row["embedkit_build_s"], 1)
    return row


def make_real_output(out: Path, n: int, args, work: Path) -> tuple[int, np.ndarray, dict]:
    """An embedkit output of real texts, encoded by the CLI in a fresh process; the held-out
    queries (half whole texts, half word windows of them) encoded by the output's model."""
    import subprocess

    from real_corpus import build, write

    from embedkit.index.queries import encode_queries, pseudo_queries
    from embedkit.io.shards import read_manifest

    corpus, held = build(Path(args.pydocs) if args.pydocs else None, n, args.queries)
    path = work / f"real{n}.parquet"
    write(corpus, path, ids=False)  # ids are row numbers: the positions exact search returns
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "embedkit.cli", "encode", str(path), str(out), "--model", args.model, "--json", "--quiet"],
                       capture_output=True, text=True)  # fmt: skip
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    wall = time.perf_counter() - t
    encode = json.loads(p.stdout.strip().splitlines()[-1])
    half = len(held) // 2
    texts = held[:half] + pseudo_queries(held[half:], len(held) - half, seed=5)
    q = encode_queries(texts, read_manifest(out), args.device if args.device != "auto" else "auto").astype(np.float32)
    return len(corpus), q, {"data": "real", "texts": len(corpus), "queries": len(texts), "encode_wall_s": round(wall, 1),
                            "encode_tok_s": round(encode["tokens_per_second"]), "tokens": encode["tokens"]}  # fmt: skip


def positions_of(out: Path, ids: list) -> np.ndarray:
    """Row positions in vectors.lance of the Retriever's ids (integer row numbers of the input):
    the encoder writes each window's rows in length order, so an id is not its position."""
    import lance

    stored = lance.dataset(str(out / "vectors.lance")).to_table(columns=["id"]).column("id").to_numpy()
    pos = np.empty(int(stored.max()) + 1, np.int64)
    pos[stored] = np.arange(len(stored))
    return np.array([[pos[int(i)] for i in row] for row in ids])


def baseline_only(out: Path, n: int, args) -> dict:
    """faiss-cpu on the vectors and with the factory of an index embedkit built earlier in this --work.

    For builds a device command cannot hold (10M: faiss-cpu's train alone runs past its limit):
    the add is timed first, on R rows, into a copy of embedkit's trained, empty index (an IVF-PQ
    add costs the same whatever the centroids' values); then faiss-cpu's own train runs in a child
    process until it ends or the deadline passes, printing k-means' cumulative time per iteration.
    """
    params = json.loads((out / "index" / "params.json").read_text())["report"]
    if params["n"] != n:
        raise SystemExit(f"{out} holds an index of {params['n']} vectors, not {n}")
    row = {"n": n, "dim": args.dim, "threads": args.threads, "factory": params["factory"], "device": params["device"],
           "embedkit_phases_s": params["seconds"], "embedkit_build_s": round(sum(v for k, v in params["seconds"].items() if k != "tune"), 2),
           "embedkit_from": "an earlier process (--baseline-only)"}  # fmt: skip
    if not args.baseline_deadline_s:
        base = faiss_baseline(out, params["factory"], report_train_size(n, params["factory"]), args)
        row.update(base["times"])
        row["speedup_build"] = round(row["faiss_build_s"] / row["embedkit_build_s"], 1)
        return row
    start = time.perf_counter()
    row.update(timed_add(out, n, args.baseline_add_rows or 1_000_000))
    row.update(bounded_train(out, params["factory"], report_train_size(n, params["factory"]), args, start + args.baseline_deadline_s))
    low = row["faiss_read_sample_s"] + row["faiss_train_s"] + row["faiss_add_s"]
    key = "faiss_build_s" if row["faiss_train_finished"] else "faiss_build_at_least_s"
    row[key] = round(low, 2)
    row["speedup_build" if row["faiss_train_finished"] else "speedup_build_at_least"] = round(low / row["embedkit_build_s"], 1)
    if "faiss_train_iter_s" in row and not row["faiss_train_finished"]:
        est = row["faiss_read_sample_s"] + row["faiss_train_iter_s"] * row["faiss_train_iters_planned"] + row["faiss_add_s"]
        row["faiss_build_estimate_s"] = round(est, 1)  # k-means iterations cost the same each; PQ training not included
    return row


def timed_add(out: Path, n: int, rows: int) -> dict:
    """faiss-cpu's add of the first `rows` vectors into a copy of embedkit's trained index, scaled to n."""
    import faiss

    index = faiss.read_index(str(out / "index" / "trained.index"))
    assert index.ntotal == 0, "trained.index holds vectors"
    measured = add_prefix(index, out, rows)
    return {"faiss_add_measured_rows": int(index.ntotal), "faiss_add_measured_s": round(measured, 2),
            "faiss_add_s": round(measured * n / index.ntotal, 2), "faiss_add_into": "embedkit's trained index, faiss-cpu add"}  # fmt: skip


TRAIN_CHILD = """
import sys, time, numpy as np, faiss
faiss.omp_set_num_threads(int(sys.argv[3]))
x = np.load(sys.argv[1])
index = faiss.index_factory(x.shape[1], sys.argv[2])
ivf = faiss.extract_index_ivf(index)
ivf.verbose = True
ivf.cp.verbose = True
print(f"NITER {ivf.cp.niter}", flush=True)
t = time.perf_counter()
index.train(x)
print(f"\\nTRAINED {time.perf_counter() - t:.3f}", flush=True)
"""


def bounded_train(out: Path, factory: str, train_size: int, args, deadline: float) -> dict:
    """faiss-cpu's index.train on the baseline's sample, in a child process stopped at the deadline."""
    import re
    import subprocess
    import threading

    sample, read_s = baseline_sample(out, train_size)
    path = out / "baseline-sample.npy"
    np.save(path, sample)
    del sample
    child = subprocess.Popen([sys.executable, "-c", TRAIN_CHILD, str(path), factory, str(args.threads)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    lines: list[str] = []

    def pump() -> None:  # k-means ends its iteration lines with \r: split on both
        buf = b""
        for chunk in iter(lambda: child.stdout.read1(4096), b""):
            buf += chunk
            *done, buf = re.split(rb"[\r\n]", buf)
            for line in (d.decode(errors="replace").strip() for d in done):
                if line:
                    lines.append(line)
                    print(f"  faiss-cpu train: {line}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    t = time.perf_counter()
    reader.start()
    try:
        child.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    elapsed = time.perf_counter() - t
    reader.join(timeout=5)
    path.unlink(missing_ok=True)
    if child.returncode not in (0, -9):
        raise SystemExit(f"faiss-cpu's train failed (exit {child.returncode}): {lines[-1] if lines else 'no output'}")
    result = {"faiss_read_sample_s": round(read_s, 2), "faiss_train_sample": int(train_size)}
    done = [float(m.group(1)) for m in (re.match(r"TRAINED ([\d.]+)", x) for x in lines) if m]
    result["faiss_train_finished"] = bool(done)
    result["faiss_train_s"] = round(done[0] if done else elapsed, 2)  # unfinished: a lower bound (incl. the child's start)
    iters = [(int(m.group(1)), float(m.group(2))) for m in (re.match(r"Iteration (\d+) \(([\d.]+) s", x) for x in lines) if m]
    niter = [int(x.split()[1]) for x in lines if x.startswith("NITER ")]
    if len(iters) >= 2:
        (i0, t0), (i1, t1) = iters[0], iters[-1]
        result.update(faiss_train_iters_done=i1 + 1, faiss_train_iter_s=round((t1 - t0) / max(1, i1 - i0), 2),
                      faiss_train_iters_planned=niter[0] if niter else None)  # fmt: skip
    print(f"faiss-cpu train {'finished' if done else 'stopped at the deadline'}: {result}", flush=True)
    return result


def report_train_size(n: int, factory: str) -> int:
    import re

    from embedkit.index.params import PQ_TRAIN_POINTS, TRAIN_POINTS_PER_LIST

    nlist = int(re.search(r"IVF(\d+)", factory).group(1))
    return min(n, max(TRAIN_POINTS_PER_LIST * nlist, PQ_TRAIN_POINTS))


class Mixture:
    """Clustered unit vectors with a low intrinsic dimension, as sentence embeddings have.

    Points are drawn from a Gaussian mixture in a `latent`-dimensional space, mapped to `dim`
    dimensions by a fixed random linear map, given a little isotropic noise and normalized.
    (An isotropic mixture in all 384 dimensions would make every neighbor within a cluster
    nearly equidistant: a worst case for any quantizer, and unlike real embeddings.)
    """

    def __init__(self, dim: int, clusters: int, latent: int = 24, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.centers = (rng.standard_normal((clusters, latent), dtype=np.float32) * 2.0).astype(np.float32)
        self.map = (rng.standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent)).astype(np.float32)
        self.dim = dim

    def sample_fast(self, seed: int, n: int, device: str) -> np.ndarray:
        """The same distribution drawn with torch (on the GPU when there is one): numpy's
        single-threaded generator would take minutes for 10M x 384."""
        import torch

        dev = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
        g = torch.Generator(device=dev).manual_seed(seed)
        centers, mapping = torch.from_numpy(self.centers).to(dev), torch.from_numpy(self.map).to(dev)
        which = torch.randint(0, len(centers), (n,), generator=g, device=dev)
        z = centers[which] + torch.randn((n, centers.shape[1]), generator=g, device=dev)
        x = z @ mapping + torch.randn((n, self.dim), generator=g, device=dev) * (0.1 / self.dim**0.5)
        return torch.nn.functional.normalize(x, dim=1).half().cpu().numpy()

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        which = rng.integers(0, len(self.centers), n)
        z = self.centers[which] + rng.standard_normal((n, self.centers.shape[1]), dtype=np.float32)
        x = z @ self.map + rng.standard_normal((n, self.dim), dtype=np.float32) * (0.1 / np.sqrt(self.dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_output(out: Path, n: int, dim: int, clusters: int, device: str) -> Mixture:
    """An embedkit output of n synthetic float16 vectors with int64 ids 0..n-1; returns the mixture."""
    import pyarrow as pa

    from embedkit.io.shards import write_manifest
    from embedkit.io.store import VectorStore, vectors_schema, vectors_table

    mix = Mixture(dim, clusters)
    if (out / "vectors.lance").exists() and VectorStore(out).dataset().count_rows() == n:
        return mix
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    schema = vectors_schema(pa.int64(), dim, "float16")
    store = VectorStore(out)
    store.create(schema)
    chunk = 1_000_000
    for i, start in enumerate(range(0, n, chunk)):
        m = min(chunk, n - start)
        x = mix.sample_fast(100 + i, m, device)
        table = vectors_table(schema, pa.array(np.arange(start, start + m)), x, np.zeros(m, np.int32), np.zeros(m, bool))
        store.commit_shard(i, table)
    write_manifest(out, {
        "embedkit_version": "bench", "model": {"name": "synthetic", "dim": dim, "max_seq_length": 0, "pooling": "none", "weights_sha256": ""},
        "output": {"dtype": "float16", "normalize": True, "keep_empty": False}, "input": {"kind": "synthetic"},
        "plan": {"rows": n, "shard_rows": chunk, "shards": -(-n // chunk)},
    })  # fmt: skip
    return mix


def batches(out: Path, rows: int = 1_000_000):
    import lance

    from embedkit.index.io import vectors_of

    ds = lance.dataset(str(out / "vectors.lance"))
    for batch in ds.to_batches(columns=["vector"], batch_size=rows):
        yield vectors_of(batch).astype(np.float32)


def exact_top(out: Path, q: np.ndarray, k: int, device: str) -> np.ndarray:
    """Exact top-k row positions by inner product, streaming the vectors once."""
    import torch

    dev = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    qt = torch.from_numpy(q).to(dev)
    best_s = torch.full((len(q), k), -float("inf"), device=dev)
    best_i = torch.zeros((len(q), k), dtype=torch.int64, device=dev)
    start = 0
    for x in batches(out):
        s = qt @ torch.from_numpy(x).to(dev).T
        top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)
        cat_s, cat_i = torch.cat([best_s, top_s], 1), torch.cat([best_i, top_i + start], 1)
        order = cat_s.topk(k, dim=1).indices
        best_s, best_i = cat_s.gather(1, order), cat_i.gather(1, order)
        start += len(x)
    return best_i.cpu().numpy()


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return round(float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())])), 4)


def search_stats(index, q: np.ndarray, truth: np.ndarray, nprobe: int) -> tuple[float, float]:
    import faiss

    faiss.extract_index_ivf(index).nprobe = nprobe
    index.search(q[:10], 10)
    t = time.perf_counter()
    _, found = index.search(q, 10)
    qps = len(q) / (time.perf_counter() - t)
    return recall(found, truth), round(qps, 1)


def faiss_baseline(out: Path, factory: str, train_size: int, args) -> dict:
    """faiss-cpu's own train and add: the same factory, sample size, data and threads."""
    import faiss
    import lance

    n = lance.dataset(str(out / "vectors.lance")).count_rows()
    sample, read_s = baseline_sample(out, train_size)
    index = faiss.index_factory(args.dim, factory)
    t = time.perf_counter()
    index.train(sample)
    train_s = time.perf_counter() - t
    print(f"faiss-cpu train: {train_s:.1f} s on {len(sample):,} vectors", flush=True)
    add_s = add_prefix(index, out, args.baseline_add_rows or n)
    times = {"faiss_read_sample_s": round(read_s, 2), "faiss_train_s": round(train_s, 2), "faiss_add_s": round(add_s, 2)}
    if index.ntotal < n:  # measured on a prefix: scaled to all rows
        times.update(faiss_add_measured_rows=int(index.ntotal), faiss_add_measured_s=round(add_s, 2))
        add_s *= n / index.ntotal
        times["faiss_add_s"] = round(add_s, 2)
    times["faiss_build_s"] = round(read_s + train_s + add_s, 2)
    print(f"faiss-cpu {factory}: {times}", flush=True)
    return {"index": index, "times": times}


def baseline_sample(out: Path, train_size: int) -> tuple[np.ndarray, float]:
    """The baseline's training sample (embedkit's sampler and seed, the size embedkit trains on)
    and seconds to read it."""
    import lance

    from embedkit.index.build import sample_positions
    from embedkit.index.io import read_rows

    ds = lance.dataset(str(out / "vectors.lance"))
    positions = sample_positions(ds.count_rows(), train_size, 1234)
    t = time.perf_counter()
    sample = read_rows(ds, positions)
    return sample, time.perf_counter() - t


def add_prefix(index, out: Path, rows: int) -> float:
    """faiss-cpu's add of the first `rows` vectors, in the script's 1M-row batches; seconds taken."""
    t = time.perf_counter()
    for x in batches(out):
        if index.ntotal >= rows:
            break
        index.add(x[: rows - index.ntotal])
        print(f"faiss-cpu add: {index.ntotal:,} rows in {time.perf_counter() - t:.1f} s", flush=True)
    return time.perf_counter() - t


def print_table(rows: list[dict], args) -> None:
    print()
    if args.baseline_only:
        for r in rows:
            at_least = "" if r.get("faiss_train_finished", True) else ">= "
            build = r.get("faiss_build_s", r.get("faiss_build_at_least_s"))
            speed = r.get("speedup_build", r.get("speedup_build_at_least"))
            print(f"| {r['n']:,} | {r['factory']} | embedkit build {r['embedkit_build_s']:.1f} s ({r['embedkit_from']}) | faiss-cpu train "
                  f"{at_least}{r['faiss_train_s']:.1f} s, add {r['faiss_add_s']:.1f} s, build {at_least}{build:.1f} s | {at_least}{speed}x |")  # fmt: skip
        return
    print(f"| N | data | factory | device | embedkit train / add / merge s | embedkit build s | faiss-cpu train / add s | faiss-cpu build s | speed-up | nprobe | recall@10 embedkit / faiss (no rerank) | recall@10 embedkit with rerank {rows[0]['rerank'] if rows else ''} | promised recall@10 | QPS embedkit / faiss / with rerank |")
    print("|---" * 14 + "|")
    for r in rows:
        p = r["embedkit_phases_s"]
        fb = f"{r.get('faiss_train_s', float('nan')):.1f} / {r.get('faiss_add_s', float('nan')):.1f}"
        print(
            f"| {r['n']:,} | {r.get('data', 'synthetic')} | {r['factory']} | {r['device']} | {p['train']:.1f} / {p['add']:.1f} / {p['merge']:.1f} | {r['embedkit_build_s']:.1f} "
            f"| {fb} | {r.get('faiss_build_s', float('nan')):.1f} | {r.get('speedup_build', float('nan'))}x | {r['nprobe']} "
            f"| {r['embedkit_recall_norerank']:.3f} / {r.get('faiss_recall_norerank', float('nan')):.3f} | {r['embedkit_recall_rerank']:.3f} "
            f"| {r['embedkit_tuned_recall']:.3f} "
            f"| {r['embedkit_qps_norerank']:,.0f} / {r.get('faiss_qps_norerank', float('nan')):,.0f} / {r['embedkit_qps_rerank']:,.0f} |"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
