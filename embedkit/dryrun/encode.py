"""`encode --dry-run`: the encoder run on two samples of the input (a cold one for the fixed
costs, a larger one for the steady rate), extrapolated to the whole input."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..plan.planning import TokenCount, count_tokens, dollars_per_million, plan_command, random_blocks, run_cost
from ..units import human_bytes
from .calibration import CALIBRATION_SHARE, MAX_CALIBRATION_S, cost_line, folder_bytes, preload

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
        out.append(cost_line(self.dry_run_seconds, self.expected_seconds, self.recorded))
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

    from ..digest import INPUT_CACHE
    from ..engine.encoder import choose_device
    from ..index.params import choose_params
    from ..io.corpus import Columns, open_corpus
    from ..io.objstore import out_path
    from ..io.shards import stored_dim
    from ..run.outdir import check_out
    from ..run.record import PREDICTION, Clock, save_prediction

    clock = Clock()
    if out is not None:
        check_out(out_path(out))  # refused before any work, as the real run would
    preload("encode")
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
        per_row = folder_bytes(work / "out" / "vectors.lance") / max(1, s.docs)
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
    from ..config import DEFAULT_BATCH_TOKENS
    from ..engine.encoder import choose_device

    cap = DEFAULT_BATCH_TOKENS[choose_device(device, "auto").type]
    return tuple(max(256, int(cap * f)) for f in SWEEP_FRACTIONS)


def _calibrate(sample: Path, out: Path, cfg, batch_tokens: int | None):
    """One real encode of the calibration sample with cfg's options at `batch_tokens`."""
    from ..encoding.pipeline import encode

    return encode(sample, out, model=cfg.model, device=cfg.device, dtype=cfg.dtype, precision=cfg.precision, normalize=cfg.normalize,
                  batch_tokens=batch_tokens, tokenize_workers=cfg.tokenize_workers, keep_empty=cfg.keep_empty,
                  max_seq_length=cfg.max_seq_length, store_text=cfg.store_text, keep_columns=cfg.keep_columns,
                  chunk_tokens=cfg.chunk_tokens, chunk_overlap=cfg.chunk_overlap, prompt_name=cfg.prompt_name, prompt=cfg.prompt,
                  dim=cfg.dim, progress=False)  # fmt: skip
