"""`embedkit plan`: the fleet arithmetic as tables, token counting against a real encode, the CLI."""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE

import embedkit
from embedkit.errors import EmbedkitError
from embedkit.plan.planning import (
    PlanInput,
    count_tokens,
    dollars_per_million,
    parse_duration,
    plan_fleet,
    shard_seconds_for,
)

T, S = 1e12, 4.1e6  # a trillion tokens; MiniLM's warm H200 rate (docs/benchmarks.md)


def test_spot_discount_of_70_percent_cuts_cost_by_3_33x():
    on_demand = plan_fleet(PlanInput(tokens=T, tokens_per_second=S, window_hours=12, gpu_price=3.0))
    spot = plan_fleet(PlanInput(tokens=T, tokens_per_second=S, window_hours=12, gpu_price=3.0, spot_discount=0.7))
    assert on_demand.ideal_dollars_per_million_tokens / spot.ideal_dollars_per_million_tokens == pytest.approx(1 / 0.3)
    assert on_demand.fleet.total_dollars / spot.fleet.total_dollars == pytest.approx(1 / 0.3)
    assert spot.fleet.gpus == on_demand.fleet.gpus  # same throughput, same fleet


# (id, inputs, gpus, hours, total $, shard seconds)
CASES = [
    # work 1e12 / 4.1e6 = 243,902 GPU-s; shards 0.5 h; ceil(243,902 / (43,200 - 1,800)) = 6 GPUs;
    # 243,902 / 6 + 1,800 = 42,451 s = 11.79 h; 6 x 11.79 h x $3 = $212.26
    ("on-demand", dict(tokens=T, tokens_per_second=S, window_hours=12, gpu_price=3.0), 6, 42450.7 / 3600, 212.25, 1800),
    # a day: ceil(243,902 / 84,600) = 3 GPUs; 243,902 / 3 + 1,800 = 83,101 s; 3 x 23.08 h x $3
    ("24h", dict(tokens=T, tokens_per_second=S, window_hours=24, gpu_price=3.0), 3, 83100.8 / 3600, 207.75, 1800),
    # 0.1 preemptions per GPU-hour and a 1% bound: shards of 2 x 0.01 x 3600 / 0.1 = 720 s;
    # each GPU loses 0.1 / 3600 x (360 + 120) = 1.33%: 4,045,333 tokens/s; 247,199 GPU-s;
    # ceil(247,199 / 42,480) = 6; 247,199 / 6 + 720 = 41,920 s; 6 x 11.64 h x $1.20 (60% off)
    ("spot", dict(tokens=T, tokens_per_second=S, window_hours=12, gpu_price=3.0, spot_discount=0.6, preemptions_per_hour=0.1),
     6, 41919.7 / 3600, 83.84, 720),
    # a small job: one GPU; 1e9 / 1e6 = 1,000 s of work, cut into 4 shards of 250 s (not 0.5 h):
    # 1,000 s + a 250 s tail
    ("tiny", dict(tokens=1e9, tokens_per_second=1e6, window_hours=12, gpu_price=2.0), 1, 1250 / 3600, 1250 / 3600 * 2.0, 250),
    # a 45-second job: shards of 11.25 s, so the margin is seconds, not half an hour
    ("45 s", dict(tokens=45e6, tokens_per_second=1e6, window_hours=12, gpu_price=2.0), 1, 56.25 / 3600, 56.25 / 3600 * 2.0, 11.25),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_plan_table(case):
    _, kwargs, gpus, hours, dollars, shard = case
    p = plan_fleet(PlanInput(**kwargs))
    assert p.fleet.gpus == gpus
    assert p.fleet.hours == pytest.approx(hours, rel=1e-4)
    assert p.fleet.total_dollars == pytest.approx(dollars, rel=1e-3)
    assert p.shard_seconds == pytest.approx(shard)
    assert p.tail_hours == pytest.approx(shard / 3600)
    assert p.fleet.within_window


def test_ideal_cost_is_the_formula():
    # $3/GPU-h at 4.1M tokens/s: 3 / (4.1e6 x 3600) x 1e6
    assert dollars_per_million(3.0, 4.1e6) == pytest.approx(3 / 14_760_000_000 * 1e6)
    p = plan_fleet(PlanInput(tokens=T, tokens_per_second=S, window_hours=12, gpu_price=3.0))
    assert p.ideal_dollars_per_million_tokens == pytest.approx(dollars_per_million(3.0, S))
    assert p.fleet.dollars_per_million_tokens > p.ideal_dollars_per_million_tokens  # the tail is paid for


@pytest.mark.parametrize(
    "tokens, window, rate, preempt",
    list(itertools.product([1e9, 5e11, 3e12], [2, 12, 48], [2e5, 4.1e6], [0.0, 0.05, 0.5])),
)
def test_the_fleet_is_the_smallest_that_finishes(tokens, window, rate, preempt):
    try:
        p = plan_fleet(PlanInput(tokens=tokens, tokens_per_second=rate, window_hours=window, gpu_price=2.5, preemptions_per_hour=preempt))
    except EmbedkitError:
        pytest.skip("window shorter than a shard")
    assert p.fleet.within_window and p.fleet.hours <= window
    assert p.smaller is None or not p.smaller.within_window
    assert p.larger.hours < p.fleet.hours and p.larger.total_dollars >= p.fleet.total_dollars
    # re-work after preemptions stays under the bound: rate x shard / 2 (as a fraction of time)
    assert preempt * p.shard_seconds / 2 / 3600 <= 0.01 + 1e-12


def test_more_preemptions_mean_shorter_shards_and_lower_throughput():
    base = dict(tokens=T, tokens_per_second=S, window_hours=12, gpu_price=3.0)
    calm, stormy = PlanInput(**base, preemptions_per_hour=0.05), PlanInput(**base, preemptions_per_hour=0.5)
    assert shard_seconds_for(stormy) < shard_seconds_for(calm)
    assert plan_fleet(stormy).effective_tokens_per_second < plan_fleet(calm).effective_tokens_per_second


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(tokens=0), ["--tokens"]),
        (dict(tokens_per_second=-1), ["--tokens-per-second"]),
        (dict(spot_discount=1.0), ["--spot-discount"]),
        (dict(window_hours=0.25), ["window is shorter than one shard"]),
        (dict(preemptions_per_hour=40.0, restart_seconds=3600), ["no work finishes"]),
    ],
)
def test_refusals(kwargs, words):
    base = dict(tokens=T, tokens_per_second=S, window_hours=12, gpu_price=3.0)
    with pytest.raises(EmbedkitError) as e:
        plan_fleet(PlanInput(**{**base, **kwargs}))
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("text, hours", [("12h", 12), ("90m", 1.5), ("3600s", 1), ("2d", 48), ("1.5", 1.5), (" 6H ", 6), (8, 8)])
def test_parse_duration(text, hours):
    assert parse_duration(text) == pytest.approx(hours)


