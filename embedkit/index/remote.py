"""The index of an output on object storage: built and searched from local files, kept in OUT.

faiss reads and writes local files (the merge memory-maps its inverted lists), so for an s3://
OUT the index folder has a local stand-in (`index_folder`: under $EMBEDKIT_CACHE, named after the
URI). Before a build or a search, `fetch` brings OUT/index's finished files into it when the
remote index is not the one the local folder holds (another host built it); after a build,
`publish` uploads the finished files, params.json last, after removing the remote params.json
first: the remote index is complete exactly when its params.json exists, as a local one is.
A killed build resumes from the local folder on the same host; on another host it starts over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io.objstore import ObjectPath, local_cache
from ..io.store import INDEX_DIR
from .state import IVFDATA, MERGED, PARAMS, QUERIES, SHARDS, TRAINED, TRUTH

# what a finished index is made of, params.json apart: enough to search it and to grow it
FILES = (TRAINED, QUERIES, TRUTH, MERGED, IVFDATA)


def index_folder(out: Any) -> Path:
    """OUT/index for a local OUT; its local stand-in for an output on object storage."""
    return local_cache(out / INDEX_DIR, "index") if isinstance(out, ObjectPath) else Path(out) / INDEX_DIR


def _read(path: Any) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def fetch(out: Any, names: tuple[str, ...] = FILES) -> Path:
    """The local folder of OUT's index, holding the remote finished index's files (`names`) when
    OUT is on object storage and its params.json differs from the local one."""
    local = index_folder(out)
    if not isinstance(out, ObjectPath):
        return local
    remote = out / INDEX_DIR
    params = _read(remote / PARAMS)
    if params is None or params == _read(local / PARAMS):
        return local
    local.mkdir(parents=True, exist_ok=True)
    (local / PARAMS).unlink(missing_ok=True)  # the local index is unfinished until the last file is here
    for name in names:
        if (remote / name).is_file():
            (remote / name).download(local / name)
    (local / PARAMS).write_bytes(params)
    return local


def publish(out: Any, local: Path) -> None:
    """Upload a finished local index to OUT/index on object storage (nothing when it is there)."""
    if not isinstance(out, ObjectPath):
        return
    remote = out / INDEX_DIR
    params = (local / PARAMS).read_bytes()
    if _read(remote / PARAMS) == params:
        return
    (remote / PARAMS).unlink(missing_ok=True)
    for name in FILES:
        if (local / name).exists():
            (remote / name).upload(local / name)
    (remote / PARAMS).write_bytes(params)  # last: the remote index is complete from here
    remote_tree = remote / SHARDS
    if remote_tree.is_dir():  # shard files that `build-index --ray` tasks put there
        remote_tree.rmtree()
