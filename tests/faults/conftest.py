"""Fixtures of the fault suite: one small corpus and one uninterrupted output of it, shared.

The corpus is 60 rows of the bundled sample, cut to 64 tokens and planned as six shards of 10,
so a run has several commits to be killed between and still takes seconds on a small CPU. The
uninterrupted output is written once, in-process, and only read by tests (a test that changes
an output works on a copy).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embedkit

from .faultkit import MAX_SEQ, ROWS, SHARD_ROWS


@pytest.fixture(scope="session")
def corpus_table(sample) -> pa.Table:
    return sample.slice(0, ROWS)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, corpus_table) -> Path:
    path = tmp_path_factory.mktemp("faults-input") / "docs.parquet"
    pq.write_table(corpus_table, path)
    return path


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, corpus_file) -> Path:
    """The corpus encoded in one uninterrupted run with ENCODE_OPTIONS (never changed by tests)."""
    out = tmp_path_factory.mktemp("faults-uninterrupted") / "out"
    embedkit.encode(corpus_file, out, device="cpu", shard_rows=SHARD_ROWS, max_seq_length=MAX_SEQ, progress=False)
    return out


@pytest.fixture
def uninterrupted_copy(tmp_path, uninterrupted) -> Path:
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    return out


def pytest_collection_modifyitems(config, items) -> None:
    """The fault suite is end to end: real kills, real runs in subprocesses. It is marked slow, so
    `-m "not slow"` is a quick check and the full suite still runs every fault."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)
