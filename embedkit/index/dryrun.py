"""`build-index --dry-run`: the plan a build would choose, and its phases' time extrapolated from
rates measured on this device; nothing is written."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import IndexConfig
from ..errors import EmbedkitError
from ..io.objstore import out_path
from ..io.shards import read_manifest
from ..io.store import VECTORS_DIR, VectorStore
from .add import fragment_shards, read_shard
from .build import plan_build
from .io import quiet_stdout
from .params import (
    KMEANS_ITERATIONS,
    PQ_TRAIN_POINTS,
    SCAN_BYTES_PER_S_PER_CORE,
    WRITE_BYTES_PER_S,
    BuildRates,
    build_phases,
)
from .train import assign

DRY_RUN_SAMPLE = 65_536  # vectors read and assigned to measure this device


@dataclass(frozen=True)
class BuildPlan:
    """What `build-index --dry-run` found: the plan a build would choose and its phases' time
    from `params.build_phases` at rates measured on this device (`doc`, as `to_dict()` gives it)."""

    doc: dict

    def to_dict(self) -> dict:
        return dict(self.doc)

    def lines(self) -> list[str]:
        d, e, m = self.doc, self.doc["estimated_seconds"], self.doc["measured"]
        grow = f"; grows the index by {d['new_rows']:,} new vectors" if d.get("new_rows") is not None else ""
        share = f" ({100 * d['dry_run_seconds'] / d['estimated_total_seconds']:.0f}% of the predicted build)" if d["estimated_total_seconds"] else ""
        return [
            f"plan: {d['factory']} over {d['n']:,} x {d['dim']} on {d['device']}; train on {d['train_size']:,}; "
            f"index {d['index_bytes'] / 2**20:,.1f} MB, build memory {d['build_memory_bytes'] / 2**20:,.1f} MB{grow}",
            f"measured on {m['sample_vectors']:,} vectors: read {m['read_bytes_per_second'] / 2**20:,.0f} MB/s, "
            f"assignment {m['assign_flops'] / 1e9:,.1f} GFLOP/s, PQ training {m['pq_flops'] / 1e9:,.2f} GFLOP/s, "
            f"a vector by position {1e6 * m['take_seconds_per_row']:,.1f} us; tuning queries {m['queries_seconds']:.1f} s"
            + (f"; the quantizer's k-means {m['kmeans_seconds']:.1f} s" if m.get("kmeans_seconds") is not None else ""),
            "expected: " + ", ".join(f"{k} {v:.1f} s" for k, v in e.items()) + f"; about {d['estimated_total_seconds']:.0f} s in all",
            f"this dry run took {d['dry_run_seconds']:.1f} s{share}; "
            + (f"its prediction is left in {d['recorded']} for `embedkit status` to compare" if d.get("recorded") else "nothing was written"),
        ]  # fmt: skip


def dry_run_build(out: str | Path, cfg: IndexConfig) -> BuildPlan:
    """What `build-index` would do, and how long it should take here; writes only its prediction.

    The plan is the one a build would choose (growing the finished index after an append, when a
    build would). The rates of `params.build_phases` are measured on this device on a sample:
    reading vectors from Lance, nearest-centroid products, PQ codebook training, reading vectors
    by position; and the tuning queries are prepared as the build would (model load and encoding).
    """
    from ..run.record import PREDICTION, Clock, save_prediction

    clock = Clock()
    began = clock()
    out = out_path(out)
    manifest = read_manifest(out)
    store = VectorStore(out)
    if manifest is None or not store.exists():
        raise EmbedkitError(f"{out} holds no vectors ({VECTORS_DIR} and embedkit.json); run `embedkit encode` first")
    t = time.perf_counter()
    b = plan_build(out, manifest, store, cfg, lambda msg: None)
    planning = time.perf_counter() - t  # the build plans too
    p = b.params
    shards = fragment_shards(b.ds, DRY_RUN_SAMPLE)
    t = time.perf_counter()
    first = read_shard(shards[0][1])[:DRY_RUN_SAMPLE]
    read_rate = first.nbytes / max(time.perf_counter() - t, 1e-6)
    stream_rate = None
    if len(shards) > 1:  # the add's reads come after the first (which opens the dataset): the next shard's rate
        t = time.perf_counter()
        second = read_shard(shards[1][1])
        stream_rate = second.nbytes / max(time.perf_counter() - t, 1e-6)
    x = np.ascontiguousarray(first, dtype=np.float32)
    lists = max(1, min(p.nlist or 1, len(x)))
    centroids = x[np.random.default_rng(0).choice(len(x), size=lists, replace=False)]
    t = time.perf_counter()
    assign(x[:1], centroids, b.device, p.metric)  # warm: kernels, threads (a CUDA context: a fixed cost of the build too)
    planning += time.perf_counter() - t
    t = time.perf_counter()
    assign(x, centroids, b.device, p.metric)
    flops = len(x) * lists * p.dim * 2 / max(time.perf_counter() - t, 1e-6)
    stored = p.dim * 2 / max(1.0, first.nbytes / max(1, len(first)))  # bytes stored (float16) per byte read
    grow = b.growth is not None
    kmeans_s = _kmeans_seconds(x, p, b.device) if b.device.startswith("cuda") and not grow and p.ivfpq else None
    rates = BuildRates(read_rate * stored, flops, _pq_flops(x, p), WRITE_BYTES_PER_S, _take_seconds(b.ds),
                       SCAN_BYTES_PER_S_PER_CORE * (os.cpu_count() or 1), _queries_seconds(b), began + planning,
                       queries_overlap=b.device.startswith("cuda"), stream_bytes_per_s=stream_rate and stream_rate * stored,
                       kmeans_seconds=kmeans_s)  # fmt: skip
    new_rows = p.n - b.growth.n_old if b.growth is not None else None
    seconds = build_phases(p, rates, new_rows=new_rows, queries=cfg.queries)
    total = sum(seconds.values())
    save_prediction(out, "build-index", {"seconds": round(total, 2), "n": p.n, "factory": p.factory, "vectors_version": b.key["vectors_version"]})
    recorded = str(out / PREDICTION)
    return BuildPlan({
        "out": str(out), "factory": p.factory, "n": p.n, "dim": p.dim, "device": b.device, "train_size": p.train_size,
        "index_bytes": p.index_bytes, "build_memory_bytes": p.build_memory_bytes, "new_rows": new_rows,
        "measured": {"sample_vectors": len(x), "read_bytes_per_second": read_rate, "stream_bytes_per_second": stream_rate,
                     "assign_flops": flops, "kmeans_seconds": kmeans_s, "pq_flops": rates.pq_flops,
                     "take_seconds_per_row": rates.take_seconds_per_row, "queries_seconds": rates.queries_seconds},
        "estimated_seconds": {k: round(v, 3) for k, v in seconds.items()}, "estimated_total_seconds": round(total, 3),
        "dry_run_seconds": round(clock(), 2), "recorded": recorded,
    })  # fmt: skip


def _kmeans_seconds(x: np.ndarray, p, device: str) -> float:
    """The quantizer's k-means as the build runs it (faiss's driver, assignment on the GPU), at
    the build's shape: the sample repeated to the training size (the products do not care which
    rows), one and three iterations; their difference is an iteration's time, the rest the
    driver's set-up (the data moved to the device, its first centroids)."""
    from .train import kmeans

    tiled = np.resize(x, (p.train_size, x.shape[1]))
    runs = []
    for niter in (1, 3):
        t = time.perf_counter()
        kmeans(p.nlist, tiled, device, niter=niter)
        runs.append(time.perf_counter() - t)
    per_iteration = max(0.0, runs[1] - runs[0]) / 2
    return max(0.0, runs[0] - per_iteration) + KMEANS_ITERATIONS * per_iteration


