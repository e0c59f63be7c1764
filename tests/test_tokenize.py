"""The tokenize stage: same ids as the model's transformers tokenizer, full lengths, worker pool."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MAX_SEQ, UNICODE_TEXTS

from embedkit.engine.models import fast_tokenizer_json
from embedkit.engine.tokenize import TextTokenizer, TokenizerPool, concat, special_wrapping


@pytest.fixture(scope="module")
def texts(sample) -> list[str]:
    edge = ["", " ", "a", "x " * 2000, "word " * 253, "word " * 254, "word " * 255] + list(UNICODE_TEXTS.values())
    return sample.column("text").to_pylist()[:400] + edge


@pytest.fixture(scope="module")
def tokenizer(st_model) -> TextTokenizer:
    return TextTokenizer(fast_tokenizer_json(st_model), MAX_SEQ)


def rows(tok, i: int) -> list[int]:
    return tok.flat[tok.offsets[i] : tok.offsets[i + 1]].tolist()


def test_ids_equal_the_transformers_tokenizer_call(st_model, tokenizer, texts):
    want = st_model.tokenizer(texts, truncation=True, max_length=MAX_SEQ)["input_ids"]
    got = tokenizer(texts)
    mismatched = [i for i in range(len(texts)) if rows(got, i) != want[i]]
    assert mismatched == []
    assert got.lengths.max() == MAX_SEQ


def test_full_length_and_truncation_flag(st_model, tokenizer, texts):
    got = tokenizer(texts)
    full = [len(ids) for ids in st_model.tokenizer(texts, truncation=False)["input_ids"]]
    assert got.n_tokens.tolist() == full
    assert got.truncated.tolist() == [n > MAX_SEQ for n in full]
    # "word " * 254 is exactly 256 tokens with [CLS]/[SEP]: full, not truncated
    assert got.n_tokens[-len(UNICODE_TEXTS) - 2] == MAX_SEQ and not got.truncated[-len(UNICODE_TEXTS) - 2]


def test_special_wrapping_is_bert_cls_sep(st_model):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(fast_tokenizer_json(st_model))
    assert special_wrapping(tok) == ([101], [102])


def test_left_truncation_keeps_the_end(st_model):
    text = "one two three four five six seven eight nine ten"
    got = TextTokenizer(fast_tokenizer_json(st_model), 8, truncation_side="left")([text])
    content = st_model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert rows(got, 0) == [101] + content[-6:] + [102]
    assert got.n_tokens[0] == len(content) + 2 and got.truncated[0]


def test_pool_of_workers_equals_in_process(st_model, tokenizer, texts):
    with TokenizerPool(fast_tokenizer_json(st_model), MAX_SEQ, workers=2) as pool:
        got = pool.submit(texts).get()
    want = tokenizer(texts)
    assert np.array_equal(got.flat, want.flat)
    assert np.array_equal(got.offsets, want.offsets)
    assert np.array_equal(got.n_tokens, want.n_tokens)


def test_concat_keeps_row_order(tokenizer):
    a, b = tokenizer(["alpha beta", "gamma"]), tokenizer(["delta epsilon zeta"])
    both = concat([a, b])
    whole = tokenizer(["alpha beta", "gamma", "delta epsilon zeta"])
    assert np.array_equal(both.flat, whole.flat) and np.array_equal(both.offsets, whole.offsets)


def test_max_length_must_leave_room_for_content(st_model):
    with pytest.raises(ValueError, match="special tokens"):
        TextTokenizer(fast_tokenizer_json(st_model), 2)


# A Ctrl-C can land on any line while the pool is being built (Python raises KeyboardInterrupt in
# the main thread wherever it is, the standard library's Pool constructor included). This script
# sends itself SIGINT on the AT-th line that runs inside multiprocessing's pool module.
_INTERRUPT_AT_LINE = """
import json, multiprocessing, multiprocessing.pool, os, signal, sys
import lance  # noqa: F401  (its at-fork hook warns on every fork outside the pool's own)
from embedkit.engine.tokenize import TokenizerPool
at, seen = int(sys.argv[2]), 0
def line(frame, event, arg):
    global seen
    if event == "line":
        seen += 1
        if seen == at:
            os.kill(os.getpid(), signal.SIGINT)
    return line
def call(frame, event, arg):
    return line if frame.f_code.co_filename == multiprocessing.pool.__file__ else None
interrupted = False
sys.settrace(call)
try:
    pool = TokenizerPool(open(sys.argv[1]).read(), 64, 2)
except KeyboardInterrupt as e:
    interrupted, kept = True, e  # held as the CLI holds it (it exits from its except block)
else:
    sys.settrace(None)
    pool.close()
sys.settrace(None)
print(json.dumps({"interrupted": interrupted, "lines": seen, "children": len(multiprocessing.active_children())}))
"""


def test_ctrl_c_while_the_pool_is_built_leaves_no_worker_and_prints_nothing(st_model, tmp_path):
    import json
    import subprocess
    import sys

    script, tok = tmp_path / "interrupt.py", tmp_path / "tokenizer.json"
    script.write_text(_INTERRUPT_AT_LINE)
    tok.write_text(fast_tokenizer_json(st_model))

    def run(at: int) -> dict:
        proc = subprocess.run([sys.executable, str(script), str(tok), str(at)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stderr == "", (at, proc.returncode, proc.stderr[-3000:])
        return json.loads(proc.stdout)

    whole = run(0)  # no interrupt: how many lines the constructor runs in the pool module
    assert not whole["interrupted"] and whole["children"] == 0 and whole["lines"] > 20
    for at in sorted({1, whole["lines"] // 3, whole["lines"] // 2, 2 * whole["lines"] // 3, whole["lines"]}):
        got = run(at)
        assert got["interrupted"], (at, got)  # the interrupt is not lost: raised once the pool is closed
        assert got["children"] == 0, (at, got)  # and no worker is left running
