"""Dry runs: `encode --dry-run` and `generate --dry-run`.

A dry run counts INPUT's tokens (planning's sampling), runs the real stage on a random sample
in a temporary folder to measure this device, and extrapolates time, bytes and cost with
planning's fleet model. It sits above the stages it calibrates with (pipeline, generation);
planning itself imports no stage, so the stages can use its shard policy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import RunOptions
from .errors import EmbedkitError, first_line
from .plan.planning import (
    TokenCount,
    count_sampled,
    count_tokens,
    dollars_per_million,
    plan_command,
    random_blocks,
    run_cost,
)
from .units import human_bytes

# ---- dry run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DryRun:
    """What `encode --dry-run` measured and expects; it writes only its prediction (for OUT).

    The time is `fixed + tokens / steady`: the steady rate from a second calibration run in the
    same process (warm: model loaded, first shapes seen), and the fixed costs from the first
    (process start, imports, model load, tokenizer pool, first batches), which the steady rate
    would otherwise read as a slow rate on a small sample."""

    count: TokenCount
    device: str
    calibration_rows: int  # of the steady (second) calibration run
    calibration_tokens: int
    tokens_per_second: float  # the steady encoding rate measured on this device
    startup_seconds: float  # the fixed costs of a run: process start to the first batch, and first-batch costs
    padding_overhead: float
    expected_seconds: float  # a fresh `embedkit encode` process, start to exit
    vectors_bytes: int  # measured bytes per row of the calibration output, times the rows
    index_bytes: int  # the IVF-PQ index `build-index` would choose
    dollars: float | None
    dollars_per_million_tokens: float | None
    plan: str | None  # with a price: the `embedkit plan` command for a fleet and a window
    # --plot: the same calibration at other batch budgets: batch_tokens, tokens_per_second,
    # padding_overhead and (with a price) dollars_per_million_tokens for each
    sweep: tuple = ()
    first_rows: int = 0  # rows of the first calibration run (it measures the fixed costs)
    dry_run_seconds: float = 0.0  # what this dry run cost, process start to its answer
    input_seconds: float = 0.0  # hashing the input (a real run pins it by content), in expected_seconds
    recorded: str | None = None  # where the prediction was left for the real run to compare with

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [
            self.count.describe(),
            f"calibration on {self.device}: {self.first_rows:,} rows, then {self.calibration_rows:,} rows ({self.calibration_tokens:,} tokens) "
            f"at a steady {self.tokens_per_second:,.0f} tokens/s; fixed costs {self.startup_seconds:.1f} s (start-up, model load, first "
            f"batches); padding {100 * self.padding_overhead:.1f}%",
            f"expected: {self.expected_seconds / 3600:.2f} h on one device ({self.expected_seconds:,.0f} s = {self.startup_seconds:.1f} s fixed"
            f"{f' + {self.input_seconds:.1f} s hashing the input' if self.input_seconds >= 0.05 else ''} + {self.count.tokens:,.0f} tokens at "
            f"{self.tokens_per_second:,.0f}/s); vectors {human_bytes(self.vectors_bytes)}, index {human_bytes(self.index_bytes)}",
        ]
        if self.dollars is not None:
            out.append(f"cost: ${self.dollars:,.2f} (${self.dollars_per_million_tokens:.4g} per 1M tokens); for a fleet and a window: {self.plan}")
        for p in self.sweep:
            cost = f", ${p['dollars_per_million_tokens']:.4g} per 1M tokens" if p.get("dollars_per_million_tokens") is not None else ""
            out.append(f"  batch {p['batch_tokens']:>8,} tokens: {p['tokens_per_second']:>12,.0f} tokens/s, padding "
                       f"{100 * p['padding_overhead']:.1f}%{cost}")  # fmt: skip
        share = f" ({100 * self.dry_run_seconds / self.expected_seconds:.0f}% of the predicted run)" if self.expected_seconds else ""
        out.append(f"this dry run took {self.dry_run_seconds:.1f} s{share}; "
                   + (f"its prediction is left in {self.recorded} for `embedkit status` to compare" if self.recorded else "nothing was written"))
        return out


def dry_run_encode(input: str | Path, cfg, *, sample: int = 10_000, calibrate_rows: int | None = None,
                   gpu_price: float | None = None, spot_discount: float = 0.0, sweep: tuple[int, ...] = (),
                   out: str | Path | None = None) -> DryRun:  # fmt: skip
    """Count INPUT's tokens, encode two random samples of it with the real pipeline (into a
    temporary folder) to measure this device's fixed costs and steady rate, and extrapolate
    time, bytes and cost. The second sample is sized so the dry run costs about
    CALIBRATION_SHARE of the run it predicts (at most MAX_CALIBRATION_S). `sweep`: batch
    budgets (padded tokens) at which the calibration is run again, for the cost curve. `out`:
    the output the run will write, where the prediction is left for `embedkit status`."""
    import shutil
    import tempfile
    import time

    import pyarrow.parquet as pq

    from .digest import INPUT_CACHE
    from .engine.encoder import choose_device
    from .index.params import choose_params
    from .io.corpus import Columns, open_corpus
    from .io.objstore import out_path
    from .io.shards import stored_dim
    from .run.outdir import check_out
    from .run.record import PREDICTION, Clock, save_prediction

    clock = Clock()
    if out is not None:
        check_out(out_path(out))  # refused before any work, as the real run would
    _preload("encode")
    t = time.perf_counter()
    count = count_tokens(input, cfg.model, sample=sample, text_column=cfg.text_column, max_seq_length=cfg.max_seq_length,
                         chunk_tokens=cfg.chunk_tokens, chunk_overlap=cfg.chunk_overlap, prompt_name=cfg.prompt_name,
                         prompt=cfg.prompt)  # fmt: skip
    choice = choose_device(cfg.device, cfg.precision)
    corpus = open_corpus(input, Columns(cfg.text_column, cfg.id_column, cfg.keep_columns))
    n = corpus.num_rows
    extra = time.perf_counter() - t  # work a real run does not do
    # a real run hashes its input once (kept in OUT's hash cache): with OUT, this dry run does it for it
    t = time.perf_counter()
    fingerprint = corpus.fingerprint(cache=out_path(out) / INPUT_CACHE if out is not None else None)
    hashing = time.perf_counter() - t
    extra += hashing  # counted apart: input_seconds below
    first = min(n, FIRST_CALIBRATION_ROWS[choice.type])
    work = Path(tempfile.mkdtemp(prefix="embedkit-dry-run-"))
    try:
        t = time.perf_counter()
        sample_1 = _sample_table(corpus, n, first, seed=1)
        pq.write_table(sample_1, work / "first.parquet")
        extra += time.perf_counter() - t
        s1 = _calibrate(work / "first.parquet", work / "first", cfg, cfg.batch_tokens)
        after_first, extra_first = clock(), extra
        warm = _calibrate(work / "first.parquet", work / "warm", cfg, cfg.batch_tokens)  # the same rows, warm
        rough_rate = warm.tokens / warm.seconds if warm.seconds > 0 else float("inf")
        rough = after_first - extra + count.tokens / rough_rate
        rows = calibrate_rows or _second_rows(n, first, warm, rough, spent=clock())
        blocks = _sample_table(corpus, n, rows, seed=2)
        pq.write_table(blocks, work / "sample.parquet")
        s = _calibrate(work / "sample.parquet", work / "out", cfg, cfg.batch_tokens)
        per_row = _folder_bytes(work / "out" / "vectors.lance") / max(1, s.docs)
        dim = stored_dim(json.loads((work / "out" / "embedkit.json").read_text()))
        swept = [(b, _calibrate(work / "sample.parquet", work / f"sweep-{b}", cfg, b)) for b in sweep]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tps = _marginal_rate(warm, s)
    # everything the process did until the first run ended, but the dry run's own work and the
    # first sample's tokens at the steady rate: process start, imports, model load, pool start,
    # first-shape costs, a run's ramp (its first windows are small)
    fixed = max(0.0, after_first - extra_first - s1.tokens / tps)
    input_seconds = 0.0 if out is not None else hashing
    expected = fixed + input_seconds + count.tokens / tps
    kept = count.rows * (1 - (s.skipped_empty / max(1, blocks.num_rows)))
    index = choose_params(max(1, int(kept)), dim, memory_budget=1 << 60).index_bytes
    dollars, per_million = run_cost(expected, count.tokens, gpu_price, spot_discount)
    points = tuple(
        {"batch_tokens": b, "tokens_per_second": r.tokens_per_second, "padding_overhead": r.padding_overhead,
         "dollars_per_million_tokens": None if gpu_price is None else dollars_per_million(gpu_price * (1 - spot_discount), r.tokens_per_second)}
        for b, r in swept
    )  # fmt: skip
    command = plan_command(count.tokens, tps, gpu_price, spot_discount) if gpu_price is not None else None
    recorded = None
    if out is not None:
        save_prediction(out, "encode", {"input": fingerprint, "seconds": round(expected, 2), "tokens": count.tokens, "fixed_seconds": round(fixed, 2),
                                        "tokens_per_second": round(tps), "device": choice.device})  # fmt: skip
        recorded = str(out_path(out) / PREDICTION)
    return DryRun(count, choice.device, s.docs, s.tokens, tps, fixed, s.padding_overhead, expected, int(per_row * kept), int(index),
                  dollars, per_million, command, points, first_rows=s1.docs, dry_run_seconds=clock(),
                  input_seconds=input_seconds, recorded=recorded)  # fmt: skip


# The first calibration run measures the fixed costs: a few batches' worth of rows. The second is
# sized to the time left of the dry run's budget: CALIBRATION_SHARE of the predicted run, at most
# MAX_CALIBRATION_S, and at least the first's size (a warm rate needs some rows).
FIRST_CALIBRATION_ROWS = {"cuda": 8_192, "cpu": 64}
MIN_SECOND_ROWS = {"cuda": 524_288, "cpu": 64}  # on a GPU: at 262,144 the rate read 16-21% under the real run's (H200)
MAX_SECOND_ROWS = {"cuda": 1_000_000, "cpu": 20_000}
CALIBRATION_SHARE = 0.10
MAX_CALIBRATION_S = 30.0


def _preload(stage: str) -> None:
    """Import what the real run imports before the dry run's own work is timed: the real run
    pays those imports, so they belong to its fixed costs, not to the work the dry run subtracts
    (counting tokens imports the tokenizer libraries too: 7 s of generate's fixed costs went
    missing on the H200 this way)."""
    import lance  # noqa: F401
    import torch  # noqa: F401

    if stage == "generate":
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        from .generation import pipeline  # noqa: F401
    else:
        from .encoding import pipeline  # noqa: F401,F811


def _marginal_rate(small, big) -> float:
    """Tokens/s of the work the larger warm run did beyond the smaller one: the steady rate,
    without what every run pays once (the pipeline filling up, the last window draining)."""
    tokens, seconds = big.tokens - small.tokens, big.seconds - small.seconds
    if tokens > 0 and seconds > 0 and big.tokens >= 2 * small.tokens:
        return tokens / seconds
    return big.tokens / big.seconds if big.seconds > 0 else float("inf")


def _second_rows(n: int, first: int, s1, rough_seconds: float, spent: float) -> int:
    """Rows of the steady calibration run: what fits the time left of the dry run's budget at
    the first run's rate (a warm run is faster: it then takes less)."""
    budget = min(CALIBRATION_SHARE * rough_seconds, MAX_CALIBRATION_S) - spent
    seconds_per_row = s1.seconds / max(1, s1.docs)
    fit = int(budget / seconds_per_row) if seconds_per_row > 0 and budget > 0 else 0
    device = "cuda" if s1.device.startswith("cuda") else "cpu"
    return min(n, max(first, MIN_SECOND_ROWS[device], min(fit, MAX_SECOND_ROWS[device])))