def _pq_flops(x: np.ndarray, p) -> float:
    """The effective rate of faiss-cpu's PQ codebook training on this machine: a short training
    of the same sub-quantizers on as many points as the build trains them on (fewer ran the
    threads below their rate and read 10-60% slow on the H200 machine)."""
    import faiss

    if not p.pq_m or p.dim % p.pq_m:
        return 1e12
    points = x[: min(len(x), PQ_TRAIN_POINTS)]
    pq = faiss.ProductQuantizer(p.dim, p.pq_m, 8)
    pq.cp.niter = 2
    pq.cp.min_points_per_centroid = 1  # a sample smaller than faiss asks for: quiet, and still the same products
    t = time.perf_counter()
    with quiet_stdout():
        pq.train(np.ascontiguousarray(points))
    return 2 * len(points) * 256 * p.dim * 2 / max(time.perf_counter() - t, 1e-6)


def _take_seconds(ds) -> float:
    """Seconds per vector read by position, as the tuning's rerank reads them (sorted, scattered)."""
    n = ds.count_rows()
    positions = np.sort(np.random.default_rng(0).choice(n, size=min(n, 5_000), replace=False))
    t = time.perf_counter()
    ds.take(positions, columns=["vector"])
    return (time.perf_counter() - t) / max(1, len(positions))


def _queries_seconds(b) -> float:
    """The tuning queries' preparation as the build does it: cut from the input, the model
    loaded, encoded on the build's device (0 when a growing index keeps its queries)."""
    from .queries import choose_queries, encode_queries

    if b.growth is not None:
        return 0.0
    t = time.perf_counter()
    chosen = choose_queries(b.manifest, b.cfg.tune_queries, b.cfg.queries, b.cfg.seed)
    if chosen.texts is not None:
        encode_queries(chosen.texts, b.manifest, b.device)
    return time.perf_counter() - t
