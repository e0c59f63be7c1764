"""Lance maintenance on an output (LanceDB's optimize(), compaction, version cleanup), kill -9
around a shard's commit, and outputs written before the ledger had files of its own.

Users of LanceDB run `optimize()`, which compacts fragments and removes old versions with
their transactions. Which shards are done must not depend on them: after any of these, at any
time (also between a kill and the rerun), the output reads as it did, and the rerun leaves
every id exactly once.
"""

from __future__ import annotations

import json
import shutil
import warnings
from datetime import timedelta
from pathlib import Path

import lance
import pyarrow.parquet as pq

import embedkit
from embedkit.io.store import SHARD_KEY, VectorStore

from .faultkit import (
    ENCODE_OPTIONS,
    ROWS,
    SHARD_ROWS,
    assert_exactly_once,
    assert_one_line_error,
    kill_at,
    referenced_files,
    run,
    run_all,
    run_to_kill,
    versions,
)

SHARDS = ROWS // SHARD_ROWS
BUILD = ["--factory", "IVF4,Flat", "--shard-rows", str(SHARD_ROWS), "--target-recall", "0.5", "-q"]


def optimize(out: Path, table: str = "vectors") -> None:
    """LanceDB's maintenance as its users call it: compact, then remove every older version."""
    import lancedb

    with warnings.catch_warnings():  # that it removes every older version is what this test wants
        warnings.filterwarnings("ignore", message=".*removes every version.*")
        lancedb.connect(str(out)).open_table(table).optimize(cleanup_older_than=timedelta(0))


def cleanup(out: Path) -> None:
    lance.dataset(str(out / "vectors.lance")).cleanup_old_versions(older_than=timedelta(0))


def compact(out: Path) -> None:
    lance.dataset(str(out / "vectors.lance")).optimize.compact_files()


def _encode(corpus_file: Path, out: Path) -> list:
    return ["encode", corpus_file, out, *ENCODE_OPTIONS, "--json"]


def _finished(result, done: int, skipped: int) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert (summary["shards_done"], summary["shards_skipped"], summary["shards_total"]) == (done, skipped, SHARDS), summary


def _shard_file(out: Path, shard: int) -> str:
    """The data file of a shard's commit, from the dataset's own history."""
    ds = lance.dataset(str(out / "vectors.lance"))
    tx = next(t for t in ds.get_transactions(ds.version) if t is not None and t.transaction_properties.get(SHARD_KEY) == str(shard))
    (path,) = [f.path for frag in tx.operation.fragments for f in frag.files]
    return path


def _truncate(out: Path, name: str) -> None:
    path = out / "vectors.lance" / "data" / name
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_maintenance_after_a_finished_encode_keeps_it_finished(tmp_path, uninterrupted, corpus_file, corpus_table):
    """optimize(cleanup_older_than=0), cleanup_old_versions(0) and compact_files() on a finished
    output: still complete with every row, the rerun has nothing to do, build-index works."""
    outs = {name: tmp_path / name for name in ("optimize", "cleanup", "compact")}
    for (name, out), maintain in zip(outs.items(), (optimize, cleanup, compact)):
        shutil.copytree(uninterrupted, out)
        maintain(out)
        ds = lance.dataset(str(out / "vectors.lance"))
        # what the old ledger was read from is gone or rewritten: the history, or the shards' fragments
        assert len(ds.versions()) == 1 or len(ds.get_fragments()) == 1, name
        st = embedkit.status(out)
        assert (st.shards_done, st.shards_total, st.rows, st.complete) == (SHARDS, SHARDS, ROWS, True), name
    ids = corpus_table.column("id").to_pylist()
    for out, rerun in zip(outs.values(), run_all([_encode(corpus_file, out) for out in outs.values()])):
        _finished(rerun, 0, SHARDS)
        assert_exactly_once(out, ids)
    for out, build in zip(outs.values(), run_all([["build-index", out, *BUILD] for out in outs.values()])):
        assert build.returncode == 0, build.stderr[-3000:]
        assert embedkit.status(out).index["state"] == "current"


def test_optimize_between_a_kill_and_the_resume(tmp_path, corpus_file, corpus_table):
    """kill -9 after two commits, LanceDB's optimize with every old version removed, rerun: the
    committed shards are kept and the rest done, every id once."""
    out = tmp_path / "out"
    store = out / "vectors.lance"
    args = _encode(corpus_file, out)[:-1]

    def two_commits(proc):  # version 1 is the empty dataset
        return lambda: versions(store) >= 3

    kill_at(args, tmp_path, "after two commits", two_commits, lambda: 2 <= embedkit.status(out).shards_done < SHARDS)
    done = embedkit.status(out).shards_done
    optimize(out)
    assert len(lance.dataset(str(store)).versions()) == 1
    st = embedkit.status(out)
    assert (st.shards_done, st.rows) == (done, done * SHARD_ROWS)
    _finished(run(*args, "--json"), SHARDS - done, done)
    assert_exactly_once(out, corpus_table.column("id").to_pylist())


