"""Planning a run: how many GPUs, for how long, for how much, from a measured throughput.

The cost of an offline job is

    $/1M tokens = ($/GPU-hour x (1 - spot discount)) / (tokens/s per GPU x 3600) x 1e6

and a fleet finishes inside a window when the work, spread over its GPUs, plus the slowest
shard's tail, fits. Preemptible GPUs are usable because every stage resumes per shard: a
preemption costs the unfinished part of one shard plus a restart. `plan_fleet` is pure
arithmetic over those quantities (tested with tables); `count_tokens` measures the token count
of an input, exactly or from a random sample with a confidence interval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import EmbedkitError

Z95 = 1.96  # two-sided 95% normal quantile
SAMPLE_BLOCK = 64  # rows per sampled block
READ_ROWS = 65_536  # rows per read when counting every row
MIN_SHARDS = 4  # a job is cut into at least this many shards (see shard_seconds_for)


@dataclass(frozen=True)
class PlanInput:
    """What a plan needs. Throughput is per GPU, measured (e.g. `embedkit encode --dry-run`, docs/benchmarks.md)."""

    tokens: float
    tokens_per_second: float
    window_hours: float
    gpu_price: float  # $ per GPU-hour, on demand
    spot_discount: float = 0.0  # 0.6 = 60% off the on-demand price
    preemptions_per_hour: float = 0.0  # per GPU; 0 for on-demand GPUs
    restart_seconds: float = 120.0  # a preempted worker's way back: new machine, model load
    rework_bound: float = 0.01  # at most this fraction of the work is redone after preemptions
    max_shard_hours: float = 0.5  # shard length without preemptions: bounds the tail (straggler)

    def __post_init__(self) -> None:
        checks = {
            "--tokens": self.tokens > 0, "--tokens-per-second": self.tokens_per_second > 0,
            "--window": self.window_hours > 0, "--gpu-price": self.gpu_price >= 0,
            "--spot-discount": 0 <= self.spot_discount < 1, "--preemptions-per-hour": self.preemptions_per_hour >= 0,
            "--rework-bound": 0 < self.rework_bound < 1, "--restart-seconds": self.restart_seconds >= 0,
        }  # fmt: skip
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise EmbedkitError(f"{bad[0]} is out of range (tokens, throughput and window positive; spot discount in [0, 1))")


@dataclass(frozen=True)
class Fleet:
    """One fleet size and what it gives."""

    gpus: int
    hours: float  # expected wall time, the tail included
    gpu_hours: float  # billed: every GPU held until the job ends
    total_dollars: float
    dollars_per_million_tokens: float  # with overheads (preemption re-work, restarts, tail)
    within_window: bool


@dataclass(frozen=True)
class Plan:
    """The smallest fleet that finishes inside the window, and its neighbours."""

    inputs: PlanInput
    price_per_gpu_hour: float  # after the spot discount
    ideal_dollars_per_million_tokens: float  # the formula above: no overheads
    effective_tokens_per_second: float  # per GPU, after preemption losses
    shard_seconds: float  # shard length that keeps re-work under the bound
    shard_tokens: float
    tail_hours: float  # the straggler margin: the last shard's length
    fleet: Fleet
    smaller: Fleet | None  # one GPU fewer: misses the window by how much
    larger: Fleet  # one GPU more: how much more it costs

    def to_dict(self) -> dict:
        return asdict(self)


def dollars_per_million(price_per_gpu_hour: float, tokens_per_second: float) -> float:
    """($/GPU-hour) / (tokens/s per GPU x 3600) x 1e6."""
    return price_per_gpu_hour / (tokens_per_second * 3600) * 1e6


def shard_seconds_for(p: PlanInput) -> float:
    """The longest shard whose expected re-work stays under the bound.

    A preemption lands, on average, halfway through a shard, so it redoes half a shard: the
    re-work fraction is rate x shard / 2. Without preemptions the cap is max_shard_hours. And a
    job is cut into MIN_SHARDS shards or more: a shard, and so the straggler margin, is never a
    large part of a short job (a 45-second job does not wait half an hour for its last shard).
    """
    cap = min(p.max_shard_hours * 3600, p.tokens / p.tokens_per_second / MIN_SHARDS)
    if p.preemptions_per_hour == 0:
        return cap
    return min(cap, 2 * p.rework_bound * 3600 / p.preemptions_per_hour)


def plan_fleet(p: PlanInput) -> Plan:
    """Smallest number of GPUs that finishes inside the window, with cost; see the module docstring."""
    price = p.gpu_price * (1 - p.spot_discount)
    shard = shard_seconds_for(p)
    # time lost per GPU-second: half a shard of re-work plus a restart per preemption
    lost = p.preemptions_per_hour / 3600 * (shard / 2 + p.restart_seconds)
    if lost >= 1:
        raise EmbedkitError("preemptions are so frequent that no work finishes; lower --preemptions-per-hour or the restart time")
    effective = p.tokens_per_second * (1 - lost)
    work = p.tokens / effective  # GPU-seconds
    window = p.window_hours * 3600
    if window <= shard:
        raise EmbedkitError(f"a {p.window_hours:g} h window is shorter than one shard ({shard / 3600:.2f} h); use a longer window")
    gpus = max(1, math.ceil(work / (window - shard)))
    fleet = fleet_at(p, gpus, work, shard, price)
    return Plan(
        inputs=p, price_per_gpu_hour=price, ideal_dollars_per_million_tokens=dollars_per_million(price, p.tokens_per_second),
        effective_tokens_per_second=effective, shard_seconds=shard, shard_tokens=shard * effective, tail_hours=shard / 3600,
        fleet=fleet, smaller=fleet_at(p, gpus - 1, work, shard, price) if gpus > 1 else None, larger=fleet_at(p, gpus + 1, work, shard, price),
    )  # fmt: skip


def fleet_at(p: PlanInput, gpus: int, work: float, shard: float, price: float) -> Fleet:
    seconds = work / gpus + shard  # even spread, then at worst one shard started at the end
    gpu_hours = gpus * seconds / 3600
    total = gpu_hours * price
    return Fleet(gpus, seconds / 3600, gpu_hours, total, total / p.tokens * 1e6, seconds <= p.window_hours * 3600 + 1e-9)


def parse_duration(text: str | float) -> float:
    """Hours from "12h", "90m", "3600s", "1.5h", "2d" or a plain number of hours."""
    if isinstance(text, (int, float)):
        return float(text)
    t = str(text).strip().lower()
    units = {"d": 24.0, "h": 1.0, "m": 1 / 60, "s": 1 / 3600}
    scale = units.get(t[-1:], None)
    number = t[:-1] if scale is not None else t
    try:
        value = float(number) * (scale if scale is not None else 1.0)
    except ValueError:
        raise EmbedkitError(f"cannot read the duration {text!r}; use e.g. 12h, 90m, 3600s or 1.5") from None
    if not value > 0:
        raise EmbedkitError(f"a duration must be positive, not {text!r}")
    return value


def plan(
    *,
    tokens_per_second: float,
    window: str | float,
    gpu_price: float,
    tokens: float | None = None,
    input: str | Path | None = None,
    docs: float | None = None,
    avg_tokens: float | None = None,
    model: str | None = None,
    sample: int = 10_000,
    spot_discount: float = 0.0,
    preemptions_per_hour: float = 0.0,
    rework_bound: float = 0.01,
    restart_seconds: float = 120.0,
) -> tuple[Plan, TokenCount | None]:
    """A fleet plan for `tokens` tokens, for `docs` documents of `avg_tokens` tokens each, or for
    INPUT's tokens counted with `model`'s tokenizer.

    >>> p, _ = embedkit.plan(tokens=1e12, tokens_per_second=4.1e6, window="12h", gpu_price=3.0)  # doctest: +SKIP
    >>> p.fleet.gpus, p.fleet.total_dollars                                                    # doctest: +SKIP
    """
    from ..config import DEFAULT_MODEL

    if (docs is None) != (avg_tokens is None):
        raise EmbedkitError("--docs and --avg-tokens go together: the job is docs x average tokens per doc")
    if sum(x is not None for x in (tokens, input, docs)) != 1:
        raise EmbedkitError("give the job's size as exactly one of --tokens N, --input INPUT, or --docs N with --avg-tokens M")
    if docs is not None:
        tokens = float(docs) * float(avg_tokens)  # type: ignore[arg-type]
    count = None
    if input is not None:
        count = count_tokens(input, model or DEFAULT_MODEL, sample=sample)
        tokens = count.tokens
    inputs = PlanInput(
        tokens=float(tokens), tokens_per_second=tokens_per_second, window_hours=parse_duration(window), gpu_price=gpu_price,
        spot_discount=spot_discount, preemptions_per_hour=preemptions_per_hour, rework_bound=rework_bound,
        restart_seconds=restart_seconds,
    )  # fmt: skip
    return plan_fleet(inputs), count


def describe(p: Plan, count: TokenCount | None = None) -> str:
    """The plan as a few lines for a terminal."""
    i, f = p.inputs, p.fleet
    lines = []
    if count is not None:
        how = "counted exactly" if count.exact else f"estimated from {count.sample_rows:,} sampled rows, 95% CI +/- {count.ci95:,.0f}"
        lines.append(f"input: {count.rows:,} rows, {count.tokens:,.0f} tokens ({how}); {100 * count.truncated_fraction:.1f}% truncated")
    lines += [
        f"job: {i.tokens:,.0f} tokens at {i.tokens_per_second:,.0f} tokens/s per GPU, window {i.window_hours:g} h",
        f"price: ${p.price_per_gpu_hour:.2f}/GPU-h after a {100 * i.spot_discount:.0f}% spot discount; "
        f"${p.ideal_dollars_per_million_tokens:.4g} per 1M tokens at full use",
        f"shards: {p.shard_seconds / 60:.1f} min each ({p.shard_tokens:,.0f} tokens), so re-work after preemptions stays under "
        f"{100 * i.rework_bound:g}% at {i.preemptions_per_hour:g} preemptions per GPU-hour; straggler margin {_duration(p.shard_seconds)}",
        f"-> {gpus_text(f.gpus)}, finished in {_duration(f.hours * 3600)}, {f.gpu_hours:,.2f} GPU-h, ${f.total_dollars:,.2f} "
        f"(${f.dollars_per_million_tokens:.4g} per 1M tokens with overheads)",
    ]
    if p.smaller is not None:
        s = p.smaller
        lines.append(f"   {gpus_text(s.gpus)}: {_duration(s.hours * 3600)}, misses the window by {_duration((s.hours - i.window_hours) * 3600)} "
                     f"(${s.total_dollars:,.2f})")  # fmt: skip
    lg = p.larger
    lines.append(f"   {gpus_text(lg.gpus)}: {_duration(lg.hours * 3600)}, {_duration((f.hours - lg.hours) * 3600)} sooner for "
                 f"${lg.total_dollars - f.total_dollars:,.2f} more")  # fmt: skip
    return "\n".join(lines)


def gpus_text(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def _duration(seconds: float) -> str:
    """Seconds as a terminal reads them: "45 s", "12.5 min", "3.20 h".

    >>> _duration(45), _duration(750), _duration(11520)
    ('45 s', '12.5 min', '3.20 h')
    """
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def plan_command(tokens: float, tokens_per_second: float, gpu_price: float, spot_discount: float = 0.0) -> str:
    """The `embedkit plan` command line for a measured job: a dry run prints it, ready to run."""
    spot = f" --spot-discount {spot_discount:g}" if spot_discount else ""
    return f"embedkit plan --tokens {tokens:.6g} --tokens-per-second {tokens_per_second:.0f} --window 12h --gpu-price {gpu_price:g}{spot}"


# ---- measuring the input -------------------------------------------------------------------


@dataclass(frozen=True)
class TokenCount:
    """Tokens the encoder will read (after truncation), for all rows or estimated from a sample."""

    rows: int
    tokens: float
    exact: bool
    sample_rows: int
    ci95: float  # half-width of the 95% confidence interval of `tokens` (0 when exact)
    mean_tokens: float
    truncated_fraction: float

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self, what: str = "tokens") -> str:
        """One line: rows, tokens, how they were counted, the share truncated."""
        how = "counted exactly" if self.exact else f"from {self.sample_rows:,} sampled rows, 95% CI +/- {self.ci95:,.0f}"
        return f"input: {self.rows:,} rows, {self.tokens:,.0f} {what} ({how}); {100 * self.truncated_fraction:.1f}% truncated"


def run_cost(seconds: float, tokens: float, gpu_price: float | None, spot_discount: float) -> tuple[float | None, float | None]:
    """($ for `seconds` on one device, $ per 1M of `tokens`) at the price after the discount;
    (None, None) without a price."""
    if gpu_price is None:
        return None, None
    dollars = seconds / 3600 * gpu_price * (1 - spot_discount)
    return dollars, (dollars / tokens * 1e6 if tokens else None)


def count_tokens(input: str | Path, model: str, *, sample: int = 10_000, seed: int = 0, text_column: str = "text",
                 max_seq_length: int | None = None, chunk_tokens: int | None = None, chunk_overlap: int = 0,
                 prompt_name: str | None = None, prompt: str | None = None) -> TokenCount:  # fmt: skip
    """Token count of INPUT with the model's tokenizer and truncation, from `sample` random rows
    (every row when there are no more; `sample=0` counts every row). With `chunk_tokens`, long
    texts are split as encode splits them: every token counts, and the overlaps twice. The
    document prompt (`prompt_name`, `prompt`, else the model's default) counts in every row."""
    from ..engine.models import (
        fast_tokenizer_json,
        load_sentence_transformer,
        resolve_model,
        resolve_prompts,
        truncation_side,
    )
    from ..engine.tokenize import TextTokenizer
    from ..io.corpus import Columns, open_corpus

    corpus = open_corpus(input, Columns(text_column, None))
    n = corpus.num_rows
    if n == 0:
        raise EmbedkitError("the input has no rows")
    source = resolve_model(model)
    st = load_sentence_transformer(source, "cpu")
    limit = chunk_tokens or max_seq_length or st.max_seq_length
    prompts, _ = resolve_prompts(st, source, prompt_name=prompt_name, prompt=prompt)
    tok = TextTokenizer(fast_tokenizer_json(st), limit, truncation_side(st), chunk_overlap if chunk_tokens else None, prompts.document)

    def measure(texts: list[str], ids: list) -> tuple[np.ndarray, np.ndarray]:
        got = tok(texts)
        return got.text_tokens(), got.text_truncated()

    return count_sampled(corpus, measure, sample, seed)


def count_sampled(corpus, measure: Callable[[list[str], list], tuple], sample: int, seed: int) -> TokenCount:
    """Every row's tokens (`sample` 0 or at least the rows), else a cluster sample of random
    blocks of consecutive rows (a read per block, not per row) and its ratio estimate."""
    return sample_lengths(corpus, measure, sample, seed)[0]


def sample_lengths(corpus, measure: Callable[[list[str], list], tuple], sample: int, seed: int) -> tuple[TokenCount, np.ndarray, list]:
    """count_sampled's count, with the measured rows' token lengths (0 for an empty text) and
    the [start, stop) spans they were read from, in order."""
    n = corpus.num_rows
    if sample == 0 or sample >= n:
        lengths, truncated = _lengths(corpus, measure, [(0, n)])
        return TokenCount(n, float(lengths.sum()), True, n, 0.0, float(lengths.mean()), float(truncated.mean())), lengths, [(0, n)]
    spans = random_blocks(n, sample, seed)
    lengths, truncated = _lengths(corpus, measure, spans)
    return estimate_from_blocks(n, spans, lengths, truncated), lengths, spans


def estimate_from_blocks(n: int, spans: list[tuple[int, int]], lengths: np.ndarray, truncated: np.ndarray) -> TokenCount:
    """The token count of n rows from per-row `lengths` of the sampled blocks `spans`
    (random_blocks): a ratio estimate with its 95% confidence interval."""
    k, blocks_total = len(spans), -(-n // SAMPLE_BLOCK)
    sizes = np.array([b - a for a, b in spans], dtype=np.float64)
    sums = np.add.reduceat(lengths, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64))
    mean = float(sums.sum() / sizes.sum())  # ratio estimator: tokens per row
    # its standard error from the blocks' residuals, with the finite-population correction
    if k > 1:
        resid = sums - mean * sizes
        se = math.sqrt(float((resid**2).sum()) / (k * (k - 1))) / float(sizes.mean()) * math.sqrt(max(0.0, 1 - k / blocks_total))
    else:
        se = float("inf")
    return TokenCount(n, n * mean, False, int(sizes.sum()), Z95 * se * n, mean, float(truncated.mean()))


def random_blocks(n: int, rows: int, seed: int) -> list[tuple[int, int]]:
    """[start, stop) of about `rows` rows of [0, n): random blocks of SAMPLE_BLOCK consecutive rows, in order."""
    blocks_total = -(-n // SAMPLE_BLOCK)
    k = min(blocks_total, -(-rows // SAMPLE_BLOCK))
    picked = np.sort(np.random.default_rng(seed).choice(blocks_total, size=k, replace=False))
    return [(int(b) * SAMPLE_BLOCK, min(n, (int(b) + 1) * SAMPLE_BLOCK)) for b in picked]


def _lengths(corpus, measure: Callable[[list[str], list], tuple], spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """`measure(texts, ids)` -> (token lengths, truncated flags) of rows [a, b) per span, in
    order; null, empty and blank texts count 0 tokens (encode and generate skip them)."""
    lengths, truncated = [], []
    for a, b in spans:
        for lo in range(a, b, READ_ROWS):
            t = corpus.read(lo, min(b, lo + READ_ROWS))
            texts = t.column("text").to_pylist()
            keep = [i for i, x in enumerate(texts) if x is not None and x.strip()]
            got_len = np.zeros(len(texts))
            got_cut = np.zeros(len(texts), dtype=bool)
            if keep:
                ids = t.column("id").to_pylist()
                got_len[keep], got_cut[keep] = measure([texts[i] for i in keep], [ids[i] for i in keep])
            lengths.append(got_len)
            truncated.append(got_cut)
    return np.concatenate(lengths), np.concatenate(truncated)


# ---- scheduling --------------------------------------------------------------------------------

SHARD_SAMPLE_ROWS = 64  # rows per shard (one random block) tokenized to rank the shards of a multi-worker run; ~8 ms a shard


SHARDS_PER_WORKER = 4  # by default, a multi-worker run cuts at least this many shards per worker
MIN_SHARD_ROWS = 1_000


def default_shard_rows(rows: int, device_type: str, workers: int = 1) -> int:
    """The shard size of a new output when the user gives none: DEFAULT_SHARD_ROWS for the
    device, capped for several workers so each gets SHARDS_PER_WORKER shards or more (then the
    last shard to finish is a small part of any worker's share, and re-issuing it is cheap).

    >>> default_shard_rows(10_000_000, "cuda", 1), default_shard_rows(10_000_000, "cuda", 8)
    (1000000, 312500)
    """
    from ..config import DEFAULT_SHARD_ROWS

    base = DEFAULT_SHARD_ROWS[device_type]
    if workers <= 1:
        return base
    return min(base, max(MIN_SHARD_ROWS, -(-rows // (workers * SHARDS_PER_WORKER))))


def longest_first(corpus, job, pending: list) -> list:
    """Pending shards ordered by their token count, the most first (each estimated from
    SHARD_SAMPLE_ROWS rows at a random place). Shards have equal rows but not equal tokens; starting the
    long ones first leaves short ones for the end, so the workers finish together."""
    if len(pending) < 2:
        return list(pending)
    from ..engine.tokenize import TextTokenizer

    tok = TextTokenizer(job.tokenizer_json, job.max_length, job.truncation_side, job.chunk_overlap, job.prompt)
    tokens = {s.index: shard_tokens(corpus, lambda texts, ids: (tok(texts).text_tokens(), 0), s) for s in pending}
    return sorted(pending, key=lambda s: (-tokens[s.index], s.index))


def shard_tokens(corpus, measure: Callable[[list[str], list], tuple], shard, rows: int = SHARD_SAMPLE_ROWS) -> float:
    """A shard's token count, estimated from random blocks of about `rows` of its rows."""
    spans = [(shard.start + a, shard.start + b) for a, b in random_blocks(shard.rows, rows, seed=shard.index)]
    lengths, _ = _lengths(corpus, measure, spans)
    return float(lengths.mean()) * shard.rows if len(lengths) else 0.0
