"""shards.py: the shard plan, manifest differences, the manifest file and the output lock."""

from __future__ import annotations

import copy
import json
import os
import time

import pytest

from embedkit.errors import EmbedkitError
from embedkit.io.shards import (
    MANIFEST,
    OutputLock,
    Shard,
    manifest_differences,
    plan_shards,
    read_manifest,
    shards_from_manifest,
    write_manifest,
)

PLAN_CASES = [
    pytest.param(5, 2, [(0, 0, 2), (1, 2, 4), (2, 4, 5)], id="docstring"),
    pytest.param(0, 3, [], id="no-rows"),
    pytest.param(6, 3, [(0, 0, 3), (1, 3, 6)], id="exact-multiple"),
    pytest.param(1, 10, [(0, 0, 1)], id="one-short-shard"),
    pytest.param(3, 1, [(0, 0, 1), (1, 1, 2), (2, 2, 3)], id="one-row-shards"),
    pytest.param(10_001, 10_000, [(0, 0, 10_000), (1, 10_000, 10_001)], id="one-row-remainder"),
]


@pytest.mark.parametrize("rows, shard_rows, expected", PLAN_CASES)
def test_plan_shards_table(rows, shard_rows, expected):
    shards = plan_shards(rows, shard_rows)
    assert [(s.index, s.start, s.stop) for s in shards] == expected
    assert sum(s.rows for s in shards) == rows


@pytest.mark.parametrize("shard_rows", [0, -1])
def test_plan_shards_rejects_non_positive_size(shard_rows):
    with pytest.raises(ValueError, match="shard_rows"):
        plan_shards(10, shard_rows)


def test_shards_from_manifest_uses_the_recorded_plan():
    assert shards_from_manifest({"plan": {"rows": 7, "shard_rows": 3, "shards": 3}}) == [
        Shard(0, 0, 3), Shard(1, 3, 6), Shard(2, 6, 7),
    ]  # fmt: skip


BASE = {
    "embedkit_version": "0.1.0",
    "model": {"name": "m", "weights_sha256": "aaa", "dim": 384, "max_seq_length": 256, "pooling": "mean"},
    "output": {"dtype": "float16", "normalize": True, "keep_empty": False, "store_text": False, "keep_columns": []},
    "input": {"kind": "parquet", "path": "/d/x.parquet", "files": 1, "sha256": "c1", "rows": 5, "text_column": "text"},
    "plan": {"rows": 5, "shard_rows": 2, "shards": 3},
}


def _changed(keys: tuple[str, ...], value) -> dict:
    new = copy.deepcopy(BASE)
    d = new
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value
    return new


DIFF_CASES = [
    pytest.param(("model", "name"), "other", ["model (m -> other)"], id="model"),
    pytest.param(("model", "weights_sha256"), "bbb", ["model weights (aaa -> bbb)"], id="weights"),
    pytest.param(("model", "dim"), 768, ["dimension (384 -> 768)"], id="dim"),
    pytest.param(("model", "max_seq_length"), 128, ["max sequence length (256 -> 128)"], id="max-seq-length"),
    pytest.param(("model", "pooling"), "cls", ["pooling (mean -> cls)"], id="pooling"),
    pytest.param(("output", "dtype"), "float32", ["dtype (float16 -> float32)"], id="dtype"),
    pytest.param(("output", "normalize"), False, ["normalize (True -> False)"], id="normalize"),
    pytest.param(("output", "keep_empty"), True, ["keep empty (False -> True)"], id="keep-empty"),
    pytest.param(("output", "store_text"), True, ["store text (False -> True)"], id="store-text"),
    pytest.param(("output", "keep_columns"), ["url"], ["kept columns (none -> url)"], id="keep-columns"),
    pytest.param(("input", "sha256"), "c2", ["input (its content changed since the output was made)"], id="input-content"),
    pytest.param(("input", "rows"), 6, ["input (rows 5 -> 6)"], id="input-rows"),
    pytest.param(("input", "text_column"), "body", ["input (text column text -> body)"], id="input-column"),
    pytest.param(("input", "kind"), "jsonl", ["input (a different input: parquet at /d/x.parquet; this run reads jsonl at /d/x.parquet)"],
                 id="input-kind"),  # fmt: skip
    # where the input lies is not what it is: the same content staged elsewhere resumes
    pytest.param(("input", "path"), "/elsewhere/x.parquet", [], id="input-path-not-pinned"),
    # a value the run does not know before the model loads (None) is compared after the load
    pytest.param(("model", "dim"), None, [], id="unknown-yet"),
    # the version of embedkit that wrote the output does not pin it: a newer one may resume
    pytest.param(("embedkit_version",), "0.2.0", [], id="version-not-pinned"),
    # the plan is compared by the pipeline itself (it names the old and new plan)
    pytest.param(("plan", "shard_rows"), 4, [], id="plan-not-here"),
    # an output written before the compute precision was recorded: unknown, so not compared
    pytest.param(("model", "precision"), "fp8", [], id="precision-unrecorded"),
]


