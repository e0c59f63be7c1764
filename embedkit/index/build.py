"""build_index(): OUT/vectors.lance -> OUT/index/, streaming, resumable, recall-tuned.

Phases, each resumable from files under OUT/index/:

1. train   a sample of the vectors -> `trained.index` (trained, empty).
2. add     the vectors, a shard of whole Lance fragments at a time -> `shards/shard-NNNNNN.index`.
           On CUDA, coarse assignment and PQ encoding run as torch matrix products and the codes
           go into the index with `add_sa_codes`; on CPU faiss adds them itself. Each shard also
           keeps the exact top-k of the held-out queries among its vectors (the ground truth).
3. merge   all shards -> `merged.index` + `merged.ivfdata` (on-disk inverted lists,
           `faiss.contrib.ondisk.merge_ondisk`); every position 0..n-1 must appear exactly once.
4. tune    recall@k of the whole search (IVF-PQ candidates, exact rerank) against exact search,
           for growing nprobe and rerank depth; the smallest that reach the target win.
5. commit  `params.json` (parameters, tuning, checksums, the vectors version) is written last:
           an index is complete exactly when it exists.

Faiss ids are row positions in the pinned version of vectors.lance (fragments in order). This
module holds the API, the resume state, train, tune and commit; the add phase's mechanics are in
`add.py`, the merge in `merge.py`, and growing a finished index after `encode --append` (only the
new rows added, into the kept quantizer) in `grow.py`.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import IndexConfig, RunOptions
from ..errors import EmbedkitError
from ..fsutil import atomic_file
from ..io.objstore import ObjectPath, out_path
from ..io.shards import OutputLock, read_manifest, stored_dim
from ..io.store import VECTORS_DIR, VectorStore
from ..run.progress import Progress, Stopwatch
from ..run.record import marks, run_wall, start_run, take_prediction
from ..version import __version__
from .add import ShardSpec, device_codec, fragment_shards, index_shard_task, read_shard, write_shard
from .grow import Growth, compatible, finish_swap, grown_prefix, measure_drift
from .io import load_index, read_for_build, read_rows, vector_dim, write_index
from .merge import merge_shards
from .params import BUILD_SHARD_ROWS, IndexParams, build_phases, choose_params, default_rates
from .queries import choose_queries, encode_queries
from .remote import fetch, index_folder, publish
from .state import (
    GROW,
    INDEX_DIR,
    IVFDATA,
    MERGED,
    PARAMS,
    QUERIES,
    SHARDS,
    STATE,
    TRAINED,
    TRUTH,
    file_sha256,
    index_damage,
    params_problem,
    read_json,
    vectors_identity,
    write_json,
)
from .train import train_custom, train_ivfpq

# in the build key: an index tuned before query-like tuning queries is rebuilt once
SAMPLE_RUN = 64  # rows read together when sampling vectors for training (see sample_positions)
TUNING_VERSION = 2


@dataclass(frozen=True)
class IndexReport:
    """What build_index did or found: parameters, tuning, seconds per phase, sizes."""

    out: str
    factory: str
    n: int
    dim: int
    metric: str
    nprobe: int
    rerank: int
    k: int
    recall: float
    target_recall: float
    recall_table: list = field(default_factory=list)  # [{"nprobe", "rerank", "recall"}], on the tuning queries
    recall_stored_rows: float | None = None  # at the same nprobe and rerank, on held-out stored rows
    tuning_queries: str = "stored rows"  # what the recall was measured on (index/queries.py SOURCES)
    tuning_count: int = 0
    seconds: dict = field(default_factory=dict)  # phase -> seconds
    steps: dict = field(default_factory=dict)  # "phase.step" -> seconds, inside the phases (where the time goes)
    bytes: dict = field(default_factory=dict)  # file -> size
    vectors_version: int = 0
    device: str = "cpu"
    shards_total: int = 0
    shards_resumed: int = 0
    up_to_date: bool = False  # nothing was built: the index already matched the vectors
    grown_from: int = 0  # vectors the index held before it grew (0: built anew)
    drift: float | None = None  # the new rows' distance to their lists over the old rows' (grown indexes)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        if self.up_to_date:
            return [f"index of {self.out} is up to date ({self.factory}, recall@{self.k} {self.recall:.3f} at nprobe {self.nprobe})"]
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        met = "" if self.recall >= self.target_recall else f" (below the {self.target_recall} target)"
        stored = "" if self.recall_stored_rows is None or self.tuning_queries.startswith("stored rows") else (
            f" ({self.recall_stored_rows:.3f} on stored rows)")
        what = f"{self.factory} over {self.n:,} vectors" if not self.grown_from else (
            f"{self.factory} grown from {self.grown_from:,} to {self.n:,} vectors (drift {self.drift:.2f})")
        return [
            f"{what} on {self.device}: {phases}; "
            f"recall@{self.k} {self.recall:.3f}{met} on {self.tuning_count:,} {self.tuning_queries}{stored} "
            f"at nprobe {self.nprobe}, rerank {self.rerank}; {sum(self.bytes.values()) / 1e6:,.1f} MB"
        ]


def build_index(
    out: str | Path,
    *,
    nlist: int | None = None,
    pq_m: int | None = None,
    opq: bool | None = None,
    factory: str | None = None,
    memory_budget: int | None = None,
    target_recall: float = 0.95,
    device: str = "auto",
    shard_rows: int | None = None,
    k: int = 10,
    queries: int = 1_000,
    seed: int = 1234,
    tune_queries: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    ray: str | None = None,
    reissue: bool = True,
    retrain: bool = False,
    max_growth: float = 0.5,
    drift_limit: float = 1.25,
) -> IndexReport:
    """Build (or resume building) the IVF-PQ index of OUT/vectors.lance into OUT/index/.

    After `encode --append`, a finished index grows: only the new rows are added to its trained
    quantizer, unless they are more than `max_growth` of all rows, or lie more than `drift_limit`
    times farther from their lists than the old rows, or `retrain` is set.

    >>> report = embedkit.build_index("out/")            # doctest: +SKIP
    >>> report.recall, report.nprobe                      # doctest: +SKIP
    """
    cfg = IndexConfig(
        nlist=nlist, pq_m=pq_m, opq=opq, factory=factory, memory_budget=memory_budget, target_recall=target_recall,
        device=device, shard_rows=shard_rows, k=k, queries=queries, seed=seed, retrain=retrain, max_growth=max_growth, drift_limit=drift_limit,
        tune_queries=str(tune_queries) if tune_queries is not None else None,
        run=RunOptions(overwrite=overwrite, progress=progress, ray=ray, reissue=reissue),
    )  # fmt: skip
    return run_build(out, cfg, log or (lambda msg: None))


@dataclass
class Build:
    """A build's plan once OUT is validated: the parameters, the device, the pinned vectors and
    the key a finished index must match."""

    out: Path
    dir: Path
    params: IndexParams
    device: str
    ds: Any  # lance dataset at the pinned version
    key: dict
    cfg: IndexConfig
    log: Callable[[str], None]
    manifest: dict = field(default_factory=dict)  # the output's: its model encodes the tuning queries
    growth: Growth | None = None  # set when the finished index grows by the new rows only
    previous: dict | None = None  # the finished index's params.json when the build was planned
    damage: str | None = None  # what is wrong with that index's files (checked once: merged.index is hashed)

    @property
    def target(self) -> Path:
        """Where the merge writes: OUT/index, or its staging folder when the index grows."""
        return self.dir if self.growth is None else self.dir / GROW


def run_build(out: str | Path, cfg: IndexConfig, log: Callable[[str], None]) -> IndexReport:
    """build_index() with a ready IndexConfig."""
    start_run()
    out = out_path(out)
    manifest = read_manifest(out)
    store = VectorStore(out)
    if manifest is None or not store.exists():
        raise EmbedkitError(f"{out} holds no vectors ({VECTORS_DIR} and embedkit.json); run `embedkit encode` first")
    with OutputLock(out):
        _require_finished_encode(out, store, manifest)
        folder = fetch(out)  # OUT/index, or its local stand-in for an output on object storage
        if finish_swap(folder):
            log("finished swapping in the grown index an earlier build left")
        b = plan_build(out, manifest, store, cfg, log, folder)
        try:
            report = _finished(b) or _build(b)
            publish(out, folder)
            return report
        except (OSError, RuntimeError) as e:  # a full disk, a read-only folder (faiss raises RuntimeError)
            raise EmbedkitError(f"cannot write {b.dir}: {_write_reason(e)}; what was finished is kept: free space (or fix "
                                "the folder) and rerun build-index to resume") from None  # fmt: skip


def _write_reason(e: BaseException) -> str:
    """The operating system's words for a failed write, from an OSError or faiss's RuntimeError."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    for words in ("No space left on device", "File too large", "Permission denied", "Read-only file system"):
        if words.lower() in text.lower():
            return words
    return (text.strip().splitlines() or [type(e).__name__])[0][:200]


