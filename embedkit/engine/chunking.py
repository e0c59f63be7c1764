"""Splitting long documents into overlapping chunks on token boundaries.

A document longer than the chunk size is cut into pieces of at most `cap` content tokens, each
starting `overlap` tokens before the previous one ended. A cut is moved back to the nearest
sentence end (or, failing that, word boundary) within the chunk's second half, so that a chunk
rarely ends mid-sentence; nothing is dropped. Each chunk keeps its character span in the
document's text, from the tokenizer's offsets, so a search hit can show where it came from.
"""

from __future__ import annotations

from typing import Sequence

SENTENCE_END = ".!?"


def chunk_bounds(offsets: Sequence[tuple[int, int]], text: str, cap: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) token ranges covering all `len(offsets)` tokens of `text`.

    `offsets[i]` is token i's character span. Each range holds at most `cap` tokens and begins
    `overlap` tokens before the previous range's end (fewer when a cut moved back).

    >>> text = "One two. Three four five. Six."
    >>> spans = [(0, 3), (4, 7), (7, 8), (9, 14), (15, 19), (20, 24), (24, 25), (26, 29), (29, 30)]
    >>> chunk_bounds(spans, text, cap=5, overlap=0)
    [(0, 3), (3, 7), (7, 9)]
    """
    n = len(offsets)
    if cap < 1 or not 0 <= overlap < max(1, cap // 2 + cap % 2):
        raise ValueError(f"chunk of {cap} tokens cannot overlap by {overlap}")
    bounds: list[tuple[int, int]] = []
    start = 0
    while True:
        end = min(start + cap, n)
        if end < n:
            end = _cut(offsets, text, start + (cap + 1) // 2, end)
        bounds.append((start, end))
        if end >= n:
            return bounds
        # the next chunk starts `overlap` tokens back; a cut at least half a chunk in keeps it moving
        start = max(end - overlap, start + 1)


def _cut(offsets: Sequence[tuple[int, int]], text: str, lo: int, hi: int) -> int:
    """The best end in [lo, hi]: the last sentence end, else the last word boundary, else hi.
    End j means tokens [.., j) are in; the boundary is between token j-1 and token j."""
    word = 0
    for j in range(hi, lo - 1, -1):
        prev_end, next_start = offsets[j - 1][1], offsets[j][0]
        gap = text[prev_end:next_start]
        if "\n" in gap or (gap and prev_end > 0 and text[prev_end - 1] in SENTENCE_END):
            return j
        if gap and not word:
            word = j
    return word or hi
