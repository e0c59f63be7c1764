"""The index stage end to end on real data: build_index, Retriever, and the build-index and search commands.

Everything is real: 2,000 sample documents encoded once per session by the bundled model into
a real Lance dataset, faiss indexes trained and merged on disk, the CLI run as a subprocess. Tests
that change an output work on their own copy of it; the session's encoded output and built index
are only read.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE, cli_command

import embedkit
from embedkit.errors import EmbedkitError
from embedkit.index.add import TorchCodec
from embedkit.index.build import IndexReport
from embedkit.index.io import load_index, vectors_of
from embedkit.index.merge import check_ids
from embedkit.index.params import choose_params
from embedkit.index.state import file_sha256
from embedkit.index.train import train_ivfpq
from embedkit.io.shards import write_manifest
from embedkit.io.store import VectorStore, vectors_table

ROWS = 2000  # of the bundled sample: IVF32,PQ48 by the default rules
MAX_SEQ = 64  # tokens per document: the encode is most of this file's time on a small CPU
DIM = 384
K = 10
TARGET = 0.95
ENCODE_SHARD_ROWS = 100  # 20 Lance fragments: an add shard of the build is whole fragments
KILL_SHARD_ROWS = 200  # 10 add shards in the killed build
HANG_GUARD_S = 600  # only stops a hung test; no assertion depends on time


@dataclass(frozen=True)
class Stored:
    """What vectors.lance of the encoded sample holds, in row-position order."""

    ids: list
    vectors: np.ndarray  # float32 (rows, dim)
    n_tokens: np.ndarray
    truncated: np.ndarray


@dataclass(frozen=True)
class Built:
    out: Path
    report: IndexReport


@pytest.fixture(scope="session")
def encoded(tmp_path_factory) -> Path:
    """ROWS sample rows encoded once (MAX_SEQ tokens, shards of 100 rows); never indexed, never changed."""
    root = tmp_path_factory.mktemp("index")
    src, out = root / "docs.parquet", root / "encoded"
    pq.write_table(pq.read_table(SAMPLE).slice(0, ROWS), src)
    embedkit.encode(src, out, device="cpu", max_seq_length=MAX_SEQ, shard_rows=ENCODE_SHARD_ROWS, progress=False)
    assert len(lance.dataset(str(out / "vectors.lance")).get_fragments()) == ROWS // ENCODE_SHARD_ROWS
    return out


@pytest.fixture(scope="session")
def stored(encoded) -> Stored:
    table = lance.dataset(str(encoded / "vectors.lance")).to_table()
    assert table.num_rows == ROWS
    return Stored(
        ids=table.column("id").to_pylist(),
        vectors=vectors_of(table).astype(np.float32),
        n_tokens=table.column("n_tokens").to_numpy(),
        truncated=np.asarray(table.column("truncated").to_pylist()),
    )


@pytest.fixture(scope="session")
def built(tmp_path_factory, encoded) -> Built:
    """A copy of the encoded sample with its index built once by default; only read by tests."""
    out = tmp_path_factory.mktemp("index") / "built"
    shutil.copytree(encoded, out)
    return Built(out, embedkit.build_index(out, device="cpu", progress=False))


@pytest.fixture
def built_copy(tmp_path, built) -> Path:
    """A private copy of the built output, for tests that change it."""
    out = tmp_path / "built"
    shutil.copytree(built.out, out)
    return out


@pytest.fixture(scope="session")
def texts_by_id(sample) -> dict:
    return dict(zip(sample.column("id").to_pylist(), sample.column("text").to_pylist()))


@pytest.fixture(scope="session")
def verbatim_rows(stored, sample) -> list[int]:
    """Row positions whose text can be searched verbatim: not truncated at MAX_SEQ tokens (the query is
    encoded without that limit), a text that occurs once, and no other stored vector closer than
    cosine 0.9 (so the row itself must be the best hit)."""
    texts = sample.column("text").to_pylist()
    counts: dict[str, int] = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    text_of = dict(zip(sample.column("id").to_pylist(), texts))
    rows = []
    for pos in np.flatnonzero(~stored.truncated & (stored.n_tokens >= 8) & (stored.n_tokens <= MAX_SEQ)):
        if counts[text_of[stored.ids[pos]]] != 1:
            continue
        sims = stored.vectors @ stored.vectors[pos]
        sims[pos] = -1
        if sims.max() < 0.9:
            rows.append(int(pos))
        if len(rows) == 3:
            break
    assert len(rows) == 3
    return rows


def brute_force(q: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k positions and inner products over all stored vectors (nothing excluded)."""
    scores = q @ vectors.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(scores, top, 1)