def _require_finished_encode(out: Path, store: VectorStore, manifest: dict) -> None:
    """An index over a half-encoded output would be stale as soon as the encode resumes.
    Called under the output lock, so a killed encode's last commit is settled first."""
    planned = int(manifest.get("plan", {}).get("shards", 0))
    store.reconcile()
    done = len(store.committed_shards())
    if done < planned:
        raise EmbedkitError(f"{out} is not fully encoded ({done} of {planned} shards); rerun the encode command first")


def plan_build(out: Path, manifest: dict, store: VectorStore, cfg: IndexConfig, log: Callable[[str], None], folder: Path | None = None) -> Build:
    """The plan of a build (or a dry run) of OUT's vectors at their latest version; `folder`:
    where the index is built (default OUT/index, or its local stand-in, see remote.py)."""
    from ..engine.encoder import choose_device

    folder = folder or index_folder(out)
    ds = store.dataset()
    n, dim = ds.count_rows(), stored_dim(manifest)
    stored = vector_dim(ds.schema)
    if stored != dim:
        raise EmbedkitError(f"{out}/embedkit.json says dim {dim} but {VECTORS_DIR} holds {stored}-dimensional vectors; "
                            "the manifest was edited: restore it or encode again with --overwrite")  # fmt: skip
    metric = "l2" if manifest["output"]["normalize"] else "ip"  # on unit vectors L2 ranks as cosine
    budget = cfg.memory_budget or _default_budget()
    params = choose_params(n, dim, memory_budget=budget, nlist=cfg.nlist, pq_m=cfg.pq_m, opq=cfg.opq, factory=cfg.factory, metric=metric)
    previous = read_json(folder / PARAMS)
    # hashed once per build: at 1B vectors merged.index is hundreds of MB, and both the growth
    # decision and the up-to-date check need the answer
    damage = index_damage(folder, previous) if previous is not None and params_problem(previous) is None else None
    kept = _kept_index(folder, ds, params, cfg, previous, damage)
    if kept is not None:  # the finished index's structure stays: it grows, or it is current
        params = replace(IndexParams(**kept[0]["params"]), n=n)
    device = choose_device(cfg.device, "auto").device
    gpu = device.startswith("cuda")
    key = {
        "vectors_version": int(ds.version), "vectors_files": vectors_identity(ds), "n": n, "dim": dim, "factory": params.factory, "metric": metric,
        "shard_rows": cfg.shard_rows or BUILD_SHARD_ROWS, "seed": cfg.seed, "queries": cfg.queries, "k": cfg.k,
        "tune_queries": str(Path(cfg.tune_queries).resolve()) if cfg.tune_queries else None, "tuning": TUNING_VERSION,
    }  # fmt: skip
    growth = None
    if kept is not None and kept[1].n_old < n and compatible(kept[0]["key"], key):
        growth = _growth_decision(folder, ds, n, kept, cfg, log)
        if growth is None:  # trained anew: the structure is chosen for the rows there are now
            params = choose_params(n, dim, memory_budget=budget, nlist=cfg.nlist, pq_m=cfg.pq_m, opq=cfg.opq, metric=metric)
            key["factory"] = params.factory
    rates = default_rates(gpu=gpu, cores=os.cpu_count() or 1)
    expected = sum(build_phases(params, rates, new_rows=n - growth.n_old if growth else None, queries=cfg.queries).values())
    log(f"index plan: {params.describe()}; memory budget {budget / 2**30:.1f} GB; expected build ~{expected:.0f} s on {device} "
        "(the model of --dry-run at default rates; --dry-run measures this machine)")  # fmt: skip
    return Build(out, folder, params, device, ds, key, cfg, log, manifest, growth, previous, damage)


