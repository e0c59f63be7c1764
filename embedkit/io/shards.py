"""Shard plan, the output manifest (embedkit.json), and the output lock.

The plan cuts the input's rows into fixed ranges. It is written into the manifest on the first
run and reused by every resume, so a shard means the same rows forever; which shards are done is
read from the store (see store.py). The manifest also pins what produced the output (model,
dtype, normalization, input): a resume that would mix two different things is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EmbedkitError

MANIFEST = "embedkit.json"
LOCK = ".embedkit.lock"


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of the input."""

    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_shards(num_rows: int, shard_rows: int) -> list[Shard]:
    """Equal row ranges of at most `shard_rows` rows.

    >>> plan_shards(5, 2)
    [Shard(index=0, start=0, stop=2), Shard(index=1, start=2, stop=4), Shard(index=2, start=4, stop=5)]
    """
    if shard_rows < 1:
        raise ValueError("shard_rows must be positive")
    return [Shard(i, s, min(s + shard_rows, num_rows)) for i, s in enumerate(range(0, num_rows, shard_rows))]


def shards_from_manifest(manifest: dict, segment: dict | None = None) -> list[Shard]:
    """The shards of one input of the output (default: its first); indexes are the output's,
    rows are the input's own."""
    seg = segment if segment is not None else input_segments(manifest)[0]
    return [Shard(seg["first_shard"] + s.index, s.start, s.stop) for s in plan_shards(seg["rows"], seg["shard_rows"])]


def input_segments(manifest: dict) -> list[dict]:
    """The inputs an output holds, in order: {"input" (fingerprint), "rows", "shard_rows",
    "shards", "first_shard", "first_row"}. `encode --append` adds one per new input (under
    "inputs"); an output made by one encode has the one its "input" and "plan" describe."""
    if manifest.get("inputs"):
        return manifest["inputs"]
    plan = manifest["plan"]
    return [{"input": manifest.get("input") or {}, "rows": plan["rows"], "shard_rows": plan["shard_rows"], "shards": plan["shards"],
             "first_shard": 0, "first_row": 0}]  # fmt: skip


