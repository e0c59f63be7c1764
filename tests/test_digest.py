"""Content identity of input files (embedkit/digest.py): content decides, not file times or place."""

from __future__ import annotations

import json
import os
import shutil

from embedkit.digest import content_digest, file_sha256


def _files(root, names_and_bytes):
    root.mkdir(parents=True, exist_ok=True)
    for name, data in names_and_bytes:
        (root / name).write_bytes(data)
    return [root / name for name, _ in names_and_bytes]


def test_digest_ignores_times_and_place_and_sees_every_byte(tmp_path):
    files = _files(tmp_path / "a", [("x.txt", b"hello"), ("y.txt", b"world")])
    cache = tmp_path / "cache.json"
    first = content_digest(files, tmp_path / "a", cache)
    os.utime(files[0])  # touch
    assert content_digest(files, tmp_path / "a", cache) == first
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # staged again elsewhere
    assert content_digest([tmp_path / "b" / "x.txt", tmp_path / "b" / "y.txt"], tmp_path / "b", cache) == first
    st = files[1].stat()
    files[1].write_bytes(b"wordl")  # same size, mtime put back
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert content_digest(files, tmp_path / "a", cache) != first
    # names are part of the identity: the same bytes under another name are another input
    renamed = _files(tmp_path / "c", [("x.txt", b"hello"), ("z.txt", b"world")])
    assert content_digest(renamed, tmp_path / "c") != first


def test_the_stat_cache_holds_each_files_hash_and_a_single_file_is_named_by_its_name(tmp_path):
    [f] = _files(tmp_path, [("docs.parquet", b"\x00" * 100)])
    cache = tmp_path / "cache.json"
    digest = content_digest([f], f, cache)
    entry = json.loads(cache.read_text())[str(f.resolve())]
    assert entry[0] == 100 and entry[-1] == file_sha256(f)
    moved = tmp_path / "other" / "docs.parquet"
    moved.parent.mkdir()
    shutil.copy(f, moved)
    assert content_digest([moved], moved) == digest  # no cache needed for the same answer
