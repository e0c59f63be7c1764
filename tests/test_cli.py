"""The `embedkit` command: refusals (exit 2, one `error:` line), --json summaries, `status`, LanceDB.

Every run is a real subprocess of the real CLI; resume and rerun refusals live in test_resume.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE

import embedkit


def _write_parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def _missing(tmp: Path) -> list:
    return [tmp / "no-such.parquet"]


def _unknown_text_column(tmp: Path) -> list:
    return [_write_parquet(tmp / "docs.parquet", {"id": ["a"], "text": ["x"]}), "--text-column", "body"]


def _unknown_id_column(tmp: Path) -> list:
    return [_write_parquet(tmp / "docs.parquet", {"id": ["a"], "text": ["x"]}), "--id-column", "doc"]


def _int_text_column(tmp: Path) -> list:
    return [_write_parquet(tmp / "docs.parquet", {"id": ["a", "b"], "text": [1, 2]})]


def _corrupt_parquet(tmp: Path) -> list:
    path = tmp / "x.parquet"
    path.write_bytes(b"this is not parquet at all\x00\x01\x02" * 50)
    return [path]


def _empty_jsonl(tmp: Path) -> list:
    path = tmp / "empty.jsonl"
    path.write_bytes(b"")
    return [path]


def _bad_jsonl(tmp: Path) -> list:
    path = tmp / "bad.jsonl"
    path.write_text('{"id": 1, "text": "fine"}\n{"id": 2, "text": \n')
    return [path]


def _duplicate_ids(tmp: Path) -> list:
    return [_write_parquet(tmp / "docs.parquet", {"id": ["a", "dup-7", "b", "dup-7"], "text": ["w", "x", "y", "z"]})]


def _zero_shard_rows(tmp: Path) -> list:
    return [_write_parquet(tmp / "docs.parquet", {"id": ["a"], "text": ["x"]}), "--shard-rows", "0"]


REFUSALS = [
    pytest.param(_missing, ["input not found", "no-such.parquet"], id="missing-input"),
    pytest.param(_unknown_text_column, ["no text column 'body'", "--text-column"], id="unknown-text-column"),
    pytest.param(_unknown_id_column, ["no id column 'doc'"], id="unknown-id-column"),
    pytest.param(_int_text_column, ["column 'text' holds int64, not text"], id="int-text-column"),
    pytest.param(_corrupt_parquet, ["cannot read parquet file", "x.parquet"], id="corrupt-parquet"),
    pytest.param(_empty_jsonl, ["empty.jsonl is empty"], id="empty-jsonl"),
    pytest.param(_bad_jsonl, ["cannot parse", "as JSON lines"], id="bad-jsonl"),
    pytest.param(_duplicate_ids, ["duplicate id 'dup-7'", "rows 1, 3", "--allow-duplicate-ids"], id="duplicate-ids"),
    pytest.param(_zero_shard_rows, ["--shard-rows must be a positive number, not 0"], id="zero-shard-rows"),
]


@pytest.mark.parametrize("make, needles", REFUSALS)
def test_encode_refusals(tmp_path, run_cli, refused, make, needles):
    args = make(tmp_path)
    out = tmp_path / "out"
    refused(run_cli("encode", *args, out), *needles)
    assert not out.exists()  # a refused run leaves nothing behind, not even an empty OUT


def test_out_must_be_a_new_folder_or_an_output(tmp_path, run_cli, refused):
    src = _write_parquet(tmp_path / "docs.parquet", {"id": ["a"], "text": ["x"]})
    refused(run_cli("encode", src, src), "docs.parquet is a file", "OUT must be a folder")
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"\xff\xd8")
    refused(run_cli("encode", src, mine), "non-empty folder that is not an embedkit output", "cat.jpg")
    refused(run_cli("generate", src, mine, "--task", "score"), "non-empty folder that is not an embedkit output")
    assert sorted(p.name for p in mine.iterdir()) == ["cat.jpg"]
    refused(run_cli("search", tmp_path / "nowhere", "query"), "output not found", "nowhere")


def test_device_cuda_without_a_gpu_is_refused(tmp_path, run_cli, refused):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    src = _write_parquet(tmp_path / "docs.parquet", {"id": ["a"], "text": ["x"]})
    refused(run_cli("encode", src, tmp_path / "out", "--device", "cuda"), "no CUDA GPU is visible", "--device cpu")


def test_status_of_a_folder_that_is_not_an_output(tmp_path, run_cli, refused):
    refused(run_cli("status", tmp_path), "not an embedkit output")


def test_allow_duplicate_ids_keeps_every_row(tmp_path, run_cli, read_output):
    src = _duplicate_ids(tmp_path)[0]
    result = run_cli("encode", src, tmp_path / "out", "--allow-duplicate-ids", "-q")
    assert result.returncode == 0, result.stderr
    assert sorted(read_output(tmp_path / "out").column("id").to_pylist()) == ["a", "b", "dup-7", "dup-7"]


@pytest.fixture(scope="module")
def renamed_input(tmp_path_factory, small_table) -> Path:
    """Integer ids in `doc_id`, the text in `body`, a decoy `text` column."""
    n = small_table.num_rows
    return _write_parquet(
        tmp_path_factory.mktemp("cli") / "renamed.parquet",
        {
            "doc_id": list(range(500, 500 + n)),
            "body": small_table.column("text"),
            "text": [f"decoy {i}" for i in range(n)],
        },
    )


def test_console_script_json_summary_and_columns(
    tmp_path, renamed_input, small_table, small_reference, read_output, vectors_of, cosine
):
    """The installed `embedkit` script: --text-column/--id-column pick the columns; --json parses."""
    script = shutil.which("embedkit", path=str(Path(sys.executable).parent))
    assert script is not None, "the embedkit console script is not installed next to this python"
    out = tmp_path / "out"
    args = [script, "encode", renamed_input, out, "--text-column", "body", "--id-column", "doc_id", "--json", "-q"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run(list(map(str, args)), capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    assert summary["docs"] == small_table.num_rows
    assert summary["tokens"] > 0 and summary["tokens_per_second"] > 0
    assert summary["tokens"] <= summary["padded_tokens"]
    assert {"skipped_empty", "truncated", "shards_done", "shards_total", "padding_overhead", "device"} <= set(summary)
    table = read_output(out)
    assert table.schema.field("id").type == pa.int64()
    want = {500 + k: v for k, v in enumerate(small_reference.values())}
    assert min(cosine(vectors_of(table), want).values()) >= 0.999


def test_encode_prints_a_summary_line(tmp_path, corpora, small_table, run_cli):
    result = run_cli("encode", corpora["jsonl"], tmp_path / "out", "-q")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"{small_table.num_rows} docs, ")
    assert "0 empty skipped" in line and "shards 1 new + 0 already done of 1" in line
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def output(tmp_path_factory, corpora) -> Path:
    """A complete output over the parquet corpus (3 shards), with the texts stored."""
    out = tmp_path_factory.mktemp("status") / "out"
    embedkit.encode(corpora["parquet"], out, shard_rows=8, device="cpu", store_text=True, progress=False)
    return out


def test_status_text(output, small_table, run_cli, full_token_count):
    result = run_cli("status", output)
    assert result.returncode == 0, result.stderr
    tokens = sum(full_token_count(t) for t in small_table.column("text").to_pylist())
    n = small_table.num_rows
    assert result.stdout.splitlines() == [
        f"{output}: embeddings, shards 3/3 (complete)",
        f"rows {n:,}, input tokens {tokens:,}",
        "model sentence-transformers/all-MiniLM-L6-v2 (dim 384, max 256 tokens, mean pooling)",
        "vectors float16, normalize True",
        f"input parquet, {n:,} rows in 3 shards of 8",
        f"index: none (run `embedkit build-index {output}` to build one)",
        f"embedkit {embedkit.__version__}",
    ]


def test_status_json(output, small_table, run_cli):
    result = run_cli("status", output, "--json")
    assert result.returncode == 0, result.stderr
    st = json.loads(result.stdout)
    assert st["complete"] is True and st["kind"] == "embeddings" and st["new_tokens"] is None
    assert st["index"]["state"] == "none"
    assert (st["shards_done"], st["shards_total"], st["rows"]) == (3, 3, small_table.num_rows)
    assert st["tokens"] == embedkit.status(output).tokens > 0
    assert st["manifest"]["model"]["dim"] == 384
    assert st["manifest"]["output"] == {"dtype": "float16", "normalize": True, "keep_empty": False, "store_text": True, "keep_columns": [],
                                          "dim": 0, "chunk_tokens": 0, "chunk_overlap": 0}
    assert st["manifest"]["plan"] == {"rows": small_table.num_rows, "shard_rows": 8, "shards": 3}


def test_output_opens_as_a_lancedb_table(output, small_table, small_reference):
    import lancedb

    table = lancedb.connect(str(output)).open_table("vectors")
    assert table.count_rows() == small_table.num_rows
    assert sorted(table.to_arrow().column("id").to_pylist()) == sorted(small_table.column("id").to_pylist())
    assert table.schema.field("text").type == pa.string()  # --store-text: the content beside the vector
    # nearest neighbour of a document's reference vector is that document, with its text
    doc_id, vec = next(iter(small_reference.items()))
    hits = table.search(np.asarray(vec, dtype=np.float32)).limit(1).to_list()
    assert hits[0]["id"] == doc_id
    assert hits[0]["text"] == dict(zip(small_table.column("id").to_pylist(), small_table.column("text").to_pylist()))[doc_id]


def _python(code: str) -> str:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_import_and_help_load_no_heavy_library():
    """`import embedkit` and `embedkit --help` stay instant: no torch, lance, numpy or pyarrow."""
    code = (
        "import sys, embedkit, embedkit.cli\n"
        "from click.testing import CliRunner\n"
        "assert CliRunner().invoke(embedkit.cli.main, ['--help']).exit_code == 0\n"
        "print(sorted(m for m in ('torch', 'lance', 'numpy', 'pyarrow') if m in sys.modules))\n"
    )
    assert _python(code) == "[]"


@pytest.mark.parametrize(
    "first",
    ["import embedkit", "import embedkit.status", "from embedkit.status import OutputStatus", "import embedkit.cli"],
)
def test_status_function_whatever_is_imported_first(first, output):
    """`embedkit.status(out)` is the function even when the `embedkit.status` module was imported first."""
    code = f"{first}\nimport embedkit\nprint(embedkit.status({str(output)!r}).complete, embedkit.OutputStatus.__name__)"
    assert _python(code) == "True OutputStatus"


@pytest.mark.parametrize("first", ["import embedkit", "import embedkit.io.export", "from embedkit.io.export import ExportSummary"])
def test_export_function_whatever_is_imported_first(first, output, tmp_path):
    """`embedkit.export(...)` is the function even when the `embedkit.io.export` module was imported first."""
    path = tmp_path / "rows.jsonl"
    code = f"{first}\nimport embedkit\nprint(embedkit.export({str(output)!r}, {str(path)!r}).rows, embedkit.ExportSummary.__name__)"
    assert _python(code) == "20 ExportSummary"


@pytest.mark.slow
def test_the_readme_python_example_runs_on_a_cpu_as_written(tmp_path):
    """The README's Python block, run as a user would from a clone (data/sample.parquet at hand),
    in a fresh interpreter on this CPU: no device to edit, nothing to add. The sample here is the
    bundled one's 1,100 shortest rows (an IVF-PQ index still: from 1,024 rows on): the block's
    code is what is tested, and the whole sample's encode was most of the suite's longest test."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("Python:\n\n```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "data").mkdir()
    table = pq.read_table(SAMPLE)
    lengths = np.array([len(t) if t else 0 for t in table.column("text").to_pylist()])
    rows = np.flatnonzero(lengths > 0)[np.argsort(lengths[lengths > 0], kind="stable")[:1_100]]
    pq.write_table(table.take(np.sort(rows)), tmp_path / "data" / "sample.parquet")
    p = subprocess.run([sys.executable, "-c", block + "\nprint('hits', len(hits.ids[0]), hits.texts[0][0] is not None)"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "hits 5 True"
    assert (tmp_path / "vectors.parquet").stat().st_size > 0
