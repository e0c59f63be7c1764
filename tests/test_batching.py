"""batching.py: token-budget packing, padding, padding overhead. Pure functions, exact tables."""

from __future__ import annotations

import numpy as np
import pytest

from embedkit.engine.batching import Batch, pack_batches, pad_rows, padding_overhead

# (lengths, budget, options) -> [(rows of the batch, its padded length), ...]
PACK_CASES = [
    pytest.param([], 10, {}, [], id="empty"),
    pytest.param([3, 1, 2, 8], 6, {}, [([1, 2], 2), ([0], 3), ([3], 8)], id="docstring-budget"),
    pytest.param([10, 10, 30, 31], 1000, {}, [([0, 1], 10), ([2, 3], 31)], id="docstring-slack"),
    pytest.param([5, 5, 5, 5], 10, {}, [([0, 1], 5), ([2, 3], 5)], id="budget-exactly-filled"),
    pytest.param([5, 5, 5, 5], 9, {}, [([0], 5), ([1], 5), ([2], 5), ([3], 5)], id="one-row-per-batch"),
    pytest.param([100], 10, {}, [([0], 100)], id="single-over-budget-row"),
    pytest.param([2, 50, 2], 10, {}, [([0, 2], 2), ([1], 50)], id="over-budget-row-alone"),
    pytest.param([4, 4, 4, 4, 4], 100, {"max_rows": 2}, [([0, 1], 4), ([2, 3], 4), ([4], 4)], id="max-rows"),
    # slack 0.1 on a shortest row of 10: cap = max(int(11.0), 10 + 2) = 12
    pytest.param([10, 11, 12, 13], 1000, {}, [([0, 1, 2], 12), ([3], 13)], id="slack-floor-two-tokens"),
    pytest.param([10, 11, 12, 13], 1000, {"slack": 0.5}, [([0, 1, 2, 3], 13)], id="wider-slack"),
    # slack 0.1 on 100: cap = 110, not the floor of 102
    pytest.param([100, 105, 110, 111], 10_000, {}, [([0, 1, 2], 110), ([3], 111)], id="slack-relative"),
    pytest.param([7, 7, 8, 9], 1000, {"slack": 0.0}, [([0, 1, 2, 3], 9)], id="zero-slack-keeps-floor"),
    # ties keep input order (stable sort)
    pytest.param([2, 1, 2, 1], 100, {}, [([1, 3, 0, 2], 2)], id="stable-ties"),
    # budget binds before slack: 3 rows of 30 = 90 <= 100, a 4th would make 4 * 31 = 124
    pytest.param([30, 30, 30, 31, 31], 100, {}, [([0, 1, 2], 30), ([3, 4], 31)], id="budget-binds"),
]


@pytest.mark.parametrize("lengths, budget, options, expected", PACK_CASES)
def test_pack_batches_table(lengths, budget, options, expected):
    batches = pack_batches(np.array(lengths, dtype=np.int64), budget, **options)
    assert [(b.rows.tolist(), b.seq_len) for b in batches] == expected


def _cap(shortest: int, slack: float) -> int:
    return max(int(shortest * (1.0 + slack)), shortest + 2)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("budget", [1, 64, 512, 4096, 16_384])
