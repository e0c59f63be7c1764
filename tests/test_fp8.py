"""`--precision fp8`: refused in one line where it cannot run (before OUT or a model), and the
parts of the fp8 path that do not need a GPU. The fp8 runs themselves (speed, vectors against
fp32, greedy agreement with bf16) are measured on the GPU by benchmarks/bench_fp8.py."""

from __future__ import annotations

import pytest

import embedkit
from embedkit.engine.fp8 import fp8_capable, plain_weight, quantizable
from embedkit.errors import EmbedkitError

CPU_REFUSAL = "--precision fp8 needs an NVIDIA GPU of compute capability 8.9 or newer"


@pytest.mark.parametrize("command", ["encode", "generate"])
def test_fp8_on_the_cpu_is_refused_before_out_is_made(run_cli, tmp_path, command):
    out = tmp_path / "out"
    r = run_cli(command, _input(tmp_path), out, "--precision", "fp8", "--device", "cpu")
    assert r.returncode != 0 and r.stderr.startswith("error: ") and CPU_REFUSAL in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_fp8_is_refused_by_the_api_too():
    with pytest.raises(EmbedkitError, match="compute capability 8.9"):
        embedkit.encode_texts(["a"], device="cpu", precision="fp8")


def test_compute_capabilities():
    assert [fp8_capable(c) for c in [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]] == [False, False, False, True, True, True, True]


def test_which_layers_are_quantized():
    """fp8 matrix products take weights whose dimensions are multiples of 16; other layers stay bf16."""
    import torch

    assert quantizable(torch.nn.Linear(384, 1536)) and not quantizable(torch.nn.Linear(384, 10))
    assert not quantizable(torch.nn.LayerNorm(384)) and not quantizable(torch.nn.Embedding(100, 384))
    w = torch.nn.Linear(32, 16).weight
    assert plain_weight(w) is w  # a plain weight is used as it is (the fused copies of the decoder)


def _input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one text", "another"]}), path)
    return path
