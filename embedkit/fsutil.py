"""Writing files inside OUT safely: atomically, and never through a link someone planted.

OUT may be a shared folder. A symbolic link placed at a name embedkit writes (the lock, the
manifest's temporary file, an index file) would make a plain `open(path, "w")` truncate or
overwrite whatever the link points to, outside OUT. So fixed names are opened with O_NOFOLLOW,
and whole files are written under a fresh random name created exclusively in the same folder,
then renamed over the final name (a rename replaces a link itself, never its target). A reader
sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import EmbedkitError

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_file(path: str | Path, *, durable: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: created exclusively under a random name beside it,
    renamed over `path` when the block ends without error, removed otherwise. `durable`: the
    file and then its folder are flushed to disk, so the rename survives a power cut too."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_folder(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | Path, data: bytes, *, durable: bool = False) -> None:
    """Write `data` to `path` atomically (see atomic_file); an object-storage path
    (io.objstore.ObjectPath) is written by one PUT, which is atomic by itself."""
    if not isinstance(path, (str, os.PathLike)):
        path.write_bytes(data)
        return
    with atomic_file(path, durable=durable) as f:
        f.write(data)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_nofollow(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """os.open that refuses a symbolic link at `path` (one line, naming it) instead of following it."""
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise EmbedkitError(f"{path} is a symbolic link; embedkit does not write through links in OUT: remove it") from None
        raise


def is_temporary(name: str) -> bool:
    """Whether a name in OUT is one of atomic_file's temporary files (left by a killed process)."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


# scheme:// (or scheme:/ once pathlib has collapsed the slashes); two letters at least, so that a
# Windows drive (C:/) is not taken for one
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/+")


def require_local(path: str | os.PathLike, role: str) -> None:
    """Refuse an object-storage URI (s3://, gs://, az://, ...) where only local paths are read
    (INPUT) in one line: a URI would be taken for a relative folder named "s3:". OUT may be
    s3:// (io/objstore.py); a shared filesystem mounted on every worker shares an INPUT."""
    text = os.fspath(path)
    m = _URI.match(text)
    if m:
        shown = f"{m.group(1)}://{text[m.end():]}"
        raise EmbedkitError(f"{role} {shown}: {m.group(1)}:// URIs are not supported yet; give a local path, or a shared "
                            "filesystem mounted at the same path on every worker")  # fmt: skip

