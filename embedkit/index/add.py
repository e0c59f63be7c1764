"""The add phase: the vectors, a shard of whole Lance fragments at a time, into shard indexes.

On CUDA, coarse assignment and PQ encoding run as torch matrix products (`TorchCodec`) and the
codes go into the index with `add_sa_codes`; on CPU faiss adds them itself. Each shard also keeps
the exact top-k of the held-out queries among its vectors (its block of the ground truth). A
shard is done when its file has the size recorded beside it; `index_shard_task` runs one as a
Ray task.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..fsutil import atomic_file
from ..io.objstore import out_path
from ..io.store import VECTORS_DIR
from .io import is_ivf, read_for_build, vectors_of, write_index
from .state import (
    SHARDS,
    TRAINED,
    read_json,
    write_json,
)
from .train import nearest

ENCODE_BLOCK = 1 << 16  # vectors encoded on the device at a time (PQ distances: M x block x 256 floats)


def fragment_shards(ds: Any, shard_rows: int, skip: int = 0, start: int = 0) -> list[tuple[int, list[Any]]]:
    """Consecutive whole fragments grouped to about shard_rows rows: [(first position, fragments)];
    from fragment `skip` on, whose first row is at position `start` (a growing index's new rows)."""
    shards: list[tuple[int, list[Any]]] = []
    rows, group = 0, []
    for frag in ds.get_fragments()[skip:]:
        count = frag.count_rows()
        if count == 0:
            continue
        group.append(frag)
        rows += count
        if rows >= shard_rows:
            shards.append((start, group))
            start, rows, group = start + rows, 0, []
    if group:
        shards.append((start, group))
    return shards


def read_shard(fragments: list[Any]) -> np.ndarray:
    import pyarrow as pa

    return vectors_of(pa.concat_tables([f.to_table(columns=["vector"]) for f in fragments]))


@dataclass(frozen=True)
class ShardSpec:
    """What writing one add shard needs, picklable for a Ray task."""

    folder: str  # OUT/index/shards (its local stand-in for an output on object storage)
    device: str
    metric: str
    ivfpq: bool
    k: int
    remote: str | None = None  # s3://.../index/shards of an output on object storage: shard tasks on other hosts put their files there

    def index_path(self, i: int) -> Path:
        return Path(self.folder) / f"shard-{i:06d}.index"

    def files(self, i: int) -> tuple[str, ...]:
        """Shard i's file names, the record (which marks it done) last."""
        return (f"shard-{i:06d}.index", f"shard-{i:06d}.truth.npz", f"shard-{i:06d}.json")

    def upload(self, i: int) -> None:
        """Put shard i's files on object storage, the record last (see `remote`)."""
        from ..io.objstore import out_path

        for name in self.files(i):
            (out_path(self.remote) / name).upload(Path(self.folder) / name)

    def fetch(self, i: int) -> bool:
        """Bring shard i's files from object storage when a task on another host put them there."""
        from ..io.objstore import out_path

        if self.remote is None:
            return False
        remote = out_path(self.remote)
        if not (remote / self.files(i)[-1]).is_file():
            return False
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        for name in self.files(i):
            (remote / name).download(Path(self.folder) / name)
        return self.done(i)

    def done(self, i: int) -> bool:
        """Shard i's index file is whole: its size is the one recorded when it was written
        (a file damaged since, or left by an older build without the record, is redone)."""
        path, record = self.index_path(i), self.index_path(i).with_suffix(".json")
        doc = read_json(record) if record.exists() else None
        return path.exists() and doc is not None and doc.get("bytes") == path.stat().st_size


def device_codec(trained: Any, spec: ShardSpec, qvec: np.ndarray, log: Callable[[str], None]) -> Any:
    """A TorchCodec on CUDA for IVF-PQ (checked against faiss on a sample), else None (faiss adds)."""
    if not (spec.ivfpq and spec.device.startswith("cuda")):
        return None
    codec = TorchCodec(trained, spec.device, spec.metric)
    if not codec.agrees_with_faiss(qvec[:1024]):
        log("the device encoder disagrees with faiss on a sample; encoding with faiss-cpu instead")
        return None
    return codec


def write_shard(spec: ShardSpec, trained: Any, codec: Any, i: int, start: int, x: np.ndarray, queries: np.ndarray, qvec: np.ndarray,
                mark: Callable[[str], None] = lambda step: None) -> None:  # fmt: skip
    """One shard: its ground-truth block, then its index file (written last: its presence marks
    the shard done). `mark(step)` is called as each step ends (the build's own timings)."""
    import faiss

    positions = np.arange(start, start + len(x), dtype=np.int64)
    _shard_truth(spec, x, start, queries, qvec, Path(spec.folder) / f"shard-{i:06d}.truth.npz")
    mark("truth")
    index = faiss.clone_index(trained)
    if codec is not None:
        codes = codec.encode(x)
        mark("encode")
        faiss.extract_index_ivf(index).add_sa_codes(codes, positions)
    elif is_ivf(index):
        index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), positions)
    else:  # flat, HNSW: no add_with_ids; shards merge in order, so a vector's number is its position
        index.add(np.ascontiguousarray(x, dtype=np.float32))
    mark("codes")
    write_index(index, spec.index_path(i))
    # the record, written last, is what marks the shard done (see ShardSpec.done)
    write_json(spec.index_path(i).with_suffix(".json"), {"bytes": spec.index_path(i).stat().st_size, "rows": len(x)})
    mark("write")