@pytest.mark.parametrize("keys, value, expected", DIFF_CASES)
def test_manifest_differences_table(keys, value, expected):
    assert manifest_differences(BASE, _changed(keys, value)) == expected


def test_an_input_recorded_without_a_content_hash_is_named_as_such():
    old = copy.deepcopy(BASE)
    old["input"] = {"kind": "parquet", "files": [{"path": "/d/x.parquet", "size": 10, "mtime_ns": 1}], "rows": 5}
    assert manifest_differences(old, BASE) == ["input (the output records no content hash of its input: it was made by an older embedkit)"]


def test_a_recorded_compute_precision_is_pinned():
    old = _changed(("model", "precision"), "fp16")
    new = _changed(("model", "precision"), "fp8")
    assert manifest_differences(old, new) == ["compute precision (fp16 -> fp8)"]
    assert manifest_differences(old, copy.deepcopy(old)) == []


def test_manifest_differences_none_when_equal():
    assert manifest_differences(BASE, copy.deepcopy(BASE)) == []


def test_manifest_differences_lists_every_change_in_order():
    new = _changed(("output", "dtype"), "float32")
    new["model"]["name"] = "other"
    assert manifest_differences(BASE, new) == ["model (m -> other)", "dtype (float16 -> float32)"]


def test_a_manifest_from_before_stored_columns_reads_as_storing_none():
    old = copy.deepcopy(BASE)
    del old["output"]["store_text"], old["output"]["keep_columns"]
    assert manifest_differences(old, BASE) == []
    assert manifest_differences(old, _changed(("output", "store_text"), True)) == ["store text (False -> True)"]


def test_manifest_differences_with_a_section_missing():
    old = copy.deepcopy(BASE)
    del old["output"]
    assert manifest_differences(old, BASE) == [
        "dtype (None -> float16)", "normalize (None -> True)", "keep empty (None -> False)",
    ]  # fmt: skip


def test_manifest_round_trip_and_unreadable(tmp_path):
    assert read_manifest(tmp_path) is None
    write_manifest(tmp_path, BASE)
    assert read_manifest(tmp_path) == BASE
    assert json.loads((tmp_path / MANIFEST).read_text()) == BASE
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST]  # no temporary file left behind
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(EmbedkitError, match="--overwrite"):
        read_manifest(tmp_path)


def test_output_lock_is_exclusive_and_released(tmp_path):
    with OutputLock(tmp_path):
        with pytest.raises(EmbedkitError, match="in use by another embedkit run"):
            with OutputLock(tmp_path):
                pass
    with OutputLock(tmp_path):  # released on exit: the next run gets it
        pass


def test_a_forked_child_does_not_keep_the_output_locked(tmp_path):
    """A tokenizer worker is forked while the run holds OUT's lock. When the run dies (here: its
    descriptor closed, no unlock, as the kernel does for kill -9) and the child lives on, the
    rerun gets the lock at once."""
    import signal
    import warnings

    from embedkit.io import shards

    lock = OutputLock(tmp_path).__enter__()
    ready_r, ready_w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # forking a process with threads: the child only sleeps
        child = os.fork()
    if child == 0:
        os.write(ready_w, b"x")  # fork() has returned here: the fork hooks have run
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        getattr(shards, "_HELD", set()).discard(lock._fd)
        os.close(lock._fd)  # the run is gone; its forked child is not
        lock._fd = None
        with OutputLock(tmp_path):
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
