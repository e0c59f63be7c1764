"""The output folder itself: checked before anything is written, created, cleared, and left as it
was found when a run fails before it wrote its manifest."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from ..digest import INPUT_CACHE
from ..errors import EmbedkitError
from ..fsutil import is_temporary
from ..io.objstore import ObjectPath, out_path, remove_tree
from ..io.shards import LOCK, MANIFEST
from ..io.store import GENERATIONS_DIR, INDEX_DIR, VECTORS_DIR, ledger_name
from .record import PREDICTION

WRITE_TEST = ".embedkit.write-test"
# What embedkit writes into OUT (and the temporary names of its atomic writes). A folder holding
# anything else and no manifest is someone else's: writing into it would mix the two.
OWN_NAMES = frozenset({
    MANIFEST, LOCK, VECTORS_DIR, GENERATIONS_DIR, ledger_name(VECTORS_DIR), ledger_name(GENERATIONS_DIR), INDEX_DIR, INPUT_CACHE, WRITE_TEST,
    PREDICTION,
})  # fmt: skip


def check_out(out: Path) -> None:
    """Refuse an OUT that is a file, or a non-empty folder that is not an embedkit output
    (on object storage: an object, or a prefix holding others' objects)."""
    out = out_path(out)
    if out.exists() and not out.is_dir():
        raise EmbedkitError(f"{out} is a file; OUT must be a folder (a new one, or an embedkit output)")
    if not out.is_dir() or (out / MANIFEST).exists():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_NAMES and not is_temporary(p.name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise EmbedkitError(f"{out} is a non-empty folder that is not an embedkit output (it holds {shown}); give a new or empty folder")


def make_out(out: Path) -> bool:
    """Create OUT (and parents) and check it is writable; True when this call created it."""
    if isinstance(out, ObjectPath):  # a prefix needs no creating; a probe object checks the bucket and credentials
        created = not out.is_dir()
        (out / WRITE_TEST).write_bytes(b"")
        (out / WRITE_TEST).unlink(missing_ok=True)
        return created
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / WRITE_TEST
        # exclusive and without following a link: a planted link is never written through
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o644))
        probe.unlink()
    except OSError as e:
        raise EmbedkitError(f"cannot write to {out}: {e.strerror}") from None
    return created


@contextlib.contextmanager
def undo_if_unstarted(out: Path, created: bool) -> Iterator[None]:
    """When the block fails before OUT holds a manifest, leave no trace of this run: a folder
    this run created is removed, and in one that existed only the lock file it added."""
    try:
        yield
    except BaseException:
        if not (out / MANIFEST).exists():
            with contextlib.suppress(OSError):
                if created:
                    remove_tree(out) if isinstance(out, ObjectPath) else shutil.rmtree(out)
                elif not any(p.name != LOCK for p in out.iterdir()):
                    (out / LOCK).unlink()
        raise


def clear_output(out: Path, names: tuple[str, ...]) -> None:
    """--overwrite: remove what embedkit wrote (the given folders and the manifest), nothing else."""
    for name in names:
        remove_tree(out / name)
    (out / MANIFEST).unlink(missing_ok=True)
