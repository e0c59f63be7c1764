"""Frozen configuration: what each stage computes (EncodeConfig, IndexConfig, GenerateConfig), and
how a job runs whatever its stage (RunOptions, the `run` field of each). Defaults live here and
nowhere else."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "all-MiniLM-L6-v2"

# Padded tokens per forward pass. On a GPU a batch must be large enough that per-batch host
# work (kernel launches, copies) hides behind the device's: on an H200, MiniLM-L6's forward ran
# at 4.1M tok/s with 131k-token batches, 5.6-6.5M with 262k and 7.1M with 524k
# (docs/benchmarks.md).
# On CUDA the budget is sized from free device memory (encoder.default_batch_tokens) up to this
# cap; on a CPU larger batches only add attention cost.
DEFAULT_BATCH_TOKENS = {"cuda": 524_288, "cpu": 16_384}

# Rows per shard: losing one shard to a preemption should cost about a minute of work.
# MiniLM at ~3M tok/s on an H200 with ~80-token docs does 1M docs in ~30 s; a 2-core CPU does
# ~10k docs a minute.
DEFAULT_SHARD_ROWS = {"cuda": 1_000_000, "cpu": 10_000}

OUTPUT_DTYPES = ("float16", "float32", "int8", "binary")  # int8/binary: quantized (engine/quantize.py)
# The columns vectors.lance holds itself (store.vectors_schema; `text` with --store-text): a kept
# input column may not take one of these names.
OUTPUT_COLUMNS = ("id", "vector", "n_tokens", "truncated", "chunk", "start", "end", "text")
EXPORT_FORMATS = ("jsonl", "csv", "parquet")
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "fp8")  # fp8: linear layers only, on GPUs of compute capability 8.9+ (engine/fp8.py)
DEVICES = ("auto", "cpu", "cuda")


def check_device(device: object, precision: object = "auto") -> None:
    """Refuse a device or precision embedkit does not know, in one line (any API or CLI caller)."""
    from .errors import EmbedkitError

    if not isinstance(device, str) or (device not in DEVICES and not (device.startswith("cuda:") and device[5:].isdigit())):
        raise EmbedkitError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    if precision not in PRECISIONS:
        raise EmbedkitError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")


@dataclass(frozen=True)
class RunOptions:
    """How a job runs, whatever its stage: none of these changes what it computes."""

    overwrite: bool = False  # --overwrite: start OUT's stage afresh
    progress: bool = True  # a bar on a terminal
    workers: int = 1  # --gpus: one per GPU, or N at once on a CPU; more than one runs shard tasks on a local Ray
    ray: str | None = None  # --ray: "" for a local Ray (or RAY_ADDRESS), else a cluster address
    reissue: bool = True  # --gpus N or --ray: near the end, a straggler's shard also runs on an idle worker

    def __post_init__(self) -> None:
        from .errors import EmbedkitError

        if self.workers < 1:
            raise EmbedkitError(f"--gpus must be all or a positive number, not {self.workers}")



@dataclass(frozen=True)
class EncodeConfig:
    """Options of the encode stage; `None` means "choose for the device"."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "float16"
    precision: str = "auto"
    normalize: bool = True
    batch_tokens: int | None = None
    shard_rows: int | None = None
    window_docs: int = 65_536
    text_column: str = "text"
    id_column: str | None = None
    tokenize_workers: int | None = None
    keep_empty: bool = False
    allow_duplicate_ids: bool = False
    max_seq_length: int | None = None
    store_text: bool = False  # --store-text: each document's text in a `text` column beside its vector
    keep_columns: tuple[str, ...] = ()  # --keep-columns: input columns stored beside the vectors, with their types
    follow_symlinks: bool = False  # --follow-symlinks: a .txt folder's links to files outside it are read too
    chunk_tokens: int | None = None  # --chunk-tokens: long documents split into chunks of at most this many tokens
    chunk_overlap: int = 0  # --chunk-overlap: tokens each chunk repeats from the end of the one before
    dim: int | None = None  # --dim: keep the first N dimensions of each vector (Matryoshka), renormalized
    prompt_name: str | None = None  # --prompt-name: the model's configured prompt put before each document
    prompt: str | None = None  # --prompt: a literal prefix for documents instead
    query_prompt_name: str | None = None  # --query-prompt-name: the prompt search puts before queries
    query_prompt: str | None = None  # --query-prompt: a literal prefix for queries instead
    append: bool = False  # --append: add this input to an existing OUT, after the inputs it holds
    run: RunOptions = RunOptions()

    def __post_init__(self) -> None:
        from .errors import EmbedkitError

        if self.append and self.run.overwrite:
            raise EmbedkitError("--append adds to OUT and --overwrite starts it afresh: choose one")
        _check_kept_names(self.keep_columns)
        if self.dtype not in OUTPUT_DTYPES:
            raise EmbedkitError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, not {self.dtype!r}")
        check_device(self.device, self.precision)
        _check_chunking(self.chunk_tokens, self.chunk_overlap)
        for named, literal in (("prompt_name", "prompt"), ("query_prompt_name", "query_prompt")):
            if getattr(self, named) is not None and getattr(self, literal) is not None:
                raise EmbedkitError(f"give --{named.replace('_', '-')} or --{literal.replace('_', '-')}, not both")
        for name in ("batch_tokens", "shard_rows", "max_seq_length", "dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EmbedkitError(f"--{name.replace('_', '-')} must be a positive number, not {value}")
        if self.window_docs < 1:
            raise EmbedkitError(f"--window-docs must be positive, not {self.window_docs}")
        if self.tokenize_workers is not None and self.tokenize_workers < 0:
            raise EmbedkitError(f"--tokenize-workers must be 0 or more, not {self.tokenize_workers}")


def _check_chunking(tokens: int | None, overlap: int) -> None:
    """--chunk-tokens positive; --chunk-overlap only with it, and under half a chunk (each chunk
    must move past the one before). The model's limits are checked once it is loaded."""
    from .errors import EmbedkitError

    if tokens is not None and (not isinstance(tokens, int) or tokens < 1):
        raise EmbedkitError(f"--chunk-tokens must be a positive number, not {tokens!r}")
    if not isinstance(overlap, int) or overlap < 0:
        raise EmbedkitError(f"--chunk-overlap must be 0 or more, not {overlap!r}")
    if overlap and tokens is None:
        raise EmbedkitError("--chunk-overlap needs --chunk-tokens")
    if tokens is not None and overlap * 2 >= tokens:
        raise EmbedkitError(f"--chunk-overlap {overlap} must be less than half of --chunk-tokens {tokens}")


def _check_kept_names(names: tuple[str, ...]) -> None:
    """--keep-columns names: each once, none of the output's own columns."""
    from .errors import EmbedkitError

    if isinstance(names, str):  # a bare string would be kept letter by letter
        raise EmbedkitError(f"keep_columns must be a sequence of column names, not the string {names!r}")
    seen: set[str] = set()
    for name in names:
        if not name:
            raise EmbedkitError("--keep-columns has an empty column name")
        if name in OUTPUT_COLUMNS:
            hint = "; --store-text stores the text" if name == "text" else ""
            raise EmbedkitError(f"--keep-columns {name!r} clashes with the output's own column {name!r} "
                                f"(it holds {', '.join(OUTPUT_COLUMNS)}){hint}")  # fmt: skip
        if name == "score":  # a search hit is {id, score, text, ...kept columns}
            raise EmbedkitError("--keep-columns 'score' clashes with the score of search hits; rename the column")
        if name in seen:
            raise EmbedkitError(f"--keep-columns names {name!r} twice")
        seen.add(name)


@dataclass(frozen=True)
class IndexConfig:
    """Options of the index build; `None` means "choose from the data"."""

    nlist: int | None = None
    pq_m: int | None = None
    opq: bool | None = None
    factory: str | None = None
    memory_budget: int | None = None  # bytes; default: half the available RAM
    target_recall: float = 0.95
    k: int = 10  # the k of recall@k that the tuning targets
    queries: int = 1_000  # held-out queries for the recall measurement
    device: str = "auto"
    shard_rows: int | None = None  # vectors per add shard (default BUILD_SHARD_ROWS)
    seed: int = 1234  # the training sample's and the held-out queries' draw
    tune_queries: str | None = None  # --tune-queries FILE: real queries to tune on (default: query-like texts cut from the input)
    retrain: bool = False  # --retrain: after an append, train anew instead of growing the finished index
    max_growth: float = 0.5  # --max-growth: train anew when more than this share of the vectors is new
    drift_limit: float = 1.25  # --drift-limit: train anew when new rows lie this much farther from their lists (index/grow.py)
    run: RunOptions = RunOptions()  # --ray: add shards as Ray tasks

    def __post_init__(self) -> None:
        from .errors import EmbedkitError

        if not 0.0 < self.target_recall <= 1.0:
            raise EmbedkitError(f"--target-recall must be in (0, 1], not {self.target_recall}")
        check_device(self.device)
        if not 0.0 <= self.max_growth <= 1.0:
            raise EmbedkitError(f"--max-growth must be a share in [0, 1], not {self.max_growth}")
        if not self.drift_limit > 0:
            raise EmbedkitError(f"--drift-limit must be positive, not {self.drift_limit}")
        for name in ("nlist", "pq_m", "memory_budget", "shard_rows", "queries", "k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EmbedkitError(f"--{name.replace('_', '-')} must be a positive number, not {value}")


DEFAULT_GENERATOR = "SmolLM2-135M-Instruct"
TASKS = ("summarize", "score", "classify")
DEFAULT_PROMPTS = {
    "summarize": "Summarize in one sentence:\n{text}",
    "score": "{text}",
    # The labels are not listed: a small model asked to pick from a list copies its first item
    # (docs/generate.md has the measurements).
    "classify": "What is this text about?\n\n{text}",
}
# classify: the start of the model's answer, in which each label is scored where {label} stands.
DEFAULT_COMPLETIONS = {"classify": "This text is about {label}"}


@dataclass(frozen=True)
class GenerateConfig:
    """Options of the generative pass; `None` means "the task's or device's default"."""

    task: str = "summarize"
    model: str = DEFAULT_GENERATOR
    prompt: str | None = None  # a format string over the row: {text}, {id} (and {labels} for classify)
    completion: str | None = None  # score: the scored continuation; classify: the answer, with {label}
    labels: tuple[str, ...] = ()
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None  # summarize: most sequences decoded at once (default 16384 on CUDA, 8 on CPU)
    shard_rows: int | None = None
    text_column: str = "text"
    id_column: str | None = None
    run: RunOptions = RunOptions()  # --ray: shards as Ray tasks

    def __post_init__(self) -> None:
        from .errors import EmbedkitError

        if self.task not in TASKS:
            raise EmbedkitError(f"--task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if isinstance(self.labels, str):  # a bare string would be labels letter by letter
            raise EmbedkitError(f"labels must be a sequence of labels, not the string {self.labels!r}")
        if self.task == "classify" and len(self.labels) < 2:
            raise EmbedkitError("--task classify needs --labels with at least two labels, e.g. --labels yes,no")
        if self.task == "classify" and (not all(lab.strip() for lab in self.labels) or len(set(self.labels)) < len(self.labels)):
            raise EmbedkitError(f"--labels must be distinct and not empty, not {','.join(self.labels)!r}")
        if self.max_new_tokens < 1:
            raise EmbedkitError(f"--max-new-tokens must be positive, not {self.max_new_tokens}")
        if self.temperature < 0:
            raise EmbedkitError(f"--temperature must be 0 (greedy) or more, not {self.temperature}")
        for name in ("batch_size", "shard_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EmbedkitError(f"--{name.replace('_', '-')} must be a positive number, not {value}")
