"""Bad files: missing, empty or truncated input; a damaged Lance fragment in OUT; OUT on a
read-only path; the disk filling up while a shard is written.

Each ends in one line `error: ...` on stderr and exit status 2, never a traceback, and in a state
that a rerun resumes: only whole shards are ever visible.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embedkit

from .faultkit import (
    ENCODE_OPTIONS,
    SHARD_ROWS,
    assert_exactly_once,
    assert_one_line_error,
    data_files,
    file_size_limit,
    make_read_only,
    make_writable,
    read_vectors,
    referenced_files,
    run,
    run_all,
    without_override,
)


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) * 2 // 3])
    return dst


def test_unreadable_inputs_are_refused_in_one_line(tmp_path, corpus_file, corpus_table):
    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(corpus_table.slice(0, 30), folder / "a.parquet")
    _truncated(corpus_file, folder / "b.parquet")
    no_rows = tmp_path / "no-rows.parquet"
    pq.write_table(corpus_table.slice(0, 0), no_rows)
    (tmp_path / "zero-bytes.parquet").write_bytes(b"")
    cases = [
        (tmp_path / "missing.parquet", ["input not found", "missing.parquet"]),
        (tmp_path / "zero-bytes.parquet", ["cannot read parquet file", "zero-bytes.parquet"]),
        (no_rows, ["the input has no rows"]),
        (_truncated(corpus_file, tmp_path / "truncated.parquet"), ["cannot read parquet file", "truncated.parquet"]),
        (folder, ["cannot read parquet file", "b.parquet"]),  # one bad file among good ones
    ]
    outs = [tmp_path / f"out-{i}" for i in range(len(cases))]
    results = run_all([["encode", src, out, *ENCODE_OPTIONS] for (src, _), out in zip(cases, outs)])
    for (src, needles), out, result in zip(cases, outs, results):
        assert_one_line_error(result, *needles)
        assert not (out / "vectors.lance").exists() and not (out / "embedkit.json").exists(), src


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory, sample) -> dict:
    """An encode whose files may not grow past 12 KB: the first two shards (two texts each,
    small files) commit, the third (ten texts) cannot be written."""
    root = tmp_path_factory.mktemp("disk-full")
    texts = sample.column("text").to_pylist()[:40]
    for shard in (0, 1):  # two texts and eight blank ones
        for i in range(2, SHARD_ROWS):
            texts[shard * SHARD_ROWS + i] = " "
    table = pa.table({"id": [f"d{i}" for i in range(40)], "text": texts})
    src, out = root / "docs.parquet", root / "out"
    pq.write_table(table, src)
    args = ["encode", src, out, *ENCODE_OPTIONS, "--dtype", "float32"]
    full = run(*args, preexec=file_size_limit(12 * 1024))
    st = embedkit.status(out)
    ids = read_vectors(out).column("id").to_pylist()
    return {"root": root, "src": src, "out": out, "args": args, "table": table, "result": full, "status": st, "ids": ids}


def test_disk_full_stops_with_one_line_and_whole_shards(disk_full):
    assert_one_line_error(disk_full["result"], "cannot write to", "File too large", "rerun the same command to resume")
    st = disk_full["status"]
    assert (st.shards_done, st.shards_total) == (2, 4)
    # no half shard: the committed rows are exactly the two small shards' texts
    assert sorted(disk_full["ids"]) == ["d0", "d1", "d10", "d11"]
    lance.dataset(str(disk_full["out"] / "vectors.lance")).validate()


def test_read_only_output_is_refused_then_the_full_disks_output_resumes(tmp_path, disk_full):
    """A copy of the interrupted output on a read-only path is refused before anything is
    done; then the interrupted output itself, with room again, resumes to the end."""
    ro = tmp_path / "read-only"
    shutil.copytree(disk_full["out"], ro)
    make_read_only(ro)
    try:
        result = run(*disk_full["args"][:2], ro, *disk_full["args"][3:], preexec=without_override)
    finally:
        make_writable(ro)
    if result.returncode == 97:
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here, so no path is read-only for root")
    assert_one_line_error(result, "cannot write to", str(ro), "Permission denied")
    assert embedkit.status(ro).shards_done == 2

    out = disk_full["out"]
    rerun = run(*disk_full["args"], "--json")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert (summary["shards_skipped"], summary["shards_done"]) == (2, 2)
    table = disk_full["table"]
    kept = [i for i, t in zip(table.column("id").to_pylist(), table.column("text").to_pylist()) if t.strip()]
    assert_exactly_once(out, kept)
    vectors = out / "vectors.lance"
    assert data_files(vectors) == referenced_files(vectors), "the failed shard's files were left behind"


def test_damaged_fragment_is_found_and_its_shard_redone(uninterrupted_copy, corpus_file, corpus_table):
    """A committed data file cut short (a disk fault, a bad copy): the output reads as
    incomplete, build-index refuses it in one line, and the encode rerun drops that shard's
    fragments in one commit and redoes the shard."""
    out = uninterrupted_copy
    store = out / "vectors.lance"
    victim = sorted(referenced_files(store))[2]
    path = store / "data" / victim
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(OSError):
        lance.dataset(str(store)).validate()  # Lance's own check sees it too

    st = embedkit.status(out)
    assert (st.shards_done, st.shards_total) == (5, 6) and not st.complete
    assert st.rows == 5 * SHARD_ROWS  # the damaged fragment is not counted
    assert_one_line_error(run("build-index", out), "not fully encoded (5 of 6 shards)", "rerun the encode command")
    rerun = run("encode", corpus_file, out, *ENCODE_OPTIONS, "--json")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert (summary["shards_done"], summary["shards_skipped"]) == (1, 5)
    assert_exactly_once(out, corpus_table.column("id").to_pylist())
    assert victim not in referenced_files(store)
    assert embedkit.status(out).complete


@pytest.mark.parametrize(
    "args, shown, why",
    [
        (["generate", "{docs}", "gs://bucket/gen"], "OUT gs://bucket/gen", "only s3://"),
        (["encode", "s3://bucket/docs.parquet", "{tmp}/out"], "INPUT s3://bucket/docs.parquet", "not supported yet"),
        (["build-index", "gs://bucket/out"], "OUT gs://bucket/out", "only s3://"),
        (["search", "az://container/out", "how do I open a file?"], "OUT az://container/out", "only s3://"),
        (["status", "az://container/out"], "OUT az://container/out", "only s3://"),
        (["export", "gs://bucket/out"], "OUT gs://bucket/out", "only s3://"),
        (["encode", "{docs}", "s3://"], "OUT s3://", "names no bucket"),
    ],
    ids=["generate-out", "encode-input", "build-index", "search", "status", "export", "no-bucket"],
)
def test_object_storage_uris_other_than_s3_are_refused_in_one_line(tmp_path, monkeypatch, run_cli, refused, args, shown, why):
    """A gs:// or az:// OUT, and an s3:// INPUT, are not supported: one line saying so, nothing
    written. (A URI was once taken for a local path: a folder named "s3:" appeared in the
    working directory and the encode failed later inside Lance.) s3:// outputs: test_s3.py."""
    docs = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one text", "another"]}), docs)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    refused(run_cli(*[a.format(docs=docs, tmp=tmp_path) for a in args]), shown, why)
    assert list(work.iterdir()) == [], "a local folder was made for the URI"
    assert not (tmp_path / "out").exists()
