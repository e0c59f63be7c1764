"""SlotDecoder: the slot plan as a table, and decoding with the real default model against transformers.

The reference is transformers' own `generate(do_sample=False)`, one prompt at a time, fp32 on CPU.
The CUDA-graph step cannot run here; benchmarks/bench_generate.py checks it against the eager step
on a GPU.
"""

from __future__ import annotations

import pytest

from embedkit.config import DEFAULT_GENERATOR, DEFAULT_PROMPTS
from embedkit.engine.decode import Group, SlotDecoder, plan_groups, shared_prefix, supported
from embedkit.errors import EmbedkitError
from embedkit.generation.model import resolve_generator
from embedkit.generation.prompts import encode_batch, fit_prompts
from embedkit.generation.tasks import SummaryTexts, bucketed_generate, summarize

MAX_NEW = 16


@pytest.mark.parametrize(
    "lengths, max_new, max_slots, budget, want",
    [
        # one group: all four rows fit with four slots of 64 positions
        ([5, 10, 20, 30], 8, 4, 1000, [Group(0, 4, 4, 64)]),
        # more rows than slots: one group, slots refilled
        ([5] * 10, 8, 4, 1000, [Group(0, 10, 4, 64)]),
        # the long prompt needs 2112 positions: only one slot of it fits, so it gets its own group
        ([10, 20, 30, 500, 600, 2000], 64, 4, 4000, [Group(0, 5, 4, 704), Group(5, 6, 1, 2112)]),
        # memory, not max_slots, bounds the slots of the short group
        ([10] * 8, 64, 100, 640, [Group(0, 8, 5, 128)]),
        # capacity is prompt + max_new - 1 rounded up to 64: 65 + 64 - 1 = 128 exactly
        ([65], 64, 8, 10_000, [Group(0, 1, 1, 128)]),
        ([66], 64, 8, 10_000, [Group(0, 1, 1, 192)]),
        ([], 64, 8, 10_000, []),
    ],
)
def test_plan_groups(lengths, max_new, max_slots, budget, want):
    assert plan_groups(lengths, max_new, max_slots, budget) == want


def test_plan_refuses_a_prompt_larger_than_the_budget():
    with pytest.raises(EmbedkitError, match="does not fit the KV-cache budget"):
        plan_groups([10, 5000], 64, 8, 4096)


def test_groups_cover_every_row_once():
    import random

    rng = random.Random(1)
    lengths = sorted(rng.randint(1, 3000) for _ in range(500))
    groups = plan_groups(lengths, 64, 256, 200_000)
    assert groups[0].start == 0 and groups[-1].stop == len(lengths)
    assert all(a.stop == b.start for a, b in zip(groups, groups[1:]))
    for g in groups:
        assert g.slots * g.capacity <= 200_000 and g.capacity >= lengths[g.stop - 1] + 63


# ---- decoding with the real default model --------------------------------------------------


@pytest.fixture(scope="module")
def model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_generator(DEFAULT_GENERATOR)
    tok = AutoTokenizer.from_pretrained(folder)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return lm, tok


@pytest.fixture(scope="module")
def prompts(model, sample):
    """Nine sample prompts of mixed lengths (up to 600 characters of text); some summaries end on EOS."""
    _, tok = model
    texts = [t for t in sample.column("text").to_pylist() if t and t.strip()][:9]
    rows = [{"text": t[:600], "id": i} for i, t in enumerate(texts)]
    return [p for p, _ in fit_prompts(tok, DEFAULT_PROMPTS["summarize"], rows, 4000, chat=True)]


@pytest.fixture(scope="module")
def reference(model, prompts):
    """transformers' greedy tokens for each prompt alone, cut at the end-of-sequence token."""
    import torch

    lm, tok = model
    out = []
    for p in prompts:
        with torch.inference_mode():
            seq = lm.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False, max_new_tokens=MAX_NEW)
        new = seq[0, len(p) :].tolist()
        out.append(new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new)
    return out


