"""`embedkit status` on every kind of output: embeddings (tests/test_cli.py, tests/test_index.py for
the index), and generations of each task, finished or not, as text and as exact JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import embedkit
from embedkit.io.shards import write_manifest


@pytest.fixture(scope="module")
def docs(tmp_path_factory, small_table) -> Path:
    """Three documents cut to 80 characters: a causal LM's forward on a CPU costs per token."""
    import pyarrow as pa

    path = tmp_path_factory.mktemp("status-docs") / "docs.parquet"
    rows = small_table.slice(0, 3)
    pq.write_table(rows.set_column(1, "text", pa.array([t[:80] for t in rows.column("text").to_pylist()])), path)
    return path


@pytest.fixture(scope="module")
def summarized(tmp_path_factory, docs) -> Path:
    out = tmp_path_factory.mktemp("status") / "summaries"
    embedkit.generate(docs, out, task="summarize", max_new_tokens=3, shard_rows=2, progress=False)
    return out


@pytest.fixture(scope="module")
def classified(tmp_path_factory, docs) -> Path:
    out = tmp_path_factory.mktemp("status") / "labels"
    embedkit.generate(docs, out, task="classify", labels=("code", "prose"), progress=False)
    return out


def _sum(out: Path, column: str) -> int:
    import lance

    return sum(lance.dataset(str(out / "generations.lance")).to_table(columns=[column]).column(column).to_pylist())


def test_status_of_summaries_counts_prompt_and_new_tokens(summarized, run_cli):
    result = run_cli("status", summarized, "--json")
    assert result.returncode == 0, result.stderr
    st = json.loads(result.stdout)
    assert (st["kind"], st["complete"], st["shards_done"], st["shards_total"], st["rows"]) == ("generations", True, 2, 2, 3)
    assert st["tokens"] == _sum(summarized, "prompt_tokens") > 0
    assert st["new_tokens"] == _sum(summarized, "new_tokens") > 0
    assert st["index"] is None and st["manifest"]["task"]["task"] == "summarize"
    text = run_cli("status", summarized)
    assert text.returncode == 0 and "Traceback" not in text.stderr, text.stderr
    assert text.stdout.splitlines()[:2] == [
        f"{summarized}: generations (summarize), shards 2/2 (complete)",
        f"rows 3, prompt tokens {st['tokens']:,}, new tokens {st['new_tokens']:,}",
    ]
    assert "task summarize, up to 3 new tokens, temperature 0.0" in text.stdout


def test_status_of_a_classify_output_names_its_labels(classified, run_cli):
    st = embedkit.status(classified)
    assert (st.kind, st.complete, st.rows, st.tokens, st.new_tokens) == ("generations", True, 3, None, None)
    text = run_cli("status", classified)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[:2] == [f"{classified}: generations (classify), shards 1/1 (complete)", "rows 3"]
    assert any(line.startswith("generator SmolLM2-135M-Instruct") and line.endswith("task classify, labels code, prose") for line in lines)


def test_status_of_an_unfinished_generation_says_to_rerun_generate(summarized, tmp_path, run_cli):
    import shutil

    out = tmp_path / "partial"
    shutil.copytree(summarized, out)
    manifest = json.loads((out / "embedkit.json").read_text())
    manifest["plan"]["shards"] = 3  # a planned shard that no commit holds
    write_manifest(out, manifest)
    text = run_cli("status", out)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0] == f"{out}: generations (summarize), shards 2/3 (incomplete: rerun the generate command to resume)"
    assert json.loads(run_cli("status", out, "--json").stdout)["complete"] is False


def test_status_of_a_missing_output_is_not_found(tmp_path, run_cli, refused):
    refused(run_cli("status", tmp_path / "nope"), "output not found", "nope")
