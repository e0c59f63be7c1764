"""The index stage under faults: kill -9 in each build phase, a doctored shard file at merge,
vectors written anew under the same version number, a truncated index file.

The vectors are the shared corpus's (60 rows, six Lance fragments of 10). `--factory IVF4,Flat`
gives the on-disk inverted-list path (train, add per fragment shard, merge) on so few vectors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import embedkit
from embedkit.index.io import load_index
from embedkit.index.merge import check_ids

from .faultkit import (
    MAX_SEQ,
    ROWS,
    SHARD_ROWS,
    assert_one_line_error,
    kill_at,
    listing,
    read_vectors,
    run,
    run_to_kill,
)

BUILD = ["--factory", "IVF4,Flat", "--shard-rows", str(SHARD_ROWS), "--target-recall", "0.5", "-q"]
ADD_SHARDS = ROWS // SHARD_ROWS


def _shards(index: Path) -> list[str]:
    return sorted(n for n in listing(index / "shards") if n.endswith(".index") and n.startswith("shard-"))


@pytest.fixture(scope="module")
def killed_builds(tmp_path_factory, uninterrupted) -> dict:
    """build-index SIGKILLed while training, while adding and while merging, then run to the end.

    Checks after each kill that it landed in its phase and nothing was committed, and keeps a
    copy of the state the merge kill left (every shard file on disk) for the merge check below.
    """
    root = tmp_path_factory.mktemp("killed-builds")
    out = root / "out"
    shutil.copytree(uninterrupted, out)
    index = out / "index"
    args = ["build-index", out, *BUILD]
    phases = [
        ("training", lambda: (index / "build.json").exists() and not (index / "trained.index").exists(),
         lambda st: not st["trained"] and st["shards"] == 0),
        ("adding", lambda: 1 <= len(_shards(index)) < ADD_SHARDS, lambda st: st["trained"] and 1 <= st["shards"] < ADD_SHARDS),
        ("merging", lambda: (index / "merged.ivfdata").exists() and not (index / "merged.index").exists(),
         lambda st: st["shards"] == ADD_SHARDS and not st["merged"]),
    ]  # fmt: skip
    states = []

    def state() -> dict:
        return {"trained": (index / "trained.index").exists(), "shards": len(_shards(index)),
                "merged": (index / "merged.index").exists(), "params": (index / "params.json").exists()}  # fmt: skip

    for name, ready, reached in phases:
        before = root / f"before-{name}"
        if index.exists():
            shutil.copytree(index, before)

        def reset() -> None:  # a kill that came too late: put the index folder back as it was
            shutil.rmtree(index, ignore_errors=True)
            if before.exists():
                shutil.copytree(before, index)

        def landed() -> bool:
            states.append({"phase": name, **state()})
            return reached(states[-1]) and not states[-1]["params"]

        if name == "merging":  # a few milliseconds at this size: the build kills itself there
            run_to_kill(args, root / "merging.log", "merge:0")
            assert landed(), states[-1]
        else:
            kill_at(args, root, name, lambda proc, ready=ready: ready, landed, reset=reset)
        if name == "merging":
            shutil.copytree(out, root / "after-merge-kill")
    final = run(*args, "--json")
    return {"out": out, "states": states, "final": final, "after_merge_kill": root / "after-merge-kill"}


def test_build_index_killed_in_each_phase_then_finished(killed_builds):
    # each kill landed in its phase (kill_at retried one that came too late)
    assert [s["phase"] for s in killed_builds["states"]][-1] == "merging"

    final = killed_builds["final"]
    assert final.returncode == 0, final.stderr[-3000:]
    report = json.loads(final.stdout)
    assert not report["up_to_date"] and report["n"] == ROWS and report["factory"] == "IVF4,Flat"
    assert report["shards_total"] == ADD_SHARDS and report["shards_resumed"] == ADD_SHARDS
    out = killed_builds["out"]
    assert (out / "index" / "params.json").exists() and not (out / "index" / "shards").exists()
    check_ids(load_index(out / "index"), ROWS)  # every position 0..n-1 exactly once
    # each stored vector finds its own row
    table = read_vectors(out)
    vectors = np.asarray(table.column("vector").to_pylist(), np.float32)
    hits = embedkit.Retriever(out).search_vectors(vectors, k=1)
    assert [h[0] for h in hits.ids] == table.column("id").to_pylist()


def test_duplicate_and_missing_ids_are_caught_at_merge(tmp_path, killed_builds):
    """A shard file that holds another shard's vectors (a bad copy, a storage fault): the merge
    finds the ids of one shard twice and the other's missing, and stops with one line."""
    out = tmp_path / "out"
    shutil.copytree(killed_builds["after_merge_kill"], out)
    shards = out / "index" / "shards"
    shutil.copyfile(shards / "shard-000000.index", shards / "shard-000001.index")
    result = run("build-index", out, *BUILD)
    assert_one_line_error(result, f"{SHARD_ROWS} duplicate and {SHARD_ROWS} missing ids", "--overwrite")
    assert not (out / "index" / "params.json").exists(), "a build with wrong ids was committed"