@pytest.mark.parametrize("text", ["", "h", "12x", "-3h", "0", "abc"])
def test_parse_duration_refusals(text):
    with pytest.raises(EmbedkitError):
        parse_duration(text)


# ---- counting an input's tokens --------------------------------------------------------------


@pytest.fixture(scope="module")
def small_input(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "docs.parquet"
    pq.write_table(pq.read_table(SAMPLE).slice(0, 400), path)
    return path


def test_exact_count_equals_what_encode_reads(small_input, tmp_path):
    count = count_tokens(small_input, "all-MiniLM-L6-v2", sample=0)
    summary = embedkit.encode(small_input, tmp_path / "out", device="cpu", progress=False)
    assert count.exact and count.rows == 400
    assert count.tokens == summary.tokens
    assert count.truncated_fraction == pytest.approx(summary.truncated / 400)


def test_sampled_count_is_within_5_percent_and_its_interval():
    exact = count_tokens(SAMPLE, "all-MiniLM-L6-v2", sample=0)
    est = count_tokens(SAMPLE, "all-MiniLM-L6-v2", sample=1500, seed=3)
    assert not est.exact and est.sample_rows >= 1500 and est.ci95 > 0
    assert abs(est.tokens - exact.tokens) <= 0.05 * exact.tokens
    assert abs(est.tokens - exact.tokens) <= est.ci95


# ---- the command -------------------------------------------------------------------------------


def test_plan_command_json(run_cli):
    r = run_cli("plan", "--tokens", "1e12", "--tokens-per-second", "4.1e6", "--window", "12h", "--gpu-price", "3",
                "--spot-discount", "0.6", "--preemptions-per-hour", "0.1", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["plan"]["fleet"]["gpus"] == 6 and out["plan"]["smaller"]["within_window"] is False
    assert out["count"] is None
    assert math.isclose(out["plan"]["shard_seconds"], 720)


def test_plan_command_sizes_a_job_by_documents_and_says_seconds_for_a_short_one(run_cli):
    by_docs = run_cli("plan", "--docs", "600000", "--avg-tokens", "75", "--tokens-per-second", "1e6", "--gpu-price", "2", "--json")
    by_tokens = run_cli("plan", "--tokens", "45e6", "--tokens-per-second", "1e6", "--gpu-price", "2", "--json")
    assert by_docs.returncode == 0 and by_tokens.returncode == 0, (by_docs.stderr, by_tokens.stderr)
    assert json.loads(by_docs.stdout) == json.loads(by_tokens.stdout)
    text = run_cli("plan", "--docs", "600000", "--avg-tokens", "75", "--tokens-per-second", "1e6", "--gpu-price", "2").stdout
    assert "straggler margin 11 s" in text and "-> 1 GPU, finished in 56 s" in text, text


def test_plan_command_counts_an_input(run_cli, small_input):
    r = run_cli("plan", "--input", small_input, "--sample", "0", "--tokens-per-second", "1e5", "--window", "1h", "--gpu-price", "1")
    assert r.returncode == 0, r.stderr
    assert "400 rows" in r.stdout and "counted exactly" in r.stdout and "GPUs" in r.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["--tokens", "1e9", "--input", "x.parquet"], ["exactly one of --tokens"]),
        (["--tokens", "1e9", "--docs", "10", "--avg-tokens", "5"], ["exactly one of --tokens"]),
        (["--docs", "1000"], ["--docs and --avg-tokens go together"]),
        (["--window", "12x", "--tokens", "1e9"], ["duration"]),
        (["--tokens", "1e9", "--spot-discount", "1.5"], ["--spot-discount"]),
    ],
)
def test_plan_command_refusals(run_cli, refused, args, words):
    r = run_cli("plan", "--tokens-per-second", "1e6", "--gpu-price", "2", *args)
    refused(r, *words)