def _kept_index(folder: Path, ds: Any, params: IndexParams, cfg: IndexConfig, previous: dict | None,
                damage: str | None) -> tuple[dict, Growth] | None:  # fmt: skip
    """(params.json, Growth) of the finished index when its rows are still the first rows of the
    vectors and nothing asks for a new structure (--overwrite, another --factory, --nlist, ...).
    `previous`: its params.json; `damage`: index_damage's answer for it."""
    if cfg.run.overwrite or previous is None or params_problem(previous) or damage is not None:
        return None
    if not ((folder / TRUTH).exists() and (folder / QUERIES).exists() and (folder / TRAINED).exists()):
        return None
    growth = grown_prefix(previous, ds)
    if growth is None or cfg.factory:
        return None
    chosen = (cfg.nlist, cfg.pq_m, cfg.opq) != (None, None, None)
    return None if chosen and params.factory != previous["key"]["factory"] else (previous, growth)


def _growth_decision(folder: Path, ds: Any, n: int, kept: tuple[dict, Growth], cfg: IndexConfig,
                     log: Callable[[str], None]) -> Growth | None:  # fmt: skip
    """Grow the kept index, or train anew (None): past --max-growth, on drift, or with --retrain."""
    previous, growth = kept
    new, share = n - growth.n_old, (n - growth.n_old) / n
    if cfg.retrain:
        log(f"--retrain: training the index anew on all {n:,} vectors ({new:,} new)")
        return None
    if share > cfg.max_growth:
        log(f"{share:.0%} of the vectors are new, more than --max-growth {cfg.max_growth:.0%}: training the index anew")
        return None
    trained_on = sample_positions(growth.trained_on, int(previous["params"]["train_size"]), cfg.seed)
    drift = measure_drift(folder, ds, growth, trained_on, cfg.seed)
    if drift > cfg.drift_limit:
        log(f"the new rows lie {drift:.2f}x farther from their lists than the old rows (--drift-limit {cfg.drift_limit}): training the index anew")
        return None
    log(f"growing the index by {new:,} new vectors ({share:.1%} of {n:,}; drift {drift:.2f}, limit {cfg.drift_limit}); "
        "--retrain trains it anew")  # fmt: skip
    return replace(growth, drift=drift)