def test_truncated_shard_file_of_a_partial_build_is_redone(tmp_path, killed_builds):
    """A shard file of an unfinished build cut short (a storage fault): its size no longer
    matches the record written with it, so the rerun adds that shard again and finishes."""
    out = tmp_path / "out"
    shutil.copytree(killed_builds["after_merge_kill"], out)
    path = out / "index" / "shards" / "shard-000002.index"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = run("build-index", out, *BUILD, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["shards_resumed"] == ADD_SHARDS - 1 and report["n"] == ROWS
    check_ids(load_index(out / "index"), ROWS)


@pytest.fixture
def indexed(tmp_path, uninterrupted) -> Path:
    """A copy of the shared output with its (exact, Flat) index built in-process."""
    out = tmp_path / "indexed"
    shutil.copytree(uninterrupted, out)
    embedkit.build_index(out, device="cpu", progress=False)
    return out


def test_search_refuses_vectors_written_anew_under_the_same_version(tmp_path, indexed, corpus_table):
    """OUT's vectors deleted and encoded again from another input: the new dataset counts its
    versions from 1 again and reaches the version the index was built on. Search must refuse
    (the index's row positions point at other rows now), and build-index must rebuild."""
    built_on = json.loads((indexed / "index" / "params.json").read_text())["key"]["vectors_version"]
    shutil.rmtree(indexed / "vectors.lance")
    (indexed / "embedkit.json").unlink()
    other = tmp_path / "other.parquet"
    pq.write_table(corpus_table.take(np.arange(ROWS)[::-1].copy()), other)  # other shards, other positions
    embedkit.encode(other, indexed, device="cpu", shard_rows=SHARD_ROWS, max_seq_length=MAX_SEQ, progress=False)
    import lance

    assert lance.dataset(str(indexed / "vectors.lance")).version == built_on  # the version number alone matches

    assert_one_line_error(run("search", indexed, "how do I report a bug"), "other vectors", "build-index")
    rebuilt = run("build-index", indexed, "--json", "-q")
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert not json.loads(rebuilt.stdout)["up_to_date"]
    table = read_vectors(indexed)
    vectors = np.asarray(table.column("vector").to_pylist(), np.float32)
    hits = embedkit.Retriever(indexed).search_vectors(vectors, k=1)
    assert [h[0] for h in hits.ids] == table.column("id").to_pylist()


def test_truncated_index_file_is_refused_then_rebuilt(indexed):
    """A finished index whose file was cut short: search refuses in one line, and build-index
    rebuilds it instead of calling it up to date."""
    merged = indexed / "index" / "merged.index"
    size = merged.stat().st_size
    with open(merged, "r+b") as f:
        f.truncate(size // 2)
    assert_one_line_error(run("search", indexed, "how do I report a bug"), "merged.index", f"{size // 2:,} bytes", "build-index")
    rebuilt = run("build-index", indexed, "--json", "-q")
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert not json.loads(rebuilt.stdout)["up_to_date"]
    assert merged.stat().st_size == size
    table = read_vectors(indexed)
    hits = embedkit.Retriever(indexed).search_vectors(np.asarray(table.column("vector").to_pylist()[:5], np.float32), k=1)
    assert [h[0] for h in hits.ids] == table.column("id").to_pylist()[:5]