def test_pack_batches_invariants(seed, budget):
    """Every row exactly once, sorted; rows * seq_len <= budget unless one row; slack; maximal cuts."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 300, size=int(rng.integers(1, 400)))
    slack, max_rows = 0.1, 64
    batches = pack_batches(lengths, budget, max_rows=max_rows, slack=slack)

    order = np.concatenate([b.rows for b in batches])
    assert sorted(order.tolist()) == list(range(len(lengths)))  # every row exactly once
    assert order.tolist() == np.argsort(lengths, kind="stable").tolist()  # shortest first
    for i, b in enumerate(batches):
        lens = lengths[b.rows]
        assert b.seq_len == lens.max()
        assert b.padded_tokens == len(b.rows) * b.seq_len
        assert len(b.rows) <= max_rows
        if len(b.rows) > 1:
            assert len(b.rows) * b.seq_len <= budget
        assert lens.max() <= _cap(int(lens.min()), slack)
        if i + 1 < len(batches):  # the cut was forced: the next row did not fit
            nxt = int(lengths[batches[i + 1].rows[0]])
            too_big = (len(b.rows) + 1) * nxt > budget
            assert too_big or nxt > _cap(int(lens.min()), slack) or len(b.rows) == max_rows


def test_pack_batches_rejects_non_positive_budget():
    with pytest.raises(ValueError, match="budget"):
        pack_batches(np.array([1, 2]), 0)


# Three rows: [11, 12], [13], [14, 15, 16]
FLAT = np.array([11, 12, 13, 14, 15, 16], dtype=np.int32)
OFFSETS = np.array([0, 2, 3, 6], dtype=np.int64)

PAD_CASES = [
    pytest.param([1, 0], 2, [[13, 0], [11, 12]], id="two-rows"),
    pytest.param([2, 0, 1], 3, [[14, 15, 16], [11, 12, 0], [13, 0, 0]], id="all-rows"),
    pytest.param([0], 5, [[11, 12, 0, 0, 0]], id="wider-than-row"),
    pytest.param([2], 3, [[14, 15, 16]], id="exact"),
]


@pytest.mark.parametrize("rows, seq_len, expected", PAD_CASES)
def test_pad_rows_table(rows, seq_len, expected):
    mat = pad_rows(FLAT, OFFSETS, np.array(rows, dtype=np.int64), seq_len)
    assert mat.dtype == np.int32
    assert mat.tolist() == expected


def test_pad_rows_writes_into_a_given_buffer():
    buf = np.full(20, -1, dtype=np.int32)  # stale contents must not leak into the padding
    mat = pad_rows(FLAT, OFFSETS, np.array([0, 1]), 3, out=buf)
    assert mat.tolist() == [[11, 12, 0], [13, 0, 0]]
    assert np.shares_memory(mat, buf)
    assert buf[6:].tolist() == [-1] * 14  # nothing written past the matrix


def test_pad_rows_of_packed_batches_round_trips():
    """pad_rows over pack_batches' output gives back every row's ids, nothing else."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=200)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = rng.integers(1, 30_000, size=int(offsets[-1])).astype(np.int32)
    for b in pack_batches(lengths, 256):
        mat = pad_rows(flat, offsets, b.rows, b.seq_len)
        for r, row in zip(b.rows, mat):
            n = lengths[r]
            assert row[:n].tolist() == flat[offsets[r] : offsets[r + 1]].tolist()
            assert not row[n:].any()


OVERHEAD_CASES = [
    pytest.param([Batch(np.array([0, 1]), 4)], [4, 2], 8 / 6 - 1, id="one-third"),
    pytest.param([Batch(np.array([0, 1]), 3), Batch(np.array([2]), 7)], [3, 3, 7], 0.0, id="rectangular"),
    pytest.param([], [], 0.0, id="empty"),
    pytest.param([Batch(np.array([0]), 2), Batch(np.array([1, 2]), 6)], [2, 1, 6], 14 / 9 - 1, id="two-batches"),
]


@pytest.mark.parametrize("batches, lengths, expected", OVERHEAD_CASES)
def test_padding_overhead_table(batches, lengths, expected):
    assert padding_overhead(batches, np.array(lengths, dtype=np.int64)) == pytest.approx(expected, abs=1e-12)


def test_padding_overhead_of_docstring_packing():
    lengths = np.array([3, 1, 2, 8])
    # batches [1, 2] @ 2, [0] @ 3, [3] @ 8: padded 4 + 3 + 8 = 15 over 14 real tokens
    assert padding_overhead(pack_batches(lengths, 6), lengths) == pytest.approx(15 / 14 - 1)
