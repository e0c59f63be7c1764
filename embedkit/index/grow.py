"""Growing a finished index after `encode --append`: only the new rows are added.

An index can grow when the vectors it was built on are still the first rows of the vectors
now: the same Lance data files, in the same fragments, with the same row counts (an append
adds fragments after them; a compaction, a deletion or a rewrite does not keep them, and the
index is then built anew). The trained quantizer and the tuning queries are kept; the new
rows are added as shards at positions continuing the old ones; the old on-disk lists and
the new shards are merged into a staging folder; the index is retuned against the exact
top-k of the old build (kept as `truth.npz`) combined with the new shards' blocks.

It is trained anew instead when the new rows are more than `IndexConfig.max_growth` of the
total, or when they fit the trained lists worse than the rows it was trained for (the drift:
mean squared distance to the nearest coarse centroid, new rows over held-out old rows, above
`IndexConfig.drift_limit`, default 1.25), or with `--retrain`.

The swap is crash-safe: the grown files and their params.json are complete in `grow/` before
any of them replaces an old one, and a build that finds `grow/params.json` finishes the swap
before anything else.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..digest import lance_files_digest
from ..io.store import injected_kill
from .io import read_for_build, read_rows
from .state import GROW, IVFDATA, MERGED, PARAMS, TRAINED, TRUTH

DRIFT_SAMPLE = 10_000  # rows of each side whose distance to the lists is compared
# the key entries a grown index must share with the one it grows (else the kept queries,
# truth and quantizer belong to another build)
SAME = ("dim", "factory", "metric", "seed", "queries", "k", "tune_queries", "tuning", "shard_rows")


@dataclass(frozen=True)
class Growth:
    """An index that can grow: the old rows are the first `n_old` of `fragments` fragments."""

    n_old: int
    fragments: int  # how many leading fragments the old index covers
    trained_on: int  # rows there were when its quantizer was trained (its training sample was drawn from them)
    drift: float | None = None  # new rows' assignment cost over the old rows' (None: not measured)


def grown_prefix(previous: dict | None, ds: Any) -> Growth | None:
    """The Growth when `previous` (a finished params.json) indexes the first rows of `ds`
    unchanged and was built by embedkit's own trainer; None otherwise."""
    if not previous or not isinstance(previous.get("params"), dict) or "fragments" not in previous:
        return None  # an index from before growth was recorded, or a custom --factory
    if previous["params"].get("custom") or not (previous["params"].get("nlist") and previous["params"].get("pq_m")):
        return None
    count, n_old = int(previous["fragments"]), int(previous["key"]["n"])
    fragments = ds.get_fragments()
    if len(fragments) < count or sum(f.count_rows() for f in fragments[:count]) != n_old:
        return None
    if lance_files_digest(ds, fragments[:count]) != previous["key"].get("vectors_files"):
        return None
    return Growth(n_old, count, int(previous.get("trained_on", n_old)))


def compatible(previous_key: dict, key: dict) -> bool:
    """The options of the kept build are the options of this one."""
    return all(previous_key.get(name) == key.get(name) for name in SAME)


def measure_drift(folder: Path, ds: Any, growth: Growth, train_positions: np.ndarray, seed: int) -> float:
    """Mean squared distance of new rows to their nearest coarse centroid, over that of the rows
    the quantizer was trained for: those of its training build it did not train on, or its
    training rows when it trained on nearly all of them. Rows added by earlier growths are not
    the reference, so drift that comes a little at a time still adds up."""
    trained = read_for_build(folder / TRAINED)
    n = ds.count_rows()
    rng = np.random.default_rng(seed + 2)
    held_out = np.setdiff1d(np.arange(growth.trained_on), train_positions, assume_unique=True)
    old_pool = held_out if len(held_out) >= 1_000 else train_positions
    old = np.sort(rng.choice(old_pool, size=min(DRIFT_SAMPLE, len(old_pool)), replace=False))
    new = np.sort(rng.choice(np.arange(growth.n_old, n), size=min(DRIFT_SAMPLE, n - growth.n_old), replace=False))
    return float(_list_distance(trained, read_rows(ds, new)) / max(_list_distance(trained, read_rows(ds, old)), 1e-12))


def _list_distance(trained: Any, x: np.ndarray) -> float:
    """Mean squared distance of rows to the centroid of the list they would be added to."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if isinstance(trained, faiss.IndexPreTransform):  # OPQ: the lists are in the rotated space
        for i in range(trained.chain.size()):
            x = trained.chain.at(i).apply(x)
    ivf = faiss.extract_index_ivf(trained)
    _, lists = ivf.quantizer.search(x, 1)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    return float(((x - centroids[lists.ravel()]) ** 2).sum(1).mean())


def finish_swap(folder: Path) -> bool:
    """Finish a grown index's swap that a kill interrupted (see the module's docstring):
    True when there was one."""
    staged = folder / GROW
    if not (staged / PARAMS).exists():
        shutil.rmtree(staged, ignore_errors=True)  # an unfinished merge: redone from the shards
        return False
    for name in (IVFDATA, MERGED, TRUTH, PARAMS):  # params.json last: it marks the index complete
        if (staged / name).exists():
            os.replace(staged / name, folder / name)
            injected_kill("swap", [0])
    shutil.rmtree(staged, ignore_errors=True)
    return True
