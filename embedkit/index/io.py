"""What the index build and search both read: vectors by row position, and the merged index.

A module of its own so that search (which build uses to tune) needs nothing from build.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..engine.quantize import Quantization
from ..fsutil import atomic_file
from .state import MERGED


def vectors_of(table: Any) -> np.ndarray:
    """The `vector` column of an Arrow table as a (rows, dim) numpy array (float16 or float32);
    int8 and binary codes (`encode --dtype int8|binary`) decoded to float32 as their field says."""
    col = table.column("vector")
    if hasattr(col, "combine_chunks"):  # a Table's column is chunked, a RecordBatch's is not
        col = col.combine_chunks()
    codes = col.values.to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)
    quantization = Quantization.of_field(table.schema.field("vector"))
    return codes if quantization is None else quantization.decode(codes)


def vector_dim(schema: Any) -> int:
    """The dimension of the vectors a Lance/Arrow schema stores (of the floats its codes stand for)."""
    field = schema.field("vector")
    quantization = Quantization.of_field(field)
    return quantization.dim if quantization is not None else field.type.list_size


def read_rows(ds: Any, positions: np.ndarray) -> np.ndarray:
    """float32 vectors of the given row positions, in the order given."""
    if len(positions) == 0:
        return np.zeros((0, 0), np.float32)
    order = np.argsort(positions, kind="stable")
    got = vectors_of(ds.take(np.asarray(positions)[order], columns=["vector"])).astype(np.float32)
    result = np.empty_like(got)
    result[order] = got
    return result


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence what faiss's C++ code prints on file descriptor 1 (it ignores sys.stdout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def load_index(folder: Path) -> Any:
    """Open merged.index; its on-disk inverted lists are memory-mapped from the same folder."""
    import faiss

    with quiet_stdout():  # faiss announces the lists file's folder on stdout
        # read-only: searching must work on storage it may not write to (faiss opens the lists r+ otherwise)
        return faiss.read_index(str(folder / MERGED), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)


def read_for_build(path: Path | str, flags: int = 0) -> Any:
    """An index file opened for building (train, add, merge), not for searching.

    Without IO_FLAG_SKIP_PRECOMPUTE_TABLE faiss recomputes an IVF-PQ's precomputed search table
    on every read, and `clone_index` copies it: nlist x M x 256 floats, 805 MB at IVF16384,PQ48,
    about 0.5 s per read or clone. Only searching uses it; a 10-shard build read or cloned it 23
    times. `load_index` (search) still builds it once."""
    import faiss

    return faiss.read_index(str(path), flags | faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)


def write_index(index: Any, path: Path) -> None:
    import faiss

    # serialized here and written by us: faiss would open the path itself, following a link
    with atomic_file(path) as f:
        f.write(faiss.serialize_index(index).tobytes())


def is_ivf(index: Any) -> bool:
    import faiss

    try:
        faiss.extract_index_ivf(index)
        return True
    except (RuntimeError, AttributeError):
        return False
