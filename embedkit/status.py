"""What an output folder holds: embeddings or generations, shards done of the plan, rows, tokens,
the index and whether it is up to date, and the manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import EmbedkitError
from .io.shards import MANIFEST, read_manifest

# Token columns summed per kind of output: (input tokens, new tokens); None where not recorded.
_TOKEN_COLUMNS = {
    "embeddings": ("n_tokens", None),
    "summarize": ("prompt_tokens", "new_tokens"),
    "score": ("n_tokens", None),
    "classify": (None, None),
}


@dataclass(frozen=True)
class OutputStatus:
    """Progress of an output: complete when every planned shard is committed.

    `kind` is "embeddings" (`embedkit encode`) or "generations" (`embedkit generate`);
    `tokens` counts what the model read (None where the output does not record it: classify),
    `new_tokens` what summarize wrote; `index` is the index's state (embeddings only).
    """

    out: str
    kind: str
    shards_done: int
    shards_total: int
    rows: int
    tokens: int | None
    manifest: dict
    quarantined: tuple = ()  # ids left out because their vectors stayed NaN/Inf (retried in fp32 too)
    new_tokens: int | None = None
    index: dict | None = None  # IndexStatus.to_dict(), embeddings only
    inputs: list = field(default_factory=list)  # per input (several after `encode --append`): path, rows, shards done and total
    dry_run: dict | None = None  # a dry run's prediction against the runs since (run/record.py comparison)

    @property
    def complete(self) -> bool:
        return self.shards_done == self.shards_total

    def to_dict(self) -> dict:
        return {
            "out": self.out, "kind": self.kind, "shards_done": self.shards_done, "shards_total": self.shards_total,
            "rows": self.rows, "tokens": self.tokens, "new_tokens": self.new_tokens, "complete": self.complete,
            "quarantined": list(self.quarantined), "index": self.index, "inputs": self.inputs, "dry_run": self.dry_run,
            "manifest": self.manifest,
        }  # fmt: skip

    def lines(self) -> list[str]:
        """The one-screen text of `embedkit status`."""
        m = self.manifest
        verb = "encode" if self.kind == "embeddings" else "generate"
        state = "complete" if self.complete else f"incomplete: rerun the {verb} command to resume"
        what = self.kind if self.kind == "embeddings" else f"generations ({m['task']['task']})"
        counts = [f"rows {self.rows:,}"]
        if self.tokens is not None:
            counts.append(f"{'input' if self.kind == 'embeddings' else 'prompt'} tokens {self.tokens:,}")
        if self.new_tokens is not None:
            counts.append(f"new tokens {self.new_tokens:,}")
        if self.quarantined:
            counts.append(f"{len(self.quarantined)} quarantined (non-finite vectors; ids in --json)")
        lines = [f"{self.out}: {what}, shards {self.shards_done}/{self.shards_total} ({state})", ", ".join(counts)]
        lines += _model_lines(m)
        if len(self.inputs) > 1:
            lines.append(f"{len(self.inputs)} inputs, {m['plan']['rows']:,} rows in {m['plan']['shards']:,} shards of {m['plan']['shard_rows']:,}:")
            lines += [f"  {i['path']}: {i['rows']:,} rows, shards {i['shards_done']}/{i['shards_total']}" for i in self.inputs]
        else:
            lines.append(f"input {m['input']['kind']}, {m['plan']['rows']:,} rows in {m['plan']['shards']:,} shards of {m['plan']['shard_rows']:,}")
        from .run.record import comparison_line

        if comparison_line(self.dry_run):
            lines.append(comparison_line(self.dry_run))
        if self.index is not None:
            lines.append(self.index["line"])
            if self.index.get("dry_run_line"):
                lines.append("index " + self.index["dry_run_line"])
        lines.append(f"embedkit {m.get('embedkit_version', '?')}")
        return lines


def _model_lines(m: dict) -> list[str]:
    if "model" in m:
        model, output = m["model"], m["output"]
        return [f"model {model['name']} (dim {model['dim']}, max {model['max_seq_length']} tokens, {model['pooling']} pooling)",
                f"vectors {output['dtype']}{_kept_dims(output, model)}, normalize {output['normalize']}{_chunking(output)}"]  # fmt: skip
    task, gen = m["task"], m["generator"]
    detail = f", labels {', '.join(task['labels'])}" if task.get("labels") else ""
    if task["task"] == "summarize":
        detail = f", up to {task.get('max_new_tokens')} new tokens, temperature {task.get('temperature')}"
    return [f"generator {gen['name']} ({gen['precision']}); task {task['task']}{detail}", f"prompt {task['prompt']!r}"]


def _kept_dims(output: dict, model: dict) -> str:
    """", first N of D dimensions" for an output encoded with --dim."""
    return f", first {output['dim']} of {model['dim']} dimensions" if output.get("dim") else ""


def _chunking(output: dict) -> str:
    """How documents were split ("" when they were cut at the model's length instead)."""
    if not output.get("chunk_tokens"):
        return ""
    return f"; documents split into chunks of {output['chunk_tokens']} tokens, overlap {output.get('chunk_overlap', 0)}"


def output_kind(manifest: dict) -> str:
    """"embeddings" or "generations", from what the manifest pins."""
    if "model" in manifest:
        return "embeddings"
    if "generator" in manifest and "task" in manifest:
        return "generations"
    raise EmbedkitError("its embedkit.json names neither a model nor a generator: not an embedkit output")


def status(out: str | Path) -> OutputStatus:
    """Read OUT's manifest, its store's ledger and (for embeddings) its index.

    >>> embedkit.status("out/").shards_done    # doctest: +SKIP
    """
    # numpy and pyarrow load here, not on import: embedkit/__init__.py imports this module
    from .io.objstore import out_path
    from .io.store import GENERATIONS_DIR, VECTORS_DIR, VectorStore
    from .run.record import manifest_comparison

    out = out_path(out)
    if not out.exists():
        raise EmbedkitError(f"output not found: {out}")
    manifest = read_manifest(out)
    if manifest is None:
        raise EmbedkitError(f"{out} has no {MANIFEST}: not an embedkit output")
    kind = output_kind(manifest)
    store = VectorStore(out, VECTORS_DIR if kind == "embeddings" else GENERATIONS_DIR)
    token_cols = _TOKEN_COLUMNS["embeddings" if kind == "embeddings" else manifest["task"]["task"]]
    done, rows, sums, quarantined = {}, 0, {}, ()
    if store.exists():
        done = store.committed_shards()
        rows, sums = store.row_stats(tuple(c for c in token_cols if c))
        quarantined = tuple(store.quarantined())
    tokens, new = (sums.get(c, 0) if c else None for c in token_cols)
    index = _index(out, store) if kind == "embeddings" else None
    return OutputStatus(
        out=str(out), kind=kind, shards_done=len(done), shards_total=manifest["plan"]["shards"], rows=rows, tokens=tokens,
        manifest=manifest, quarantined=quarantined, new_tokens=new, index=index, inputs=_inputs(manifest, done),
        dry_run=manifest_comparison(manifest),
    )  # fmt: skip


def _inputs(manifest: dict, done: dict) -> list[dict]:
    """Each input the output holds, with its shards' progress."""
    from .io.shards import input_segments

    return [{"path": (seg["input"] or {}).get("path"), "rows": seg["rows"], "shards_total": seg["shards"],
             "shards_done": sum(1 for i in range(seg["first_shard"], seg["first_shard"] + seg["shards"]) if i in done)}
            for seg in input_segments(manifest)]  # fmt: skip


def _index(out: Path, store) -> dict:
    from .index.state import index_status

    return index_status(out, store.dataset() if store.exists() else None).to_dict()


def commit_log(out: str | Path) -> list[dict]:
    """Per committed shard of OUT (embeddings or generations): worker, start and commit times."""
    from .io.objstore import out_path
    from .io.store import GENERATIONS_DIR, VECTORS_DIR, VectorStore

    out = out_path(out)
    name = VECTORS_DIR if (out / VECTORS_DIR).exists() else GENERATIONS_DIR
    store = VectorStore(out, name)
    if not store.exists():
        raise EmbedkitError(f"{out} holds no committed shards yet")
    return store.commit_log()