def test_killed_between_the_lance_commit_and_the_ledger(tmp_path, corpus_file, corpus_table):
    """The run SIGKILLs itself right after shard 2's Lance commit (before the shard is recorded),
    or right before it (its record of intent written). Each output is rerun as it was left and
    after LanceDB's optimize removed the history: shard 2 is counted once either way."""
    killed = {"commit": (tmp_path / "after", 3), "intent": (tmp_path / "before", 2)}
    for phase, (out, done) in killed.items():
        run_to_kill(_encode(corpus_file, out)[:-1], tmp_path / f"{phase}.log", f"{phase}:2")
        assert versions(out / "vectors.lance") == 1 + done, phase  # the empty dataset, then one per commit
    outs = []
    for phase, (out, done) in killed.items():
        optimized = out.with_name(out.name + "-optimized")
        shutil.copytree(out, optimized)
        optimize(optimized)
        for o in (out, optimized):
            st = embedkit.status(o)
            assert (st.shards_done, st.rows) == (done, done * SHARD_ROWS), (o.name, st)
            outs.append((o, done))
    for (out, done), rerun in zip(outs, run_all([_encode(corpus_file, o) for o, _ in outs])):
        _finished(rerun, SHARDS - done, done)
        assert_exactly_once(out, corpus_table.column("id").to_pylist())


def test_damaged_file_after_compaction_redoes_every_shard_it_held(uninterrupted_copy, corpus_file, corpus_table):
    """After compaction one file holds every shard's rows. Cut short, it makes all of them not
    done (build-index refuses), and the rerun drops it and redoes them: every id once."""
    out = uninterrupted_copy
    compact(out)
    (victim,) = referenced_files(out / "vectors.lance")
    _truncate(out, victim)
    st = embedkit.status(out)
    assert (st.shards_done, st.complete) == (0, False)
    assert_one_line_error(run("build-index", out), f"not fully encoded (0 of {SHARDS} shards)")
    _finished(run(*_encode(corpus_file, out)), SHARDS, 0)
    assert_exactly_once(out, corpus_table.column("id").to_pylist())
    assert victim not in referenced_files(out / "vectors.lance")


def test_killed_while_dropping_a_damaged_shard(uninterrupted_copy, tmp_path, corpus_file, corpus_table):
    """Shard 2's file cut short; the rerun is killed right after the Lance commit that removes
    the shard's fragments, before the ledger forgets the shard. The next rerun redoes it once."""
    out = uninterrupted_copy
    victim = _shard_file(out, 2)
    _truncate(out, victim)
    run_to_kill(_encode(corpus_file, out)[:-1], tmp_path / "drop.log", "drop:2")
    assert victim not in referenced_files(out / "vectors.lance")  # the drop landed
    st = embedkit.status(out)
    assert (st.shards_done, st.rows) == (SHARDS - 1, ROWS - SHARD_ROWS)
    _finished(run(*_encode(corpus_file, out)), 1, SHARDS - 1)
    assert_exactly_once(out, corpus_table.column("id").to_pylist())


def test_generations_survive_optimize(tmp_path, sample):
    """`generate --task score`, then LanceDB's optimize on generations: still complete, the rerun
    has nothing to do, export takes every row once."""
    docs = sample.slice(0, 6)
    src, out = tmp_path / "docs.parquet", tmp_path / "out"
    pq.write_table(docs, src)
    args = ["generate", src, out, "--task", "score", "--shard-rows", 2, "-q", "--json"]
    first = run(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    optimize(out, "generations")
    assert len(lance.dataset(str(out / "generations.lance")).versions()) == 1
    st = embedkit.status(out)
    assert (st.shards_done, st.shards_total, st.rows, st.complete) == (3, 3, 6, True)
    rerun = run(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (json.loads(rerun.stdout)["shards_done"], json.loads(rerun.stdout)["shards_skipped"]) == (0, 3)
    exported = embedkit.export(out, tmp_path / "rows.jsonl")
    assert exported.complete
    ids = [json.loads(line)["id"] for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(docs.column("id").to_pylist())


def test_output_of_the_old_format_is_migrated(tmp_path, uninterrupted, corpus_file, corpus_table):
    """An output whose shards are recorded only in Lance's transactions (as embedkit wrote them
    before): status reads it; the rerun, under its lock, writes the ledger from them, after
    which optimize() is safe. One whose transactions were already removed is refused in one line,
    nothing appended."""
    old, stale = tmp_path / "old", tmp_path / "stale"
    for out in (old, stale):
        shutil.copytree(uninterrupted, out)
        shutil.rmtree(VectorStore(out).ledger_path)
    assert embedkit.status(old).complete
    cleanup(stale)
    ids = corpus_table.column("id").to_pylist()
    migrated, refused = run_all([_encode(corpus_file, old), _encode(corpus_file, stale)])
    _finished(migrated, 0, SHARDS)
    assert VectorStore(old).ledger_path.is_dir()
    optimize(old)
    st = embedkit.status(old)
    assert (st.shards_done, st.rows, st.complete) == (SHARDS, ROWS, True)
    _finished(run(*_encode(corpus_file, old)), 0, SHARDS)
    assert_exactly_once(old, ids)
    assert_one_line_error(refused, "older embedkit", "--overwrite")
    assert_exactly_once(stale, ids)
