"""The encode stage's summary: what a run did, as a line and a dict."""

from __future__ import annotations

from dataclasses import dataclass

from ..io.shards import RunSummary

SUMMED_FIELDS = ("docs", "chunks", "tokens", "padded_tokens", "truncated", "skipped_empty", "shards_done", "input_wait_seconds", "retried", "quarantined")


@dataclass(frozen=True)
class EncodeSummary(RunSummary):
    """What a run did. `tokens` counts what the model read (after truncation)."""

    tokens: int
    padded_tokens: int
    input_wait_seconds: float = 0.0  # time the model sat waiting for tokenized input
    # --gpus N or --ray: one part per worker process, its committed tokens and the seconds its
    # shard tasks spent encoding them once the model was loaded (sum over parts of tokens /
    # seconds: the steady rate); `seconds` above is the whole run's wall time, start-up included
    parts: tuple = ()
    reissued: int = 0  # --gpus N or --ray: shards run a second time on an idle worker (first commit wins)
    tail_seconds: float = 0.0  # --gpus N or --ray: time from 95% of shards committed to 100%
    retried: int = 0  # rows whose vectors were not finite, run again alone in fp32
    quarantined: int = 0  # rows still not finite: left out, their ids recorded in their shard's commit
    quarantined_ids: tuple = ()  # this process's quarantined ids (all of them: `embedkit status OUT --json`)
    chunks: int = 0  # --chunk-tokens: the rows written, one per chunk (`docs` counts the documents)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def padding_overhead(self) -> float:
        return self.padded_tokens / self.tokens - 1.0 if self.tokens else 0.0

    @classmethod
    def merged(cls, parts: list[dict], *, out: str, device: str, seconds: float, skipped: int, total: int) -> "EncodeSummary":
        """One summary from shard tasks' `to_dict()`s (their counts add up); `parts` holds one
        entry per worker process (a task's `worker`, host:pid)."""
        # a part that committed nothing (a re-issued copy that lost the race) is left out: its
        # work is counted by the winner; one that found its shard committed by an attempt that
        # died before reporting counts that shard's rows (its tokens are not known)
        parts = [p for p in parts if p.get("shards_done")]
        counts = {f: sum(p[f] for p in parts) for f in SUMMED_FIELDS}
        workers: dict = {}
        for i, p in enumerate(p for p in parts if not p.get("committed_before")):  # no encoding seconds
            tokens, secs = workers.get(p.get("worker", i), (0, 0.0))
            workers[p.get("worker", i)] = (tokens + p["tokens"], secs + p["seconds"])
        each = tuple({"tokens": t, "seconds": round(secs, 2)} for t, secs in workers.values())
        return cls(out=out, device=device, seconds=seconds, shards_skipped=skipped, shards_total=total, parts=each, **counts)

    def rates(self) -> dict:
        return {"tokens_per_second": round(self.tokens_per_second, 1), "padding_overhead": round(self.padding_overhead, 4)}

    def work_line(self, shards: str) -> str:
        return (
            f"{self.docs} docs{f' in {self.chunks} chunks' if self.chunks else ''}, {self.tokens} tokens in {self.seconds:.1f} s "
            f"({self.tokens_per_second:,.0f} tokens/s) on {self.device}; "
            f"{self.truncated} truncated, {self.skipped_empty} empty skipped, "
            f"padding {100 * self.padding_overhead:.1f}%, {shards}"
            + (f"; tail {self.tail_seconds:.1f} s, {self.reissued} shards re-issued" if self.parts else "")
            + (f"; non-finite vectors: {self.retried} rows retried in fp32, {self.quarantined} quarantined{_ids(self.quarantined_ids)}"
               if self.retried else "")
        )


def _ids(ids: tuple, shown: int = 10) -> str:
    if not ids:
        return ""
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return f" (ids {', '.join(map(repr, ids[:shown]))}{more})"
