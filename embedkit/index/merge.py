"""The merge phase: shard indexes -> one index with on-disk inverted lists, every position once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EmbedkitError
from ..io.store import injected_kill
from .io import is_ivf, quiet_stdout, write_index
from .state import (
    IVFDATA,
    MERGED,
    SHARDS,
    TRAINED,
)


def merge_shards(folder: Path, n_shards: int, n: int) -> None:
    """Merge the shard indexes into `merged.index` with on-disk inverted lists (`merged.ivfdata`),
    or one in-memory index for factories without inverted lists; every position 0..n-1 must be
    there exactly once."""
    import faiss

    shard_files = [str(folder / SHARDS / f"shard-{i:06d}.index") for i in range(n_shards)]
    (folder / MERGED).unlink(missing_ok=True)
    (folder / IVFDATA).unlink(missing_ok=True)  # a killed merge's partial file
    trained = faiss.read_index(str(folder / TRAINED))
    if is_ivf(trained):
        from faiss.contrib.ondisk import merge_ondisk

        # the lists file gets its final name, which the index records as given; params.json,
        # written last, is what marks the index complete. An absolute name lets plain
        # `faiss.read_index(".../merged.index")` open it from any working directory (a moved
        # OUT needs faiss.IO_FLAG_ONDISK_SAME_DIR, which load_index always passes).
        with quiet_stdout():
            merge_ondisk(trained, shard_files, os.path.abspath(folder / IVFDATA))
        check_ids(trained, n)
        injected_kill("merge", [0])
    else:  # flat, HNSW and other non-IVF factories: one in-memory index from the shards
        for f in shard_files:
            part = faiss.read_index(f)
            trained.merge_from(part) if hasattr(trained, "merge_from") and _mergeable(trained) else trained.add(_reconstruct(part))
        if trained.ntotal != n:
            raise EmbedkitError(f"the merged index holds {trained.ntotal:,} vectors, not {n:,}; rerun build-index")
    write_index(trained, folder / MERGED)


def _mergeable(index: Any) -> bool:
    import faiss

    return isinstance(faiss.downcast_index(index), (faiss.IndexFlat, faiss.IndexFlatCodes))


def _reconstruct(index: Any) -> np.ndarray:
    return index.reconstruct_n(0, index.ntotal)


def check_ids(index: Any, n: int) -> None:
    """Every faiss id of the inverted lists is a position 0..n-1 and appears exactly once."""
    import faiss

    invlists = faiss.extract_index_ivf(index).invlists
    seen = np.zeros(n, np.uint8)
    total = 0
    for lst in range(invlists.nlist):
        size = invlists.list_size(lst)
        if size == 0:
            continue
        ids = faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy()
        invlists.release_ids(lst, invlists.get_ids(lst))
        if ids.min() < 0 or ids.max() >= n:
            raise EmbedkitError(f"inverted list {lst} holds an id outside 0..{n - 1}; rerun build-index with --overwrite")
        np.add.at(seen, ids, 1)
        total += size
    if total != n or not (seen == 1).all():
        dup, missing = int((seen > 1).sum()), int((seen == 0).sum())
        raise EmbedkitError(f"the merged index has {dup} duplicate and {missing} missing ids; rerun build-index with --overwrite")
