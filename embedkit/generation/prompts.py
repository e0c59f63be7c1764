"""Prompts: templates and their fields, prompts cut to fit the model's positions, the chat
wrapper, label tokens for classify, and batch tokenize/detokenize."""

from __future__ import annotations

import string
from typing import Any

from ..config import DEFAULT_COMPLETIONS, GenerateConfig
from ..errors import EmbedkitError


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
    # the batch's lists are new: kept as they are (a copy of 2.5M ids costs a quarter second)
    return [(p, False) if len(p) <= limit else fit_prompt(tok, template, fields, limit, chat) for p, fields in zip(ids, rows)]


# texts per batch call: a call's encodings (tokens, offsets, masks beside the ids) all live until
# its ids are taken. 60k pydocs prompts on the H200 machine's 16 cores: one call grew the process
# by 689-692 MB, calls of 8,192 by 318 MB (4,096: 289; 32,768: 484; the ids' lists alone about
# 190 MB); the time did not measurably change (1.15-1.61 s over sizes and processes, 1.19 and
# 1.61 s for one call in two processes). In one call, a million such rows would hold about 8 GB of encodings.
ENCODE_CHUNK = 8192


def encode_batch(tok: Any, texts: list[str], special: bool, chunk: int = ENCODE_CHUNK) -> list[list[int]]:
    """Token ids of many texts: the fast tokenizer's Rust batch call (parallel, no Python per
    text), in its variant that tracks no character offsets where the library has it (the
    encoder's workers use it too): the same ids, 15% less time for 20k summarize prompts on 2 cores.
    Called `chunk` texts at a time, so that a shard of a million rows never holds all its
    encodings at once."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return tok(texts, add_special_tokens=special)["input_ids"]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    ids: list[list[int]] = []
    for i in range(0, len(texts), chunk):
        ids += [e.ids for e in encode(texts[i : i + chunk], add_special_tokens=special)]
    return ids


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
