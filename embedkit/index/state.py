"""What OUT/index holds, and whether it still belongs to the vectors: read by build, search and status.

An index is finished exactly when `params.json` exists (it is written last). It belongs to the
vectors when the vectors' latest version is the one it was built on, made of the same data
files (an output deleted and encoded again counts its versions from 1 anew). Its files are
intact when their sizes, and the sha256 of the small `merged.index`, are those it recorded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..digest import lance_files_digest as vectors_identity
from ..io.store import INDEX_DIR

PARAMS = "params.json"
STATE = "build.json"
MERGED = "merged.index"
IVFDATA = "merged.ivfdata"
TRAINED = "trained.index"  # the trained, empty index
SHARDS = "shards"  # the add phase's shard indexes
QUERIES = "queries.npz"  # the build's tuning queries (kept for a resume, and for growing)
TRUTH = "truth.npz"  # the exact top-k of the tuning queries over the indexed rows (kept for growing)
GROW = "grow"  # a grown index's files, complete before they replace the old ones (grow.py)


def read_json(path: Path) -> dict | None:
    """A JSON document, or None when the file is missing or unreadable (a partial write)."""
    try:
        return json.loads((Path(path) if isinstance(path, str) else path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: Path, doc: dict) -> None:
    """Write atomically: a reader sees the old document or the new one, never half of one."""
    from ..fsutil import atomic_write

    atomic_write(path, (json.dumps(doc, indent=2, default=_jsonable) + "\n").encode())


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    if not isinstance(path, (str, Path)):  # an object on object storage (io.objstore.ObjectPath)
        h.update(path.read_bytes())
        return h.hexdigest()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def index_damage(folder: Path, params: dict, full: bool = False) -> str | None:
    """What is wrong with a finished index's files, or None: sizes always, the sha256 of
    merged.index (small), and with `full` of every file."""
    for name, check in params.get("files", {}).items():
        path = folder / name
        size, expected = path.stat().st_size if path.exists() else -1, check["bytes"]
        if size != expected:
            return f"{path} is " + ("missing" if size < 0 else f"{size:,} bytes, expected {expected:,}")
        if (name == MERGED or full) and file_sha256(path) != check["sha256"]:
            return f"{path} does not match its checksum"
    return None


def params_problem(params: Any) -> str | None:
    """What is missing from a params.json (an edited or foreign one), or None when it is whole."""
    if not isinstance(params, dict) or not isinstance(params.get("key"), dict):
        return "no key"
    for key in ("vectors_version", "n", "dim", "factory"):
        if key not in params["key"]:
            return f"no key.{key}"
    for key in ("nprobe", "rerank", "k", "files"):
        if key not in params:
            return f"no {key}"
    return None


def staleness(params: dict, latest: Any) -> str | None:
    """Why a finished index no longer belongs to the vectors' latest version `latest` (a Lance
    dataset), or None when it does."""
    built_on = int(params["key"]["vectors_version"])
    if int(latest.version) != built_on:
        return f"built on version {built_on} of the vectors, which are now at version {latest.version}"
    built_from = params["key"].get("vectors_files")  # absent in indexes built before it was recorded
    if built_from is not None and vectors_identity(latest) != built_from:
        return f"built on other vectors than version {built_on} now holds (they were written anew since)"
    return None


@dataclass(frozen=True)
class IndexStatus:
    """State of OUT/index: "none", "unfinished" (a build to resume), "current", "stale" or
    "damaged"; `reason` says why when it is not current; `params` is params.json when finished."""

    out: Path
    state: str
    reason: str = ""
    params: dict | None = None

    def to_dict(self) -> dict:
        d: dict = {"state": self.state, "reason": self.reason, "line": self.line(), "dry_run": None, "dry_run_line": None}
        if self.params is not None and self.params.get("prediction"):
            from ..run.record import comparison, comparison_line

            d["dry_run"] = comparison(self.params["prediction"], [self.params["run"]] if self.params.get("run") else [])
            d["dry_run_line"] = comparison_line(d["dry_run"])
        if self.params is not None:
            report = self.params.get("report", {})
            d.update(
                factory=self.params["key"]["factory"], n=self.params["key"]["n"], k=self.params.get("k"),
                recall=report.get("recall"), target_recall=self.params.get("target_recall"),
                nprobe=self.params.get("nprobe"), rerank=self.params.get("rerank"),
                vectors_version=self.params["key"]["vectors_version"],
            )  # fmt: skip
        return d

    def line(self) -> str:
        """One line for `embedkit status`."""
        rebuild = f"run `embedkit build-index {self.out}`"
        if self.state == "none":
            return f"index: none ({rebuild} to build one)"
        if self.state == "unfinished":
            return f"index: unfinished build ({rebuild} to resume it)"
        if self.params is None:  # damaged beyond reading
            return f"index: {self.state}: {self.reason}; {rebuild} --overwrite"
        p, report = self.params or {}, (self.params or {}).get("report", {})
        what = f"{p['key']['factory']} over {p['key']['n']:,} vectors"
        if self.state != "current":
            return f"index: {self.state}, {what}: {self.reason}; {rebuild} again"
        at = f"at nprobe {p.get('nprobe')}, rerank {p.get('rerank')}" if p.get("nprobe") else f"at rerank {p.get('rerank')}"
        return f"index: {what}; recall@{p.get('k')} {report.get('recall', 0):.3f} promised {at} (target {p.get('target_recall')}); up to date"


def index_status(out: Path, latest: Any | None) -> IndexStatus:
    """The state of OUT/index against the vectors' latest version (`latest`, None: no vectors)."""
    from ..io.objstore import out_path

    out = out_path(out)
    folder = out / INDEX_DIR
    params = read_json(folder / PARAMS)
    if (folder / GROW / PARAMS).exists():  # a grown index whose swap a kill interrupted
        return IndexStatus(out, "unfinished")
    if params is None:
        return IndexStatus(out, "unfinished" if (folder / STATE).exists() else "none")
    problem = params_problem(params)
    if problem:
        return IndexStatus(out, "damaged", f"{folder / PARAMS} is damaged ({problem})")
    damage = index_damage(folder, params)
    if damage is not None:
        return IndexStatus(out, "damaged", damage, params)
    stale = staleness(params, latest) if latest is not None else "the vectors are gone"
    return IndexStatus(out, "stale", stale, params) if stale else IndexStatus(out, "current", "", params)
