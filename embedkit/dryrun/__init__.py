"""Dry runs: `encode --dry-run` and `generate --dry-run`.

A dry run counts INPUT's tokens (planning's sampling), runs the real stage on a random sample
in a temporary folder to measure this device, and extrapolates time, bytes and cost with
planning's fleet model. It sits above the stages it calibrates with (pipeline, generation);
planning itself imports no stage, so the stages can use its shard policy.
"""

from .encode import DryRun, dry_run_encode, sweep_budgets
from .generate import GenerateDryRun, count_prompt_tokens, dry_run_generate

__all__ = ["DryRun", "dry_run_encode", "sweep_budgets", "GenerateDryRun", "count_prompt_tokens", "dry_run_generate"]