def _default_budget() -> int:
    """Half of the memory available now."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _finished(b: Build) -> IndexReport | None:
    """The existing report when a finished index matches; clears stale or unwanted state.

    A matching index whose files were damaged since (truncated, changed) is rebuilt, not
    reported up to date."""
    params = read_json(b.dir / PARAMS)
    state = read_json(b.dir / STATE)
    if b.growth is not None:  # the finished index stays until the grown one replaces it
        if state != b.key:  # shards of another growth (or none): not these rows
            shutil.rmtree(b.dir / SHARDS, ignore_errors=True)
            write_json(b.dir / STATE, b.key)
        return None
    if params is not None and params.get("key") == b.key and params.get("target_recall") == b.cfg.target_recall and not b.cfg.run.overwrite:
        damage = b.damage if params == b.previous else index_damage(b.dir, params)
        if damage is None:
            return replace(IndexReport(**params["report"]), up_to_date=True)
        b.log(f"{damage}: rebuilding the index")
    if b.cfg.run.overwrite or params is not None or state != b.key:
        if b.dir.exists():
            b.log("starting the index build afresh" if state is None or b.cfg.run.overwrite else "the vectors or options changed: rebuilding the index")
        shutil.rmtree(b.dir, ignore_errors=True)
    b.dir.mkdir(parents=True, exist_ok=True)
    if read_json(b.dir / STATE) != b.key:
        write_json(b.dir / STATE, b.key)
    return None


def _build(b: Build) -> IndexReport:
    seconds: dict[str, float] = {}
    watch = Stopwatch()  # the steps inside the phases, for finding where a build's time goes
    t = time.perf_counter()
    if b.growth is None:
        # the tuning queries (reading the input, loading the model, encoding) are prepared while
        # the quantizer trains: the add phase needs them, training does not
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedkit-queries") as pool:
            tuning = pool.submit(_timed, _tuning_set, b)
            trained = _train(b, watch)
            seconds["train"] = time.perf_counter() - t
            t = time.perf_counter()
            (queries, qvec, m, source), prepared = tuning.result()
        watch.add("queries.prepare", prepared)
    else:  # growing: the kept quantizer and the kept queries (their truth over the old rows is kept too)
        trained = read_for_build(b.dir / TRAINED)
        queries, qvec, m, source = _tuning_set(b)
    seconds["queries"] = time.perf_counter() - t  # the wait for them after training
    t = time.perf_counter()
    skip, start = (0, 0) if b.growth is None else (b.growth.fragments, b.growth.n_old)
    shards = fragment_shards(b.ds, b.key["shard_rows"], skip=skip, start=start)
    resumed = _add(b, trained, shards, queries, qvec, watch)
    seconds["add"] = time.perf_counter() - t
    t = time.perf_counter()
    index = _merge(b, len(shards), watch)
    seconds["merge"] = time.perf_counter() - t
    t = time.perf_counter()
    scores, truth = _ground_truth(b, len(shards), len(queries))
    from .search import recall_of, tune

    # tuned on the first m queries (query-like texts, or stored rows when there are none); the
    # held-out stored rows after them give the second figure
    table, nprobe, rerank, recall = tune(index, b.ds, qvec[:m], queries[:m], truth[:m], b.cfg.k, b.cfg.target_recall, b.params.nlist)
    stored = recall if m == len(queries) else recall_of(index, b.ds, qvec[m:], queries[m:], truth[m:], b.cfg.k, nprobe, rerank)
    seconds["tune"] = time.perf_counter() - t
    report = IndexReport(
        out=str(b.out), factory=b.params.factory, n=b.params.n, dim=b.params.dim, metric=b.params.metric, nprobe=nprobe,
        rerank=rerank, k=b.cfg.k, recall=recall, target_recall=b.cfg.target_recall, recall_table=table,
        recall_stored_rows=stored, tuning_queries=source, tuning_count=m,
        seconds={k: round(v, 3) for k, v in seconds.items()}, bytes=_sizes(b.dir), vectors_version=b.key["vectors_version"],
        device=b.device, shards_total=len(shards), shards_resumed=resumed, steps=watch.rounded(),
        grown_from=b.growth.n_old if b.growth else 0, drift=b.growth.drift if b.growth else None,
    )  # fmt: skip
    _commit(b, report, scores, truth)
    return report


# ---- reading vectors -----------------------------------------------------------------------


# ---- train ---------------------------------------------------------------------------------


def _train(b: Build, watch: Stopwatch) -> Any:
    path = b.dir / TRAINED
    if path.exists():
        b.log("reusing the trained quantizer")
        return read_for_build(path)
    p = b.params
    watch.restart()
    sample = read_rows(b.ds, _train_positions(b))
    watch.mark("train.read")
    b.log(f"training on {len(sample):,} vectors ({'torch on ' + b.device if b.device.startswith('cuda') else 'faiss-cpu'})")
    if p.ivfpq:
        index = train_ivfpq(sample, p, b.device, b.cfg.seed, mark=lambda step: watch.mark("train." + step))
    else:
        index = train_custom(sample, p)
        watch.mark("train.faiss")
    write_index(index, path)
    watch.mark("train.write")
    return read_for_build(path)


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    return fn(*args), time.perf_counter() - t


def _train_positions(b: Build) -> np.ndarray:
    return sample_positions(b.params.n, b.params.train_size, b.cfg.seed)


def sample_positions(n: int, size: int, seed: int, run: int = SAMPLE_RUN) -> np.ndarray:
    """`size` sorted row positions of `n`, drawn as random runs of `run` consecutive rows.

    Lance reads a run of neighbouring rows far faster than as many scattered ones: 200k rows of
    2M (384-d float16) took 0.35 s in runs of 64 and 1.33 s one by one (CPU, page cache). Runs
    of 64 still spread a 1M-row sample over 15,625 places."""
    if size >= n:
        return np.arange(n)
    runs = n // run
    if runs < -(-size // run):  # too few runs to draw from: single rows
        return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    starts = np.random.default_rng(seed).choice(runs, size=-(-size // run), replace=False) * run
    positions = (starts[:, None] + np.arange(run)[None, :]).reshape(-1)
    return np.sort(positions[:size])


def _query_positions(b: Build) -> np.ndarray:
    """Held-out queries: rows outside the training sample, unless the sample is every row
    (up to PQ_TRAIN_POINTS rows); a small output uses all its rows, for a steadier estimate."""
    n = b.params.n
    q = min(b.cfg.queries, n)
    rng = np.random.default_rng(b.cfg.seed + 1)
    candidates = rng.choice(n, size=min(n, 4 * q), replace=False)
    train = _train_positions(b)
    at = np.searchsorted(train, candidates).clip(max=len(train) - 1)
    held_out = candidates[train[at] != candidates]
    chosen = held_out[:q] if len(held_out) >= q else candidates[:q]
    return np.sort(chosen).astype(np.int64)


def _tuning_set(b: Build) -> tuple[np.ndarray, np.ndarray, int, str]:
    """(positions, vectors, m, source) of the build's queries. The first m tune: query-like
    texts (position -1: no stored row) unless there are none, then held-out stored rows (their
    positions, so a row is not its own neighbour) for the second figure. Kept in
    index/queries.npz: a resumed build's ground truth must be that of the same queries."""
    path = b.dir / QUERIES
    if path.exists():
        with np.load(path) as z:
            return z["positions"], z["vectors"], int(z["m"]), str(z["source"])
    stored = _query_positions(b)
    svec = read_rows(b.ds, stored)
    chosen = choose_queries(b.manifest, b.cfg.tune_queries, b.cfg.queries, b.cfg.seed)
    if chosen.texts is None:
        b.log(f"tuning on stored rows: {chosen.note}")
        positions, vectors, m, source = stored, svec, len(stored), f"{chosen.source} ({chosen.note})"
    else:
        b.log(f"tuning on {len(chosen.texts):,} {chosen.source}")
        like = encode_queries(chosen.texts, b.manifest, b.device).astype(np.float32)
        positions = np.concatenate([np.full(len(like), -1, np.int64), stored])
        vectors, m, source = np.concatenate([like, svec]).astype(np.float32), len(like), chosen.source
    with atomic_file(path) as f:
        np.savez(f, positions=positions, vectors=vectors, m=m, source=source)
    return positions, vectors, m, source


