"""What a dry run predicted for an output, and what its real runs took, side by side.

`--dry-run` with an OUT leaves its prediction in `OUT/.embedkit.prediction.json`, one entry per
stage (encode, generate, build-index), the only file a dry run writes. The stage's next real run
moves its entry into its own record (the manifest for encode and generate, the index's
params.json for build-index) when the prediction was made for the same input, and adds what
the run took (`record_run`). `embedkit status` shows the two, so every user sees the error.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

PREDICTION = ".embedkit.prediction.json"


def process_seconds() -> float:
    """Seconds since this process started (what a user waits for a CLI command): from the
    kernel's record of the process start; the time since this module's import elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()
_COMMAND = False  # set by the CLI: a command's time is its process's, start to exit
_STARTED = time.perf_counter()  # the current run's start (an API call's time is its own)


def count_from_process_start(on: bool = True) -> None:
    """Called by the CLI for the length of a command: runs and dry runs count the time since the
    process started (imports and interpreter start included), which is what a user waits for."""
    global _COMMAND
    _COMMAND = on


_MARKS: dict[str, float] = {}


def start_run() -> None:
    """A stage's run begins (for an API call, its time counts from here)."""
    global _STARTED
    _STARTED = time.perf_counter()
    _MARKS.clear()
    mark("start")


def marks() -> dict[str, float]:
    """The current run's marks so far (see mark)."""
    return dict(_MARKS)


def mark(step: str) -> None:
    """The run's wall seconds as `step` ends, kept in its record: where a run's time went
    outside its stage's own seconds (imports, model load, checks), for the dry run's fixed costs."""
    _MARKS[step] = round(run_wall(), 3)


def run_wall() -> float:
    """The current run's seconds so far: the process's for a CLI command, else since start_run()."""
    return process_seconds() if _COMMAND else time.perf_counter() - _STARTED


class Clock:
    """A dry run's own clock, on the same terms as run_wall(): from the process's start for a
    CLI command, else from its creation."""

    def __init__(self) -> None:
        self.offset = process_seconds() if _COMMAND else 0.0
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return self.offset + time.perf_counter() - self.t0


def save_prediction(out: Any, stage: str, doc: dict) -> None:
    """Leave a dry run's prediction for the next real run of `stage` on OUT (created if needed)."""
    from ..fsutil import atomic_write
    from ..io.objstore import ObjectPath, out_path

    out = out_path(out)
    if not isinstance(out, ObjectPath):
        out.mkdir(parents=True, exist_ok=True)
    entries = _read(out)
    entries[stage] = {**doc, "made": time.time()}
    atomic_write(out / PREDICTION, (json.dumps(entries, indent=2) + "\n").encode())


def take_prediction(out: Any, stage: str, input_digest: Any) -> dict | None:
    """The dry run's prediction for this run of `stage` (made for the input `input_digest`, any
    when None), removed from the pending file; None when there is none for it."""
    from ..fsutil import atomic_write
    from ..io.objstore import out_path

    out = out_path(out)
    entries = _read(out)
    doc = entries.pop(stage, None)
    if doc is None:
        return None
    if input_digest is not None and _plain(doc.get("input")) != _plain(input_digest):
        return None  # for another input: left for that input's run
    if entries:
        atomic_write(out / PREDICTION, (json.dumps(entries, indent=2) + "\n").encode())
    else:
        (out / PREDICTION).unlink(missing_ok=True)
    return doc


def _plain(value: Any) -> Any:
    """As it reads back from JSON (tuples become lists), for comparing."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _read(out: Any) -> dict:
    try:
        doc = json.loads((out / PREDICTION).read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def run_record(seconds: float, tokens: float, docs: int, shards: int, device: str) -> dict:
    """One real run's entry: the stage's own seconds, the run's wall seconds (run_wall: a CLI
    command's from its process start), and what it did."""
    return {"seconds": round(seconds, 2), "wall_seconds": round(run_wall(), 2), "tokens": int(tokens), "docs": int(docs),
            "shards": int(shards), "device": device, "ended": time.time(), "marks": dict(_MARKS)}  # fmt: skip


def comparison(prediction: dict | None, runs: list[dict]) -> dict | None:
    """Predicted against real (the runs since the prediction, added up): tokens and seconds, and
    the relative error of each (real / predicted - 1)."""
    if not prediction:
        return None
    after = [r for r in runs if r.get("ended", 0) >= prediction.get("made", 0)]
    if not after:
        return {"predicted_seconds": prediction.get("seconds"), "predicted_tokens": prediction.get("tokens"), "real_seconds": None}
    seconds = sum(r.get("wall_seconds", r.get("process_seconds", 0.0)) for r in after)
    tokens = sum(r.get("tokens", 0) for r in after)
    out = {"predicted_seconds": prediction.get("seconds"), "real_seconds": round(seconds, 2), "runs": len(after),
           "predicted_tokens": prediction.get("tokens"), "real_tokens": tokens}  # fmt: skip
    for name in ("seconds", "tokens"):
        p, r = out[f"predicted_{name}"], out[f"real_{name}"]
        out[f"{name}_error"] = round(r / p - 1, 4) if p and r else None
    return out


def comparison_line(c: dict | None) -> str | None:
    """One line for `embedkit status`."""
    if not c:
        return None
    if c.get("real_seconds") is None:
        return f"dry run: predicted {c['predicted_seconds']:,.1f} s; no run since"
    tokens = "" if not c.get("predicted_tokens") else (
        f"; tokens {c['real_tokens']:,} against {c['predicted_tokens']:,.0f} predicted ({_pct(c['tokens_error'])})")
    runs = f" in {c['runs']} runs" if c["runs"] > 1 else ""
    return f"dry run: predicted {c['predicted_seconds']:,.1f} s, took {c['real_seconds']:,.1f} s{runs} ({_pct(c['seconds_error'])}){tokens}"


def _pct(error: float | None) -> str:
    return "n/a" if error is None else f"{100 * error:+.1f}%"


def record_run(out: Any, stage: str, fingerprint: dict | None, entry: dict) -> None:
    """After a run of encode or generate: its entry in the manifest's `runs`, and the dry run's
    prediction for it (when one was left for this input) as the manifest's `prediction`."""
    from ..io.shards import read_manifest, write_manifest

    manifest = read_manifest(out)
    if manifest is None:
        return
    prediction = take_prediction(out, stage, fingerprint)
    if prediction is not None:
        manifest["prediction"] = {k: v for k, v in prediction.items() if k != "input"}
    manifest.setdefault("runs", []).append(entry)
    write_manifest(out, manifest)


def manifest_comparison(manifest: dict) -> dict | None:
    """The dry run's prediction against the runs recorded in a manifest."""
    return comparison(manifest.get("prediction"), manifest.get("runs", []))
