"""OUT on object storage: encode (killed and resumed), append, status, build-index, search,
generate and Ray shard tasks against a real S3-compatible server on localhost (moto's server
mode: real HTTP, real conditional puts), with the real default model and real Lance datasets.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embedkit
from embedkit.io import objstore
from embedkit.io.objstore import ObjectLock, out_path
from embedkit.io.store import KILL_ENV

ROWS = 40
SHARD_ROWS = 15


@pytest.fixture(scope="module")
def s3(s3_server):
    """The AWS environment of the local server, set for this module (the CLI's child processes
    and Ray's workers inherit it)."""
    env = dict(s3_server)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    objstore._client.cache_clear()
    yield env
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    objstore._client.cache_clear()


def _bucket() -> str:
    name = f"embedkit-{uuid.uuid4().hex[:12]}"
    objstore._client().create_bucket(Bucket=name)
    return name


def _input(tmp, name: str, sample, start: int, rows: int = ROWS):
    texts = [t for t in sample.column("text").to_pylist() if t][start : start + rows]
    path = tmp / f"{name}.parquet"
    pq.write_table(pa.table({"id": [f"{name}{i}" for i in range(rows)], "text": texts}), path)
    return path, dict(zip([f"{name}{i}" for i in range(rows)], texts))


def _ids(uri: str) -> list:
    return lance.dataset(f"{uri}/vectors.lance").to_table(columns=["id"]).column("id").to_pylist()


def test_encode_killed_resumed_appended_indexed_and_searched_on_s3(s3, tmp_path, sample, run_cli, run_cli_process, monkeypatch):
    (a, texts), (b, more) = _input(tmp_path, "a", sample, 0), _input(tmp_path, "b", sample, ROWS)
    out = f"s3://{_bucket()}/corpus/out"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMBEDKIT_CACHE", str(tmp_path / "this-host"))  # the local stand-ins of the index folder
    enc = ("--device", "cpu", "--shard-rows", str(SHARD_ROWS), "--max-seq-length", "64", "--quiet")
    # killed between a shard's Lance commit and its ledger record, then resumed
    monkeypatch.setenv(KILL_ENV, "commit:1")
    assert run_cli_process("encode", a, out, *enc).returncode == -9
    monkeypatch.delenv(KILL_ENV)
    assert embedkit.status(out).shards_done < 3
    r = run_cli("encode", a, out, *enc, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["shards_done"] + json.loads(r.stdout)["shards_skipped"] == 3
    r = run_cli("encode", b, out, *enc, "--append")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(_ids(out)) == sorted([*texts, *more])  # every id once
    exported = run_cli("export", out, "--format", "jsonl")
    assert exported.returncode == 0 and len(exported.stdout.strip().splitlines()) == 2 * ROWS
    st = embedkit.status(out)
    assert st.complete and [i["shards_done"] for i in st.inputs] == [3, 3]
    # the index: built from a local stand-in, published to the bucket, searched from another cache
    r = run_cli("build-index", out, "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["n"] == 2 * ROWS
    assert (out_path(out) / "index" / "params.json").is_file()
    assert embedkit.status(out).index["state"] == "current"
    monkeypatch.setenv("EMBEDKIT_CACHE", str(tmp_path / "another-host"))
    wanted = next(i for i, t in more.items() if 4 <= len(t.split()) <= 12 and list(more.values()).count(t) == 1)
    hits = embedkit.Retriever(out).search([more[wanted]], k=1)
    assert hits.ids[0][0] == wanted
    assert (tmp_path / "another-host").is_dir()
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir()), "a local folder was made for the URI"


def test_the_lock_object_refuses_a_live_holder_and_takes_over_a_dead_one(s3, tmp_path, sample, run_cli):
    (a, _) = _input(tmp_path, "a", sample, 0, rows=5)
    out = out_path(f"s3://{_bucket()}/out")
    lock = out / ".embedkit.lock"
    # another host's run, renewed just now: refused
    lock.write_bytes(json.dumps({"holder": "pid 1 on elsewhere", "host": "elsewhere", "pid": 1, "renewed": time.time()}).encode())
    r = run_cli("encode", a, str(out), "--device", "cpu", "--quiet")
    assert r.returncode == 2 and "in use by another embedkit run (pid 1 on elsewhere)" in r.stderr
    # a process of this host that is gone (kill -9): taken over at once; so is a lease run out
    for record in ({"host": socket.gethostname(), "pid": 2**22 + 7, "renewed": time.time()}, {"host": "elsewhere", "pid": 1, "renewed": 0}):
        lock.write_bytes(json.dumps({"holder": "gone", **record}).encode())
        r = run_cli("encode", a, str(out), "--device", "cpu", "--quiet", "--overwrite")
        assert r.returncode == 0, r.stderr[-2000:]
        assert not lock.is_file()  # released at the end
    # two takers of one lock: the conditional puts let exactly one in
    first, second = ObjectLock(lock, "first"), ObjectLock(lock, "second")
    first.acquire()
    with pytest.raises(embedkit.EmbedkitError, match="in use by another embedkit run"):
        second.acquire()
    etag = lock.etag()
    assert lock.replace_if(b"{}", etag) is not None and lock.replace_if(b"{}", etag) is None
    first.release()


def test_generate_on_s3(s3, tmp_path, sample, run_cli):
    (a, _) = _input(tmp_path, "a", sample, 0, rows=6)
    out = f"s3://{_bucket()}/gen"
    r = run_cli("generate", a, out, "--device", "cpu", "--max-new-tokens", "4", "--shard-rows", "3", "--quiet", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["docs"] == 6
    rows = lance.dataset(f"{out}/generations.lance").to_table().to_pylist()
    assert sorted(row["id"] for row in rows) == [f"a{i}" for i in range(6)] and all(row["summary"] for row in rows)
    assert embedkit.status(out).complete


def test_ray_tasks_encode_and_index_on_s3(s3, tmp_path, sample, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("EMBEDKIT_CACHE", str(tmp_path / "cache"))
    (a, texts) = _input(tmp_path, "a", sample, 0)
    out = f"s3://{_bucket()}/ray/out"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # after the AWS environment: workers inherit it
    try:
        s = embedkit.encode(a, out, device="cpu", shard_rows=SHARD_ROWS, max_seq_length=64, progress=False, ray="")
        report = embedkit.build_index(out, device="cpu", progress=False, ray="")
    finally:
        ray.shutdown()
    assert s.shards_done == 3 and sorted(_ids(out)) == sorted(texts)
    assert report.n == ROWS and embedkit.status(out).index["state"] == "current"
    # the add tasks took the quantizer from the bucket and put their shards there (hosts share no disk)
    assert list((tmp_path / "cache").rglob(".task-trained-*.index"))
    assert not (out_path(out) / "index" / "shards").is_dir()  # removed once the index was published
