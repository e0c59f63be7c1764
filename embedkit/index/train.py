"""Training: k-means for the coarse quantizer and PQ codebooks, on a sample of the vectors.

On CUDA the k-means assignment step runs as torch matrix products on device tensors, plugged
into faiss's own k-means driver (`faiss.contrib.clustering.kmeans` takes any object with the
`DatasetAssign` interface). faiss-gpu's assignment is used instead when it is importable and
sees a GPU; faiss-cpu's otherwise. The result is a standard faiss index (`faiss.read_index`
opens it), trained and empty.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Callable, Iterator

import numpy as np

from .params import HNSW_M, KMEANS_ITERATIONS, PQ_TRAIN_POINTS, IndexParams

# distance blocks of at most this many elements (float32: 2 GiB)
BLOCK_ELEMENTS = 1 << 29


def faiss_metric(metric: str) -> int:
    import faiss

    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def nearest(x: Any, centroids: Any, metric: str = "l2") -> tuple[Any, Any]:
    """(distance, index) of the nearest centroid for every row of x; torch tensors, any device.

    L2 ranks by ||c||^2 - 2 x.c (||x||^2 is the same for every centroid and is added back for
    the distance); ip by -x.c. In float32, so that assignments (and the codes built on them)
    are those faiss computes: fp16 products would flip near-ties between lists (k-means
    training alone runs its products in TF32, see `tf32_products`).
    """
    import torch

    c = centroids.float()
    c_norm = (c**2).sum(1)
    block = max(1, BLOCK_ELEMENTS // max(1, c.shape[0]))
    dists, ids = [], []
    for start in range(0, x.shape[0], block):
        xb = x[start : start + block].float()
        prod = xb @ c.T
        score = c_norm[None, :] - 2 * prod if metric == "l2" else -prod
        d, i = score.min(1)
        if metric == "l2":
            d = d + (xb**2).sum(1)
        dists.append(d)
        ids.append(i)
    return torch.cat(dists), torch.cat(ids)


@contextlib.contextmanager
def tf32_products(device: str) -> Iterator[None]:
    """float32 matrix products in TF32 on CUDA for the duration (8x the float32 rate on Hopper).

    For k-means training only: an assignment that flips between two near-equidistant
    centroids moves a centroid by a negligible amount, and the tuning measures the recall of
    what was trained. Codes (the add phase) keep exact float32 products."""
    if not device.startswith("cuda"):
        yield
        return
    import torch

    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = saved


class TorchAssign:
    """faiss.contrib.clustering's DatasetAssign interface over a torch tensor (GPU or CPU)."""

    def __init__(self, x: Any):
        self.x = x

    def count(self) -> int:
        return int(self.x.shape[0])

    def dim(self) -> int:
        return int(self.x.shape[1])

    def get_subset(self, indices: np.ndarray) -> Any:
        import torch

        return self.x[torch.as_tensor(indices, device=self.x.device)].float()

    def perform_search(self, centroids: Any) -> tuple[Any, Any]:
        d, i = nearest(self.x, centroids)
        return d[:, None], i[:, None]

    def assign_to(self, centroids: Any, weights: Any = None) -> tuple[np.ndarray, Any, Any]:
        import torch

        d, i = nearest(self.x, centroids)
        sums = torch.zeros(centroids.shape, dtype=torch.float32, device=self.x.device)
        rows = self.x.float() if weights is None else self.x.float() * torch.as_tensor(weights, device=self.x.device)[:, None]
        sums.index_add_(0, i, rows)
        return i.cpu().numpy(), d, sums


def kmeans(k: int, x: np.ndarray, device: str, *, niter: int = KMEANS_ITERATIONS, seed: int = 1234) -> np.ndarray:
    """k centroids of x (float32 rows) with faiss's k-means driver; assignment on `device`."""
    from faiss.contrib import clustering

    data = _dataset(x, device)
    # the driver prints a line even when not verbose
    with contextlib.redirect_stdout(io.StringIO()), tf32_products(device):
        centroids = clustering.kmeans(k, data, niter=niter, seed=seed, verbose=False)
    if not isinstance(centroids, np.ndarray):
        centroids = centroids.float().cpu().numpy()
    return np.ascontiguousarray(centroids, dtype=np.float32)


