"""Pure choice of IVF-PQ parameters from the number of vectors, the dimension and a memory budget.

Rules (each one is a line of the table in tests/test_index_params.py):

- nlist: the power of two nearest 4 * sqrt(n) on a log scale, lowered until every list has at least
  MIN_POINTS_PER_LIST training points (k-means below that is unstable; faiss warns at 39).
- PQ sub-quantizers (bytes per vector): dim / 8 (8 dimensions per sub-quantizer) when the
  inverted lists fit the memory budget, else the largest divisor of dim that fits.
- OPQ (a learned rotation before PQ) when the budget forces more than 8 dimensions per
  sub-quantizer: heavy compression is where the rotation pays.
- An HNSW coarse quantizer from HNSW_FROM_NLIST lists on: a flat scan of the centroids would
  dominate every query.
- Fewer than FLAT_BELOW vectors: an exact flat index; an ANN index buys nothing at that size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import EmbedkitError
from ..units import human_bytes

MIN_POINTS_PER_LIST = 39
TRAIN_POINTS_PER_LIST = 64
PQ_MIN_POINTS = 256  # one per centroid of an 8-bit sub-quantizer
PQ_TRAIN_POINTS = 65_536
HNSW_FROM_NLIST = 65_536
HNSW_M = 32
FLAT_BELOW = 1_024
ID_BYTES = 8  # faiss stores an int64 id next to every code
BUILD_SHARD_ROWS = 1_000_000  # vectors per add shard: the unit of resume of a build

# Rates behind the printed build-time estimate, measured on one H200 machine (docs/design.md):
# Lance reads 1.07 GB/s; faiss-cpu assigns at ~12.6 GFLOP/s per core; a torch fp16 matmul on the
# GPU at ~285 TFLOP/s, of which a third is assumed reachable with the surrounding work.
READ_BYTES_PER_S = 1.0e9
WRITE_BYTES_PER_S = 0.5e9
CPU_FLOPS_PER_CORE = 12.6e9
GPU_FLOPS = 100e12
KMEANS_ITERATIONS = 10
# PQ codebooks are trained by faiss-cpu on every machine: 25 k-means iterations per sub-quantizer
# over 256 centroids in dim/M dimensions. Distances in a few dimensions run far below the matmul
# rate: on the H200 machine's 16 cores the PQ step of the 10M build took ~12 s, a tenth of what
# CPU_FLOPS_PER_CORE would give; on a 2-core machine, 3,000 points took 3-5 s.
PQ_ITERATIONS = 25
PQ_EFFICIENCY = 0.1


@dataclass(frozen=True)
class IndexParams:
    """What will be built, and what it costs."""

    n: int
    dim: int
    factory: str  # faiss index_factory string
    metric: str  # "l2" or "ip"
    nlist: int  # 0 for an index without inverted lists
    pq_m: int  # bytes per PQ code; 0 when the factory has no PQ
    opq: bool
    hnsw: bool
    train_size: int
    custom: bool  # the user's --factory: built through faiss's own train/add

    @property
    def ivfpq(self) -> bool:
        """Built by embedkit's own trainer and encoder (GPU when present)."""
        return not self.custom and self.nlist > 0 and self.pq_m > 0

    @property
    def index_bytes(self) -> int:
        """Codes and ids plus centroids (plus the HNSW graph): what a search keeps in memory."""
        per_vector = self.pq_m + ID_BYTES if self.pq_m else self.dim * 4
        graph = self.nlist * HNSW_M * 2 * 4 if self.hnsw else 0
        return self.n * per_vector + self.nlist * self.dim * 4 + graph

    @property
    def build_memory_bytes(self) -> int:
        """Peak RAM of the build: the float32 training sample plus one shard of vectors and codes."""
        shard = min(self.n, BUILD_SHARD_ROWS)
        return self.train_size * self.dim * 4 + shard * (self.dim * 4 + self.pq_m + ID_BYTES)

    def describe(self) -> str:
        return (
            f"{self.factory} over {self.n:,} x {self.dim} vectors ({self.metric}); "
            f"train on {self.train_size:,}; index {human_bytes(self.index_bytes)}, build memory ~{human_bytes(self.build_memory_bytes)}"
        )