def appended(manifest: dict, fingerprint: dict, rows: int) -> dict:
    """The manifest with one more input after the others: its shards and rows numbered after
    theirs, the plan's totals grown."""
    segments = input_segments(manifest)
    last, shard_rows = segments[-1], manifest["plan"]["shard_rows"]
    segment = {"input": fingerprint, "rows": rows, "shard_rows": shard_rows, "shards": -(-rows // shard_rows),
               "first_shard": last["first_shard"] + last["shards"], "first_row": last["first_row"] + last["rows"]}  # fmt: skip
    plan = {"rows": segment["first_row"] + rows, "shard_rows": shard_rows, "shards": segment["first_shard"] + segment["shards"]}
    return {**manifest, "inputs": [*segments, segment], "plan": plan}


def read_manifest(out: Path) -> dict | None:
    from .objstore import out_path

    path = out_path(out) / MANIFEST
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EmbedkitError(f"{path} is unreadable ({e}); start fresh with --overwrite") from None
    problem = manifest_problem(doc)
    if problem:
        raise EmbedkitError(f"{path} is damaged ({problem}); start fresh with --overwrite")
    return doc


# What every manifest holds, by kind, and the types they must have (an edited or truncated
# manifest is refused in one line instead of failing later on a missing key).
_REQUIRED = {
    "plan": {"rows": int, "shard_rows": int, "shards": int},
    "model": {"name": str, "dim": int, "max_seq_length": int, "pooling": str},
    "output": {"dtype": str, "normalize": bool},
    "generator": {"name": str, "precision": str},
    "task": {"task": str},
}


def manifest_problem(doc: Any) -> str | None:
    """What is missing or of the wrong type in a manifest, or None when it is whole."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    sections = ["plan", *(["model", "output"] if "model" in doc or "generator" not in doc else ["generator", "task"])]
    for section in sections:
        part = doc.get(section)
        if not isinstance(part, dict):
            return f"no {section}"
        for key, kind in _REQUIRED[section].items():
            value = part.get(key)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                return f"{section}.{key} is {value!r}"
    if doc["plan"]["shard_rows"] < 1:
        return f"plan.shard_rows is {doc['plan']['shard_rows']}"
    return None


def write_manifest(out: Path, manifest: dict) -> None:
    """Write atomically: a crash leaves the old manifest or the new one, never half of one."""
    from ..fsutil import atomic_write
    from .objstore import out_path

    path = out_path(out) / MANIFEST
    try:
        atomic_write(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    except OSError as e:  # a full disk or a read-only folder: one line, not a traceback
        raise EmbedkitError(f"cannot write {path}: {e.strerror or e}; free space (or fix the path) and rerun") from None


# Manifest keys whose change makes an existing output unusable, and how to name them.
_PINNED = {
    ("model", "name"): "model",
    ("model", "weights_sha256"): "model weights",
    ("model", "dim"): "dimension",
    ("model", "max_seq_length"): "max sequence length",
    ("model", "pooling"): "pooling",
    # resolved (auto is fp16 on CUDA, fp32 on a CPU): fp8's vectors differ from 16-bit ones by
    # more than a resume may mix (recall@10 0.930 against 0.988 on the sample)
    ("model", "precision"): "compute precision",
    ("output", "dtype"): "dtype",
    ("output", "normalize"): "normalize",
    # a resume that changed it would leave empty texts in some shards and not in others
    ("output", "keep_empty"): "keep empty",
    # what is stored beside the vectors: every shard's rows must have the same columns
    ("output", "store_text"): "store text",
    ("output", "keep_columns"): "kept columns",
    # every shard's documents must be split the same way (0: not split)
    # --dim: the stored vectors' length (0: the model's)
    ("output", "dim"): "vector dimensions kept",
    ("output", "chunk_tokens"): "chunk tokens",
    ("output", "chunk_overlap"): "chunk overlap",
    ("prompts", "document"): "document prompt",
    ("prompts", "query"): "query prompt",
    ("input",): "input",
}
# What a key absent from an older manifest means (it was written before the key existed).
_ABSENT = {("output", "store_text"): False, ("output", "keep_columns"): [], ("output", "dim"): 0, ("output", "chunk_tokens"): 0,
           ("output", "chunk_overlap"): 0, ("prompts", "document"): "", ("prompts", "query"): ""}  # fmt: skip
# Keys an older manifest may lack whose value then is unknown: not compared.
_UNRECORDED = {("model", "precision")}


def manifest_differences(old: dict, new: dict, pinned: dict[tuple[str, ...], str] | None = None) -> list[str]:
    """What differs between an existing output's manifest and this run's, in words.

    `pinned` names the keys to compare (default: the encode pipeline's)."""
    diffs = []
    for keys, label in (_PINNED if pinned is None else pinned).items():
        if keys == ("input",):
            diff = input_difference(old.get("input") or {}, new.get("input") or {})
            diffs += [diff] if diff else []
            continue
        a, b = _dig(old, keys), _dig(new, keys)
        if b is None or (a is None and keys in _UNRECORDED):  # not known yet (compared after the model loads), or never recorded
            continue
        a = _ABSENT.get(keys) if a is None else a
        if a != b:
            diffs.append(f"{label} ({_shown(a)} -> {_shown(b)})")
    return diffs


def settings_differences(old: dict, new: dict) -> list[str]:
    """manifest_differences without the input: what an appended input must share with the output."""
    return manifest_differences(old, new, {k: v for k, v in _PINNED.items() if k != ("input",)})


def segment_of(manifest: dict, fingerprint: dict) -> dict | None:
    """The output's input whose content is this fingerprint's, or None."""
    return next((seg for seg in input_segments(manifest) if input_difference(seg["input"] or {}, fingerprint) is None), None)


def stored_dim(manifest: dict) -> int:
    """The length of the stored vectors: the model's, or what `encode --dim` kept of it."""
    return int((manifest.get("output") or {}).get("dim") or manifest["model"]["dim"])


def _shown(value: Any) -> str:
    """A manifest value in a one-line message: lists comma-joined, long, multi-line, empty or space-edged text quoted (and cut)."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "none"
    if isinstance(value, str) and (len(value) > 120 or not value.isprintable() or value != value.strip() or not value):
        text = repr(value)
        return text if len(text) <= 128 else text[:125] + "..."
    return str(value)


# Input fingerprint keys that show where an input was, not what it is: not compared.
_WHERE = ("path",)


def input_difference(old: dict, new: dict) -> str | None:
    """How this run's input differs from the one an output was made from, in words (None: the
    same input). Content decides, not place or file times: a copy staged elsewhere is the same."""
    keys = [k for k in sorted(set(old) | set(new)) if k not in _WHERE and old.get(k) != new.get(k)]
    if not keys:
        return None
    if not {"sha256", "files_sha256"} & set(old):
        return "input (the output records no content hash of its input: it was made by an older embedkit)"
    if "kind" in keys:
        return f"input (a different input: {old.get('kind')} at {old.get('path')}; this run reads {new.get('kind')} at {new.get('path')})"
    shown = [k for k in keys if k not in ("sha256", "files_sha256", "version")]
    if shown:
        return "input (" + ", ".join(f"{k.replace('_', ' ')} {old.get(k)} -> {new.get(k)}" for k in shown) + ")"
    return "input (its content changed since the output was made)"


def _dig(d: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


# Lock file descriptors this process holds. A forked child (a tokenizer worker) closes its copies
# at once: a flock belongs to the open file, so a child outliving a killed parent would otherwise
# keep OUT locked and refuse the rerun.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


def lock_record() -> str:
    """What OUT's lock file says while this process holds the lock."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def held_by(out: Path, record: str) -> bool:
    """Whether OUT's lock is held now, by the run whose `lock_record()` is `record`.

    A shard task asks before it commits: a task whose driver died (or has finished and let go
    of OUT) must write nothing, since a rerun may already be cleaning OUT and redoing its shard.
    The record alone would not do: it stays in the file after its holder is gone.
    """
    import fcntl

    from .objstore import ObjectPath, lock_held_by, out_path

    out = out_path(out)
    if isinstance(out, ObjectPath):
        return lock_held_by(out / LOCK, record)
    try:
        fd = os.open(Path(out) / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held exclusively: by which run?
            return os.pread(fd, 200, 0).decode(errors="replace").strip() == record
        return False  # held by nobody (the probe's shared lock goes with the close below)
    finally:
        os.close(fd)


class OutputLock:
    """An exclusive lock on OUT for the length of a run.

    flock is released by the kernel when the holder dies, even by kill -9, so a stale lock from a
    killed run never blocks the rerun. The file records who holds it for the refusal message.
    Only the process that took it holds it: forked children close their copy (see _HELD), and
    other processes (Ray workers) never inherit it; a shard task checks `held_by` instead.
    """

    def __init__(self, out: Path):
        from .objstore import ObjectLock, ObjectPath, out_path

        out = out_path(out)
        self.path = out / LOCK
        self._fd: int | None = None
        # on object storage: a lock object taken with a conditional put (objstore.ObjectLock)
        self._object = ObjectLock(self.path, lock_record()) if isinstance(out, ObjectPath) else None

    def __enter__(self) -> "OutputLock":
        import fcntl

        from ..fsutil import open_nofollow

        if self._object is not None:
            self._object.acquire()
            return self

        try:
            fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a read-only OUT, say
            raise EmbedkitError(f"cannot lock {self.path.parent}: {e.strerror}; embedkit needs to write in OUT") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise EmbedkitError(f"{self.path.parent} is in use by another embedkit run ({holder}); wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, lock_record().encode(), 0)
        self._fd = fd
        _HELD.add(fd)
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        if self._object is not None:
            self._object.release()
        if self._fd is not None:
            _HELD.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class RunSummary:
    """What the stages' run summaries share: the counts every stage reports, `lines()` (one line
    that names the shards or says there was nothing to do) and `to_dict()` with the summary's
    `rates()`. A stage's summary adds its own fields and its `work_line`."""

    out: str
    device: str
    docs: int
    seconds: float
    truncated: int
    skipped_empty: int
    shards_done: int
    shards_skipped: int
    shards_total: int

    def lines(self) -> list[str]:
        s: Any = self
        if s.shards_done == 0 and s.shards_skipped == s.shards_total:
            return [f"nothing to do: all {s.shards_total} shards of {s.out} are already committed"]
        return [self.work_line(f"shards {s.shards_done} new + {s.shards_skipped} already done of {s.shards_total}")]

    def work_line(self, shards: str) -> str:
        raise NotImplementedError

    def rates(self) -> dict:
        return {}

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self), **self.rates()}  # type: ignore[call-overload]
