"""The tasks' model work: summarize (the slot decoder, or length-bucketed `generate` calls where
it does not apply), score (continuation log-probabilities by packed prefill) and classify
(calibrated label log-probabilities); a shard's rows in, its output columns out."""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import GenerateConfig
from ..engine.batching import pack_batches
from ..engine.encoder import DeviceChoice
from .prompts import answer_tokens, decode_batch, fit_prompts, prompt_ids, task_completion

# Start the decoder's host-side set-up in a thread beside the model's load (`warm_up_host`); a
# module switch so that a benchmark can turn it off.
HOST_WARM_UP = True

_DECODERS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()  # model -> SlotDecoder, dropped with the model
_PRIORS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()  # model -> {(prompt, answer, labels): prior}


def slot_decoder(lm: Any) -> Any:
    """The slot decoder kept for this model (its counters feed the summary), or None."""
    return _DECODERS.get(lm)


@contextlib.contextmanager
def timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall seconds to phases[name]: where a shard's time goes, in the summary."""
    t = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t


SCORE_BATCH_TOKENS = {"cuda": 131_072, "cpu": 4_096}
DEFAULT_BATCH_SIZE = {"cuda": 64, "cpu": 8}  # sequences per batch of the generic decoder
SLOT_BATCH_SIZE = {"cuda": 16384, "cpu": 8}  # most KV-cache slots of SlotDecoder (memory may allow fewer); 16,384 made 4% more
# new tokens/s than 4,096 on the H200, in two runs (docs/benchmarks.md, generate runs 5 and 6)


# classify: texts with no content. A label's log-probability after them is the model's prior for
# the label (its bias, whatever the text), which is subtracted ("Calibrate Before Use", Zhao et
# al. 2021, who average the same three).
CONTENT_FREE = ("N/A", "", "[MASK]")
LABEL_SCORING = "label log-probability minus its mean over the content-free texts N/A, '', [MASK]"


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


class SummaryTexts:
    """The summaries' texts, decoded from their tokens in chunks as rows finish, while the GPU
    runs queued decode steps (`engine.decode.HostWork`): on 60k pydocs rows detokenizing costs
    about 0.5 s, which the host would otherwise spend after the last step with the GPU idle."""

    CHUNK = 2048  # rows per turn: about 20 ms on the H200 machine (60k rows took 0.6-0.7 s after the run), within 8 queued steps

    def __init__(self, tok: Any, rows: int):
        self.tok = tok
        self.texts: list[str | None] = [None] * rows
        self._tokens: list[list[int]] = []
        self._rows: list[int] = []

    def finished(self, tokens: list[list[int]], rows: list[int]) -> None:
        self._tokens.extend(tokens)
        self._rows.extend(rows)

    def step(self) -> None:
        if not self._rows:
            return
        tokens, rows = self._tokens[: self.CHUNK], self._rows[: self.CHUNK]
        del self._tokens[: self.CHUNK], self._rows[: self.CHUNK]
        for r, text in zip(rows, decode_batch(self.tok, tokens)):
            self.texts[r] = text.strip()

    def all(self, new: list[list[int]]) -> list[str]:
        """Every row's text: the ones not decoded yet (or never handed over) decoded now."""
        while self._rows:
            self.step()
        missing = [r for r, t in enumerate(self.texts) if t is None]
        for r, text in zip(missing, decode_batch(self.tok, [new[r] for r in missing])):
            self.texts[r] = text.strip()
        return self.texts  # type: ignore[return-value]


