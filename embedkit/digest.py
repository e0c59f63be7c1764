"""Content identity of input files: what a resume compares to know the input is the same one.

Identity comes from content, not from file times: `touch`, a copy, or an input staged again after
a preemption is the same input, and a file edited in place is not, even with its size and mtime
put back. Hashing every byte costs a read of the input, so each file's hash is kept in a stat
cache beside the output (OUT/.embedkit.input-hashes.json), keyed by size, mtime, ctime and inode:
a file whose stat is unchanged is not read again. ctime cannot be set by users (`touch -d` and
`os.utime` change it to now), so an edit that restores the mtime still misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

INPUT_CACHE = ".embedkit.input-hashes.json"
_BLOCK = 1 << 22


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (hashlib releases the GIL on large blocks: threads hash in parallel)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def content_digest(files: list[Path], root: Path, cache: Path | None = None, threads: int | None = None) -> str:
    """One sha256 over every file's name (relative to `root`), size and content hash, in order.

    `cache`: the stat cache file; hashes of files whose stat is unchanged are taken from it,
    and it is rewritten with this call's hashes (best effort: a read-only OUT only loses the cache).
    """
    known = _load(cache)
    keys = [_stat_key(f) for f in files]
    todo = [i for i, (f, k) in enumerate(zip(files, keys)) if known.get(str(f.resolve()), [None])[:-1] != k]
    hashes = [known.get(str(f.resolve()), [""])[-1] for f in files]
    if todo:
        with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
            for i, h in zip(todo, pool.map(file_sha256, [files[i] for i in todo])):
                hashes[i] = h
        _save(cache, {str(f.resolve()): [*k, h] for f, k, h in zip(files, keys, hashes)})
    digest = hashlib.sha256()
    for f, k, h in zip(files, keys, hashes):
        name = f.name if f == root else f.relative_to(root).as_posix()
        digest.update(f"{name}\0{k[0]}\0{h}\n".encode())
    return digest.hexdigest()


def _load(cache: Path | None) -> dict:
    if cache is None:
        return {}
    try:
        doc = json.loads(cache.read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _save(cache: Path | None, entries: dict) -> None:
    if cache is None:
        return
    from .fsutil import atomic_write

    try:
        atomic_write(cache, json.dumps(entries).encode())
    except OSError:
        pass  # the cache only saves time; the digest itself is already computed


def lance_files_digest(ds: object, fragments: list | None = None) -> str:
    """A digest of the data files a version of a Lance dataset is made of (read from its manifest).

    A version number alone does not name the rows: a dataset deleted and written again counts
    its versions from 1 anew. Data file names are unique (uuids), so this tells them apart.
    `fragments`: the digest of these (leading) fragments of the version only.
    """
    h = hashlib.sha256()
    for frag in ds.get_fragments() if fragments is None else fragments:  # type: ignore[attr-defined]
        for f in frag.data_files():
            h.update(f"{frag.fragment_id}:{f.path}\n".encode())
    return h.hexdigest()
