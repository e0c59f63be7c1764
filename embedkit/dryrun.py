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
    """What `encode --dry-run` measured and expects; nothing was written to OUT."""

    count: TokenCount
    device: str
    calibration_rows: int
    calibration_tokens: int
    tokens_per_second: float  # encoding rate once the model is loaded, measured on this device
    startup_seconds: float  # process work before the first batch (model load, tokenizer pool), measured
    padding_overhead: float
    expected_seconds: float
    vectors_bytes: int  # measured bytes per row of the calibration output, times the rows
    index_bytes: int  # the IVF-PQ index `build-index` would choose
    dollars: float | None
    dollars_per_million_tokens: float | None
    plan: str | None  # with a price: the `embedkit plan` command for a fleet and a window
    # --plot: the same calibration at other batch budgets: batch_tokens, tokens_per_second,
    # padding_overhead and (with a price) dollars_per_million_tokens for each
    sweep: tuple = ()

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [
            self.count.describe(),
            f"calibration on {self.device}: {self.calibration_rows:,} rows, {self.calibration_tokens:,} tokens at "
            f"{self.tokens_per_second:,.0f} tokens/s; start-up {self.startup_seconds:.1f} s; padding {100 * self.padding_overhead:.1f}%",
            f"expected: {self.expected_seconds / 3600:.2f} h on one device ({self.expected_seconds:,.0f} s); vectors "
            f"{human_bytes(self.vectors_bytes)}, index {human_bytes(self.index_bytes)}",
        ]
        if self.dollars is not None:
            out.append(f"cost: ${self.dollars:,.2f} (${self.dollars_per_million_tokens:.4g} per 1M tokens); for a fleet and a window: {self.plan}")
        for p in self.sweep:
            cost = f", ${p['dollars_per_million_tokens']:.4g} per 1M tokens" if p.get("dollars_per_million_tokens") is not None else ""
            out.append(f"  batch {p['batch_tokens']:>8,} tokens: {p['tokens_per_second']:>12,.0f} tokens/s, padding "
                       f"{100 * p['padding_overhead']:.1f}%{cost}")  # fmt: skip
        out.append("nothing was written")
        return out


def dry_run_encode(input: str | Path, cfg, *, sample: int = 10_000, calibrate_rows: int | None = None,
                   gpu_price: float | None = None, spot_discount: float = 0.0, sweep: tuple[int, ...] = ()) -> DryRun:  # fmt: skip
    """Count INPUT's tokens, encode a random sample of it with the real pipeline (into a
    temporary folder) to measure this device, and extrapolate time, bytes and cost. `sweep`:
    batch budgets (padded tokens) at which the calibration is run again, for the cost curve."""
    import shutil
    import tempfile
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    from .engine.encoder import choose_device
    from .index.params import choose_params
    from .io.corpus import Columns, open_corpus
    from .io.shards import stored_dim

    count = count_tokens(input, cfg.model, sample=sample, text_column=cfg.text_column, max_seq_length=cfg.max_seq_length,
                         chunk_tokens=cfg.chunk_tokens, chunk_overlap=cfg.chunk_overlap, prompt_name=cfg.prompt_name,
                         prompt=cfg.prompt)  # fmt: skip
    choice = choose_device(cfg.device, cfg.precision)
    rows = calibrate_rows or CALIBRATION_ROWS[choice.type]
    corpus = open_corpus(input, Columns(cfg.text_column, cfg.id_column, cfg.keep_columns))
    n = corpus.num_rows
    # the kept columns come along: stored beside the vectors, they are part of the bytes measured
    blocks = pa.concat_tables([corpus.read(a, b).drop_columns(["id"]) for a, b in random_blocks(n, rows, seed=1)])
    texts = blocks.column("text")
    work = Path(tempfile.mkdtemp(prefix="embedkit-dry-run-"))
    try:
        pq.write_table(blocks, work / "sample.parquet")
        t = time.perf_counter()
        s = _calibrate(work / "sample.parquet", work / "out", cfg, cfg.batch_tokens)
        wall = time.perf_counter() - t
        per_row = _folder_bytes(work / "out" / "vectors.lance") / max(1, s.docs)
        dim = stored_dim(json.loads((work / "out" / "embedkit.json").read_text()))
        swept = [(b, _calibrate(work / "sample.parquet", work / f"sweep-{b}", cfg, b)) for b in sweep]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tps = s.tokens / s.seconds if s.seconds > 0 else float("inf")
    startup = max(0.0, wall - s.seconds)
    expected = startup + count.tokens / tps
    kept = count.rows * (1 - (s.skipped_empty / max(1, len(texts))))
    index = choose_params(max(1, int(kept)), dim, memory_budget=1 << 60).index_bytes
    dollars, per_million = run_cost(expected, count.tokens, gpu_price, spot_discount)
    points = tuple(
        {"batch_tokens": b, "tokens_per_second": r.tokens_per_second, "padding_overhead": r.padding_overhead,
         "dollars_per_million_tokens": None if gpu_price is None else dollars_per_million(gpu_price * (1 - spot_discount), r.tokens_per_second)}
        for b, r in swept
    )  # fmt: skip
    command = plan_command(count.tokens, tps, gpu_price, spot_discount) if gpu_price is not None else None
    return DryRun(count, choice.device, s.docs, s.tokens, tps, startup, s.padding_overhead, expected, int(per_row * kept), int(index),
                  dollars, per_million, command, points)  # fmt: skip


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