def _eos(model) -> set[int]:
    lm, tok = model
    configured = lm.generation_config.eos_token_id
    return {tok.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}


def test_prompts_tokenized_in_chunks_equal_one_by_one(model, sample):
    """encode_batch calls the tokenizer a chunk of texts at a time: every text's ids as a call of
    its own gives them, in order, across the chunks' edges (here 3 texts a chunk, 10 texts)."""
    _, tok = model
    texts = [t[:300] for t in sample.column("text").to_pylist()[:10]]
    want = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert encode_batch(tok, texts, special=False, chunk=3) == want
    assert encode_batch(tok, texts, special=False) == want


def test_default_model_is_supported(model):
    assert supported(model[0]) is None


@pytest.mark.parametrize("max_slots, cache_tokens", [(3, None), (16, None), (4, 900)])
def test_greedy_equals_transformers_generate(model, prompts, reference, max_slots, cache_tokens):
    """Slots refilled (3 slots for 9 prompts), all at once (16), and split into groups by a small cache budget."""
    decoder = SlotDecoder(model[0], eos_ids=_eos(model), cache_tokens=cache_tokens)
    got = decoder.run(prompts, max_new=MAX_NEW, max_slots=max_slots)
    assert got == reference
    assert decoder.stats["prefix_tokens"] == len(shared_prefix(prompts)) >= 8  # the chat template's start, stored once
    assert any(len(r) < MAX_NEW for r in reference), "no prompt ended on EOS: the end-of-row path is untested"


def test_one_decoder_over_runs_of_other_shapes(model, prompts, reference):
    """Like a process over shards: one decoder, runs whose groups have other slot counts and
    lengths, its cache kept between them as views of one buffer that grows: each run gives the
    reference tokens."""
    decoder = SlotDecoder(model[0], eos_ids=_eos(model))
    shapes = set()
    for max_slots, part in ((4, slice(0, 4)), (2, slice(4, 6)), (3, slice(6, 9)), (4, slice(0, 4))):
        assert decoder.run(prompts[part], max_new=6, max_slots=max_slots) == [r[:6] for r in reference[part]]
        shapes |= {(g["slots"], g["capacity"]) for g in decoder.stats["groups"]}
    assert len(shapes) >= 3, shapes


def test_narrow_steps_give_the_same_tokens(model, prompts, reference, monkeypatch):
    """8 slots for 9 prompts: the last prompt runs alone in slot 0, in steps two slots wide."""
    import embedkit.engine.decode as decode

    monkeypatch.setattr(decode, "STEP_WIDTH_MIN", 2)
    assert decode.step_width(1, 8) == 2 and decode.step_width(5, 8) == 8 and decode.step_width(3, 16) == 4
    decoder = SlotDecoder(model[0], eos_ids=_eos(model))
    assert decoder.run(prompts, max_new=MAX_NEW, max_slots=8) == reference
    assert decoder.stats["narrow_steps"] > 0


def test_texts_are_decoded_as_rows_finish(model, prompts, reference, monkeypatch):
    """The summaries' texts, decoded two rows a turn while decoding goes on (`SummaryTexts` as the
    decoder's host work): each row's text is its reference tokens' text, most decoded before the run ended."""
    lm, tok = model
    monkeypatch.setattr(SummaryTexts, "CHUNK", 2)
    texts = SummaryTexts(tok, len(prompts))
    got = SlotDecoder(lm, eos_ids=_eos(model)).run(prompts, max_new=MAX_NEW, max_slots=4, host=texts)
    assert got == reference
    decoded_during = sum(t is not None for t in texts.texts)
    assert decoded_during >= len(prompts) // 2, decoded_during  # 9 rows, 4 slots: turns came while rows were running
    assert texts.all(got) == [tok.decode(r, skip_special_tokens=True).strip() for r in reference]