# ---- add -----------------------------------------------------------------------------------


def _add(b: Build, trained: Any, shards: list, queries: np.ndarray, qvec: np.ndarray, watch: Stopwatch) -> int:
    """Write each missing shard index (with its ground-truth block); returns how many existed."""
    folder = b.dir / SHARDS
    folder.mkdir(exist_ok=True)
    spec = ShardSpec(str(folder), b.device, b.params.metric, b.params.ivfpq, b.cfg.k)
    todo = [(i, start, frags) for i, (start, frags) in enumerate(shards) if not spec.done(i)]
    bar = Progress(len(shards), b.cfg.run.progress, unit="shard", desc="add")
    bar.update(len(shards) - len(todo))
    if b.cfg.run.ray is not None:
        _add_as_tasks(b, spec, todo, queries, qvec, bar)
        bar.close()
        return len(shards) - len(todo)
    watch.restart()
    codec = device_codec(trained, spec, qvec, b.log)
    watch.mark("add.codec")
    # the next shard is read from Lance while this one is encoded
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedkit-read") as reader:
        ahead = reader.submit(_timed, read_shard, todo[0][2]) if todo else None
        for j, (i, start, _) in enumerate(todo):
            x, read_s = ahead.result()
            watch.add("add.read", read_s)  # in the reader thread, overlapped with the previous shard
            watch.mark("add.wait")  # what the reads did not hide
            ahead = reader.submit(_timed, read_shard, todo[j + 1][2]) if j + 1 < len(todo) else None
            write_shard(spec, trained, codec, i, start, x, queries, qvec, mark=lambda step: watch.mark("add." + step))
            bar.update(1)
    bar.close()
    return len(shards) - len(todo)