def _shard_truth(spec: ShardSpec, x: np.ndarray, start: int, queries: np.ndarray, qvec: np.ndarray, path: Path) -> None:
    """Exact top-k (inner product) of every query among this shard's rows, the query itself excluded."""
    import torch

    dev = spec.device if spec.device.startswith("cuda") else "cpu"
    xs = torch.from_numpy(np.require(x, requirements=["C", "W"])).to(dev).float()
    scores = torch.from_numpy(qvec).to(dev) @ xs.T
    inside = (queries >= start) & (queries < start + len(x))
    rows = np.flatnonzero(inside)
    scores[torch.as_tensor(rows, device=dev), torch.as_tensor(queries[inside] - start, device=dev)] = -float("inf")
    k = min(spec.k, len(x))
    top, idx = scores.topk(k, dim=1)
    with atomic_file(path) as f:
        np.savez(f, scores=top.cpu().numpy(), positions=idx.cpu().numpy().astype(np.int64) + start)


class TorchCodec:
    """IVF-PQ standalone codes (coarse list id, then PQ code of the residual) computed with torch.

    The same codes faiss's `sa_encode` produces, so `add_sa_codes` stores them as faiss would.
    """

    def __init__(self, index: Any, device: str, metric: str):
        import faiss
        import torch

        self.index = index
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        self.device, self.metric = device, metric
        self.rotation = None
        if isinstance(index, faiss.IndexPreTransform):
            vt = faiss.downcast_VectorTransform(index.chain.at(0))
            a = faiss.vector_to_array(vt.A).reshape(vt.d_out, vt.d_in)
            self.rotation = torch.from_numpy(a).to(device)
        centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
        self.centroids = torch.from_numpy(centroids).to(device)
        pq = ivf.pq
        self.m, self.ksub, self.dsub = pq.M, pq.ksub, pq.dsub
        book = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
        self.book = torch.from_numpy(book).to(device)
        self.book_norm = (self.book**2).sum(-1)  # (M, ksub)
        self.coarse_bytes = ivf.coarse_code_size()

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(n, coarse_bytes + M) uint8 codes."""
        out = np.empty((len(x), self.coarse_bytes + self.m), np.uint8)
        for s in range(0, len(x), ENCODE_BLOCK):
            out[s : s + ENCODE_BLOCK] = self._encode_block(x[s : s + ENCODE_BLOCK])
        return out

    def _encode_block(self, x: np.ndarray) -> np.ndarray:
        import torch

        xs = torch.from_numpy(np.require(x, requirements=["C", "W"])).to(self.device).float()
        if self.rotation is not None:
            xs = xs @ self.rotation.T
        _, lists = nearest(xs, self.centroids, self.metric)
        residual = (xs - self.centroids[lists]).view(len(xs), self.m, self.dsub).transpose(0, 1)  # (M, n, dsub)
        dist = self.book_norm[:, None, :] - 2 * torch.bmm(residual, self.book.transpose(1, 2))  # (M, n, ksub)
        codes = dist.argmin(-1).T.to(torch.uint8)  # (n, M)
        coarse = torch.stack([(lists >> (8 * i)) & 0xFF for i in range(self.coarse_bytes)], 1).to(torch.uint8)
        return torch.cat([coarse, codes], 1).cpu().numpy()

    def agrees_with_faiss(self, x: np.ndarray, threshold: float = 0.99) -> bool:
        """Compare with faiss's own sa_encode on a sample (fp16 products may break near-ties)."""
        if len(x) == 0:
            return True
        ours = self.encode(x)
        theirs = self.index.sa_encode(np.ascontiguousarray(x, dtype=np.float32))
        return bool((ours == theirs).mean() >= threshold)


def index_shard_task(out: str, version: int, shards: dict[int, tuple[int, list[int]]], spec: Any, queries: Any, qvec: Any, i: int,
                     copy: int = 0, arbiter: Any = None, driver: str | None = None) -> dict:  # fmt: skip
    """One add shard as a shard task of the executors (`run_shard_tasks`): shard `i` is the
    vectors at positions from `shards[i][0]`, in the Lance fragments `shards[i][1]` of the pinned
    version. A shard whose file a previous attempt wrote is reported done with no rows; with an
    `arbiter`, only the copy that gets the right writes the file. Returns the task's part: the
    shard done, its rows (`docs`), and the worker."""
    import lance

    from ..run.distributed import TASK_CACHE, commit_allowed, worker_name

    if spec.done(i) or (spec.remote is not None and (out_path(spec.remote) / spec.files(i)[-1]).is_file()):
        return {"shards_done": 1, "docs": 0, "committed_before": True, "worker": worker_name()}
    trained_path = Path(spec.folder).parent / TRAINED
    if spec.remote is not None:  # this host's stand-in of the folder; the quantizer from OUT
        from .remote import index_folder

        here = index_folder(out_path(out))
        spec = replace(spec, folder=str(here / SHARDS))
        Path(spec.folder).mkdir(parents=True, exist_ok=True)
        trained_path = here / f".task-trained-{version}.index"
        if not trained_path.exists():
            (out_path(spec.remote).parent / TRAINED).download(trained_path)
    key = ("index", spec.remote or spec.folder, version)
    if key not in TASK_CACHE:  # the trained quantizer and its device codec, once per worker
        trained = read_for_build(trained_path)
        TASK_CACHE[key] = (trained, device_codec(trained, spec, qvec, lambda msg: None))
    trained, codec = TASK_CACHE[key]
    start, fragment_ids = shards[i]
    ds = lance.dataset(str(out_path(out) / VECTORS_DIR), version=version)
    x = read_shard([ds.get_fragment(f) for f in fragment_ids])
    if arbiter is not None and not commit_allowed(arbiter, i, copy, out_path(out), driver):
        return {"shards_done": 0, "docs": 0, "worker": worker_name()}
    write_shard(spec, trained, codec, i, start, x, queries, qvec)
    if spec.remote is not None:
        spec.upload(i)
    return {"shards_done": 1, "docs": len(x), "worker": worker_name()}
