"""What both dry runs share: the calibration budget, the imports a real run pays, folder sizes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

CALIBRATION_SHARE = 0.10
MAX_CALIBRATION_S = 30.0


def preload(stage: str) -> None:
    """Import what the real run imports before the dry run's own work is timed: the real run
    pays those imports, so they belong to its fixed costs, not to the work the dry run subtracts
    (counting tokens imports the tokenizer libraries too: 7 s of generate's fixed costs went
    missing on the H200 this way)."""
    import lance  # noqa: F401
    import torch  # noqa: F401

    if stage == "generate":
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        from ..generation import pipeline  # noqa: F401
    else:
        from ..encoding import pipeline  # noqa: F401,F811


def folder_bytes(path: Path) -> int:
    """Bytes of the files under `path`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cost_line(seconds: float, expected: float, recorded: str | None) -> str:
    """The dry run's last line: what it cost, as a share of the run it predicts, and where its prediction was left."""
    share = f" ({100 * seconds / expected:.0f}% of the predicted run)" if expected else ""
    left = f"its prediction is left in {recorded} for `embedkit status` to compare" if recorded else "nothing was written"
    return f"this dry run took {seconds:.1f} s{share}; {left}"


@contextlib.contextmanager
def kernel_compiles(gpu: bool) -> Iterator[list[float]]:
    """Seconds Triton spends compiling kernels inside the block ([seconds], filled as it goes).

    A machine compiles each kernel once and keeps it in Triton's on-disk cache, so the real run
    after a dry run loads what the dry run compiled: those seconds are not the real run's (on a
    fresh H200 machine, 1.96 s of a dry run's fixed costs that the run then did not have). Cache
    hits are not counted: loading a cached kernel is a cost the real run pays too. Nothing is
    counted without a GPU, or with a Triton that has no compilation listener."""
    spent = [0.0]
    knobs = None
    if gpu:
        try:
            from triton import knobs
        except ImportError:
            knobs = None
    if knobs is None or not hasattr(getattr(knobs, "compilation", None), "listener"):
        yield spent
        return
    before = knobs.compilation.listener

    def heard(**kw) -> None:
        total = getattr(kw.get("times"), "total", None)
        if not kw.get("cache_hit", True) and total is not None:
            spent[0] += total / 1e6  # microseconds
        if before is not None:
            before(**kw)

    knobs.compilation.listener = heard
    try:
        yield spent
    finally:
        knobs.compilation.listener = before