def _add_as_tasks(b: Build, spec: ShardSpec, todo: list, queries: np.ndarray, qvec: np.ndarray, bar: Progress) -> None:
    """`build-index --ray`: the missing add shards as shard tasks on the cluster (`num_gpus=1`
    when the build runs on CUDA), through the executors' one runner: retries, re-issue near the
    end and the commit arbiter as for encode and generate. Each task reads its fragments at the
    pinned version and writes its shard file with the trained quantizer the driver wrote."""
    from ..run.distributed import run_shard_tasks

    gpu = spec.device.startswith("cuda")
    task_spec = replace(spec, device="cuda:0" if gpu else "cpu")  # a GPU task sees its one GPU as cuda:0
    if isinstance(b.out, ObjectPath):  # the cluster's hosts share no disk: the quantizer and the shards go through OUT
        remote = b.out / INDEX_DIR
        (remote / TRAINED).upload(b.dir / TRAINED)
        task_spec = replace(task_spec, remote=str(remote / SHARDS))
    shards = {i: (start, [f.fragment_id for f in frags]) for i, start, frags in todo}
    run_shard_tasks(index_shard_task, (str(b.out), b.key["vectors_version"], shards, task_spec, queries, qvec), [i for i, _, _ in todo],
                    gpu=gpu, workers=1, address=b.cfg.run.ray, reissue=b.cfg.run.reissue, on_commit=lambda part: bar.update(1))  # fmt: skip
    missing = [i for i, _, _ in todo if not spec.done(i) and not replace(task_spec, folder=spec.folder).fetch(i)]
    if missing:
        raise EmbedkitError(f"the add shard tasks ended without shards {missing[:5]}; rerun build-index to resume")