def id_recall(found: list[list], truth: list[list]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def small_output(encoded: Path, dst: Path, rows: int) -> Path:
    """A real output holding the first `rows` vectors of the encoded sample, in two commits."""
    dst.mkdir(parents=True)
    manifest = json.loads((encoded / "embedkit.json").read_text())
    manifest["plan"] = {"rows": rows, "shard_rows": rows - rows // 2, "shards": 2}  # the two commits below
    write_manifest(dst, manifest)
    table = lance.dataset(str(encoded / "vectors.lance")).to_table().slice(0, rows)
    store = VectorStore(dst)
    store.create(table.schema)
    store.commit_shard(0, table.slice(0, rows // 2))
    store.commit_shard(1, table.slice(rows // 2))
    return dst


# ---- the report and the files ----------------------------------------------------------------


def test_build_report_and_files(built, encoded):
    r, folder = built.report, built.out / "index"
    assert not r.up_to_date
    assert (r.factory, r.n, r.dim, r.metric, r.k, r.target_recall) == ("IVF32,PQ48", ROWS, DIM, "l2", K, TARGET)
    assert r.recall >= TARGET, r.recall_table
    assert 1 <= r.nprobe <= 32 and r.rerank in (10, 20, 50, 100)
    # the tuning stops at the first (nprobe, rerank) that reaches the target: the reported one
    last = r.recall_table[-1]
    assert (last["nprobe"], last["rerank"]) == (r.nprobe, r.rerank)
    assert last["recall"] == pytest.approx(r.recall, abs=1e-4)
    assert all(row["recall"] < TARGET for row in r.recall_table[:-1])
    assert (r.shards_total, r.shards_resumed) == (1, 0)
    assert r.vectors_version == lance.dataset(str(built.out / "vectors.lance")).version
    assert set(r.seconds) == {"train", "queries", "add", "merge", "tune"}
    # where the time went, step by step; the steps of a phase fit inside it
    assert {"train.read", "train.kmeans", "train.pq", "queries.prepare", "add.truth", "add.codes", "merge.lists", "merge.check"} <= set(r.steps)
    for phase in ("train", "add", "merge"):
        inside = sum(v for k, v in r.steps.items() if k.startswith(phase + ".") and k != "add.read")  # reads overlap
        assert inside <= r.seconds[phase] + 0.01, (phase, r.steps, r.seconds)

    names = {p.name for p in folder.iterdir()}
    assert {"params.json", "trained.index", "merged.index", "merged.ivfdata"} <= names
    assert "shards" not in names and "build.json" not in names  # freed after the commit
    files = ("trained.index", "merged.index", "merged.ivfdata")
    assert r.bytes == {name: (folder / name).stat().st_size for name in files}
    params = json.loads((folder / "params.json").read_text())
    assert (params["nprobe"], params["rerank"], params["metric"]) == (r.nprobe, r.rerank, "l2")
    assert params["key"]["vectors_version"] == r.vectors_version
    for name in ("merged.index", "merged.ivfdata"):
        assert params["files"][name] == {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}

    merged = faiss.read_index(str(folder / "merged.index"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    assert merged.ntotal == ROWS and merged.d == DIM
    assert faiss.extract_index_ivf(merged).nlist == 32
    check_ids(merged, ROWS)
    trained = faiss.read_index(str(folder / "trained.index"))
    assert trained.is_trained and trained.ntotal == 0 and trained.d == DIM


def test_recall_against_brute_force(built, stored):
    """100 stored vectors as queries: the Retriever's top 10 against exact inner products over all rows."""
    positions = np.random.default_rng(7).choice(ROWS, size=100, replace=False)
    q = stored.vectors[positions]
    top, top_scores = brute_force(q, stored.vectors, K)
    truth = [[stored.ids[p] for p in row] for row in top]

    res = embedkit.Retriever(built.out).search_vectors(q, k=K)
    assert all(len(ids) == K for ids in res.ids)
    recall = id_recall(res.ids, truth)
    assert recall >= TARGET, recall
    # a query is its own best hit (or ties with an identical stored vector)
    for pos, ids, scores, best in zip(positions, res.ids, res.scores, top_scores[:, 0]):
        assert ids[0] == stored.ids[pos] or scores[0] == pytest.approx(best, abs=1e-4)
    # scores are the exact inner products of the hits, best first
    where = {d: i for i, d in enumerate(stored.ids)}
    for qv, ids, scores in zip(q, res.ids, res.scores):
        exact = stored.vectors[[where[d] for d in ids]] @ qv
        np.testing.assert_allclose(scores, exact, atol=1e-4)
        assert all(a >= b for a, b in zip(scores, scores[1:]))


def test_search_text_stored_verbatim(built, stored, texts_by_id, verbatim_rows):
    texts = [texts_by_id[stored.ids[p]] for p in verbatim_rows]
    res = embedkit.Retriever(built.out).search(texts, k=5)
    assert [ids[0] for ids in res.ids] == [stored.ids[p] for p in verbatim_rows]
    assert all(scores[0] > 0.99 for scores in res.scores)
    assert all(len(ids) == 5 for ids in res.ids)


def test_status_reports_the_index_and_the_recall_it_promises(encoded, built, run_cli):
    assert embedkit.status(encoded).index["state"] == "none"
    index = embedkit.status(built.out).index
    r = built.report
    assert (index["state"], index["recall"], index["nprobe"], index["rerank"]) == ("current", r.recall, r.nprobe, r.rerank)
    assert (index["factory"], index["n"], index["target_recall"]) == (r.factory, ROWS, TARGET)
    shown = run_cli("status", built.out)
    assert shown.returncode == 0, shown.stderr
    assert (f"index: {r.factory} over {ROWS:,} vectors; recall@{K} {r.recall:.3f} promised at nprobe {r.nprobe}, "
            f"rerank {r.rerank} (target {TARGET}); up to date") in shown.stdout.splitlines(), shown.stdout


def test_plain_faiss_opens_the_index_from_any_working_directory(built_copy, tmp_path, stored, run_cli):
    """merged.index names its lists file by an absolute path, so `faiss.read_index` works from
    another folder than the build's, even when the build was given a relative OUT."""
    rebuilt = run_cli("build-index", built_copy.name, "--overwrite", "--quiet", cwd=built_copy.parent)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import faiss, numpy as np, sys\n"
        f"index = faiss.read_index({str(built_copy / 'index' / 'merged.index')!r})\n"
        f"faiss.extract_index_ivf(index).nprobe = 64\n"
        f"_, found = index.search(np.load({str(tmp_path / 'q.npy')!r}), 5)\n"
        "print(found.tolist())\n"
    )
    np.save(tmp_path / "q.npy", stored.vectors[:20])
    p = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    ours = load_index(built_copy / "index")
    faiss.extract_index_ivf(ours).nprobe = 64
    assert json.loads(p.stdout.strip().splitlines()[-1]) == ours.search(stored.vectors[:20], 5)[1].tolist()


# ---- rebuilds and resume ---------------------------------------------------------------------


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_rerun_is_up_to_date_and_overwrite_rebuilds(built, built_copy):
    folder = built_copy / "index"
    names = ("trained.index", "merged.index", "merged.ivfdata", "params.json")
    before = {name: _stamp(folder / name) for name in names}

    again = embedkit.build_index(built_copy, device="cpu", progress=False)
    assert again.up_to_date
    first = built.report
    for name in ("factory", "nprobe", "rerank", "recall", "recall_table", "vectors_version"):
        assert getattr(again, name) == getattr(first, name), name
    assert {name: _stamp(folder / name) for name in before} == before  # nothing was rewritten

    fresh = embedkit.build_index(built_copy, device="cpu", overwrite=True, progress=False)
    assert not fresh.up_to_date
    assert fresh.recall >= TARGET and fresh.n == ROWS
    for name, stamp in before.items():
        assert _stamp(folder / name) != stamp, name
    assert embedkit.build_index(built_copy, device="cpu", progress=False).up_to_date


def _shard_files(out: Path) -> list[str]:
    try:
        return sorted(p.name for p in (out / "index" / "shards").glob("shard-*.json"))  # a shard is done once its record is written
    except FileNotFoundError:
        return []


def test_the_tuning_k_queries_and_seed_are_options_of_the_cli_and_the_api(built_copy, run_cli):
    """IndexConfig's k, queries and seed reach the build from the command line (and so from
    build_index(), which the command calls)."""
    shown = run_cli("build-index", built_copy, "--overwrite", "--quiet", "--json", "--k", "5", "--queries", "40", "--seed", "7")
    assert shown.returncode == 0, shown.stderr[-3000:]
    report = json.loads(shown.stdout.strip().splitlines()[-1])
    key = json.loads((built_copy / "index" / "params.json").read_text())["key"]
    assert (report["k"], key["k"], key["queries"], key["seed"]) == (5, 5, 40, 7)
    assert "recall@5" in run_cli("status", built_copy).stdout


def test_killed_build_resumes(encoded, stored, tmp_path, run_cli):
    """SIGKILL `build-index` once two add shards are on disk; the rerun keeps them and finishes."""
    out = tmp_path / "out"
    shutil.copytree(encoded, out)
    args = ["build-index", str(out), "--shard-rows", str(KILL_SHARD_ROWS), "--quiet"]
    log = tmp_path / "killed-build.log"  # a file, not a pipe that could fill up
    with open(log, "w") as sink:
        proc = subprocess.Popen([*cli_command(), *args], stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while len(_shard_files(out)) < 2:
            assert proc.poll() is None, ("the build ended before two shards were seen", log.read_text()[-2000:])
            assert time.monotonic() < deadline, "no add shard was written"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "index" / "params.json").exists(), "the build finished before the kill"
    done = _shard_files(out)
    assert len(done) >= 2
    assert embedkit.status(out).index["state"] == "unfinished"
    assert f"index: unfinished build (run `embedkit build-index {out}` to resume it)" in run_cli("status", out).stdout

    rerun = run_cli(*args, "--json")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    report = json.loads(rerun.stdout)
    assert not report["up_to_date"]
    assert report["shards_total"] == ROWS // KILL_SHARD_ROWS
    assert report["shards_resumed"] == len(done) >= 1
    assert report["n"] == ROWS and report["factory"] == "IVF32,PQ48"
    assert report["recall"] >= TARGET, report["recall_table"]
    assert not (out / "index" / "shards").exists()

    index = load_index(out / "index")
    assert index.ntotal == ROWS
    check_ids(index, ROWS)  # every position 0..n-1 exactly once
    with pytest.raises(EmbedkitError, match="outside"):
        check_ids(index, ROWS - 1)  # and the check does look: position n-1 is out of range here

    res = embedkit.Retriever(out).search_vectors(stored.vectors[:30], k=K)
    top, _ = brute_force(stored.vectors[:30], stored.vectors, K)
    assert id_recall(res.ids, [[stored.ids[p] for p in row] for row in top]) >= TARGET


# ---- refusals --------------------------------------------------------------------------------


def test_build_index_without_vectors_is_refused(tmp_path, run_cli, refused):
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(run_cli("build-index", empty), str(empty), "no vectors")
    refused(run_cli("build-index", tmp_path / "missing"), "no vectors")
    assert not (empty / "index").exists()


def test_too_many_lists_is_refused(encoded, run_cli, refused):
    refused(run_cli("build-index", encoded, "--nlist", "4096"), "2,000", "--nlist 4096")
    assert not (encoded / "index").exists()


def test_search_refuses_a_truncated_lists_file(built_copy, run_cli, refused):
    lists = built_copy / "index" / "merged.ivfdata"
    size = lists.stat().st_size
    with open(lists, "r+b") as f:
        f.truncate(size // 2)
    refused(run_cli("search", built_copy, "how do I report a bug"), "merged.ivfdata", f"{size // 2:,}")
    with pytest.raises(EmbedkitError, match="merged.ivfdata"):
        embedkit.Retriever(built_copy)
    index = embedkit.status(built_copy).index
    assert index["state"] == "damaged" and f"{size // 2:,} bytes" in index["reason"]


def test_search_refuses_a_changed_index_file(built_copy, run_cli, refused):
    path = built_copy / "index" / "merged.index"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    refused(run_cli("search", built_copy, "how do I report a bug"), "merged.index", "checksum")
    # build-index does not report the damaged index up to date: it rebuilds it (its check runs once per build)
    r = run_cli("build-index", built_copy)
    assert r.returncode == 0 and "does not match its checksum: rebuilding the index" in r.stderr, r.stderr
    assert run_cli("search", built_copy, "how do I report a bug").returncode == 0


def test_new_vectors_version_refuses_search_and_rebuilds(built_copy, stored, run_cli, refused):
    store = VectorStore(built_copy)
    ds = store.dataset()
    built_on = ds.version
    ids = pa.array([f"new:{i}" for i in range(5)], pa.string())
    vectors = stored.vectors[:5].astype(np.float16)  # the stored dtype
    rows = vectors_table(ds.schema, ids, vectors, stored.n_tokens[:5], stored.truncated[:5])
    latest = store.commit_shard(999, rows)
    assert latest > built_on

    searched = run_cli("search", built_copy, "how do I report a bug")
    refused(searched, f"version {built_on}", f"version {latest}", "build-index")
    status = run_cli("status", built_copy)
    assert f"index: stale, IVF32,PQ48 over {ROWS:,} vectors: built on version {built_on} of the vectors, which are now at " \
        f"version {latest}; run `embedkit build-index {built_copy}` again" in status.stdout.splitlines(), status.stdout

    rebuilt = run_cli("build-index", built_copy, "--quiet", "--json")
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    report = json.loads(rebuilt.stdout)
    assert not report["up_to_date"]
    assert (report["n"], report["vectors_version"]) == (ROWS + 5, latest)
    assert report["recall"] >= TARGET
    # the new rows are in the index: a copy of row 0 scores as row 0 does
    res = embedkit.Retriever(built_copy).search_vectors(stored.vectors[:1], k=K)
    assert {stored.ids[0], "new:0"} <= set(res.ids[0][:2])


# ---- other outputs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows,factory",
    [
        (250, "Flat"),  # below 1024 vectors
        # 4*sqrt(1500) = 154.9 -> 128; 1500 // 39 = 38 lists at most -> 64 -> 32
        (1500, "IVF32,PQ48"),
    ],
)
def test_small_output_gets_a_smaller_index(encoded, stored, tmp_path, rows, factory):
    out = small_output(encoded, tmp_path / "small", rows)
    report = embedkit.build_index(out, device="cpu", shard_rows=100, progress=False)
    assert (report.factory, report.n) == (factory, rows)
    assert report.shards_total == 2  # the two commits, one add shard each
    assert report.recall >= TARGET
    index = load_index(out / "index")
    assert index.ntotal == rows
    if factory == "Flat":
        assert isinstance(index, faiss.IndexFlat)

    vectors = stored.vectors[:rows]
    positions = np.random.default_rng(3).choice(rows, size=50, replace=False)
    res = embedkit.Retriever(out).search_vectors(vectors[positions], k=K)
    top, top_scores = brute_force(vectors[positions], vectors, K)
    assert id_recall(res.ids, [[stored.ids[p] for p in row] for row in top]) >= TARGET
    for pos, ids, scores, best in zip(positions, res.ids, res.scores, top_scores[:, 0]):
        assert ids[0] == stored.ids[pos] or scores[0] == pytest.approx(best, abs=1e-4)


def test_unnormalized_output_uses_inner_product(unnormalized_model_dir, sample, tmp_path):
    short = sample.filter(pc.less_equal(pc.utf8_length(sample.column("text")), 250)).slice(0, 300)
    src, out = tmp_path / "docs.parquet", tmp_path / "out"
    pq.write_table(short, src)
    model = str(unnormalized_model_dir)
    embedkit.encode(src, out, model=model, normalize=False, device="cpu", max_seq_length=128, progress=False)
    table = lance.dataset(str(out / "vectors.lance")).to_table()
    ids, vectors = table.column("id").to_pylist(), vectors_of(table).astype(np.float32)
    assert np.abs(np.linalg.norm(vectors, axis=1) - 1).max() > 0.1  # really not unit vectors

    def check_search(r: embedkit.Retriever, min_recall: float) -> None:
        res = r.search_vectors(vectors, k=K)  # every stored row as a query
        top, top_scores = brute_force(vectors, vectors, K)
        recall = id_recall(res.ids, [[ids[p] for p in row] for row in top])
        assert recall >= min_recall, recall
        for got, want in zip(res.scores, top_scores):  # inner products, not cosines
            assert all(a >= b for a, b in zip(got, got[1:]))
            assert got[0] <= want[0] + 1e-3
        text = short.column("text")[0].as_py()
        hits = r.search([text], k=5)
        assert len(hits.ids[0]) == 5
        assert all(a >= b for a, b in zip(hits.scores[0], hits.scores[0][1:]))
        # the text is encoded as the output was (no normalization) and scored by inner product
        query = embedkit.encode_texts([text], model=model, normalize=False, device="cpu")[0]
        where = {d: i for i, d in enumerate(ids)}
        np.testing.assert_allclose(hits.scores[0], vectors[[where[d] for d in hits.ids[0]]] @ query, atol=1e-3)
        assert hits.scores[0][0] <= (vectors @ query).max() + 1e-3

    def check_exact(r: embedkit.Retriever) -> None:
        res = r.search_vectors(vectors, k=K)
        np.testing.assert_allclose(np.array(res.scores), brute_force(vectors, vectors, K)[1], atol=1e-3)

    report = embedkit.build_index(out, device="cpu", progress=False)
    assert (report.factory, report.metric) == ("Flat", "ip")
    assert json.loads((out / "index" / "params.json").read_text())["metric"] == "ip"
    check_exact(embedkit.Retriever(out))
    check_search(embedkit.Retriever(out), TARGET)

    # an inverted-file index over inner products too: 4 lists need 4 * 39 = 156 vectors
    report = embedkit.build_index(out, device="cpu", nlist=4, progress=False)
    assert (report.factory, report.metric, report.up_to_date) == ("IVF4,PQ48", "ip", False)
    assert report.recall >= TARGET
    assert faiss.extract_index_ivf(load_index(out / "index")).metric_type == faiss.METRIC_INNER_PRODUCT
    # every list visited and every row reranked: exactly the brute-force inner products
    check_exact(embedkit.Retriever(out, nprobe=4, rerank=300))
    # at the tuned nprobe/rerank; the margin below the target is the tuning's own sampling
    # error: at 300 rows it measures recall on only 30 queries (rows 0-39 alone reach ~0.9)
    check_search(embedkit.Retriever(out), TARGET - 0.05)


@pytest.mark.parametrize(
    "options,metric,factory",
    [
        ({}, "l2", "IVF32,PQ48"),
        pytest.param({"nlist": 16, "pq_m": 8, "opq": True}, "l2", "OPQ8,IVF16,PQ8", marks=pytest.mark.slow),  # OPQ training: ~10 s
        ({"nlist": 16}, "ip", "IVF16,PQ48"),
    ],
    ids=["ivfpq", "opq-ivfpq", "ivfpq-ip"],
)
def test_torch_codec_matches_faiss(stored, options, metric, factory):
    x = stored.vectors
    p = choose_params(ROWS, DIM, memory_budget=1 << 40, metric=metric, **options)
    assert p.factory == factory
    index = train_ivfpq(x[:1_000] if p.opq else x, p, "cpu")  # OPQ's training is the cost: on half the rows (it needs >= dim)
    assert isinstance(index, faiss.IndexPreTransform) == p.opq

    codec = TorchCodec(index, "cpu", metric)
    ours = codec.encode(x)
    theirs = index.sa_encode(x)
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape == (ROWS, 1 + p.pq_m)
    assert len(np.unique(theirs[:, 0])) > p.nlist // 2  # the codes say something
    equal = (ours == theirs).mean()
    assert equal >= 0.99, equal
    assert (ours == theirs).all(axis=1).mean() >= 0.99
    assert codec.agrees_with_faiss(x[:500])

    # stored with add_sa_codes, the codes search as faiss's own add does
    positions = np.arange(ROWS, dtype=np.int64)
    ours_index, faiss_index = faiss.clone_index(index), faiss.clone_index(index)
    faiss.extract_index_ivf(ours_index).add_sa_codes(ours, positions)
    faiss_index.add_with_ids(x, positions)
    for i in (ours_index, faiss_index):
        faiss.extract_index_ivf(i).nprobe = 8
    _, a = ours_index.search(x[:200], K)
    _, b = faiss_index.search(x[:200], K)
    assert (a == b).mean() >= 0.99


# ---- the search command and other readers ----------------------------------------------------


def test_search_json_output(built, stored, texts_by_id, verbatim_rows, run_cli_process):
    texts = [texts_by_id[stored.ids[verbatim_rows[0]]], "how do I open a file for reading"]
    r = run_cli_process("search", built.out, *texts, "-k", "5", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]  # JSON lines: nothing else on stdout
    assert len(rows) == 2 and all(isinstance(row, dict) for row in rows)
    known = set(stored.ids)
    for row, text in zip(rows, texts):
        assert set(row) == {"query", "hits"} and row["query"] == text
        assert len(row["hits"]) == 5
        for hit in row["hits"]:
            assert set(hit) == {"id", "score"}  # no text stored: none shown
            assert hit["id"] in known and isinstance(hit["score"], float)
        scores = [hit["score"] for hit in row["hits"]]
        assert scores == sorted(scores, reverse=True)
    assert rows[0]["hits"][0]["id"] == stored.ids[verbatim_rows[0]]


def test_lancedb_opens_an_indexed_output(built):
    import lancedb

    table = lancedb.connect(str(built.out)).open_table("vectors")
    assert table.count_rows() == ROWS
    assert table.schema.field("vector").type.list_size == DIM


def test_build_refuses_an_unfinished_encode(encoded, tmp_path):
    out = small_output(encoded, tmp_path / "partial", 250)
    manifest = json.loads((out / "embedkit.json").read_text())
    manifest["plan"]["shards"] = 3  # one planned shard is not committed yet
    write_manifest(out, manifest)
    with pytest.raises(EmbedkitError, match="not fully encoded"):
        embedkit.build_index(out, device="cpu", progress=False)
    assert not (out / "index").exists()


def test_build_index_dry_run_plans_the_real_build_and_status_compares_the_two(encoded, built, run_cli, tmp_path):
    """--dry-run: the factory the real build chose, rates measured here, no index folder, only
    its prediction left in OUT; the real build records it beside its own time."""
    out = tmp_path / "out"
    shutil.copytree(encoded, out)
    before = set(p.name for p in out.iterdir())
    r = run_cli("build-index", out, "--device", "cpu", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(p.name for p in out.iterdir()) - before == {".embedkit.prediction.json"}
    assert d["factory"] == built.report.factory and d["n"] == ROWS
    m = d["measured"]
    assert m["sample_vectors"] == ROWS and min(m["assign_flops"], m["read_bytes_per_second"], m["pq_flops"], m["take_seconds_per_row"]) > 0
    assert m["queries_seconds"] > 0  # the tuning queries were prepared as the build prepares them
    e = d["estimated_seconds"]
    assert set(e) == {"fixed", "read", "train", "queries", "add", "merge", "tune"} and min(e.values()) >= 0 and e["train"] > 0
    assert d["estimated_total_seconds"] == pytest.approx(sum(e.values()), abs=0.01)
    report = embedkit.build_index(out, device="cpu", progress=False)
    index = embedkit.status(out).index
    assert report.factory == d["factory"] and index["dry_run"]["predicted_seconds"] == pytest.approx(d["estimated_total_seconds"], abs=0.01)
    assert index["dry_run"]["real_seconds"] > 0 and index["dry_run_line"].startswith("dry run: predicted")
    assert not (out / ".embedkit.prediction.json").exists()


# ---- the queries a build tunes with -----------------------------------------------------------


def test_pseudo_queries_look_like_what_users_type(sample):
    from embedkit.index.queries import SENTENCE_WORDS, WINDOW_WORDS, pseudo_queries

    texts = sample.column("text").to_pylist()[:500]
    queries = pseudo_queries(texts, 200, seed=3)
    assert len(queries) == 200 == len(set(queries))
    assert all(WINDOW_WORDS[0] <= len(q.split()) <= SENTENCE_WORDS for q in queries)
    assert queries == pseudo_queries(texts, 200, seed=3) and queries != pseudo_queries(texts, 200, seed=4)
    starts = sum(any(t.split()[:3] == q.split()[:3] for t in texts) for q in queries)
    assert 0.2 * len(queries) < starts < len(queries)  # first sentences and windows from inside documents, both


def test_a_build_tunes_on_query_like_texts_and_reports_both_figures(built, stored):
    """By default the recall promised is measured on query-like texts cut from the input, and
    it is what those queries get: recomputed here against exact search over the stored vectors."""
    r = built.report
    assert (r.tuning_queries, r.tuning_count) == ("query-like texts from the input", 1000)
    assert r.recall_stored_rows is not None and 0 < r.recall_stored_rows <= 1
    assert "on 1,000 query-like texts from the input" in r.lines()[0] and "on stored rows" in r.lines()[0]
    saved = json.loads((built.out / "index" / "params.json").read_text())["report"]
    assert (saved["recall"], saved["recall_stored_rows"], saved["tuning_queries"]) == (r.recall, r.recall_stored_rows, r.tuning_queries)
    with np.load(built.out / "index" / "queries.npz") as z:
        like = z["vectors"][: int(z["m"])]
        assert (z["positions"][: int(z["m"])] == -1).all()
    exact = np.argsort(-(like @ stored.vectors.T), axis=1, kind="stable")[:, :K]
    found = embedkit.Retriever(built.out).search_vectors(like, K).ids
    by_id = {doc: pos for pos, doc in enumerate(stored.ids)}
    measured = np.mean([len({by_id[d] for d in hits} & set(row.tolist())) / K for hits, row in zip(found, exact)])
    assert abs(measured - r.recall) <= 0.005, (measured, r.recall)


def test_tune_queries_from_a_file_take_precedence(built_copy, sample, tmp_path):
    path = tmp_path / "queries.txt"
    path.write_text("\n".join(" ".join(t.split()[:6]) for t in sample.column("text").to_pylist()[:40]) + "\n\n")
    r = embedkit.build_index(built_copy, device="cpu", progress=False, overwrite=True, tune_queries=path)
    assert (r.tuning_queries, r.tuning_count) == ("queries from --tune-queries", 40)
    with pytest.raises(EmbedkitError, match="--tune-queries file not found"):
        embedkit.build_index(built_copy, device="cpu", progress=False, overwrite=True, tune_queries=tmp_path / "none.txt")


def test_an_input_that_is_gone_falls_back_to_stored_rows_and_says_so(built_copy, run_cli):
    manifest = json.loads((built_copy / "embedkit.json").read_text())
    manifest["input"]["path"] = str(built_copy / "moved-away.parquet")
    write_manifest(built_copy, manifest)
    shown = run_cli("build-index", built_copy, "--overwrite", "--json")
    assert shown.returncode == 0, shown.stderr[-3000:]
    report = json.loads(shown.stdout.strip().splitlines()[-1])
    assert report["tuning_queries"].startswith("stored rows (the input") and "is gone" in report["tuning_queries"]
    assert "tuning on stored rows: the input" in shown.stderr


def test_search_at_a_recall_uses_the_setting_the_build_measured(built):
    table = built.report.recall_table
    low = min(row["recall"] for row in table)
    r = embedkit.Retriever(built.out, recall=low)
    assert (r.nprobe, r.rerank) == (table[0]["nprobe"], table[0]["rerank"])
    best = max(table, key=lambda row: row["recall"])
    top = embedkit.Retriever(built.out, recall=1.0)
    reached = [row for row in table if row["recall"] >= 1.0]
    want = reached[0] if reached else best
    assert (top.nprobe, top.rerank) == (want["nprobe"], want["rerank"])
    with pytest.raises(EmbedkitError, match="--recall must be in"):
        embedkit.Retriever(built.out, recall=1.5)


def test_search_reads_queries_from_a_file(built, run_cli, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"query": q}) + "\n" for q in ("open a file", "format a string", "sort a list")))
    shown = run_cli("search", built.out, "--queries", path, "--json", "-k", "3", "--recall", "0.9")
    assert shown.returncode == 0, shown.stderr[-3000:]
    rows = [json.loads(line) for line in shown.stdout.strip().splitlines()]
    assert [row["query"] for row in rows] == ["open a file", "format a string", "sort a list"]
    assert all(len(row["hits"]) == 3 for row in rows)
    assert run_cli("search", built.out).returncode == 2  # no query at all