def _dataset(x: np.ndarray, device: str) -> Any:
    import faiss
    from faiss.contrib import clustering

    if device.startswith("cuda"):
        import torch

        return TorchAssign(torch.from_numpy(x).to(device))
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:  # faiss-gpu without torch CUDA
        return clustering.DatasetAssignGPU(x, 0)
    return clustering.DatasetAssign(x)


def assign(x: np.ndarray, centroids: np.ndarray, device: str, metric: str = "l2") -> np.ndarray:
    """Nearest-centroid index of every row (int64)."""
    import torch

    if device.startswith("cuda"):
        _, i = nearest(torch.from_numpy(x).to(device), torch.from_numpy(centroids).to(device), metric)
        return i.cpu().numpy().astype(np.int64)
    import faiss

    index = faiss.IndexFlatIP(x.shape[1]) if metric == "ip" else faiss.IndexFlatL2(x.shape[1])
    index.add(centroids)
    return index.search(x, 1)[1].ravel().astype(np.int64)


def train_ivfpq(sample: np.ndarray, p: IndexParams, device: str, seed: int = 1234,
                mark: Callable[[str], None] = lambda step: None) -> Any:  # fmt: skip
    """A trained, empty `[OPQ,]IVF[_HNSW],PQ` index from a float32 sample.

    Order as in faiss: the OPQ rotation first (trained on at most PQ_TRAIN_POINTS rows), the
    coarse centroids on the rotated sample, then the PQ codebooks on the residuals of at most
    PQ_TRAIN_POINTS rows to their assigned centroids. `mark(step)` is called as the k-means and
    the PQ training end (the build's own timings).
    """
    import faiss

    x = np.ascontiguousarray(sample, dtype=np.float32)
    rng = np.random.default_rng(seed)
    small = x[rng.choice(len(x), size=min(len(x), PQ_TRAIN_POINTS), replace=False)] if len(x) > PQ_TRAIN_POINTS else x
    opq = None
    if p.opq:
        opq = faiss.OPQMatrix(p.dim, p.pq_m)
        opq.train(small)
        x, small = opq.apply(x), opq.apply(small)
    centroids = kmeans(p.nlist, x, device, seed=seed)
    mark("kmeans")
    metric = faiss_metric(p.metric)
    quantizer = faiss.IndexHNSWFlat(p.dim, HNSW_M, metric) if p.hnsw else faiss.IndexFlat(p.dim, metric)
    quantizer.add(centroids)
    ivf = faiss.IndexIVFPQ(quantizer, p.dim, p.nlist, p.pq_m, 8, metric)
    ivf.own_fields = True
    quantizer.this.disown()  # the IVF index owns and frees its quantizer
    # A small output trains PQ on fewer points than faiss recommends (39 per centroid); faiss
    # would print that once per sub-quantizer. The recall tuning measures the consequence.
    ivf.pq.cp.min_points_per_centroid = 1
    lists = assign(small, centroids, device, p.metric)
    # as IndexIVF::train does: the encoder trains on residuals to the assigned centroids
    residuals = np.ascontiguousarray(small - centroids[lists], dtype=np.float32)
    ivf.train_encoder(len(residuals), faiss.swig_ptr(residuals), faiss.swig_ptr(lists))
    ivf.is_trained = True  # no precompute_table(): only search uses it (see io.read_for_build)
    mark("pq")
    if opq is None:
        return ivf
    index = faiss.IndexPreTransform(opq, ivf)
    index.own_fields = True
    opq.this.disown()
    ivf.this.disown()
    return index


def train_custom(sample: np.ndarray, p: IndexParams) -> Any:
    """Any faiss factory string, trained by faiss itself (CPU)."""
    import faiss

    index = faiss.index_factory(p.dim, p.factory, faiss_metric(p.metric))
    if not index.is_trained:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index
