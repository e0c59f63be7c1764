"""`--ray [ADDRESS]`: the shards of one plan as Ray tasks, on a cluster or a local Ray.

`embedkit generate --ray` does the same with the generative pass, and `embedkit build-index --ray`
with the index's add phase (training and the merge stay on the driver). The driver validates the input, writes the manifest and cleans the store under the output
lock (so a second driver on the same OUT is refused), then submits one task per pending shard:
`num_gpus=1` when encoding on CUDA, `num_gpus=0` on CPU clusters. A task runs the ordinary
single-device pipeline on its shard and commits it. Ray retries a task whose worker died or was
preempted; a retried task first checks whether its shard is already committed, so a shard is
never written twice. A killed driver is resumed by rerunning the same command. Ray is imported
only here (`pip install embedkit[ray]`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import EncodeConfig
from .errors import EmbedkitError

TASK_RETRIES = 3
_JOB_CACHE: dict = {}  # per Ray worker process: the loaded model, reused by its later tasks


def run_ray(input: str | Path, out: Path, cfg: EncodeConfig, job: Any, pending: list, skipped: int, address: str | None) -> Any:
    """Encode `pending` shards as Ray tasks; returns the merged EncodeSummary."""
    from .pipeline import EncodeSummary

    ray = _ray(address)
    gpu = job.choice.type == "cuda"
    task = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1, max_retries=TASK_RETRIES)(encode_shard)
    task_cfg = replace(cfg, workers=1, progress=False, overwrite=False, ray=None, device="cuda" if gpu else "cpu",
                       tokenize_workers=cfg.tokenize_workers if cfg.tokenize_workers is not None else (None if gpu else 0))  # fmt: skip
    start = time.perf_counter()
    refs = [task.remote(str(input), str(out), task_cfg, s.index) for s in sorted(pending, key=lambda s: -s.rows)]
    return EncodeSummary.merged(
        _get(ray, refs), out=str(out), device=f"ray ({'GPU' if gpu else 'CPU'} tasks)",
        seconds=time.perf_counter() - start, skipped=skipped, total=len(job.shards),
    )  # fmt: skip


def encode_shard(input: str, out: str, cfg: EncodeConfig, index: int) -> dict:
    """One shard, in a Ray worker: skipped if a previous attempt already committed it."""
    from .corpus import Columns, open_corpus
    from .encoder import choose_device
    from .pipeline import _run_shards, attach_job
    from .runtime import retain_freed_memory
    from .store import VectorStore

    retain_freed_memory()
    from .pipeline import SUMMED_FIELDS

    if index in VectorStore(Path(out)).committed_shards():
        # a retry of a task whose commit landed before its worker died: it adds nothing
        return {**dict.fromkeys(SUMMED_FIELDS, 0), "seconds": 0.0}
    key = (input, out, cfg.model, cfg.device, cfg.precision, cfg.max_seq_length)
    if key not in _JOB_CACHE:
        corpus = open_corpus(input, Columns(cfg.text_column, cfg.id_column))
        _JOB_CACHE[key] = (corpus, attach_job(corpus, Path(out), cfg, choose_device(cfg.device, cfg.precision)))
    corpus, job = _JOB_CACHE[key]
    shard = next(s for s in job.shards if s.index == index)
    return _run_shards(corpus, job, [shard], cfg, skipped=0).to_dict()


def run_generate_ray(input: str | Path, out: Path, cfg: Any, template: str, choice: Any, pending: list, skipped: int, total: int) -> Any:
    """`embedkit generate --ray`: one Ray task per pending shard; the merged GenerateSummary."""
    from .generation import summarize_parts

    ray = _ray(cfg.ray)
    gpu = choice.type == "cuda"
    task = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1, max_retries=TASK_RETRIES)(generate_shard_task)
    task_cfg = replace(cfg, ray=None, progress=False, overwrite=False, device="cuda" if gpu else "cpu")
    start = time.perf_counter()
    refs = [task.remote(str(input), str(out), task_cfg, template, choice.precision, s.index) for s in pending]
    parts = _get(ray, refs)
    return summarize_parts(out, cfg, f"ray ({'GPU' if gpu else 'CPU'} tasks)", parts, time.perf_counter() - start, skipped, total)


def generate_shard_task(input: str, out: str, cfg: Any, template: str, precision: str, index: int) -> dict:
    """One generate shard, in a Ray worker; skipped if a previous attempt committed it."""
    from .corpus import Columns, open_corpus
    from .encoder import DeviceChoice, choose_device
    from .generation import GENERATIONS_DIR, _schema, generate_shard, load_generator
    from .shards import plan_shards, read_manifest
    from .store import VectorStore

    store = VectorStore(Path(out), GENERATIONS_DIR)
    if index in store.committed_shards():
        return {"docs": 0, "prompt": 0, "new": 0, "truncated": 0, "empty": 0, "shards": 0}
    choice = DeviceChoice(choose_device(cfg.device, "fp32").device, precision)
    key = ("generate", input, cfg.model, choice.device, precision)
    if key not in _JOB_CACHE:
        lm, tok, _ = load_generator(cfg.model, choice)
        _JOB_CACHE[key] = (open_corpus(input, Columns(cfg.text_column, cfg.id_column)), lm, tok)
    corpus, lm, tok = _JOB_CACHE[key]
    plan = read_manifest(Path(out))["plan"]
    shard = plan_shards(plan["rows"], plan["shard_rows"])[index]
    return generate_shard(corpus, cfg, template, lm, tok, choice, store, _schema(cfg.task, corpus.id_type), shard)


def add_index_shards_ray(out: str, version: int, todo: list, spec: Any, queries: Any, qvec: Any, address: str, on_done: Any = None) -> None:
    """`embedkit build-index --ray`: the add phase's shards as Ray tasks (`num_gpus=1` when the
    build runs on CUDA). Each task reads its Lance fragments at the pinned version, encodes them
    with the trained quantizer that the driver wrote, and writes its shard file; a retried task
    whose file already landed does nothing. The driver merges afterwards, as without Ray."""
    from dataclasses import replace as dc_replace

    ray = _ray(address)
    gpu = spec.device.startswith("cuda")
    task = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1, max_retries=TASK_RETRIES)(index_shard_task)
    task_spec = dc_replace(spec, device="cuda:0" if gpu else "cpu")  # a GPU task sees its one GPU as cuda:0
    q_ref, v_ref = ray.put(queries), ray.put(qvec)
    refs = [task.remote(out, version, [f.fragment_id for f in frags], i, start, task_spec, q_ref, v_ref) for i, start, frags in todo]
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
            if on_done is not None:
                on_done()
    except Exception as e:  # a task that failed after its retries
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise EmbedkitError(f"a Ray task failed ({first}); finished shards are kept: rerun the same command to resume") from None


def index_shard_task(out: str, version: int, fragment_ids: list[int], i: int, start: int, spec: Any, queries: Any, qvec: Any) -> int:
    """One add shard, in a Ray worker; returns its rows (0 when a previous attempt wrote it)."""
    import faiss
    import lance

    from .index.build import TRAINED, _read_shard, device_codec, write_shard
    from .store import VECTORS_DIR

    if spec.index_path(i).exists():
        return 0
    key = ("index", spec.folder, version)
    if key not in _JOB_CACHE:  # the trained quantizer and its device codec, once per worker
        trained = faiss.read_index(str(Path(spec.folder).parent / TRAINED))
        _JOB_CACHE[key] = (trained, device_codec(trained, spec, qvec, lambda msg: None))
    trained, codec = _JOB_CACHE[key]
    ds = lance.dataset(str(Path(out) / VECTORS_DIR), version=version)
    x = _read_shard([ds.get_fragment(f) for f in fragment_ids])
    write_shard(spec, trained, codec, i, start, x, queries, qvec)
    return len(x)


def _ray(address: str | None) -> Any:
    try:
        import ray
    except ImportError:
        raise EmbedkitError("--ray needs Ray: pip install 'embedkit[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
    return ray


def _get(ray: Any, refs: list) -> list:
    try:
        return ray.get(refs)
    except Exception as e:  # a task that failed after its retries
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise EmbedkitError(f"a Ray task failed ({first}); committed shards are kept: rerun the same command to resume") from None