def summarize(lm: Any, tok: Any, prompts: list[list[int]], cfg: GenerateConfig, batch_size: int | None, seed: int,
              texts: SummaryTexts | None = None) -> list[list[int]]:  # fmt: skip
    """New token ids per prompt (cut before the end-of-sequence token); `texts`, where given,
    decodes rows to text as they finish (the slot decoder only).

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
        return decoder.run(prompts, max_new=cfg.max_new_tokens, max_slots=slots, temperature=cfg.temperature, seed=seed, host=texts)
    batch = batch_size or DEFAULT_BATCH_SIZE[kind]
    return bucketed_generate(lm, prompts, pad_id=tok.pad_token_id, eos_ids=eos, max_new=cfg.max_new_tokens, batch_size=batch,
                             temperature=cfg.temperature, seed=seed)  # fmt: skip


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


def prompt_limit(config: Any, reserve: int) -> int:
    positions = int(getattr(config, "max_position_embeddings", 2048) or 2048)
    return max(8, positions - reserve)


def task_inputs(texts: list, ids: list, cfg: GenerateConfig, template: str, tok: Any, config: Any) -> tuple[list, list[bool]]:
    """What the model reads for each row, and whether it was truncated to fit: the prompt's token
    ids (summarize), the prompt and the start of the answer that each label follows (classify),
    or a (context, target) pair (score). Needs only the tokenizer and the model's config, so a
    dry run counts tokens without loading the weights."""
    if cfg.task == "score":
        return _score_pairs(tok, template, cfg.completion, texts, ids, prompt_limit(config, 0))
    answer: list[int] = []
    if cfg.task == "summarize":
        limit, rows = prompt_limit(config, cfg.max_new_tokens), [{"text": t, "id": i} for t, i in zip(texts, ids)]
    else:  # classify: room for the answer and its longest label after the prompt
        answer, label_ids = answer_tokens(tok, task_completion(cfg), cfg.labels)
        labels = ", ".join(cfg.labels)
        limit = prompt_limit(config, len(answer) + max(len(lab) for lab in label_ids))
        rows = [{"text": t, "id": i, "labels": labels} for t, i in zip(texts, ids)]
    fitted = fit_prompts(tok, template, rows, limit, chat=True)
    return [p + answer if answer else p for p, _ in fitted], [f for _, f in fitted]


def input_tokens(x: Any) -> int:
    """Tokens of one task input: a prompt, or a (context, target) pair."""
    return len(x[0]) + len(x[1]) if isinstance(x, tuple) else len(x)


@dataclass(frozen=True)
class Generator:
    """A loaded generator and what its task needs with it: the stage's config, the prompt
    template and the device."""

    lm: Any
    tok: Any
    cfg: GenerateConfig
    template: str
    choice: DeviceChoice


def warm_up_host(cfg: GenerateConfig, choice: DeviceChoice) -> None:
    """Start the decoder's host-side set-up in a thread (`engine.decode.start_host_warm_up`,
    once per process) where the slot decoder will run (summarize on CUDA); called before the
    model's load, which it overlaps."""
    if cfg.task == "summarize" and choice.type == "cuda" and HOST_WARM_UP:
        from ..engine.decode import start_host_warm_up

        start_host_warm_up()


def task_columns(gen: Generator, inputs: list, flags: list[bool], shard: int, phases: dict[str, float]) -> tuple[dict, int]:
    """The task's output columns for a shard's inputs (`task_inputs`, in row order) and its new tokens."""
    lm, tok, cfg = gen.lm, gen.tok, gen.cfg
    if cfg.task == "summarize":
        texts = SummaryTexts(tok, len(inputs))
        with timed(phases, "model"):  # most rows' texts are decoded in here, while the GPU decodes
            new = summarize(lm, tok, inputs, cfg, cfg.batch_size, seed=cfg.seed + shard, texts=texts)
        with timed(phases, "outputs"):
            cols = {
                "summary": texts.all(new),
                "prompt_tokens": [len(p) for p in inputs], "new_tokens": [len(n) for n in new], "truncated": flags,
            }  # fmt: skip
        return cols, sum(cols["new_tokens"])
    with timed(phases, "model"):
        return _logprob_columns(gen, inputs, flags), 0


def _logprob_columns(gen: Generator, inputs: list, flags: list[bool]) -> dict:
    """score and classify: columns from log-probabilities of continuations (pure prefill)."""
    budget = SCORE_BATCH_TOKENS[gen.choice.type]
    if gen.cfg.task == "classify":
        return _classify_columns(gen, inputs, flags, budget)
    lps = continuation_logprobs(gen.lm, inputs, budget)
    return {
        "logprob": [float(lp.sum()) for lp in lps], "mean_logprob": [float(lp.mean()) if len(lp) else 0.0 for lp in lps],
        "n_tokens": [len(lp) for lp in lps], "truncated": flags,
    }  # fmt: skip


def _classify_columns(gen: Generator, inputs: list, flags: list[bool], budget: int) -> dict:
    """classify: each label scored as the continuation of (prompt, start of the answer).

    `label_logprobs` holds log p(label's tokens | prompt, answer start), summed over the label's
    tokens; `label_scores` the same less the label's prior, its mean log-probability after the
    content-free texts (label_prior: computed once, not per row).
    `label` is the best score: without the prior, the model's bias for a label decides.
    """
    if not inputs:
        return {"label": [], "label_logprobs": [], "label_scores": [], "truncated": flags}
    lm, tok, cfg = gen.lm, gen.tok, gen.cfg
    _, label_ids = answer_tokens(tok, task_completion(cfg), cfg.labels)
    raw = label_logprobs(lm, inputs, label_ids, budget)
    scores = raw - label_prior(lm, tok, cfg, gen.template, budget)
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
