"""choose_params, parse_bytes and estimate_build_seconds: pure functions, checked against tables.

Every expected value below is worked out by hand from the rules in embedkit/index/params.py
(the arithmetic is in the comments), never by calling the function under test.

- nlist: the power of two nearest 4*sqrt(n), halved until n // 39 >= nlist.
- pq_m: dim/8 when n*(pq_m + 8) + nlist*dim*4 fits the memory budget, else the largest divisor
  of dim that fits.
- OPQ only when dim/pq_m > 8, unless forced either way.
- HNSW quantizer from 65536 lists; Flat below 1024 vectors (unless nlist or pq_m is forced).
- train_size = min(n, max(64*nlist, 65536)).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from embedkit.errors import EmbedkitError
from embedkit.index.params import (
    KMEANS_ITERATIONS,
    IndexParams,
    build_phases,
    choose_params,
    default_rates,
    estimate_build_seconds,
    parse_bytes,
)

GiB = 1 << 30
BIG = 1 << 40  # a budget that never binds

# n = 10M, dim 384: nlist 16384, so the centroids take 16384 * 384 * 4 = 25,165,824 bytes
CENTROIDS_10M = 25_165_824

# (id, n, dim, keyword arguments, factory, nlist, pq_m, opq, hnsw, train_size)
AUTO = [
    # 4*sqrt(3000) = 219.1 -> 256; cap 3000 // 39 = 76 -> 128 -> 64. 384/48 = 8: no OPQ
    ("sample-3000", 3000, 384, {}, "IVF64,PQ48", 64, 48, False, False, 3000),
    # 4*sqrt(2000) = 178.9 -> 128 (51 away, 256 is 77 away); cap 51 -> 64 -> 32
    ("cap-2000", 2000, 384, {}, "IVF32,PQ48", 32, 48, False, False, 2000),
    # the first size that is not Flat: 4*sqrt(1024) = 128; cap 26 -> 64 -> 32 -> 16
    ("flat-boundary-1024", 1024, 384, {}, "IVF16,PQ48", 16, 48, False, False, 1024),
    # 4*sqrt(50000) = 894.4 -> 1024; cap 1282; train min(50000, 65536)
    ("50k", 50_000, 384, {}, "IVF1024,PQ48", 1024, 48, False, False, 50_000),
    # 4*sqrt(1e5) = 1264.9 -> 1024; train min(1e5, max(65536, 65536))
    ("100k", 100_000, 384, {}, "IVF1024,PQ48", 1024, 48, False, False, 65_536),
    # 4*sqrt(1e6) = 4000 -> 4096; pq_m 768/8 = 96; train 64*4096 = 262144
    ("1M-768d", 1_000_000, 768, {}, "IVF4096,PQ96", 4096, 96, False, False, 262_144),
    # 4*sqrt(1e7) = 12649 -> 16384 (3735 away, 8192 is 4457 away); train 64*16384
    ("10M", 10_000_000, 384, {}, "IVF16384,PQ48", 16384, 48, False, False, 1_048_576),
    # 4*sqrt(2e8) = 56569 -> 65536: HNSW quantizer; train 64*65536
    ("200M-hnsw", 200_000_000, 384, {}, "IVF65536_HNSW32,PQ48", 65536, 48, False, True, 4_194_304),
    # metric is carried through unchanged
    ("ip", 3000, 384, {"metric": "ip"}, "IVF64,PQ48", 64, 48, False, False, 3000),
]

BUDGET = [
    # PQ48 needs 10M * (48 + 8) + 25,165,824 = 585,165,824 bytes: an exact fit is a fit
    ("pq48-exact-fit", {"memory_budget": 10_000_000 * 56 + CENTROIDS_10M}, "IVF16384,PQ48", 48, False),
    # one byte less: the next divisor of 384 below 48 is 32 (425,165,824 bytes); 384/32 = 12 > 8: OPQ
    ("pq32", {"memory_budget": 10_000_000 * 56 + CENTROIDS_10M - 1}, "OPQ32,IVF16384,PQ32", 32, True),
    # 400 MiB = 419,430,400: PQ32 (425,165,824) no longer fits, PQ24 (345,165,824) does
    ("pq24", {"memory_budget": 400 << 20}, "OPQ24,IVF16384,PQ24", 24, True),
    ("pq24-no-opq", {"memory_budget": 400 << 20, "opq": False}, "IVF16384,PQ24", 24, False),
    ("forced-opq", {"memory_budget": 8 * GiB, "opq": True}, "OPQ48,IVF16384,PQ48", 48, True),
    # the smallest possible: PQ1 needs 10M * 9 + 25,165,824 = 115,165,824 bytes
    ("pq1", {"memory_budget": 10_000_000 * 9 + CENTROIDS_10M}, "OPQ1,IVF16384,PQ1", 1, True),
]

FORCED = [
    # nlist need not be a power of two; 76 * 39 = 2964 <= 3000; train min(3000, 65536)
    ("nlist-76", 3000, 384, {"nlist": 76}, "IVF76,PQ48", 76, 48, False, False, 3000),
    # a forced pq_m above dim/8 is allowed (384/64 = 6: no OPQ)
    ("pq-m-64", 3000, 384, {"pq_m": 64}, "IVF64,PQ64", 64, 64, False, False, 3000),
    # 384/12 = 32 > 8: OPQ
    ("pq-m-12", 3000, 384, {"pq_m": 12}, "OPQ12,IVF64,PQ12", 64, 12, True, False, 3000),
    # below 1024 vectors a forced nlist or pq_m still builds IVF-PQ: 8 * 39 = 312 <= 500
    ("small-nlist", 500, 384, {"nlist": 8}, "IVF8,PQ48", 8, 48, False, False, 500),
    # 4*sqrt(500) = 89.4 -> 64 (25 away, 128 is 39 away); cap 12 -> 32 -> 16 -> 8; 384/24 = 16 > 8
    ("small-pq-m", 500, 384, {"pq_m": 24}, "OPQ24,IVF8,PQ24", 8, 24, True, False, 500),
    # a forced 65536 lists gets the HNSW quantizer: 65536 * 39 = 2,555,904 vectors are enough
    ("nlist-65536", 2_555_904, 384, {"nlist": 65536}, "IVF65536_HNSW32,PQ48", 65536, 48, False, True, 2_555_904),
    ("nlist-65535", 2_555_904, 384, {"nlist": 65535}, "IVF65535,PQ48", 65535, 48, False, False, 2_555_904),
    # 384/8 = 48 > 8 would rotate, but OPQ needs at least dim (384) vectors: 300 get none
    ("few-no-opq", 300, 384, {"nlist": 2, "pq_m": 8}, "IVF2,PQ8", 2, 8, False, False, 300),
    ("dim-vectors-opq", 384, 384, {"nlist": 2, "pq_m": 8}, "OPQ8,IVF2,PQ8", 2, 8, True, False, 384),
]


def _check(p: IndexParams, n, dim, factory, nlist, pq_m, opq, hnsw, train_size) -> None:
    assert (p.n, p.dim) == (n, dim)
    assert p.factory == factory
    assert (p.nlist, p.pq_m, p.opq, p.hnsw, p.train_size) == (nlist, pq_m, opq, hnsw, train_size)
    assert not p.custom
    assert p.ivfpq


@pytest.mark.parametrize("case", AUTO + FORCED, ids=lambda c: c[0])
def test_choose_params_table(case):
    _, n, dim, kwargs, *expected = case
    kwargs = {"memory_budget": BIG, **kwargs}
    p = choose_params(n, dim, **kwargs)
    _check(p, n, dim, *expected)
    assert p.metric == kwargs.get("metric", "l2")


@pytest.mark.parametrize("case", BUDGET, ids=lambda c: c[0])
def test_choose_params_memory_budget(case):
    _, kwargs, factory, pq_m, opq = case
    p = choose_params(10_000_000, 384, **kwargs)
    _check(p, 10_000_000, 384, factory, 16384, pq_m, opq, False, 1_048_576)
    assert p.n * (p.pq_m + 8) + CENTROIDS_10M <= kwargs["memory_budget"]


@pytest.mark.parametrize("n", [1, 10, 500, 1023])
def test_flat_below_1024_vectors(n):
    p = choose_params(n, 384, memory_budget=BIG)
    assert p.factory == "Flat"
    assert (p.nlist, p.pq_m, p.opq, p.hnsw, p.train_size) == (0, 0, False, False, n)
    assert p.custom and not p.ivfpq


# (id, n, kwargs, words the message must hold)
REFUSED = [
    ("no-vectors", 0, {}, ["no vectors"]),
    ("no-vectors-custom", 0, {"factory": "IVF16,PQ8"}, ["no vectors"]),
    # 77 * 39 = 3003 > 3000
    ("nlist-77", 3000, {"nlist": 77}, ["too few", "77", "3,003"]),
    ("nlist-4096", 3000, {"nlist": 4096}, ["too few", "4096"]),
    ("nlist-0", 3000, {"nlist": 0}, ["--nlist"]),
    ("pq-m-not-divisor", 3000, {"pq_m": 50}, ["--pq-m 50", "384"]),
    ("pq-m-above-dim", 3000, {"pq_m": 768}, ["--pq-m 768"]),
    # PQ1 needs 10M * (1 + 8) + 25,165,824 = 115,165,824 bytes
    ("budget-1-byte-short", 10_000_000, {"memory_budget": 115_165_823}, ["--memory-budget", "too small"]),
    ("budget-100M", 10_000_000, {"memory_budget": 100 << 20}, ["--memory-budget", "too small"]),
    ("custom-more-lists-than-vectors", 3000, {"factory": "IVF4096,Flat"}, ["too few", "IVF4096,Flat"]),
    # PQ codebooks need 256 vectors; OPQ needs as many as the dimension
    ("pq-under-256", 255, {"nlist": 1}, ["too few for product quantization", "256", "exact index"]),
    ("pq-m-under-256", 120, {"pq_m": 8}, ["too few for product quantization"]),
    ("opq-under-dim", 383, {"nlist": 2, "pq_m": 8, "opq": True}, ["--opq", "384", "383"]),
]


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c[0])
def test_choose_params_refusals(case):
    _, n, kwargs, needles = case
    kwargs = {"memory_budget": BIG, **kwargs}
    with pytest.raises(EmbedkitError) as e:
        choose_params(n, 384, **kwargs)
    for needle in needles:
        assert needle in str(e.value)


def test_bad_metric_is_refused():
    with pytest.raises(ValueError, match="metric"):
        choose_params(3000, 384, memory_budget=BIG, metric="cosine")


# (factory, n, nlist, pq_m, opq, hnsw, train_size); train_size = min(n, max(64*lists, 65536))
# when the factory has lists or PQ, else n
CUSTOM = [
    ("IVF256,PQ32", 100_000, 256, 32, False, False, 65_536),
    ("OPQ16,IVF1024,PQ16", 100_000, 1024, 16, True, False, 65_536),
    ("IVF65536_HNSW32,PQ48", 10_000_000, 65536, 48, False, True, 4_194_304),
    ("IVF4096,Flat", 5000, 4096, 0, False, False, 5000),
    ("HNSW32", 5000, 0, 0, False, True, 5000),
    ("PQ32", 1000, 0, 32, False, False, 1000),
    ("Flat", 10, 0, 0, False, False, 10),
]


@pytest.mark.parametrize("case", CUSTOM, ids=lambda c: c[0])
def test_custom_factory(case):
    factory, n, nlist, pq_m, opq, hnsw, train_size = case
    p = choose_params(n, 384, memory_budget=BIG, factory=factory)
    assert p.factory == factory
    assert (p.nlist, p.pq_m, p.opq, p.hnsw, p.train_size) == (nlist, pq_m, opq, hnsw, train_size)
    assert p.custom and not p.ivfpq


def test_custom_factory_overrides_the_other_options():
    # --nlist 4096 alone would be refused on 3000 vectors; with a factory it is ignored
    p = choose_params(3000, 384, memory_budget=BIG, factory="IVF16,PQ8", nlist=4096, pq_m=50, opq=True)
    assert p.factory == "IVF16,PQ8"
    assert (p.nlist, p.pq_m, p.opq) == (16, 8, False)


def test_sizes():
    p = choose_params(3000, 384, memory_budget=BIG)
    # codes and ids 3000 * (48 + 8) = 168,000 + centroids 64 * 384 * 4 = 98,304
    assert p.index_bytes == 266_304
    # training sample 3000 * 384 * 4 = 4,608,000 + one shard 3000 * (1536 + 48 + 8) = 4,776,000
    assert p.build_memory_bytes == 9_384_000
    # Flat: 1000 * 384 * 4
    assert choose_params(1000, 384, memory_budget=BIG).index_bytes == 1_536_000
    # HNSW: 200M * 56 + 65536 * 1536 + graph 65536 * 32 * 2 * 4
    assert choose_params(200_000_000, 384, memory_budget=BIG).index_bytes == 11_200_000_000 + 100_663_296 + 16_777_216


PARSED = [
    ("8G", 8 << 30),
    ("512M", 512 << 20),
    ("1.5T", 3 << 39),
    ("1024", 1024),
    ("4k", 4096),
    ("2GiB", 2 << 30),
    ("2GB", 2 << 30),
    ("10MB", 10 << 20),
    (" 3 g ", 3 << 30),
    (".5K", 512),
    ("0.25G", 1 << 28),
    ("7b", 7),
]


@pytest.mark.parametrize("text,expected", PARSED)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "8X", "-1G", "G", "1.2.3G", "8 G B B"])
def test_parse_bytes_refusals(text):
    with pytest.raises(EmbedkitError, match="size"):
        parse_bytes(text)


SIZES = [2_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000, 1_000_000_000]


def test_estimate_of_the_sample_on_two_cores_counts_pq_training_and_the_fixed_parts():
    # IVF64,PQ48 over 3,000 x 384 on 2 cores (25.2 GFLOP/s): start-up 4 s; read (3000 + 3000) *
    # 384*2 / 1e9 = 0.0046 s (the training sample, then the add); coarse k-means
    # 10*3000*64*384*2 / 25.2e9 = 0.0585 s and PQ codebooks 25*3000*256*384*2 / (25.2e9 * 0.1) =
    # 5.8514 s; the queries (3 s), on the same cores as the training (a CPU build): 3 s; add
    # 3000*(64+256+1000)*384*2 / 25.2e9 = 0.1207 s (assignment, codes, and the 1,000 queries'
    # exact top-k); merge 266,304 B / 0.5e9 = 0.0005 s; tune 3000 * 2e-5 (rerank reads) + 1000
    # queries x 3000/2 codes x 48 B / (1.15e8 * 2) (scans) = 0.3730 s: 13.4088 s in all.
    # Without the PQ term it printed "~0 s" for a 5 s build; without the fixed parts, "~1 s".
    p = choose_params(3000, 384, memory_budget=BIG)
    assert estimate_build_seconds(p, gpu=False, cores=2) == pytest.approx(13.4088, abs=0.001)


def test_queries_overlap_training_only_on_a_gpu():
    """On a GPU the tuning queries are prepared while the quantizer trains (hidden up to the
    training's length); on a CPU both take the same cores, so they add."""
    p = choose_params(3000, 384, memory_budget=BIG)
    for gpu in (False, True):
        r = default_rates(gpu=gpu, cores=2)
        phases = build_phases(p, r)
        assert phases["queries"] == (max(0.0, r.queries_seconds - phases["train"]) if gpu else r.queries_seconds)


def test_measured_kmeans_and_stream_rate_replace_their_models():
    """A GPU dry run's measured k-means seconds stand in for the product-rate model, and the
    add's rows are read at the stream rate (the training sample, the first read, at the other)."""
    p = choose_params(1_000_000, 384, memory_budget=BIG)
    r = default_rates(gpu=True, cores=16)
    base = build_phases(p, r)
    measured = build_phases(p, replace(r, kmeans_seconds=0.5, stream_bytes_per_s=4 * r.read_bytes_per_s))
    pq_part = base["train"] - KMEANS_ITERATIONS * p.train_size * p.nlist * p.dim * 2 / r.flops
    assert measured["train"] == pytest.approx(0.5 + pq_part)
    vb = p.dim * 2
    assert measured["read"] == pytest.approx((p.train_size + p.n / 4) * vb / r.read_bytes_per_s)
    assert base["read"] == pytest.approx((p.train_size + p.n) * vb / r.read_bytes_per_s)
    grow = build_phases(p, replace(r, kmeans_seconds=0.5, stream_bytes_per_s=4 * r.read_bytes_per_s), new_rows=1000)
    assert grow["train"] == 0 and grow["read"] == pytest.approx(1000 * vb / r.read_bytes_per_s)


@pytest.mark.parametrize("gpu", [False, True])
def test_estimate_is_monotone_in_n(gpu):
    # with the parameters chosen for each size
    estimates = [estimate_build_seconds(choose_params(n, 384, memory_budget=BIG), gpu=gpu, cores=8) for n in SIZES]
    assert all(e > 0 for e in estimates)
    assert all(a < b for a, b in zip(estimates, estimates[1:])), estimates
    # and with the same parameters over more vectors
    base = choose_params(10_000_000, 384, memory_budget=BIG)
    grown = [replace(base, n=n, train_size=min(n, base.train_size)) for n in SIZES]
    fixed = [estimate_build_seconds(p, gpu=gpu, cores=8) for p in grown]
    assert all(a < b for a, b in zip(fixed, fixed[1:])), fixed


@pytest.mark.parametrize("n", [n for n in SIZES if n >= 100_000])  # below, a CUDA context's start-up is most of a build
def test_estimate_gpu_faster_than_cpu(n):
    p = choose_params(n, 384, memory_budget=BIG)
    cpu = estimate_build_seconds(p, gpu=False, cores=16)
    assert estimate_build_seconds(p, gpu=True, cores=16) < cpu
    # and more CPU cores are faster than fewer
    assert cpu < estimate_build_seconds(p, gpu=False, cores=2)


def test_training_samples_are_runs_of_neighbouring_rows_spread_over_the_data():
    from embedkit.index.build import SAMPLE_RUN, sample_positions

    got = sample_positions(1_000_000, 100_000, seed=5)
    assert len(got) == 100_000 == len(np.unique(got)) and (np.diff(got) > 0).all()
    assert 0 <= got.min() and got.max() < 1_000_000
    assert (got == sample_positions(1_000_000, 100_000, seed=5)).all() and not (got == sample_positions(1_000_000, 100_000, seed=6)).all()
    runs = np.split(got, np.flatnonzero(np.diff(got) != 1) + 1)
    assert np.median([len(r) for r in runs]) >= SAMPLE_RUN  # read as runs, not one by one
    assert got.max() - got.min() > 900_000  # spread over the whole range
    assert (sample_positions(100, 500, seed=1) == np.arange(100)).all()
    small = sample_positions(100, 90, seed=1)  # too few runs of 64: single rows
    assert len(small) == 90 == len(np.unique(small))


def test_the_dry_runs_kmeans_measure_runs_the_builds_shape():
    """The k-means a GPU dry run times is the build's own driver on the sample repeated to the
    training size (run here on the CPU: the same code); set-up plus ten iterations' worth."""
    from embedkit.index.dryrun import _kmeans_seconds

    p = choose_params(20_000, 32, memory_budget=BIG)
    x = np.random.default_rng(0).standard_normal((2_000, 32)).astype(np.float32)
    assert p.train_size > len(x) and p.nlist > 1
    assert _kmeans_seconds(x, p, "cpu") > 0
