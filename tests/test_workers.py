"""Several workers on one output (`--gpus N`): shard tasks on a local Ray, run on the CPU with two.

The tests share one Ray started for this module (`local_ray`), as a program that called
`ray.init()` would. What happens when the driver or a worker dies: tests/faults/test_fault_workers.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE
from faults.faultkit import HANG_GUARD_S

import embedkit
from embedkit.errors import EmbedkitError
from embedkit.io.store import VectorStore

ROWS, SHARD_ROWS = 120, 15  # 8 shards: each of two workers takes several


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("workers") / "docs.parquet"
    pq.write_table(pq.read_table(SAMPLE).slice(0, ROWS), path)
    return path


def stored(out: Path) -> dict:
    table = lance.dataset(str(out / "vectors.lance")).to_table()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id was written twice"
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    return dict(zip(ids, vectors))


@pytest.fixture(scope="module")
def one_and_two(corpus, tmp_path_factory, local_ray) -> tuple:
    """The corpus (with an int16 column) encoded by one process and by two workers, storing the
    text and that column, each with a tokenizer process: (one's summary, two's summary, two's
    OUT, the rows). Each worker loads torch and the model itself, so the suite runs one
    two-worker encode and checks it from several sides."""
    root = tmp_path_factory.mktemp("one-and-two")
    rows = pq.read_table(corpus)
    rows = rows.append_column("n", pa.array(range(ROWS), pa.int16()))
    src = root / "docs.parquet"
    pq.write_table(rows, src)
    options = dict(device="cpu", shard_rows=SHARD_ROWS, max_seq_length=64, store_text=True, keep_columns=("n",),
                   tokenize_workers=1, progress=False)  # fmt: skip
    one = embedkit.encode(src, root / "one", **options)
    two = embedkit.encode(src, root / "two", gpus=2, **options)
    return one, two, root / "two", rows


@pytest.mark.slow  # two Ray workers, each loading torch and the model
def test_two_workers_write_what_one_writes(one_and_two):
    one, two, out, _ = one_and_two
    assert (two.docs, two.tokens, two.shards_done) == (one.docs, one.tokens, ROWS // SHARD_ROWS)
    assert two.device == "2 x cpu"
    # one part per worker process: the tokens of the shards it committed and its seconds
    # encoding them; a copy that lost a re-issued shard adds nothing
    assert len(two.parts) == 2 and sum(p["tokens"] for p in two.parts) == two.tokens and all(p["seconds"] > 0 for p in two.parts)
    a, b = stored(Path(one.out)), stored(out)
    assert set(a) == set(b) and len(b) == ROWS
    cos = [float(a[k] @ b[k] / np.linalg.norm(a[k]) / np.linalg.norm(b[k])) for k in a]
    assert min(cos) >= 0.9999
    assert embedkit.status(out).complete
    # each shard is one commit carrying its index, whichever worker made it
    assert sorted(VectorStore(out).committed_shards()) == list(range(ROWS // SHARD_ROWS))


@pytest.mark.slow
def test_workers_store_the_text_and_kept_columns(one_and_two):
    """Each worker reads and writes the stored columns of its own shards."""
    _, _, out, rows = one_and_two
    table = lance.dataset(str(out / "vectors.lance")).to_table()
    assert table.schema.field("n").type == pa.int16()
    got = {r["id"]: (r["text"], r["n"]) for r in table.select(["id", "text", "n"]).to_pylist()}
    assert got == {r["id"]: (r["text"], r["n"]) for r in rows.to_pylist()}


@pytest.mark.slow
def test_workers_share_the_shards_and_the_timeline_shows_them(one_and_two, tmp_path, run_cli):
    """Both workers get shards, each running them with a tokenizer process of its own (a Ray
    worker may start children); `status --plot` draws one bar per committed shard on one row
    per worker."""
    from embedkit.plan.plots import plot_timeline
    from embedkit.status import commit_log

    _, two, out, _ = one_and_two
    log = commit_log(out)
    assert sorted(e["shard"] for e in log) == list(range(ROWS // SHARD_ROWS))
    per_worker = {w: sum(1 for e in log if e["worker"] == w) for w in {e["worker"] for e in log}}
    assert len(per_worker) == 2 and min(per_worker.values()) >= 2, per_worker
    assert all(e["committed"] >= e["started"] for e in log)
    drawn = plot_timeline(log, tmp_path / "t.png")
    assert len(drawn["bars"]) == ROWS // SHARD_ROWS and sorted(drawn["workers"]) == sorted(per_worker)
    r = run_cli("status", out, "--plot", tmp_path / "cli.png")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cli.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{ROWS // SHARD_ROWS} shards on 2 workers" in r.stdout


@pytest.mark.parametrize("gpus", ["0", "x", "all"])
def test_bad_gpus_values_are_refused(corpus, tmp_path, gpus):
    with pytest.raises(EmbedkitError, match="--gpus"):
        embedkit.encode(corpus, tmp_path / "o", device="cpu", gpus=gpus, progress=False)


@pytest.mark.slow  # a fresh interpreter that loads the model
def test_one_worker_never_imports_ray_and_several_need_it(corpus, tmp_path):
    """With a `ray` that cannot be imported (it records the attempt): a single-worker encode
    runs without trying, and `gpus=2` is refused in one line naming the extra, before OUT is
    made."""
    shim = tmp_path / "shim" / "ray"
    shim.mkdir(parents=True)
    tried = tmp_path / "ray-import-tried"
    (shim / "__init__.py").write_text(f"open({str(tried)!r}, 'w').close()\nraise ImportError(\"No module named 'ray'\")\n")
    code = (
        "import os, embedkit\n"
        f"s = embedkit.encode({str(corpus)!r}, {str(tmp_path / 'one')!r}, device='cpu', shard_rows=60, max_seq_length=16, progress=False)\n"
        f"print(s.docs, os.path.exists({str(tried)!r}))\n"
        "try:\n"
        f"    embedkit.encode({str(corpus)!r}, {str(tmp_path / 'two')!r}, device='cpu', gpus=2, progress=False)\n"
        "except embedkit.EmbedkitError as e:\n"
        "    print(e)\n"
    )  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")]), PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert lines[0] == f"{ROWS} False"  # encoded, and `import ray` never tried
    assert len(lines) == 2 and "pip install 'embedkit[ray]'" in lines[1] and "--gpus" in lines[1], lines
    assert not (tmp_path / "two").exists()


# With re-issue the run must end well before the stall would: a long stall. Without, it must
# outlast the stall: a short one is proof enough, and costs a third of the time.
STALL_S = {True: 30.0, False: 4.0}


@pytest.mark.slow
@pytest.mark.parametrize("reissue", [True, False])
def test_a_stalled_worker_is_overtaken(local_ray, corpus, tmp_path, monkeypatch, reissue):
    """The first copy of shard 0 stalls STALL_S[reissue] seconds (fault injection). With re-issue
    the idle worker also runs that shard, commits it first, and the run ends well before the
    stall is over; without, the run waits for it. Either way every id is written exactly once."""
    from embedkit.run.distributed import STALL_ENV

    monkeypatch.setenv(STALL_ENV, f"0:{STALL_S[reissue]}")
    t = time.perf_counter()
    s = embedkit.encode(corpus, tmp_path / "out", device="cpu", shard_rows=20, max_seq_length=64, gpus=2, reissue=reissue, progress=False)
    wall = time.perf_counter() - t
    assert len(stored(tmp_path / "out")) == ROWS and s.docs == ROWS and s.shards_done == ROWS // 20
    assert sorted(VectorStore(tmp_path / "out").committed_shards()) == list(range(ROWS // 20))
    if reissue:
        assert s.reissued >= 1
        assert wall < STALL_S[True], wall  # the stalled shard was committed by the other worker
    else:
        assert s.reissued == 0
        assert wall > STALL_S[False], wall


@pytest.mark.slow
def test_workers_split_prompt_and_quantize_as_one_process_does(corpus, tmp_path, local_ray):
    """Chunking, the document prompt, --dim and the int8 ranges reach each worker through the
    manifest: two workers store the same (id, chunk) rows and the same codes as one process."""
    options = dict(device="cpu", shard_rows=SHARD_ROWS, chunk_tokens=48, chunk_overlap=4, prompt="passage: ", dim=256,
                   dtype="int8", progress=False)  # fmt: skip
    one = embedkit.encode(corpus, tmp_path / "one", **options)
    two = embedkit.encode(corpus, tmp_path / "two", gpus=2, **options)
    assert (two.docs, two.chunks, two.tokens) == (one.docs, one.chunks, one.tokens) and one.chunks > ROWS

    def rows(out: Path) -> dict:
        table = lance.dataset(str(out / "vectors.lance")).to_table(columns=["id", "chunk", "start", "end", "vector"])
        return {(r["id"], r["chunk"]): (r["start"], r["end"], np.asarray(r["vector"], np.int16)) for r in table.to_pylist()}

    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert a.keys() == b.keys() and len(b) == one.chunks
    assert all(a[k][:2] == b[k][:2] for k in a)  # the same spans
    # the same codes with the same ranges: batches differ between the runs, so the float vectors
    # differ by about 1e-7 and a value on a step's edge may land one step over
    diff = np.abs(np.stack([a[k][2] for k in a]) - np.stack([b[k][2] for k in a]))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999, (diff == 0).mean()
