"""What an output folder holds: shards done of the plan, rows, tokens, and the manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import EmbedkitError
from .shards import MANIFEST, read_manifest


def straggler_tail(commit_times: list[float]) -> float:
    """Seconds from 95% of shards committed to 100% (commit times in any order; 0 for fewer than 2)."""
    if len(commit_times) < 2:
        return 0.0
    ends = sorted(commit_times)
    return ends[-1] - ends[max(0, int(0.95 * len(ends)) - 1)]


@dataclass(frozen=True)
class OutputStatus:
    """Progress of an output: complete when every planned shard is committed."""

    out: str
    shards_done: int
    shards_total: int
    rows: int
    tokens: int
    manifest: dict
    quarantined: tuple = ()  # ids left out because their vectors stayed NaN/Inf (retried in fp32 too)

    @property
    def complete(self) -> bool:
        return self.shards_done == self.shards_total

    def to_dict(self) -> dict:
        return {
            "out": self.out, "shards_done": self.shards_done, "shards_total": self.shards_total,
            "rows": self.rows, "tokens": self.tokens, "complete": self.complete, "quarantined": list(self.quarantined),
            "manifest": self.manifest,
        }  # fmt: skip


def status(out: str | Path) -> OutputStatus:
    """Read OUT's manifest and its store's ledger.

    >>> embedkit.status("out/").shards_done    # doctest: +SKIP
    """
    # numpy and pyarrow load here, not on import: embedkit/__init__.py imports this module
    from .store import VectorStore

    out = Path(out)
    manifest = read_manifest(out)
    if manifest is None:
        raise EmbedkitError(f"{out} has no {MANIFEST}: not an embedkit output")
    store = VectorStore(out)
    done = store.committed_shards() if store.exists() else {}
    rows, tokens = store.row_stats() if store.exists() else (0, 0)
    quarantined = tuple(store.quarantined()) if store.exists() else ()
    return OutputStatus(
        out=str(out), shards_done=len(done), shards_total=manifest["plan"]["shards"], rows=rows, tokens=tokens,
        manifest=manifest, quarantined=quarantined,
    )  # fmt: skip


def commit_log(out: str | Path) -> list[dict]:
    """Per committed shard of OUT (embeddings or generations): worker, start and commit times."""
    from .store import VECTORS_DIR, VectorStore

    out = Path(out)
    name = VECTORS_DIR if (out / VECTORS_DIR).exists() else "generations.lance"
    store = VectorStore(out, name)
    if not store.exists():
        raise EmbedkitError(f"{out} holds no committed shards yet")
    return store.commit_log()