# ---- merge ---------------------------------------------------------------------------------


def _merge(b: Build, n_shards: int, watch: Stopwatch) -> Any:
    """Merge the shard indexes (merge.py), after the kept index's lists when it grows, and open the result."""
    watch.restart()
    merge_shards(b.dir, n_shards, b.params.n, mark=lambda step: watch.mark("merge." + step), into=b.target)
    index = load_index(b.target)
    watch.mark("merge.open")
    return index



# ---- ground truth, commit ------------------------------------------------------------------


def _ground_truth(b: Build, n_shards: int, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) of the exact top-k of every query over all shards, from the shards'
    blocks; a growing index's kept truth over its old rows is one more block."""
    scores, positions = [], []
    if b.growth is not None:
        with np.load(b.dir / TRUTH) as z:
            scores.append(z["scores"])
            positions.append(z["positions"])
    for i in range(n_shards):
        with np.load(b.dir / SHARDS / f"shard-{i:06d}.truth.npz") as z:
            scores.append(z["scores"])
            positions.append(z["positions"])
    s, p = np.concatenate(scores, 1), np.concatenate(positions, 1)
    order = np.argsort(-s, axis=1, kind="stable")[:, : b.cfg.k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(p, order, 1)


def _commit(b: Build, report: IndexReport, scores: np.ndarray, truth: np.ndarray) -> None:
    """params.json last: the index is complete exactly when it exists (a grown index's files
    are swapped in after it is written in the staging folder). Then free the shards.

    The truth (kept for growing), the structure and the fragment count of the rows are recorded:
    a later build grows this index when these fragments are still the first ones."""
    folder = b.target
    with atomic_file(folder / TRUTH) as f:
        np.savez(f, scores=scores, positions=truth)
    checks = {name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)} for name in (MERGED, IVFDATA) if (folder / name).exists()}
    doc = {
        "embedkit_version": __version__, "key": b.key, "target_recall": b.cfg.target_recall, "nprobe": report.nprobe,
        "rerank": report.rerank, "k": report.k, "metric": report.metric, "files": checks, "report": report.to_dict(),
        "vectors": VECTORS_DIR, "params": asdict(b.params), "fragments": len(b.ds.get_fragments()),
        "trained_on": b.growth.trained_on if b.growth else b.params.n,
        # what this build took, beside what `build-index --dry-run` predicted for these vectors (`embedkit status`)
        "run": {"seconds": round(sum(report.seconds.values()), 2), "wall_seconds": round(run_wall(), 2), "ended": time.time(), "marks": marks()},
        "prediction": _prediction(b),
    }  # fmt: skip
    write_json(folder / PARAMS, doc)
    if b.growth is not None:
        finish_swap(b.dir)
    shutil.rmtree(b.dir / SHARDS, ignore_errors=True)
    (b.dir / STATE).unlink(missing_ok=True)


def _prediction(b: Build) -> dict | None:
    """The dry run's prediction for this build, when one was made for these vectors."""
    doc = take_prediction(b.out, "build-index", None)
    return doc if doc is not None and doc.get("vectors_version") == b.key["vectors_version"] else None


def _sizes(folder: Path) -> dict:
    return {name: (folder / name).stat().st_size for name in (TRAINED, MERGED, IVFDATA) if (folder / name).exists()}


