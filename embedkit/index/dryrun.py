"""`build-index --dry-run`: the plan a build would choose, and its phases' time extrapolated from
rates measured on this device; nothing is written."""

from __future__ import annotations

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
from .params import KMEANS_ITERATIONS
from .train import assign

DRY_RUN_SAMPLE = 65_536  # vectors read and assigned to measure this device


@dataclass(frozen=True)
class BuildPlan:
    """What `build-index --dry-run` found: the plan a build would choose and its phases' time
    extrapolated from rates measured on this device (`doc`, as `to_dict()` gives it)."""

    doc: dict

    def to_dict(self) -> dict:
        return dict(self.doc)

    def lines(self) -> list[str]:
        d, e, m = self.doc, self.doc["estimated_seconds"], self.doc["measured"]
        return [
            f"plan: {d['factory']} over {d['n']:,} x {d['dim']} on {d['device']}; train on {d['train_size']:,}; "
            f"index {d['index_bytes'] / 2**20:,.1f} MB, build memory {d['build_memory_bytes'] / 2**20:,.1f} MB",
            f"measured on {m['sample_vectors']:,} vectors: read {m['read_bytes_per_second'] / 2**20:,.0f} MB/s, "
            f"assignment {m['assign_flops'] / 1e9:,.1f} GFLOP/s",
            f"expected: read {e['read']:.1f} s, train {e['train']:.1f} s, add {e['add']:.1f} s; "
            f"about {d['estimated_total_seconds']:.0f} s in all (merge and tuning not included); nothing was written",
        ]  # fmt: skip


def dry_run_build(out: str | Path, cfg: IndexConfig) -> BuildPlan:
    """What `build-index` would do, and how long it should take here; writes nothing.

    The plan is the one a build would choose. Two rates are measured on this device: reading
    vectors sequentially from Lance, and nearest-centroid assignment (the training and add
    work) on a sample. The phases are extrapolated from them.
    """
    out = out_path(out)
    manifest = read_manifest(out)
    store = VectorStore(out)
    if manifest is None or not store.exists():
        raise EmbedkitError(f"{out} holds no vectors ({VECTORS_DIR} and embedkit.json); run `embedkit encode` first")
    b = plan_build(out, manifest, store, cfg, lambda msg: None)
    p = b.params
    t = time.perf_counter()
    first = read_shard(fragment_shards(b.ds, DRY_RUN_SAMPLE)[0][1])[:DRY_RUN_SAMPLE]
    read_rate = first.nbytes / max(time.perf_counter() - t, 1e-6)
    x = np.ascontiguousarray(first, dtype=np.float32)
    lists = max(1, min(p.nlist or 1, len(x)))
    centroids = x[np.random.default_rng(0).choice(len(x), size=lists, replace=False)]
    assign(x[:1], centroids, b.device, p.metric)  # warm: kernels, threads
    t = time.perf_counter()
    assign(x, centroids, b.device, p.metric)
    flops = len(x) * lists * p.dim * 2 / max(time.perf_counter() - t, 1e-6)
    bytes_per_vector = first.nbytes / max(1, len(first))
    seconds = {
        "read": p.n * bytes_per_vector / read_rate * 2,  # once for the training sample, once for the add
        "train": KMEANS_ITERATIONS * p.train_size * max(1, p.nlist) * p.dim * 2 / flops,
        "add": p.n * (max(1, p.nlist) + (256 if p.pq_m else 0)) * p.dim * 2 / flops,
    }
    return BuildPlan({
        "out": str(out), "factory": p.factory, "n": p.n, "dim": p.dim, "device": b.device, "train_size": p.train_size,
        "index_bytes": p.index_bytes, "build_memory_bytes": p.build_memory_bytes,
        "measured": {"sample_vectors": len(x), "read_bytes_per_second": read_rate, "assign_flops": flops},
        "estimated_seconds": {k: round(v, 3) for k, v in seconds.items()}, "estimated_total_seconds": round(sum(seconds.values()), 3),
    })  # fmt: skip
