"""`encode --append`: new inputs added to an existing output, each with its own shard plan.

Real encodes of slices of the bundled sample with the default model; a kill -9 inside an
append through the store's own fault hook.
"""

from __future__ import annotations

import json
from pathlib import Path

import lance
import pyarrow as pa
import pyarrow.parquet as pq

import embedkit

ROWS = 40  # per input
SHARD_ROWS = 15  # 3 shards per input


def _input(tmp: Path, name: str, sample, start: int, ids: bool = True) -> Path:
    texts = [t for t in sample.column("text").to_pylist() if t][start : start + ROWS]
    columns = {"id": [f"{name}{i}" for i in range(ROWS)]} if ids else {}
    path = tmp / f"{name}.parquet"
    pq.write_table(pa.table({**columns, "text": texts}), path)
    return path


def _stored_ids(out: Path) -> list:
    return lance.dataset(str(out / "vectors.lance")).to_table(columns=["id"]).column("id").to_pylist()


def _encode(run_cli, *args) -> dict:
    r = run_cli("encode", *map(str, args), "--device", "cpu", "--shard-rows", str(SHARD_ROWS), "--quiet", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_three_appends_hold_every_id_once_and_status_lists_the_inputs(tmp_path, sample, run_cli):
    a, b, c = (_input(tmp_path, n, sample, i * ROWS) for i, n in enumerate("abc"))
    out = tmp_path / "out"
    _encode(run_cli, a, out)
    for path in (b, c):
        summary = _encode(run_cli, path, out, "--append")
        assert summary["docs"] == ROWS and summary["shards_done"] == 3
    ids = _stored_ids(out)
    assert sorted(ids) == sorted(f"{n}{i}" for n in "abc" for i in range(ROWS))
    manifest = json.loads((out / "embedkit.json").read_text())
    assert [s["first_shard"] for s in manifest["inputs"]] == [0, 3, 6] and manifest["plan"]["shards"] == 9
    st = embedkit.status(out)
    assert st.complete and st.shards_done == 9
    assert [(i["rows"], i["shards_done"], i["shards_total"]) for i in st.inputs] == [(ROWS, 3, 3)] * 3
    shown = run_cli("status", str(out)).stdout
    assert all(p.name in shown for p in (a, b, c)), shown
    # a rerun of any of the three commands finds it done; the index covers every input
    assert _encode(run_cli, b, out, "--append")["shards_done"] == 0
    assert _encode(run_cli, a, out)["shards_done"] == 0
    report = embedkit.build_index(out, progress=False)
    assert report.n == 3 * ROWS


def test_inputs_without_ids_continue_the_row_numbers(tmp_path, sample, run_cli):
    a, b = (_input(tmp_path, n, sample, i * ROWS, ids=False) for i, n in enumerate("ab"))
    out = tmp_path / "out"
    _encode(run_cli, a, out)
    _encode(run_cli, b, out, "--append")
    assert sorted(_stored_ids(out)) == list(range(2 * ROWS))


def test_append_refusals(tmp_path, sample, run_cli, refused):
    a, b = _input(tmp_path, "a", sample, 0), _input(tmp_path, "b", sample, ROWS)
    out = tmp_path / "out"
    refused(run_cli("encode", a, out, "--append"), "--append adds to an existing output")
    _encode(run_cli, a, out)
    # a new input without --append: the refusal says how to add it
    refused(run_cli("encode", b, out, "--device", "cpu", "--shard-rows", str(SHARD_ROWS)), "different input", "--append")
    # other settings
    refused(run_cli("encode", b, out, "--append", "--device", "cpu", "--dtype", "float32"), "different dtype", "same settings")
    # an id the output already holds
    clash = tmp_path / "clash.parquet"
    pq.write_table(pa.table({"id": ["new1", "a7"], "text": ["one", "two"]}), clash)
    refused(run_cli("encode", clash, out, "--append", "--device", "cpu"), "id 'a7' is already stored")
    # --append with --overwrite
    refused(run_cli("encode", b, out, "--append", "--overwrite"), "choose one")
    assert sorted(_stored_ids(out)) == sorted(f"a{i}" for i in range(ROWS))  # nothing written by the refusals


def test_an_append_by_two_workers_stores_what_one_process_does(tmp_path, sample):
    """`--append --gpus 2`: the shard tasks find their input among the output's by its content,
    and continue its row numbers (no id column)."""
    a, b = (_input(tmp_path, n, sample, i * ROWS, ids=False) for i, n in enumerate("ab"))
    options = {"device": "cpu", "shard_rows": SHARD_ROWS, "progress": False}
    for name, workers in (("one", 1), ("two", 2)):
        embedkit.encode(a, tmp_path / name, **options)
        summary = embedkit.encode(b, tmp_path / name, append=True, gpus=workers, **options)
        assert summary.docs == ROWS
    one, two = (lance.dataset(str(tmp_path / n / "vectors.lance")).to_table(columns=["id", "vector"]).sort_by("id") for n in ("one", "two"))
    assert one.column("id").to_pylist() == two.column("id").to_pylist() == list(range(2 * ROWS))
    x, y = (t.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(2 * ROWS, -1) for t in (one, two))
    assert abs(x.astype("float32") - y.astype("float32")).max() < 2e-3