CALIBRATION_ROWS = {"cuda": 100_000, "cpu": 1_000}  # seconds of encoding on an H200; tens of seconds on 2 CPU cores


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())




# ---- generate dry run ---------------------------------------------------------------------------

GENERATE_CALIBRATION_ROWS = {"cuda": 8_192, "cpu": 16}  # two full slot batches on a GPU; seconds on a CPU


@dataclass(frozen=True)
class GenerateDryRun:
    """What `generate --dry-run` measured and expects; nothing was written to OUT."""

    task: str
    count: TokenCount  # prompt tokens (for score: context and target) the model will read
    device: str
    calibration_rows: int
    calibration_seconds: float  # generating, once the model was loaded
    startup_seconds: float  # model load and everything before the first shard, measured
    new_tokens_per_row: float  # measured in the calibration (0 for score and classify)
    tokens_per_second: float  # prompt + new tokens per second in the calibration
    expected_new_tokens: float
    expected_seconds: float
    output_bytes: int  # measured bytes per row of the calibration's generations, times the rows
    dollars: float | None
    dollars_per_million_tokens: float | None  # per 1M prompt + new tokens
    plan: str | None = None  # with a price: the `embedkit plan` command for a fleet and a window

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [
            self.count.describe("prompt tokens"),
            f"calibration on {self.device}: {self.task} of {self.calibration_rows:,} rows in {self.calibration_seconds:.1f} s, "
            f"{self.tokens_per_second:,.0f} tokens/s (prompt + new); {self.new_tokens_per_row:.1f} new tokens per row; "
            f"start-up {self.startup_seconds:.1f} s",
            f"expected: {self.expected_new_tokens:,.0f} new tokens, {self.expected_seconds / 3600:.2f} h on one device "
            f"({self.expected_seconds:,.0f} s); generations {human_bytes(self.output_bytes)}",
        ]
        if self.dollars is not None:
            out.append(f"cost: ${self.dollars:,.2f} (${self.dollars_per_million_tokens:.4g} per 1M prompt + new tokens); "
                       f"for a fleet and a window: {self.plan}")  # fmt: skip
        out.append("nothing was written")
        return out


def dry_run_generate(input: str | Path, cfg, *, sample: int = 10_000, calibrate_rows: int | None = None,
                     gpu_price: float | None = None, spot_discount: float = 0.0) -> GenerateDryRun:  # fmt: skip
    """Count the prompt tokens of INPUT (with the generator's tokenizer, template and truncation),
    run the real generate on a random sample of rows (into a temporary folder) to measure this
    device, and extrapolate time, new tokens, bytes and cost."""
    import shutil
    import tempfile
    import time
    from dataclasses import replace

    import pyarrow as pa
    import pyarrow.parquet as pq

    from .engine.encoder import choose_device
    from .generation.pipeline import DEFAULT_PROMPTS, GENERATIONS_DIR, check_task_templates, run_generate
    from .io.corpus import Columns, open_corpus

    template = cfg.prompt if cfg.prompt is not None else DEFAULT_PROMPTS[cfg.task]
    check_task_templates(cfg, template)
    corpus = open_corpus(input, Columns(cfg.text_column, cfg.id_column))
    n = corpus.num_rows
    if n == 0:
        raise EmbedkitError("the input has no rows")
    count = count_prompt_tokens(corpus, cfg, template, sample=sample)
    choice = choose_device(cfg.device, cfg.precision)
    rows = calibrate_rows or GENERATE_CALIBRATION_ROWS[choice.type]
    spans = random_blocks(n, rows, seed=1)
    table = pa.concat_tables([corpus.read(a, b).select(["id", "text"]) for a, b in spans])
    work = Path(tempfile.mkdtemp(prefix="embedkit-dry-run-"))
    try:
        pq.write_table(table, work / "sample.parquet")
        t = time.perf_counter()
        s = run_generate(work / "sample.parquet", work / "out", replace(cfg, prompt=template, text_column="text", id_column="id",
                                                                        shard_rows=None, run=RunOptions(progress=False)))  # fmt: skip
        wall = time.perf_counter() - t
        per_row = _folder_bytes(work / "out" / GENERATIONS_DIR) / max(1, s.docs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kept = n * s.docs / max(1, table.num_rows)  # empty texts are skipped, as in the calibration
    new_per_row = s.new_tokens / max(1, s.docs)
    tps = (s.prompt_tokens + s.new_tokens) / s.seconds if s.seconds > 0 else float("inf")
    startup = max(0.0, wall - s.seconds)
    expected = startup + kept * s.seconds / max(1, s.docs)
    total = count.tokens + new_per_row * kept
    dollars, per_million = run_cost(expected, total, gpu_price, spot_discount)
    command = plan_command(total, tps, gpu_price, spot_discount) if gpu_price is not None else None
    return GenerateDryRun(cfg.task, count, choice.device, s.docs, s.seconds, startup, new_per_row, tps, new_per_row * kept, expected,
                          int(per_row * kept), dollars, per_million, command)  # fmt: skip


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