def test_one_new_token(model, prompts, reference):
    got = SlotDecoder(model[0], eos_ids=_eos(model)).run(prompts, max_new=1, max_slots=4)
    assert got == [r[:1] for r in reference]


def test_one_new_token_after_the_host_warm_up(model, prompts, reference):
    """The warm-up thread (Triton's cache key, computed beside tokenizing) starts once per
    process, and a run after it waits for it and gives the same tokens."""
    from embedkit.engine import decode

    decode.start_host_warm_up()
    decode.start_host_warm_up()
    assert len(decode._HOST_WARM_UP) == 1
    got = SlotDecoder(model[0], eos_ids=_eos(model)).run(prompts, max_new=1, max_slots=4)
    assert not decode._HOST_WARM_UP[0].is_alive()
    assert got == [r[:1] for r in reference]


@pytest.mark.parametrize("prompts, want", [
    ([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]], [1, 2]),
    ([[1, 2, 3], [1, 2, 3, 4, 5]], [1, 2]),  # one prompt is another's start: it keeps its last token
    ([[7], [7, 8]], []),
    ([[1, 2], [3, 4]], []),
])  # fmt: skip
def test_shared_prefix(prompts, want):
    assert shared_prefix(prompts) == want


def test_prompt_that_is_the_shared_start_of_another(model, prompts):
    """A prompt that is another's start keeps one token of its own; the tokens equal those of
    the decoder with every prompt whole in its slot."""
    short = prompts[0][: len(shared_prefix(prompts)) + 1]
    rows = [short, prompts[0], prompts[1]]
    shared = SlotDecoder(model[0], eos_ids=_eos(model))
    whole = SlotDecoder(model[0], eos_ids=_eos(model))
    whole.share_prefix = False
    got = shared.run(rows, max_new=6, max_slots=2)
    assert shared.stats["prefix_tokens"] == len(short) - 1 and whole.run(rows, max_new=6, max_slots=2) == got


def test_sampling_follows_the_seed(model, prompts):
    decoder = SlotDecoder(model[0], eos_ids=_eos(model))
    a = decoder.run(prompts[:4], max_new=8, max_slots=4, temperature=1.0, seed=3)
    b = decoder.run(prompts[:4], max_new=8, max_slots=4, temperature=1.0, seed=3)
    c = decoder.run(prompts[:4], max_new=8, max_slots=4, temperature=1.0, seed=4)
    assert a == b and a != c


def test_other_architectures_use_the_generic_decoder(prompts):
    """A GPT-2 model (not Llama's layer) is refused by SlotDecoder and decoded by transformers' generate on
    length-bucketed batches: equal to generate one prompt at a time; sampling follows the seed."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from embedkit.config import GenerateConfig

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_positions=1024, n_embd=64, n_layer=2, n_head=2)).eval()
    assert "not one of" in supported(lm)
    with pytest.raises(ValueError, match="cannot run this model"):
        SlotDecoder(lm, eos_ids={0})

    class Tok:  # what summarize reads from a tokenizer
        eos_token_id = 0
        pad_token_id = 0

    got = summarize(lm, Tok(), prompts[:3], GenerateConfig(max_new_tokens=6), batch_size=2, seed=0)
    want = []
    for p in prompts[:3]:
        with torch.inference_mode():
            seq = lm.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                              max_new_tokens=6, pad_token_id=0, eos_token_id=0)  # fmt: skip
        new = seq[0, len(p) :].tolist()
        want.append(new[: new.index(0)] if 0 in new else new)
    assert got == want
    assert got == bucketed_generate(lm, prompts[:3], pad_id=0, eos_ids={0}, max_new=6, batch_size=3)
    state = torch.random.get_rng_state()
    a, b, c = (bucketed_generate(lm, prompts[:3], pad_id=0, eos_ids={0}, max_new=6, batch_size=2, temperature=1.0, seed=s) for s in (5, 5, 6))
    assert a == b and a != c
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is left alone
