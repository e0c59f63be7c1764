"""The merge phase: shard indexes -> one index with on-disk inverted lists, every position once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import EmbedkitError
from ..io.store import injected_kill
from .io import is_ivf, quiet_stdout, read_for_build, write_index
from .state import (
    IVFDATA,
    MERGED,
    SHARDS,
    TRAINED,
)


def merge_shards(folder: Path, n_shards: int, n: int, mark: Callable[[str], None] = lambda step: None, into: Path | None = None) -> None:
    """Merge the shard indexes into `merged.index` with on-disk inverted lists (`merged.ivfdata`),
    or one in-memory index for factories without inverted lists; every position 0..n-1 must be
    there exactly once.

    `into`: a staging folder (a growing index): the kept index's lists in `folder` come first,
    the result is written there, and it names its lists file as it will be once moved to `folder`."""
    shard_files = [str(folder / SHARDS / f"shard-{i:06d}.index") for i in range(n_shards)]
    into = into or folder
    into.mkdir(exist_ok=True)
    (into / MERGED).unlink(missing_ok=True)
    (into / IVFDATA).unlink(missing_ok=True)  # a killed merge's partial file
    trained = read_for_build(folder / TRAINED)
    if is_ivf(trained):
        # the lists file gets its final name, which the index records as given; params.json,
        # written last, is what marks the index complete. An absolute name lets plain
        # `faiss.read_index(".../merged.index")` open it from any working directory (a moved
        # OUT needs faiss.IO_FLAG_ONDISK_SAME_DIR, which load_index always passes).
        kept = None if into == folder else str(folder / MERGED)
        with quiet_stdout():
            merge_ondisk(trained, shard_files, os.path.abspath(into / IVFDATA), os.path.abspath(folder / IVFDATA), kept=kept)
        mark("lists")
        check_ids(trained, n)
        mark("check")
        injected_kill("merge", [0])
    else:  # flat, HNSW and other non-IVF factories: one in-memory index from the shards
        for f in shard_files:
            part = read_for_build(f)
            trained.merge_from(part) if hasattr(trained, "merge_from") and _mergeable(trained) else trained.add(_reconstruct(part))
        if trained.ntotal != n:
            raise EmbedkitError(f"the merged index holds {trained.ntotal:,} vectors, not {n:,}; rerun build-index")
    write_index(trained, into / MERGED)
    mark("write")


def merge_ondisk(trained: Any, shard_files: list[str], ivfdata: str, recorded: str | None = None, kept: str | None = None) -> None:
    """`faiss.contrib.ondisk.merge_ondisk`, with the shards opened for building: memory-mapped,
    without the precomputed search table faiss would otherwise rebuild for each shard (about
    0.5 s each at IVF16384,PQ48; see io.read_for_build).

    `kept`: a merged index with on-disk lists whose lists come first (a growing index), opened
    read-only from its folder. `recorded`: the lists file's name as the index records it, when
    the file moves there after the merge."""
    import faiss

    parts = [read_for_build(name, faiss.IO_FLAG_MMAP) for name in shard_files]
    if kept is not None:  # not IO_FLAG_MMAP: faiss 1.13 then reads on-disk lists it cannot use (a crash)
        parts.insert(0, read_for_build(kept, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY))
    lists = [faiss.extract_index_ivf(part).invlists for part in parts]
    ivf = faiss.extract_index_ivf(trained)
    if trained.ntotal != 0:
        raise EmbedkitError("the trained quantizer holds vectors; rerun build-index with --overwrite")
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, ivfdata)
    vector = faiss.InvertedListsPtrVector()
    for lst in lists:
        vector.push_back(lst)
    total = ondisk.merge_from_multiple(vector.data(), vector.size(), False)
    trained.ntotal = ivf.ntotal = total
    if recorded is not None:
        ondisk.filename = recorded
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()
    del lists, parts  # the shards' mapped lists are freed with their indexes


def _mergeable(index: Any) -> bool:
    import faiss

    return isinstance(faiss.downcast_index(index), (faiss.IndexFlat, faiss.IndexFlatCodes))


def _reconstruct(index: Any) -> np.ndarray:
    return index.reconstruct_n(0, index.ntotal)


def check_ids(index: Any, n: int) -> None:
    """Every faiss id of the inverted lists is a position 0..n-1 and appears exactly once.

    One byte per position (1 GB at a billion rows): n ids in all that cover every position
    can only be each position once."""
    import faiss

    invlists = faiss.extract_index_ivf(index).invlists
    seen = np.zeros(n, np.bool_)
    total = 0
    for lst in range(invlists.nlist):
        size = invlists.list_size(lst)
        if size == 0:
            continue
        ptr = invlists.get_ids(lst)
        ids = faiss.rev_swig_ptr(ptr, size)
        bad = ids.min() < 0 or ids.max() >= n
        if not bad:
            seen[ids] = True
        invlists.release_ids(lst, ptr)
        if bad:
            raise EmbedkitError(f"inverted list {lst} holds an id outside 0..{n - 1}; rerun build-index with --overwrite")
        total += size
    covered = int(seen.sum())
    if total != n or covered != n:
        missing = n - covered
        raise EmbedkitError(f"the merged index has {total - covered} duplicate and {missing} missing ids; rerun build-index with --overwrite")
