"""Plots: a plan's cost curves (`embedkit plan --plot`) and a run's timeline (`embedkit status --plot`).

matplotlib is optional (`pip install 'embedkit[plot]'`). Each function writes a PNG and returns
the series it drew, so what the picture shows can be checked without looking at it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import EmbedkitError
from ..run.distributed import straggler_tail
from .planning import PlanInput, fleet_at, gpus_text, plan_fleet


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise EmbedkitError("--plot needs matplotlib: pip install 'embedkit[plot]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_plan(p: PlanInput, path: str | Path) -> dict:
    """Three panels: finish time and total cost against fleet size (the window marked), and
    $/1M tokens against the spot discount for the planned fleet."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    plan = plan_fleet(p)
    work = p.tokens / plan.effective_tokens_per_second
    top = max(plan.fleet.gpus * 2, plan.fleet.gpus + 4)
    fleets = [fleet_at(p, g, work, plan.shard_seconds, plan.price_per_gpu_hour) for g in range(1, top + 1)]
    discounts = [d / 100 for d in range(0, 91, 5)]
    per_million = [plan_fleet(replace(p, spot_discount=d)).fleet.dollars_per_million_tokens for d in discounts]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    gpus = [f.gpus for f in fleets]
    axes[0].plot(gpus, [f.hours for f in fleets], marker="o", ms=3)
    axes[0].axhline(p.window_hours, color="red", ls="--", label=f"window {p.window_hours:g} h")
    axes[0].axvline(plan.fleet.gpus, color="green", ls=":", label=f"plan: {gpus_text(plan.fleet.gpus)}")
    axes[0].set(xlabel="GPUs", ylabel="hours to finish", title="finish time")
    axes[0].legend()
    axes[1].plot(gpus, [f.total_dollars for f in fleets], marker="o", ms=3)
    axes[1].axvline(plan.fleet.gpus, color="green", ls=":")
    axes[1].set(xlabel="GPUs", ylabel="$ total", title="bill (every GPU held to the end)")
    axes[2].plot([100 * d for d in discounts], per_million, marker="o", ms=3)
    axes[2].set(xlabel="spot discount %", ylabel="$ per 1M tokens", title=f"cost per token at {gpus_text(plan.fleet.gpus)}")
    for ax in axes[:2]:  # a fleet is a whole number of GPUs
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{p.tokens:,.0f} tokens at {p.tokens_per_second:,.0f} tokens/s per GPU, ${p.gpu_price:g}/GPU-h on demand")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"gpus": gpus, "hours": [f.hours for f in fleets], "dollars": [f.total_dollars for f in fleets],
            "discounts": discounts, "dollars_per_million_tokens": per_million, "planned_gpus": plan.fleet.gpus,
            "gpu_ticks": [float(t) for t in axes[0].get_xticks()], "legend": axes[0].get_legend_handles_labels()[1]}  # fmt: skip


def plot_timeline(log: list[dict], path: str | Path, title: str = "") -> dict:
    """One row per worker, one bar per committed shard from its start to its commit."""
    plt = _pyplot()
    timed = [e for e in log if e.get("started") is not None and e.get("committed") is not None]
    if not timed:
        raise EmbedkitError("no committed shard records its start and end (outputs written before this version do not)")
    t0 = min(e["started"] for e in timed)
    workers = sorted({e["worker"] or "?" for e in timed})
    row = {w: i for i, w in enumerate(workers)}
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.45 * len(workers)))
    bars = []
    for e in timed:
        start, width = e["started"] - t0, e["committed"] - e["started"]
        ax.barh(row[e["worker"] or "?"], width, left=start, height=0.6, edgecolor="black")
        ax.text(start + width / 2, row[e["worker"] or "?"], str(e["shard"]), ha="center", va="center", fontsize=7)
        bars.append({"shard": e["shard"], "worker": e["worker"], "start": start, "seconds": width})
    tail = straggler_tail([e["committed"] for e in timed])
    ax.set_yticks(range(len(workers)), workers)
    ax.set(xlabel="seconds since the first shard started", title=title or f"{len(timed)} shards; tail from 95% to 100%: {tail:.1f} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"bars": bars, "workers": workers, "tail_seconds": tail}


def plot_batch_sweep(sweep: tuple | list, path: str | Path, title: str = "") -> dict:
    """$/1M tokens (or, without a price, tokens/s) against the batch budget, from the points
    that `encode --dry-run --plot` measured on this device."""
    if not sweep:
        raise EmbedkitError("no batch sizes were measured")
    plt = _pyplot()
    budgets = [p["batch_tokens"] for p in sweep]
    priced = all(p.get("dollars_per_million_tokens") is not None for p in sweep)
    ys = [p["dollars_per_million_tokens"] if priced else p["tokens_per_second"] for p in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(budgets, ys, marker="o")
    ax.set_xscale("log", base=2)
    for b, y, p in zip(budgets, ys, sweep):
        ax.annotate(f"pad {100 * p['padding_overhead']:.0f}%", (b, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set(xlabel="batch budget (padded tokens per forward pass)", ylabel="$ per 1M tokens" if priced else "tokens/s",
           title=title or ("cost per token against batch size" if priced else "throughput against batch size"))  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"batch_tokens": budgets, "y": ys, "priced": priced}
