"""Growing an index after `encode --append`: only the new rows are added to the kept quantizer.

Real encodes of slices of the bundled sample (short texts: 32 tokens), real faiss indexes, the
CLI in this process, and a fresh process killed in the grown index's swap.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embedkit
from embedkit.config import IndexConfig
from embedkit.index.build import IndexReport, plan_build
from embedkit.io.shards import read_manifest
from embedkit.io.store import KILL_ENV, VectorStore

FIRST, NEW = 1_100, 200  # rows of the first input (IVF-PQ from 1,024 on) and of each append
MAX_SEQ = 16  # tokens a row: the encodes are most of this file's time
SHARD_ROWS = 100


@dataclass(frozen=True)
class Grown:
    out: Path  # grown twice: three inputs
    appended: Path  # the same output after the third input's encode, before its index grew
    reports: list[IndexReport]
    texts: dict  # id -> text of every input row
    inputs: dict  # name -> parquet path


def _write(path: Path, ids: list, texts: list) -> Path:
    pq.write_table(pa.table({"id": ids, "text": texts}), path)
    return path


def _encode(src: Path, out: Path, append: bool) -> None:
    embedkit.encode(src, out, device="cpu", max_seq_length=MAX_SEQ, shard_rows=SHARD_ROWS, progress=False, append=append)


@pytest.fixture(scope="module")
def grown(tmp_path_factory, sample) -> Grown:
    root = tmp_path_factory.mktemp("grow")
    texts = sample.column("text").to_pylist()
    cuts = {"a": (0, FIRST), "b": (FIRST, FIRST + NEW), "c": (FIRST + NEW, FIRST + 2 * NEW)}
    inputs = {n: _write(root / f"{n}.parquet", [f"{n}{i}" for i in range(hi - lo)], texts[lo:hi]) for n, (lo, hi) in cuts.items()}
    # a fourth input unlike the others: the same kind of text written backwards
    lo = FIRST + 2 * NEW
    inputs["reversed"] = _write(root / "reversed.parquet", [f"r{i}" for i in range(NEW)], [t[::-1] for t in texts[lo : lo + NEW]])
    out, reports = root / "out", []
    for name in "abc":
        _encode(inputs[name], out, append=name != "a")
        if name == "c":
            shutil.copytree(out, root / "appended")
        reports.append(embedkit.build_index(out, device="cpu", progress=False))
    by_id = {f"{n}{i}": t for n, (lo, hi) in cuts.items() for i, t in enumerate(texts[lo:hi])}
    return Grown(out, root / "appended", reports, by_id, inputs)


def _copy(src: Path, tmp: Path, name: str = "out") -> Path:
    shutil.copytree(src, tmp / name)
    return tmp / name


def test_three_inputs_grow_the_index_within_a_hundredth_of_a_rebuild(grown, tmp_path):
    first, second, third = grown.reports
    assert (first.grown_from, second.grown_from, third.grown_from) == (0, FIRST, FIRST + NEW)
    assert third.n == FIRST + 2 * NEW and third.factory == first.factory
    assert third.drift is not None and third.seconds.get("train") is None  # nothing trained
    ids = lance.dataset(str(grown.out / "vectors.lance")).to_table(columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(grown.texts)  # every id of the three inputs, each once
    status = embedkit.status(grown.out)
    assert status.index["state"] == "current", status.index["line"]
    # the same vectors and lists, trained anew on all of them: at the grown index's setting the
    # recall on the same tuning queries is within 0.01
    nlist = int(re.search(r"IVF(\d+)", third.factory).group(1))
    rebuilt = embedkit.build_index(_copy(grown.out, tmp_path), device="cpu", progress=False, overwrite=True, nlist=nlist)
    assert rebuilt.grown_from == 0 and rebuilt.factory == third.factory and rebuilt.tuning_count == third.tuning_count
    at = {(r["nprobe"], r["rerank"]): r["recall"] for r in rebuilt.recall_table}
    assert abs(third.recall - at[third.nprobe, third.rerank]) <= 0.01, (third.recall, at[third.nprobe, third.rerank])
    assert third.recall >= third.target_recall
    # the new rows are found: short texts of the last input (not cut at MAX_SEQ), each its own best hit
    seen, unique = {}, []
    for i, t in grown.texts.items():
        seen[t] = seen.get(t, 0) + 1
    unique = [i for i, t in grown.texts.items() if i.startswith("c") and seen[t] == 1 and 3 <= len(t.split()) <= 7][:5]
    assert len(unique) == 5
    hits = embedkit.Retriever(grown.out).search([grown.texts[i] for i in unique], k=1)
    assert [row[0] for row in hits.ids] == unique


def test_a_kill_in_the_swap_is_finished_by_the_rerun(grown, tmp_path, monkeypatch, run_cli_process, run_cli):
    out = _copy(grown.appended, tmp_path)
    monkeypatch.setenv(KILL_ENV, "swap:0")
    killed = run_cli_process("build-index", out, "--device", "cpu", "--quiet")
    assert killed.returncode == -9, killed.stderr[-2000:]
    monkeypatch.delenv(KILL_ENV)
    assert embedkit.status(out).index["state"] == "unfinished"
    r = run_cli("build-index", out, "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "finished swapping in the grown index" in r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["up_to_date"] and report["n"] == FIRST + 2 * NEW and report["grown_from"] == FIRST + NEW
    assert embedkit.status(out).index["state"] == "current"
    hit = embedkit.Retriever(out, verify="full").search_vectors(
        lance.dataset(str(out / "vectors.lance")).take([FIRST + 2 * NEW - 1], columns=["vector"]).column("vector").to_numpy(zero_copy_only=False)[0][None].astype("float32"), k=1)
    assert hit.ids[0][0] == f"c{NEW - 1}"


def test_more_new_rows_than_max_growth_drift_or_retrain_train_anew(grown, tmp_path, run_cli, refused):
    refused(run_cli("build-index", grown.appended, "--max-growth", "1.5"), "--max-growth must be a share")
    out = _copy(grown.appended, tmp_path, "max")
    r = run_cli("build-index", out, "--device", "cpu", "--json", "--max-growth", "0.1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "more than --max-growth 10%: training the index anew" in r.stderr, r.stderr[-2000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["grown_from"] == 0 and report["n"] == FIRST + 2 * NEW and "train" in report["seconds"]
    # --retrain: the plan trains anew (planning writes nothing: the output is only read)
    said: list[str] = []
    plan = plan_build(grown.appended, read_manifest(grown.appended), VectorStore(grown.appended), IndexConfig(device="cpu", retrain=True),
                      said.append)  # fmt: skip
    assert plan.growth is None and any("--retrain: training the index anew" in line for line in said), said
    # rows unlike those the quantizer was trained on: the drift says so, and the index is trained anew
    out = _copy(grown.out, tmp_path, "drift")
    _encode(grown.inputs["reversed"], out, append=True)
    r = run_cli("build-index", out, "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "farther from their lists than the old rows" in r.stderr, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["grown_from"] == 0


def test_after_lancedbs_optimize_the_index_is_trained_anew_not_grown(grown, tmp_path):
    """Compaction rewrites the fragments the old index's positions refer to: growing from it
    would pair old lists with moved rows. The build must see it and train anew."""
    import lancedb

    out = _copy(grown.appended, tmp_path)
    lancedb.connect(str(out)).open_table("vectors").optimize()
    said: list[str] = []
    report = embedkit.build_index(out, device="cpu", progress=False, log=said.append)
    assert report.grown_from == 0 and "train" in report.seconds and report.n == FIRST + 2 * NEW, said
    assert not any("growing" in line for line in said), said
    # every row is found by its own vector: positions are those of the compacted dataset
    ds = lance.dataset(str(out / "vectors.lance"))
    rows = [0, FIRST + NEW, FIRST + 2 * NEW - 1]
    table = ds.take(rows, columns=["id", "vector"])
    vectors = table.column("vector").to_numpy(zero_copy_only=False)
    hits = embedkit.Retriever(out).search_vectors(np.stack(vectors).astype("float32"), k=1)
    assert [h[0] for h in hits.ids] == table.column("id").to_pylist()
