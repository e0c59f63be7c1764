"""Length bucketing and token-budget packing: pure functions over token lengths.

Sorting a large window of documents by length and cutting batches by a budget of *padded* tokens
makes every batch nearly rectangular (little padding) and about equally expensive (the GPU sees
the same amount of work whether the documents are short or long).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Batch:
    """Rows of a window (indices into it) that go through one forward pass together."""

    rows: np.ndarray  # int64 indices into the window, sorted by length
    seq_len: int  # padded length: the longest row of the batch

    @property
    def padded_tokens(self) -> int:
        return int(len(self.rows) * self.seq_len)


def pack_batches(lengths: np.ndarray, budget: int, *, max_rows: int = 65_536, slack: float = 0.1) -> list[Batch]:
    """Sort rows by length and cut batches so that rows * longest <= budget.

    A batch also closes before its longest row would exceed its shortest by more than `slack`
    (relative, with a floor of 2 tokens): on a small window a large budget would otherwise span
    short and long rows and pad the short ones. A row longer than the budget gets a batch of its
    own. Rows are taken shortest first, so a batch's newest row is always its longest.

    >>> [b.rows.tolist() for b in pack_batches(np.array([3, 1, 2, 8]), budget=6)]
    [[1, 2], [0], [3]]
    >>> [b.rows.tolist() for b in pack_batches(np.array([10, 10, 30, 31]), budget=1000)]
    [[0, 1], [2, 3]]
    """
    if budget < 1:
        raise ValueError(f"budget must be positive, not {budget}")
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")
    sorted_len = lengths[order]
    batches: list[Batch] = []
    start = 0
    n = len(order)
    while start < n:
        # rows start..end-1 fit when (end - start) * sorted_len[end - 1] <= budget; since sorted_len
        # grows with end, the largest such end is found by a binary search over a monotone test.
        # no batch can hold more rows than the budget allows at the shortest remaining length
        limit = min(max_rows, budget // max(1, int(sorted_len[start])))
        ends = np.arange(start + 1, min(n, start + max(1, limit)) + 1)
        first = int(sorted_len[start])
        cap = max(int(first * (1.0 + slack)), first + 2)
        fits = ((ends - start) * sorted_len[ends - 1] <= budget) & (sorted_len[ends - 1] <= cap)
        k = int(np.searchsorted(~fits, True))  # first end that does not fit
        end = ends[k - 1] if k > 0 else start + 1
        batches.append(Batch(rows=order[start:end], seq_len=int(sorted_len[end - 1])))
        start = end
    return batches


def padding_overhead(batches: list[Batch], lengths: np.ndarray) -> float:
    """Padded tokens over real tokens, minus one (0.0 means no padding at all)."""
    real = int(np.sum(lengths))
    padded = sum(b.padded_tokens for b in batches)
    return padded / real - 1.0 if real else 0.0


def pad_rows(flat_ids: np.ndarray, offsets: np.ndarray, rows: np.ndarray, seq_len: int, out: np.ndarray | None = None) -> np.ndarray:
    """Gather the token ids of `rows` into a zero-padded (len(rows), seq_len) int32 matrix.

    `flat_ids[offsets[i]:offsets[i+1]]` are row i's ids. `out`, when given, is a buffer of at
    least that many elements (pinned memory on CUDA) that the matrix is written into.
    """
    lens = offsets[rows + 1] - offsets[rows]
    n = len(rows)
    size = n * seq_len
    mat = (np.empty(size, np.int32) if out is None else out[:size]).reshape(n, seq_len)
    mat.fill(0)
    mask = np.arange(seq_len)[None, :] < lens[:, None]
    # positions of every real token in flat_ids, row by row in batch order
    starts = np.repeat(offsets[rows], lens)
    within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    mat[mask] = flat_ids[starts + within]
    return mat