def choose_params(
    n: int,
    dim: int,
    *,
    memory_budget: int,
    nlist: int | None = None,
    pq_m: int | None = None,
    opq: bool | None = None,
    factory: str | None = None,
    metric: str = "l2",
) -> IndexParams:
    """IVF-PQ parameters for n vectors of this dimension; any argument given overrides its rule.

    >>> choose_params(10_000_000, 384, memory_budget=8 << 30).factory
    'IVF16384,PQ48'
    >>> choose_params(3_000, 384, memory_budget=8 << 30).factory
    'IVF64,PQ48'
    """
    if n < 1:
        raise EmbedkitError("there are no vectors to index; run `embedkit encode` first")
    if metric not in ("l2", "ip"):
        raise ValueError(f"metric must be l2 or ip, not {metric!r}")
    if factory:
        return _custom(n, dim, factory, metric)
    if n < FLAT_BELOW and nlist is None and pq_m is None:
        return IndexParams(n, dim, "Flat", metric, 0, 0, False, False, n, custom=True)
    if n < PQ_MIN_POINTS:  # only reachable with --nlist/--pq-m: the automatic choice is Flat here
        raise EmbedkitError(
            f"{n:,} vectors are too few for product quantization (its codebooks need at least {PQ_MIN_POINTS}); "
            "omit --nlist and --pq-m for an exact index"
        )
    lists = _nlist(n, nlist)
    m = _pq_m(n, dim, lists, memory_budget, pq_m)
    # faiss's OPQ training needs at least `dim` points (fewer corrupt its memory)
    if opq and n < dim:
        raise EmbedkitError(f"--opq needs at least {dim:,} vectors (the dimension) to train the rotation; this output has {n:,}")
    rotate = (dim // m > 8 and n >= dim) if opq is None else opq
    hnsw = lists >= HNSW_FROM_NLIST
    text = f"{f'OPQ{m},' if rotate else ''}IVF{lists}{f'_HNSW{HNSW_M}' if hnsw else ''},PQ{m}"
    train = min(n, max(TRAIN_POINTS_PER_LIST * lists, PQ_TRAIN_POINTS))
    return IndexParams(n, dim, text, metric, lists, m, rotate, hnsw, train, custom=False)


def _nlist(n: int, forced: int | None) -> int:
    if forced is not None:
        if forced < 1:
            raise EmbedkitError(f"--nlist must be positive, not {forced}")
        if n < forced * MIN_POINTS_PER_LIST:
            raise EmbedkitError(
                f"{n:,} vectors are too few for --nlist {forced} (k-means needs at least "
                f"{forced * MIN_POINTS_PER_LIST:,}); omit --nlist to choose automatically"
            )
        return forced
    target = 2 ** round(math.log2(4 * math.sqrt(n)))
    cap = max(1, n // MIN_POINTS_PER_LIST)
    while target > cap:
        target //= 2
    return max(1, target)


def _pq_m(n: int, dim: int, nlist: int, budget: int, forced: int | None) -> int:
    divisors = [d for d in range(1, dim + 1) if dim % d == 0]
    if forced is not None:
        if forced not in divisors:
            raise EmbedkitError(f"--pq-m {forced} must divide the dimension {dim} (try {', '.join(map(str, divisors[-6:]))})")
        return forced
    fixed = nlist * dim * 4
    fits = [d for d in divisors if d <= max(1, dim // 8) and n * (d + ID_BYTES) + fixed <= budget]
    if not fits:
        need = n * (1 + ID_BYTES) + fixed
        raise EmbedkitError(f"--memory-budget {human_bytes(budget)} is too small for {n:,} vectors (at least {human_bytes(need)})")
    return fits[-1]


def _custom(n: int, dim: int, factory: str, metric: str) -> IndexParams:
    _check_factory(dim, factory, metric)
    ivf = re.search(r"IVF(\d+)", factory)
    pq = re.search(r"(?<!O)PQ(\d+)", factory)  # not the OPQ16 of "OPQ16_64"
    lists = int(ivf.group(1)) if ivf else 0
    if lists and n < lists:
        raise EmbedkitError(f"{n:,} vectors are too few for {factory!r}: it has {lists} lists")
    train = min(n, max(TRAIN_POINTS_PER_LIST * lists, PQ_TRAIN_POINTS)) if lists or pq else n
    return IndexParams(n, dim, factory, metric, lists, int(pq.group(1)) if pq else 0, "OPQ" in factory, "HNSW" in factory, train, custom=True)


def _check_factory(dim: int, factory: str, metric: str) -> None:
    """Refuse a factory string faiss cannot build for `dim` before anything is read or removed
    (constructing the empty index is cheap; a failure later would read as a write error)."""
    import faiss

    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)
    except RuntimeError as e:
        found = re.search(r"\.(?:cpp|h):\d+: (.*)", str(e))
        reason = (found.group(1) if found else str(e)).strip().splitlines()[0]
        raise EmbedkitError(f"--factory {factory!r} is not a faiss index for {dim}-d vectors: {reason}") from None


# The parts of a build that do not grow with the vectors, and the rerank's reads, by default
# (`build-index --dry-run` measures them on its machine): process start and imports (torch,
# faiss, lance; a CUDA context on GPUs); the tuning queries (model load, 1,000 texts encoded),
# prepared while the quantizer trains; reading a vector by its position, which the tuning's
# exact rerank does for each query's deepest candidate list (cached across settings).
FIXED_SECONDS = {False: 4.0, True: 6.0}
QUERIES_SECONDS = {False: 3.0, True: 2.0}
TAKE_SECONDS_PER_ROW = 2e-5
TUNE_ROWS = 100_000  # 1,000 queries x a rerank depth of 100
# The tuning searches its queries at nprobe 1, 2, 4, ... until past the target the recall stops
# rising (search.TABLE_PLATEAU), typically about nlist/4: about nlist/2 lists in all, half the
# codes, per query. faiss-cpu's search, candidates and the rerank's bookkeeping included, went
# through PQ codes at about this many bytes per second per core: the mean of three builds of
# IVF4096,PQ48 over 1M pydocs vectors, 1,000 queries, on 16 cores of the H200 machine (2.4e10
# bytes in 14.7, 12.7 and 12.0 s: 1.02e8, 1.18e8 and 1.25e8 per core).
SCAN_BYTES_PER_S_PER_CORE = 1.15e8


@dataclass(frozen=True)
class BuildRates:
    """The rates a build's time is modeled with (`build_phases`): measured on this machine by
    `build-index --dry-run`, else `default_rates`."""

    read_bytes_per_s: float  # Lance, sequential
    flops: float  # nearest-centroid products: k-means and the add's assignment and encoding
    pq_flops: float  # PQ codebook training (faiss-cpu's k-means in a few dimensions)
    write_bytes_per_s: float  # the merged lists
    take_seconds_per_row: float  # a vector read by its position (the tuning's rerank)
    scan_bytes_per_s: float  # PQ codes scanned by faiss-cpu's search (the tuning's searches)
    queries_seconds: float  # the tuning queries: model load and encoding
    fixed_seconds: float  # process start and imports
    # the queries are prepared while the quantizer trains; that hides them only where training
    # runs on a GPU: on a CPU both take the same cores (measured on 2 cores: preparing took 6.5 s
    # beside training against 3.0 s alone, and training 19.2 s against 14 s modeled alone)
    queries_overlap: bool = True
    # sequential reads after the first (the add's stream; the first read opens the dataset): None
    # reads everything at read_bytes_per_s
    stream_bytes_per_s: float | None = None
    # the quantizer's k-means at the build's shape, measured by a GPU dry run (a product-rate
    # model read the driver's per-iteration work wrong by 4x there); None: from `flops`
    kmeans_seconds: float | None = None


def default_rates(*, gpu: bool, cores: int) -> BuildRates:
    """The constants above for a GPU or a CPU of `cores` cores."""
    cpu = CPU_FLOPS_PER_CORE * max(1, cores)
    return BuildRates(READ_BYTES_PER_S, GPU_FLOPS if gpu else cpu, cpu * PQ_EFFICIENCY, WRITE_BYTES_PER_S, TAKE_SECONDS_PER_ROW,
                      SCAN_BYTES_PER_S_PER_CORE * max(1, cores), QUERIES_SECONDS[gpu], FIXED_SECONDS[gpu], queries_overlap=gpu)  # fmt: skip


def build_phases(p: IndexParams, r: BuildRates, *, new_rows: int | None = None, queries: int = 1_000) -> dict[str, float]:
    """Seconds of each part of a build (a fresh process, start to exit): the same model for the
    plan line a build prints and for `--dry-run` (which measures `r`). `new_rows`: a growing
    index, which reads and adds only those, trains nothing and keeps its queries."""
    vector_bytes = p.dim * 2  # float16 as stored
    lists = max(1, p.nlist)
    grow = new_rows is not None
    rows = new_rows if grow else p.n
    pq_points = min(p.train_size, PQ_TRAIN_POINTS) if p.pq_m else 0
    kmeans = r.kmeans_seconds if r.kmeans_seconds is not None else KMEANS_ITERATIONS * p.train_size * lists * p.dim * 2 / r.flops
    train = 0.0 if grow else kmeans + PQ_ITERATIONS * pq_points * 256 * p.dim * 2 / r.pq_flops
    # the training sample is the build's first read; the add then streams every row
    first, stream = (rows, 0) if grow else (p.train_size, rows)
    return {
        "fixed": r.fixed_seconds,
        "read": first * vector_bytes / r.read_bytes_per_s + stream * vector_bytes / (r.stream_bytes_per_s or r.read_bytes_per_s),
        "train": train,
        "queries": 0.0 if grow else (max(0.0, r.queries_seconds - train) if r.queries_overlap else r.queries_seconds),
        # assignment and codes, then the tuning queries' exact top-k among the rows (the ground truth)
        "add": rows * (lists + (256 if p.pq_m else 0) + queries) * p.dim * 2 / r.flops,
        "merge": p.index_bytes / r.write_bytes_per_s,
        "tune": min(p.n, TUNE_ROWS) * r.take_seconds_per_row + queries * p.n / 2 * max(1, p.pq_m) / r.scan_bytes_per_s,
    }


def estimate_build_seconds(p: IndexParams, *, gpu: bool, cores: int) -> float:
    """The figure a build prints before it starts: `build_phases` at the default rates."""
    return sum(build_phases(p, default_rates(gpu=gpu, cores=cores)).values())


def parse_bytes(text: str) -> int:
    """'8G', '512M', '1.5T' or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", text)
    if not m:
        raise EmbedkitError(f"cannot read {text!r} as a size; use a number with K, M, G or T")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