@pytest.mark.parametrize(
    "rows, device, workers, expected",
    [
        (10_000_000, "cuda", 1, 1_000_000),  # one worker: the device's default
        (10_000_000, "cuda", 2, 1_000_000),  # 10 shards for 2 workers: already 4 or more each
        (10_000_000, "cuda", 8, 312_500),  # capped: 32 shards, 4 per worker
        (1_000_000_000, "cuda", 64, 1_000_000),  # a billion rows: the default already gives 1,000 shards
        (50_000, "cpu", 2, 6_250),
        (3_000, "cpu", 4, 1_000),  # never below MIN_SHARD_ROWS
    ],
)
def test_default_shard_rows_give_each_worker_several_shards(rows, device, workers, expected):
    from embedkit.plan.planning import default_shard_rows

    assert default_shard_rows(rows, device, workers) == expected


def test_shards_go_out_longest_first_by_tokens(tmp_path):
    """Shards of equal rows but different document lengths: the one with the most tokens first."""
    from types import SimpleNamespace

    from embedkit.engine.models import fast_tokenizer_json, load_sentence_transformer, resolve_model, truncation_side
    from embedkit.io.corpus import Columns, open_corpus
    from embedkit.io.shards import plan_shards
    from embedkit.plan.planning import longest_first

    words = {0: 3, 1: 60, 2: 20, 3: 1}  # words per document in each 64-row shard
    texts = [" ".join(["token"] * words[i // 64]) for i in range(64 * len(words))]
    pq.write_table(pa.table({"text": texts}), tmp_path / "docs.parquet")
    corpus = open_corpus(tmp_path / "docs.parquet", Columns())
    st = load_sentence_transformer(resolve_model("all-MiniLM-L6-v2"), "cpu")
    job = SimpleNamespace(tokenizer_json=fast_tokenizer_json(st), max_length=256, truncation_side=truncation_side(st), chunk_overlap=None, prompt="")
    order = longest_first(corpus, job, plan_shards(corpus.num_rows, 64))
    assert [s.index for s in order] == [1, 2, 0, 3]


# ---- encode --dry-run ------------------------------------------------------------------------

TIME_FACTOR = 3.0  # a CPU calibration of a few hundred rows predicts a full run's time within this factor


@pytest.mark.slow
def test_dry_run_estimate_matches_a_real_run(small_input, tmp_path):
    from embedkit.config import EncodeConfig, RunOptions
    from embedkit.dryrun import dry_run_encode

    # 64 tokens a row: the calibrations and the real run take seconds, not tens of seconds, on 2 cores
    cfg = EncodeConfig(device="cpu", max_seq_length=64, run=RunOptions(progress=False))
    d = dry_run_encode(small_input, cfg, sample=320, calibrate_rows=192, gpu_price=1.0)
    assert not (tmp_path / "real").exists()
    t = time.perf_counter()
    real = embedkit.encode(small_input, tmp_path / "real", device="cpu", max_seq_length=64, progress=False)
    wall = time.perf_counter() - t
    # estimated from 5 random blocks of 64 rows: within 5% of the real count, and inside its own 95% interval
    assert not d.count.exact and 256 <= d.count.sample_rows <= 320
    assert abs(d.count.tokens - real.tokens) <= min(d.count.ci95, 0.05 * real.tokens)
    assert d.calibration_rows == 192 and d.first_rows == 64 and d.tokens_per_second > 0
    # an API call: the fixed costs are the call's own (model load, pool, first batches), not a process's
    assert d.startup_seconds > 0 and d.expected_seconds == pytest.approx(d.startup_seconds + d.input_seconds + d.count.tokens / d.tokens_per_second)
    assert 1 / TIME_FACTOR <= d.expected_seconds / wall <= TIME_FACTOR, (d.expected_seconds, wall)
    stored = sum(f.stat().st_size for f in (tmp_path / "real" / "vectors.lance").rglob("*") if f.is_file())
    assert 0.5 <= d.vectors_bytes / stored <= 2.0
    assert d.dollars == pytest.approx(d.expected_seconds / 3600 * 1.0)


def test_encode_dry_run_leaves_only_its_prediction_and_status_compares_it_with_the_run(run_cli, small_input, tmp_path):
    out = tmp_path / "out"
    r = run_cli("encode", small_input, out, "--device", "cpu", "--dry-run", "--sample", "0", "--calibrate-rows", "64", "--max-seq-length", "64",
                "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["count"]["exact"] and d["count"]["rows"] == 400 and d["calibration_rows"] == 64
    assert os.listdir(out) == [".embedkit.prediction.json"] and d["recorded"].endswith(".embedkit.prediction.json")
    # a run of another input leaves the prediction for this one
    other = tmp_path / "other.parquet"
    pq.write_table(pq.read_table(small_input).slice(0, 8), other)
    assert run_cli("encode", other, tmp_path / "elsewhere", "--device", "cpu", "-q").returncode == 0
    assert run_cli("encode", small_input, out, "--device", "cpu", "-q", "--max-seq-length", "64").returncode == 0
    st = embedkit.status(out)
    c = st.dry_run
    assert c["predicted_seconds"] == pytest.approx(d["expected_seconds"], abs=0.01) and c["real_seconds"] > 0 and c["runs"] == 1
    assert c["predicted_tokens"] == d["count"]["tokens"] == c["real_tokens"]  # every row counted: the tokens the run read
    assert not (out / ".embedkit.prediction.json").exists()
    assert any(line.startswith("dry run: predicted") for line in st.lines())


@pytest.fixture(scope="module")
def short_input(tmp_path_factory):
    """128 rows cut to 120 characters: scoring them on a CPU takes seconds."""
    path = tmp_path_factory.mktemp("plan") / "short.parquet"
    t = pq.read_table(SAMPLE).slice(0, 128)
    pq.write_table(t.set_column(t.schema.get_field_index("text"), "text", pa.array([x[:120] for x in t.column("text").to_pylist()])), path)
    return path


@pytest.fixture(scope="module")
def short_scored(short_input, tmp_path_factory):
    """A real `generate --task score` run over short_input: (summary, its output folder)."""
    out = tmp_path_factory.mktemp("plan") / "real"
    return embedkit.generate(short_input, out, task="score", device="cpu", progress=False), out


def _prompt_tokens(path: Path, sample: int):
    from embedkit.config import GenerateConfig
    from embedkit.dryrun import count_prompt_tokens
    from embedkit.generation.pipeline import DEFAULT_PROMPTS
    from embedkit.io.corpus import Columns, open_corpus

    return count_prompt_tokens(open_corpus(path, Columns("text", None)), GenerateConfig(task="score"), DEFAULT_PROMPTS["score"], sample=sample)


@pytest.mark.slow
def test_prompt_tokens_are_counted_as_generate_counts_them(small_input, short_input, short_scored):
    """Exactly (sample 0: equal to a real run's prompt tokens), and within 5% and inside its own
    95% interval from a sample of 320 of 400 rows; the weights are never loaded for it."""
    exact = _prompt_tokens(short_input, 0)
    real, _ = short_scored
    assert exact.exact and exact.tokens == real.prompt_tokens
    full, est = _prompt_tokens(small_input, 0), _prompt_tokens(small_input, 320)
    assert not est.exact and 256 <= est.sample_rows <= 320
    assert abs(est.tokens - full.tokens) <= min(est.ci95, 0.05 * full.tokens)


@pytest.mark.slow
def test_generate_dry_run_predicts_a_real_run_and_writes_nothing(run_cli, short_input, short_scored, tmp_path):
    out = tmp_path / "out"
    r = run_cli("generate", short_input, out, "--task", "score", "--device", "cpu", "--dry-run", "--sample", "0",
                "--calibrate-rows", "64", "--gpu-price", "1", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert os.listdir(out) == [".embedkit.prediction.json"]
    real, real_out = short_scored
    assert d["count"]["exact"] and d["count"]["tokens"] == real.prompt_tokens
    assert d["calibration_rows"] == 64 and d["new_tokens_per_row"] == 0
    real_seconds = real.seconds + d["startup_seconds"]
    assert 1 / TIME_FACTOR <= d["expected_seconds"] / real_seconds <= TIME_FACTOR, (d["expected_seconds"], real_seconds)
    stored = sum(f.stat().st_size for f in (real_out / "generations.lance").rglob("*") if f.is_file())
    assert 0.5 <= d["output_bytes"] / stored <= 2.0
    assert d["dollars"] == pytest.approx(d["expected_seconds"] / 3600)
    # the plan command it suggests runs as printed
    suggested = d["plan"].split()
    assert suggested[:2] == ["embedkit", "plan"] and "--gpu-price" in suggested
    planned = run_cli(*suggested[1:])
    assert planned.returncode == 0 and "GPU" in planned.stdout, planned.stderr


@pytest.mark.slow
def test_encode_dry_run_plot_measures_cost_against_batch_size(run_cli, refused, small_input, tmp_path):
    from embedkit.dryrun import sweep_budgets

    r = run_cli("encode", small_input, tmp_path / "out", "--device", "cpu", "--dry-run", "--sample", "0", "--calibrate-rows", "64",
                "--max-seq-length", "64", "--gpu-price", "2", "--spot-discount", "0.5", "--plot", tmp_path / "sweep.png", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert [p["batch_tokens"] for p in d["sweep"]] == list(sweep_budgets("cpu")) == [256, 1024, 4096, 16384]
    for p in d["sweep"]:  # each point is its own measured calibration, priced by the cost formula
        assert p["tokens_per_second"] > 0
        assert p["dollars_per_million_tokens"] == pytest.approx(dollars_per_million(1.0, p["tokens_per_second"]))
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path / "out") == [".embedkit.prediction.json"]  # the dry run's only write
    refused(run_cli("encode", small_input, tmp_path / "out", "--plot", tmp_path / "x.png"), "--plot goes with --dry-run")
    assert os.listdir(tmp_path / "out") == [".embedkit.prediction.json"]  # the refused run wrote nothing


def test_plan_plot_draws_the_plan(tmp_path, run_cli):
    from embedkit.plan.plots import plot_plan

    p = PlanInput(tokens=76.9e9, tokens_per_second=2.52e6, window_hours=1, gpu_price=3.0, spot_discount=0.6, preemptions_per_hour=0.1)
    drawn = plot_plan(p, tmp_path / "cost.png")
    plan = plan_fleet(p)
    at = drawn["gpus"].index(plan.fleet.gpus)
    assert drawn["planned_gpus"] == plan.fleet.gpus == 11
    assert drawn["dollars"][at] == pytest.approx(plan.fleet.total_dollars)
    assert drawn["hours"][at] <= 1 < drawn["hours"][at - 1]  # the curve crosses the window at the plan
    i60 = drawn["discounts"].index(0.6)
    assert drawn["dollars_per_million_tokens"][i60] == pytest.approx(plan.fleet.dollars_per_million_tokens)
    one = plot_plan(PlanInput(tokens=1e9, tokens_per_second=1e6, window_hours=12, gpu_price=3.0), tmp_path / "one.png")
    assert one["legend"][1] == "plan: 1 GPU" and all(t == int(t) for t in one["gpu_ticks"]), one
    r = run_cli("plan", "--tokens", "1e12", "--tokens-per-second", "4.1e6", "--gpu-price", "3", "--plot", tmp_path / "cli.png")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cli.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dry_run_options_without_dry_run_are_refused(run_cli, refused, small_input, tmp_path):
    r = run_cli("encode", small_input, tmp_path / "out", "--device", "cpu", "--gpu-price", "3")
    refused(r, "--dry-run")
    assert not (tmp_path / "out").exists()


# ---- the models the dry runs extrapolate with (pure) ----------------------------------------------


def _gen_summary(docs: int, new_tokens: int, steps: int, decode_s: float, prefill_s: float, prefill_tokens: int, seconds: float,
                 slots: int, limit: int):  # fmt: skip
    decode = {"steps": steps, "seconds": decode_s, "prefill_s": prefill_s, "capture_s": 0.0, "prefill_tokens": prefill_tokens,
              "groups": [{"rows": docs, "slots": slots, "capacity": 256, "slot_limit": limit, "budget": 1 << 20}]}  # fmt: skip
    return SimpleNamespace(docs=docs, new_tokens=new_tokens, decode=decode, seconds=seconds)


def test_a_decode_step_is_read_off_the_measured_steps():
    from embedkit.plan.decode_time import step_seconds

    points = [(64, 0.010), (1024, 0.025), (16384, 0.040)]
    assert step_seconds(64, points) == pytest.approx(0.010)
    assert step_seconds(544, points) == pytest.approx(0.0175)  # halfway along the first segment
    assert step_seconds(8704, points) == pytest.approx(0.0325)  # halfway along the second: not the first's line
    assert step_seconds(32768, points) == pytest.approx(0.056)  # beyond: along the last segment
    assert step_seconds(0, [(64, 0.010), (1024, 0.001)]) >= 0.0
    assert step_seconds(10, [(64, 0.010)]) == 0.010


def test_the_run_is_planned_in_the_decoders_own_groups():
    """A sample of lengths standing for many rows is cut where the decoder would cut the rows."""
    from embedkit.engine.decode import plan_groups
    from embedkit.plan.decode_time import run_groups

    sample = [30] * 80 + [400] * 15 + [3000] * 5  # short, longer, long prompts
    whole = sorted(sample * 100)  # the run: each sampled length 100 times
    want = plan_groups(whole, 64, 4096, 4_000_000)
    got = run_groups(sample, len(whole), 64, 4096, 4_000_000)
    assert [(round(r), round(s)) for r, s, _ in got] == [(g.stop - g.start, g.slots) for g in want]
    assert [longest for _, _, longest in got] == [whole[g.stop - 1] for g in want]
    assert run_groups([], 100, 64, 4096, 1 << 20) == []


def test_decode_time_is_each_groups_steps_at_its_own_width():
    from embedkit.dryrun.generate import _generate_parts
    from embedkit.plan.decode_time import decode_seconds

    # 64 rows: 64 new tokens each, the first from the prefill, 63 in 63 steps (every slot busy)
    # at 10 ms a step; 1,024 rows at 25 ms
    small = _gen_summary(64, 64 * 64, 63, 0.63 + 0.1, 0.1, 6_400, 1.0, slots=64, limit=4096)
    big = _gen_summary(1024, 1024 * 64, 63, 63 * 0.025 + 0.5, 0.5, 102_400, 2.5, slots=1024, limit=4096)
    # the run: 16,000 rows in 4,096 slots, then 4,000 in 512 (all busy): each group at its width
    groups = [(16_000, 4096, 100), (4_000, 512, 900)]
    parts = _generate_parts(20_000, 2_000_000, 64.0, small, big, groups, None)
    wide = 0.010 + (4096 - 64) * 0.015 / 960  # along the line through the two calibrations
    narrow = 0.010 + (512 - 64) * 0.015 / 960
    assert parts["decode"] == pytest.approx(16_000 * 63 / 4096 * wide + 4_000 * 63 / 512 * narrow)
    assert parts["rows_at_once"] == pytest.approx(20_000 * 63 / (16_000 * 63 / 4096 + 4_000 * 63 / 512), abs=0.1)
    assert parts["prefill"] == pytest.approx(2_000_000 * 0.5 / 102_400)
    assert parts["other"] == pytest.approx(20_000 * (2.5 - big.decode["seconds"]) / 1024)
    # a probe at the wide group's width (16 new tokens: 15 steps): that group's step is the probe's
    probe = _gen_summary(4096, 4096 * 16, 15, 15 * 0.030 + 0.3, 0.3, 400_000, 1.5, slots=4096, limit=4096)
    with_probe = _generate_parts(20_000, 2_000_000, 64.0, small, big, groups, probe)
    assert with_probe["decode"] == pytest.approx(16_000 * 63 / 4096 * 0.030 + 4_000 * 63 / 512 * narrow)
    assert with_probe["decode"] == pytest.approx(decode_seconds(groups, 63.0, 1.0, [(64, 0.01), (1024, 0.025), (4096, 0.03)])[0])
    # no decoder stats (score, classify): seconds per row of the larger run
    plain = SimpleNamespace(docs=100, new_tokens=0, decode={}, seconds=2.0)
    assert _generate_parts(1_000, 5e4, 0.0, plain, plain, [], None) == {"other": pytest.approx(20.0)}


def test_a_growing_index_is_modeled_as_its_new_rows_only():
    from embedkit.index.params import build_phases, choose_params, default_rates

    p = choose_params(1_000_000, 384, memory_budget=1 << 40)
    r = default_rates(gpu=True, cores=16)
    full, grow = build_phases(p, r), build_phases(p, r, new_rows=100_000)
    assert grow["train"] == 0 and grow["queries"] == 0 and full["train"] > 0
    assert grow["add"] == pytest.approx(full["add"] / 10) and grow["merge"] == full["merge"] and grow["fixed"] == full["fixed"]
    assert sum(grow.values()) < sum(full.values())


def test_a_dry_run_leaves_out_only_the_kernels_it_compiled():
    """Triton's compilation listener, as a compile and a cache load call it: a compile's seconds
    are counted (the real run finds that kernel in the cache), a cache load is not (the real run
    loads it too); a listener already set still hears both and is put back; no GPU, no counting."""
    triton = pytest.importorskip("triton")
    from embedkit.dryrun.calibration import kernel_compiles

    knobs = triton.knobs
    if not hasattr(knobs.compilation, "listener"):
        pytest.skip("this Triton has no compilation listener")
    heard = []

    def theirs(**kw):
        heard.append(kw["cache_hit"])

    before = knobs.compilation.listener
    knobs.compilation.listener = theirs
    try:
        with kernel_compiles(True) as spent:
            knobs.compilation.listener(src=None, metadata={}, metadata_group={}, times=SimpleNamespace(total=2_500_000), cache_hit=False)
            knobs.compilation.listener(src=None, metadata={}, metadata_group={}, times=SimpleNamespace(total=4_000_000), cache_hit=True)
        assert spent == [2.5] and heard == [False, True] and knobs.compilation.listener is theirs
        with kernel_compiles(False) as spent:
            assert knobs.compilation.listener is theirs
        assert spent == [0.0]
    finally:
        knobs.compilation.listener = before
