"""`generate --dry-run`: the prompts counted on a sample, the real generate run on samples of
rows (cold, warm, larger, and on a GPU a probe at the run's widest decoding), extrapolated with
the decoder's own grouping (`plan.decode_time`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import RunOptions
from ..errors import EmbedkitError, first_line
from ..plan.planning import TokenCount, plan_command, random_blocks, run_cost, sample_lengths
from ..units import human_bytes
from .calibration import CALIBRATION_SHARE, MAX_CALIBRATION_S, cost_line, folder_bytes, kernel_compiles, preload

# ---- generate dry run ---------------------------------------------------------------------------

# The first calibration run measures the fixed costs; a second of the same size, warm, is what
# that work costs without them; a third, sized to the dry run's budget, gives a second point of
# the decode step's cost against the number of rows decoded at once (`plan.decode_time`).
FIRST_GENERATE_ROWS = {"cuda": 512, "cpu": 4}
MAX_GENERATE_ROWS = {"cuda": 16_384, "cpu": 64}
# On a GPU, when the run's widest group decodes this many times more rows at once than the
# largest calibration, a probe measures steps at that width: PROBE_NEW_TOKENS new tokens for as
# many sampled rows as that group has slots (it costs a prefill of those prompts and 16 steps).
PROBE_WIDER = 1.5
PROBE_NEW_TOKENS = 16


@dataclass(frozen=True)
class GenerateDryRun:
    """What `generate --dry-run` measured and expects; it writes only its prediction (for OUT).

    The time is `fixed + prefill + decode + other`: fixed costs from a first, cold calibration
    run less what the same work costs warm; prefill at the measured prompt-token rate; decode
    over the groups the decoder will form for the whole run (planned from the sampled prompt
    lengths), each group's steps at the step time of its width, read off the measured steps (the
    warm calibrations' and, on a GPU, a probe's at the widest group: `plan.decode_time`); other
    work (reading, prompts, outputs, commits) per row."""

    task: str
    count: TokenCount  # prompt tokens (for score: context and target) the model will read
    device: str
    calibration_rows: int
    calibration_seconds: float  # generating, once the model was loaded (the largest calibration)
    startup_seconds: float  # the fixed costs: process start, imports, model load, first-call compiles
    new_tokens_per_row: float  # measured in the calibration (0 for score and classify)
    tokens_per_second: float  # prompt + new tokens per second over the predicted run (fixed costs apart)
    expected_new_tokens: float
    expected_seconds: float  # a fresh `embedkit generate` process, start to exit
    output_bytes: int  # measured bytes per row of the calibration's generations, times the rows
    dollars: float | None
    dollars_per_million_tokens: float | None  # per 1M prompt + new tokens
    plan: str | None = None  # with a price: the `embedkit plan` command for a fleet and a window
    parts: dict | None = None  # the expected seconds by part: prefill, decode, other (and the decode model)
    dry_run_seconds: float = 0.0
    recorded: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        parts = "" if not self.parts else " + " + " + ".join(f"{k} {self.parts[k]:,.1f} s" for k in ("prefill", "decode", "other") if k in self.parts)
        out = [
            self.count.describe("prompt tokens"),
            f"calibration on {self.device}: {self.task} of up to {self.calibration_rows:,} rows; {self.new_tokens_per_row:.1f} new tokens per row; "
            f"fixed costs {self.startup_seconds:.1f} s (start-up, model load, first calls)",
            f"expected: {self.expected_new_tokens:,.0f} new tokens, {self.expected_seconds / 3600:.2f} h on one device "
            f"({self.expected_seconds:,.0f} s: {self.startup_seconds:.1f} s fixed{parts}); generations {human_bytes(self.output_bytes)}",
        ]
        if self.dollars is not None:
            out.append(f"cost: ${self.dollars:,.2f} (${self.dollars_per_million_tokens:.4g} per 1M prompt + new tokens); "
                       f"for a fleet and a window: {self.plan}")  # fmt: skip
        out.append(cost_line(self.dry_run_seconds, self.expected_seconds, self.recorded))
        return out


def dry_run_generate(input: str | Path, cfg, *, sample: int = 10_000, calibrate_rows: int | None = None,
                     gpu_price: float | None = None, spot_discount: float = 0.0, out: str | Path | None = None) -> GenerateDryRun:  # fmt: skip
    """Count the prompt tokens of INPUT (with the generator's tokenizer, template and truncation),
    run the real generate on random samples of rows (into a temporary folder) to measure this
    device, and extrapolate time, new tokens, bytes and cost (see GenerateDryRun). `out`: the
    output the run will write, where the prediction is left for `embedkit status`."""
    import shutil
    import tempfile
    import time

    from ..digest import INPUT_CACHE
    from ..engine.encoder import choose_device
    from ..generation.pipeline import DEFAULT_PROMPTS, GENERATIONS_DIR, check_task_templates
    from ..io.corpus import Columns, open_corpus
    from ..io.objstore import out_path
    from ..run.outdir import check_out
    from ..run.record import PREDICTION, Clock, save_prediction

    clock = Clock()
    if out is not None:
        check_out(out_path(out))
    template = cfg.prompt if cfg.prompt is not None else DEFAULT_PROMPTS[cfg.task]
    check_task_templates(cfg, template)
    preload("generate")
    t = time.perf_counter()
    corpus = open_corpus(input, Columns(cfg.text_column, cfg.id_column))
    n = corpus.num_rows
    if n == 0:
        raise EmbedkitError("the input has no rows")
    count, lengths, spans = prompt_token_sample(corpus, cfg, template, sample=sample)
    choice = choose_device(cfg.device, cfg.precision)
    fingerprint = corpus.fingerprint(cache=out_path(out) / INPUT_CACHE if out is not None else None)
    extra = time.perf_counter() - t  # work a real run does not do (or, with OUT, does not redo)
    first = min(n, FIRST_GENERATE_ROWS[choice.type])
    work = Path(tempfile.mkdtemp(prefix="embedkit-dry-run-"))
    with kernel_compiles(choice.type == "cuda") as compiled:
        try:
            sampled: dict[str, int] = {}

            def calibrate(name: str, rows: int, seed: int):
                nonlocal extra
                t = time.perf_counter()
                sampled[name] = _write_generate_sample(corpus, n, rows, seed, work / f"{name}.parquet")
                extra += time.perf_counter() - t
                return _calibrate_generate(work / f"{name}.parquet", work / name, cfg, template)

            calibrate("cold", first, 1)
            after_cold, extra_cold = clock(), extra
            warm = calibrate("warm", first, 1)  # the same rows again: the same work without the fixed costs
            rough = after_cold - extra + n * warm.seconds / max(1, warm.docs)
            rows = calibrate_rows or _generate_rows(n, first, warm, rough, spent=clock(), device=choice.type)
            big = calibrate("big", rows, 2) if rows > first else warm
            big_rows = sampled["big" if rows > first else "warm"]
            per_row = folder_bytes(work / "big" / GENERATIONS_DIR) / max(1, big.docs)
            kept = n * big.docs / max(1, big_rows)  # empty texts are skipped, as in the calibration
            groups = _run_groups(lengths, kept, cfg, choice.type, big)
            probe = None
            if choice.type == "cuda" and groups and max(g[1] for g in groups) > PROBE_WIDER * _rows_at_once(big):
                probe = _probe(corpus, spans, lengths, max(groups, key=lambda g: g[1]), cfg, template, big, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    # kernels this dry run compiled are in the machine's cache for the real run (most compile in
    # the cold calibration, whose fixed costs they would inflate)
    fixed = max(0.0, after_cold - extra_cold - warm.seconds - compiled[0])
    new_per_row = big.new_tokens / max(1, big.docs)
    parts = _generate_parts(kept, count.tokens, new_per_row, warm, big, groups, probe)
    parts["kernel_compiles"] = round(compiled[0], 3)  # seconds left out of the fixed costs (see kernel_compiles)
    expected = fixed + sum(v for k, v in parts.items() if k in ("prefill", "decode", "other"))
    total = count.tokens + new_per_row * kept
    tps = total / max(1e-9, expected - fixed)
    dollars, per_million = run_cost(expected, total, gpu_price, spot_discount)
    command = plan_command(total, tps, gpu_price, spot_discount) if gpu_price is not None else None
    recorded = None
    if out is not None:
        save_prediction(out, "generate", {"input": fingerprint, "seconds": round(expected, 2), "tokens": round(total), "fixed_seconds": round(fixed, 2),
                                          "device": choice.device})  # fmt: skip
        recorded = str(out_path(out) / PREDICTION)
    return GenerateDryRun(cfg.task, count, choice.device, big.docs, big.seconds, fixed, new_per_row, tps, new_per_row * kept, expected,
                          int(per_row * kept), dollars, per_million, command, parts=parts, dry_run_seconds=clock(),
                          recorded=recorded)  # fmt: skip


def _generate_rows(n: int, first: int, warm, rough_seconds: float, spent: float, device: str) -> int:
    """Rows of the largest calibration run: what fits the time left of the dry run's budget at
    the warm run's seconds per row (larger runs decode more rows at once: they take less)."""
    budget = min(CALIBRATION_SHARE * rough_seconds, MAX_CALIBRATION_S) - spent
    per_row = warm.seconds / max(1, warm.docs)
    fit = int(budget / per_row) if per_row > 0 and budget > 0 else 0
    # at least 4x the first: the step's cost against rows at once needs two sizes apart
    return min(n, max(4 * first, min(fit, MAX_GENERATE_ROWS[device])))


def _step_point(s) -> tuple[float, float] | None:
    """(rows decoded at once, seconds) of a calibration's mean decode step: the tokens its steps
    made (a row's first new token comes from the prefill) over its steps, and its decoding time
    (capture and prefill taken off) over them; None without decoder stats."""
    d = s.decode or {}
    if not d.get("steps"):
        return None
    return max(1.0, s.new_tokens - s.docs) / d["steps"], max(0.0, d["seconds"] - d.get("prefill_s", 0.0) - d.get("capture_s", 0.0)) / d["steps"]


def _rows_at_once(s) -> float:
    point = _step_point(s)
    return point[0] if point else 0.0


def _run_groups(lengths: np.ndarray, rows: float, cfg, device: str, big) -> list[tuple[float, float, int]]:
    """The groups the slot decoder will form over the whole run (`plan.decode_time.run_groups`),
    with the cache budget and shared start the calibration's decoder had; [] without them."""
    from ..generation.tasks import SLOT_BATCH_SIZE
    from ..plan.decode_time import run_groups

    d = big.decode or {}
    budget = max((g.get("budget", 0) for g in d.get("groups") or []), default=0)
    if not d.get("steps") or not budget:
        return []
    own = [int(x) - d.get("prefix_tokens", 0) for x in lengths if x > 0]
    return run_groups(own, rows, cfg.max_new_tokens, cfg.batch_size or SLOT_BATCH_SIZE[device], budget)


def _probe(corpus, spans: list, lengths: np.ndarray, group: tuple[float, float, int], cfg, template: str, big, work: Path):
    """A short real generate at the width of the run's widest group: its slots' worth of sampled
    rows whose prompts fit that group, PROBE_NEW_TOKENS new tokens each (its steps measure a
    step at that width). None when no sampled prompt fits."""
    from dataclasses import replace

    import pyarrow as pa
    import pyarrow.parquet as pq

    _, slots, longest = group
    prefix = (big.decode or {}).get("prefix_tokens", 0)
    texts = [t for a, b in spans for t in corpus.read(a, b).column("text").to_pylist()]
    fits = [t for t, x in zip(texts, lengths) if 0 < x and x - prefix <= longest]
    if not fits:
        return None
    width = int(slots)
    table = pa.table({"id": [f"probe-{i}" for i in range(width)], "text": [fits[i % len(fits)] for i in range(width)]})
    pq.write_table(table, work / "probe.parquet")
    return _calibrate_generate(work / "probe.parquet", work / "probe", replace(cfg, max_new_tokens=min(cfg.max_new_tokens, PROBE_NEW_TOKENS)), template)


def _generate_parts(rows: float, prompt_tokens: float, new_per_row: float, small, big, groups: list, probe) -> dict:
    """The predicted run's seconds by part (see GenerateDryRun), from the warm calibrations (and
    the probe): decode over the run's own groups (`plan.decode_time`)."""
    from ..plan.decode_time import decode_seconds

    points = [p for p in (_step_point(s) for s in (small, big, probe) if s is not None) if p is not None]
    d = big.decode or {}
    if not points or not d.get("prefill_s") or not groups:  # score, classify, or another decoder: per row
        return {"other": rows * big.seconds / max(1, big.docs)}
    occupancy = _rows_at_once(big) / max(1, max(g.get("slots", 1) for g in d.get("groups") or [{}]))  # busy share of the slots
    decode, at_once = decode_seconds(groups, max(0.0, new_per_row - 1), occupancy, points)  # the first from the prefill
    # per prompt token, the shared start counted too (the decoder stores it once: its cost is in the rate)
    prefill = prompt_tokens * d["prefill_s"] / max(1, d.get("prompt_tokens", d.get("prefill_tokens", 1)))
    other = rows * max(0.0, big.seconds - d["seconds"]) / max(1, big.docs)
    return {"prefill": prefill, "decode": decode, "other": other, "steps_measured": [[round(x, 1), round(t, 6)] for x, t in sorted(points)],
            "groups": [[round(r), round(sl), longest] for r, sl, longest in groups], "rows_at_once": round(at_once, 1)}  # fmt: skip


def _write_generate_sample(corpus, n: int, rows: int, seed: int, path: Path) -> int:
    """Random blocks of about `rows` rows into a parquet file; the rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([corpus.read(a, b).select(["id", "text"]) for a, b in random_blocks(n, rows, seed=seed)])
    pq.write_table(table, path)
    return table.num_rows


def _calibrate_generate(sample: Path, out: Path, cfg, template: str):
    from dataclasses import replace

    from ..generation.pipeline import run_generate

    return run_generate(sample, out, replace(cfg, prompt=template, text_column="text", id_column="id", shard_rows=None,
                                             run=RunOptions(progress=False)))  # fmt: skip


def count_prompt_tokens(corpus, cfg, template: str, *, sample: int = 10_000, seed: int = 0) -> TokenCount:
    """Prompt tokens of every row (or of `sample` random rows, with a 95% CI), as generate counts
    them: the template, the chat wrapping and the truncation; the weights are not loaded."""
    return prompt_token_sample(corpus, cfg, template, sample=sample, seed=seed)[0]


def prompt_token_sample(corpus, cfg, template: str, *, sample: int = 10_000, seed: int = 0) -> tuple[TokenCount, np.ndarray, list]:
    """count_prompt_tokens, with each measured row's prompt tokens and the spans they were read from (`sample_lengths`)."""
    from transformers import AutoConfig, AutoTokenizer

    from ..generation.model import resolve_generator
    from ..generation.tasks import input_tokens, task_inputs

    target = resolve_generator(cfg.model)
    try:
        tok, config = AutoTokenizer.from_pretrained(target), AutoConfig.from_pretrained(target)
    except Exception as e:  # library-specific failures: one line
        first = first_line(e)
        raise EmbedkitError(f"cannot load generator {cfg.model}: {first}") from None

    def measure(texts: list[str], ids: list) -> tuple[list[int], list[bool]]:
        inputs, flags = task_inputs(texts, ids, cfg, template, tok, config)
        return [input_tokens(x) for x in inputs], flags

    return sample_lengths(corpus, measure, sample, seed)