def _sample_table(corpus, n: int, rows: int, seed: int):
    """Random blocks of `rows` rows (the kept columns come along: stored beside the vectors,
    they are part of the bytes measured)."""
    import pyarrow as pa

    return pa.concat_tables([corpus.read(a, b).drop_columns(["id"]) for a, b in random_blocks(n, rows, seed=seed)])


SWEEP_FRACTIONS = (1 / 64, 1 / 16, 1 / 4, 1)  # of the device's largest default budget: the cost curve's points


def sweep_budgets(device: str) -> tuple[int, ...]:
    """Batch budgets for the cost curve of `encode --dry-run --plot` on this kind of device."""
    from .config import DEFAULT_BATCH_TOKENS
    from .engine.encoder import choose_device

    cap = DEFAULT_BATCH_TOKENS[choose_device(device, "auto").type]
    return tuple(max(256, int(cap * f)) for f in SWEEP_FRACTIONS)


def _calibrate(sample: Path, out: Path, cfg, batch_tokens: int | None):
    """One real encode of the calibration sample with cfg's options at `batch_tokens`."""
    from .encoding.pipeline import encode

    return encode(sample, out, model=cfg.model, device=cfg.device, dtype=cfg.dtype, precision=cfg.precision, normalize=cfg.normalize,
                  batch_tokens=batch_tokens, tokenize_workers=cfg.tokenize_workers, keep_empty=cfg.keep_empty,
                  max_seq_length=cfg.max_seq_length, store_text=cfg.store_text, keep_columns=cfg.keep_columns,
                  chunk_tokens=cfg.chunk_tokens, chunk_overlap=cfg.chunk_overlap, prompt_name=cfg.prompt_name, prompt=cfg.prompt,
                  dim=cfg.dim, progress=False)  # fmt: skip



