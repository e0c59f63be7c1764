"""A whole run's decode time for the slot decoder, from a few measured steps (`generate --dry-run`).

The decoder sorts a shard's prompts by length and cuts them into groups, each decoded with as
many KV-cache slots as fit at its longest prompt (`engine.decode.plan_groups`): on 20,000 pydocs
prompts and an H200, 16,384 slots for the short ones, 3,068 for the longer, 25 for the longest.
A calibration of a few thousand sampled rows can form other groups (with fewer rows, the long
prompts fit in the first group), and a decode step's time does not grow in proportion to its
rows: narrow steps are bound by each kernel's fixed cost, wide ones by the matrix products and
the cache reads. A
straight line through two small calibrations, extrapolated to the run's width, predicted 7.2 s
of decoding for a run that decoded in 3.0 s (benchmarks.md, dry run 7).

So the run's groups are planned as the decoder will plan them, from the sampled prompt lengths,
and each group's step time is read off steps measured at widths around its own: the
calibrations', and on a GPU a short probe at the run's widest group (`dryrun`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..engine.decode import plan_groups


def run_groups(own_lengths: Sequence[int], rows: float, max_new: int, max_slots: int, budget: int) -> list[tuple[float, float, int]]:
    """(rows, slots, longest prompt) of each group the decoder will form over `rows` prompts
    whose lengths (the shared start taken off) are distributed as the sample `own_lengths`: each
    sampled prompt stands for rows / len(own_lengths) prompts, so the sample is planned with the
    slot limit and the cache budget divided by that weight (the same cuts, in sample units)."""
    own = sorted(max(1, int(x)) for x in own_lengths)
    if not own or rows <= 0:
        return []
    w = rows / len(own)
    groups = plan_groups(own, max_new, max(1, round(max_slots / w)), max(1, int(budget / w)))
    # slots: never more than the decoder may have (the sample's slot limit is rounded)
    return [((g.stop - g.start) * w, min((g.stop - g.start) * w, g.slots * w, max_slots), own[g.stop - 1]) for g in groups]


def step_seconds(width: float, points: Sequence[tuple[float, float]]) -> float:
    """A decode step's seconds at `width` rows decoded at once: linear between the measured
    (rows at once, seconds) points, along the nearest segment beyond them, never below 0."""
    pts = sorted(points)
    if not pts:
        raise ValueError("no measured decode step")
    if len(pts) == 1:
        return pts[0][1]
    i = 0
    while i < len(pts) - 2 and width > pts[i + 1][0]:
        i += 1
    (x1, y1), (x2, y2) = pts[i], pts[i + 1]
    slope = (y2 - y1) / (x2 - x1) if x2 > x1 else 0.0
    return max(0.0, y1 + slope * (width - x1))


def decode_seconds(groups: Sequence[tuple[float, float, int]], step_tokens: float, occupancy: float,
                   points: Sequence[tuple[float, float]]) -> tuple[float, float]:  # fmt: skip
    """(seconds, mean rows at once) of decoding `groups` (`run_groups`), each row making
    `step_tokens` tokens in decode steps: a group's steps are its tokens over the rows it
    decodes at once (its slots times `occupancy`, the busy share of slots the calibration saw),
    each at `step_seconds` of that width."""
    seconds = steps = tokens = 0.0
    for rows, slots, _ in groups:
        at_once = max(1.0, slots * occupancy)
        n = rows * step_tokens / at_once
        seconds += n * step_seconds(at_once, points)
        steps += n
        tokens += rows * step_tokens
    return seconds, (tokens / steps if steps else 0.0)