def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())




# ---- generate dry run ---------------------------------------------------------------------------

# The first calibration run measures the fixed costs; a second of the same size, warm, is what
# that work costs without them; a third, sized to the dry run's budget, gives the second point of
# the decode step's cost against the number of rows decoded at once (see _decode_model).
FIRST_GENERATE_ROWS = {"cuda": 512, "cpu": 4}
MAX_GENERATE_ROWS = {"cuda": 16_384, "cpu": 64}


@dataclass(frozen=True)
class GenerateDryRun:
    """What `generate --dry-run` measured and expects; it writes only its prediction (for OUT).

    The time is `fixed + prefill + decode + other`: fixed costs from a first, cold calibration
    run less what the same work costs warm; prefill at the measured prompt-token rate; decode as
    steps x step time, the step time a line through two warm calibrations (a step's cost grows
    with the rows decoded at once) taken at the slots the full run will fill; other work (reading,
    prompts, outputs, commits) per row."""

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
        share = f" ({100 * self.dry_run_seconds / self.expected_seconds:.0f}% of the predicted run)" if self.expected_seconds else ""
        out.append(f"this dry run took {self.dry_run_seconds:.1f} s{share}; "
                   + (f"its prediction is left in {self.recorded} for `embedkit status` to compare" if self.recorded else "nothing was written"))
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

    from .digest import INPUT_CACHE
    from .engine.encoder import choose_device
    from .generation.pipeline import DEFAULT_PROMPTS, GENERATIONS_DIR, check_task_templates
    from .io.corpus import Columns, open_corpus
    from .io.objstore import out_path
    from .run.outdir import check_out
    from .run.record import PREDICTION, Clock, save_prediction

    clock = Clock()
    if out is not None:
        check_out(out_path(out))
    template = cfg.prompt if cfg.prompt is not None else DEFAULT_PROMPTS[cfg.task]
    check_task_templates(cfg, template)
    _preload("generate")
    t = time.perf_counter()
    corpus = open_corpus(input, Columns(cfg.text_column, cfg.id_column))
    n = corpus.num_rows
    if n == 0:
        raise EmbedkitError("the input has no rows")
    count = count_prompt_tokens(corpus, cfg, template, sample=sample)
    choice = choose_device(cfg.device, cfg.precision)
    fingerprint = corpus.fingerprint(cache=out_path(out) / INPUT_CACHE if out is not None else None)
    extra = time.perf_counter() - t  # work a real run does not do (or, with OUT, does not redo)
    first = min(n, FIRST_GENERATE_ROWS[choice.type])
    work = Path(tempfile.mkdtemp(prefix="embedkit-dry-run-"))
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
        per_row = _folder_bytes(work / "big" / GENERATIONS_DIR) / max(1, big.docs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fixed = max(0.0, after_cold - extra_cold - warm.seconds)
    kept = n * big.docs / max(1, big_rows)  # empty texts are skipped, as in the calibration
    new_per_row = big.new_tokens / max(1, big.docs)
    parts = _generate_parts(kept, count.tokens, new_per_row, warm, big)
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


def _decode_model(small, big) -> tuple[float, float] | None:
    """(a, b) of a decode step's seconds = a + b x rows decoded at once, through the two warm
    calibrations (their mean rows per step: new tokens / steps); None without decoder stats."""
    points = []
    for s in (small, big):
        d = s.decode or {}
        if not d.get("steps"):
            return None
        step = max(0.0, d["seconds"] - d.get("prefill_s", 0.0) - d.get("capture_s", 0.0)) / d["steps"]
        points.append((s.new_tokens / d["steps"], step))
    (x1, y1), (x2, y2) = points
    slope = (y2 - y1) / (x2 - x1) if x2 - x1 > 1e-9 else 0.0
    slope = max(0.0, slope)
    return max(0.0, y2 - slope * x2), slope


def _generate_parts(rows: float, prompt_tokens: float, new_per_row: float, small, big) -> dict:
    """The predicted run's seconds by part (see GenerateDryRun), from the warm calibrations."""
    model = _decode_model(small, big)
    d = big.decode or {}
    if model is None or not d.get("prefill_s"):  # score, classify, or another decoder: per row
        return {"other": rows * big.seconds / max(1, big.docs)}
    a, b = model
    groups = d.get("groups") or [{}]
    limit = max(g.get("slot_limit", g.get("slots", 1)) for g in groups)
    occupancy = (big.new_tokens / d["steps"]) / max(1, max(g.get("slots", 1) for g in groups))  # busy share of the slots
    at_once = max(1.0, min(rows, limit) * occupancy)
    new_tokens = rows * new_per_row
    decode = new_tokens / at_once * (a + b * at_once)
    # per prompt token, the shared start counted too (the decoder stores it once: its cost is in the rate)
    prefill = prompt_tokens * d["prefill_s"] / max(1, d.get("prompt_tokens", d.get("prefill_tokens", 1)))
    other = rows * max(0.0, big.seconds - d["seconds"]) / max(1, big.docs)
    return {"prefill": prefill, "decode": decode, "other": other, "step_seconds": round(a, 6), "step_seconds_per_row": b,
            "rows_at_once": round(at_once, 1)}  # fmt: skip


def _write_generate_sample(corpus, n: int, rows: int, seed: int, path: Path) -> int:
    """Random blocks of about `rows` rows into a parquet file; the rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([corpus.read(a, b).select(["id", "text"]) for a, b in random_blocks(n, rows, seed=seed)])
    pq.write_table(table, path)
    return table.num_rows


def _calibrate_generate(sample: Path, out: Path, cfg, template: str):
    from dataclasses import replace

    from .generation.pipeline import run_generate

    return run_generate(sample, out, replace(cfg, prompt=template, text_column="text", id_column="id", shard_rows=None,
                                             run=RunOptions(progress=False)))  # fmt: skip


def count_prompt_tokens(corpus, cfg, template: str, *, sample: int = 10_000, seed: int = 0) -> TokenCount:
    """Prompt tokens of every row (or of `sample` random rows, with a 95% CI), as generate counts
    them: the template, the chat wrapping and the truncation; the weights are not loaded."""
    from transformers import AutoConfig, AutoTokenizer

    from .generation.model import resolve_generator
    from .generation.tasks import input_tokens, task_inputs

    target = resolve_generator(cfg.model)
    try:
        tok, config = AutoTokenizer.from_pretrained(target), AutoConfig.from_pretrained(target)
    except Exception as e:  # library-specific failures: one line
        first = first_line(e)
        raise EmbedkitError(f"cannot load generator {cfg.model}: {first}") from None

    def measure(texts: list[str], ids: list) -> tuple[list[int], list[bool]]:
        inputs, flags = task_inputs(texts, ids, cfg, template, tok, config)
        return [input_tokens(x) for x in inputs], flags

    return count_sampled(corpus, measure, sample, seed)
