"""Classify accuracy and label-order sensitivity: how labels are scored, measured on texts with an unambiguous label.

data/classify.jsonl holds three labelled sets: `topics` (40 short texts, 8 each about an animal,
food, a sport, an emotion or a tool), `sentiment` (20 reviews, positive or negative) and `docs`
(10 paragraphs of data/sample.parquet, the Python docs, labelled programming, and 10 off-topic
texts about cooking or travel). Each set is classified with `embedkit.generate(task="classify")`
(the default model, on CPU by default) once per prompt and answer below, with its labels in the
given order, reversed and shuffled (seed 0). Every run writes `label_logprobs` (log p of the
label's tokens, summed) and `label_scores` (the same less the label's log-probability after
content-free texts), so each way of choosing a label is read off the same runs:

- sum: argmax of label_logprobs (embedkit before calibration);
- mean: label_logprobs per label token;
- calibrated: argmax of label_scores (embedkit's `label`);
- calibrated mean: label_scores per label token.

For each set the table gives the accuracy in each order and the fraction of texts whose label is
the same in every order.

    python benchmarks/bench_classify.py                      # every variant (about 5 min on 2 idle CPU cores)
    python benchmarks/bench_classify.py --variants unlisted-answer --sets topics
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DATA = Path(__file__).resolve().parents[1] / "data" / "classify.jsonl"
SETS = {"topics": ("animal", "food", "sport", "emotion", "tool"), "sentiment": ("positive", "negative"),
        "docs": ("programming", "cooking", "travel")}  # fmt: skip
LISTED = "Classify the text as one of: {labels}.\n\n{text}"  # the default prompt before calibration
UNLISTED = "What is this text about?\n\n{text}"  # the default prompt now
ANSWER = "This text is about {label}"  # the default answer now
# name: (prompt, answer, rules); "{label}" alone scores the label right after "<|im_start|>assistant\n",
# " {label}" the same with a leading space. "listed" with "sum" is embedkit before calibration.
VARIANTS = {
    "listed": (LISTED, "{label}", ("sum", "mean", "calibrated", "calibrated mean")),
    "listed-space": (LISTED, " {label}", ("sum", "calibrated")),
    "listed-answer": (LISTED, ANSWER, ("sum", "calibrated")),
    "unlisted": (UNLISTED, "{label}", ("sum", "calibrated")),
    "unlisted-answer": (UNLISTED, ANSWER, ("sum", "mean", "calibrated", "calibrated mean")),  # the default
}


def orders(labels: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """The given order, reversed and shuffled; an order equal to an earlier one is left out."""
    shuffled = list(labels)
    random.Random(0).shuffle(shuffled)
    out: dict[str, tuple[str, ...]] = {}
    for name, order in (("given", labels), ("reversed", labels[::-1]), ("shuffled", tuple(shuffled))):
        if order not in out.values():
            out[name] = order
    return out


def classify(rows: list[dict], labels: tuple[str, ...], prompt: str, answer: str, work: Path, device: str) -> dict[str, dict]:
    """id -> output row of one generate run over `rows`."""
    import lance

    import embedkit

    src, out = work / "in.parquet", work / "out"
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]}), src)
    embedkit.generate(src, out, task="classify", labels=labels, prompt=prompt, completion=answer, device=device,
                      overwrite=True, progress=False)  # fmt: skip
    return {r["id"]: r for r in lance.dataset(str(out / "generations.lance")).to_table().to_pylist()}


def choose(got: dict, labels: tuple[str, ...], label_tokens: np.ndarray, rule: str) -> dict[str, str]:
    """id -> label chosen by `rule` from a run's columns."""
    out = {}
    for i, row in got.items():
        score = np.array(row["label_scores" if rule.startswith("calibrated") else "label_logprobs"])
        if rule.endswith("mean"):
            score = score / label_tokens
        out[i] = labels[int(np.argmax(score))]
    return out


def measure(name: str, set_name: str, rows: list[dict], work: Path, device: str, tok) -> list[dict]:
    """One result per rule of variant `name` on one set: accuracy per order and agreement over orders."""
    from embedkit.generation.prompts import answer_tokens

    prompt, answer, rules = VARIANTS[name]
    gold = {r["id"]: r["label"] for r in rows}
    runs = {}
    for order_name, labels in orders(SETS[set_name]).items():
        lengths = np.array([len(t) for t in answer_tokens(tok, answer, labels)[1]])
        runs[order_name] = (labels, lengths, classify(rows, labels, prompt, answer, work, device))
    results = []
    for rule in rules:
        chosen = {o: choose(got, labels, lengths, rule) for o, (labels, lengths, got) in runs.items()}
        accuracy = {o: float(np.mean([c[i] == g for i, g in gold.items()])) for o, c in chosen.items()}
        same = float(np.mean([len({c[i] for c in chosen.values()}) == 1 for i in gold]))
        results.append({"variant": name, "rule": rule, "set": set_name, "accuracy": accuracy, "same_in_every_order": same})
    return results


def table(results: list[dict], sets: list[str]) -> str:
    head = "| variant | answer | rule | " + " | ".join(f"{s}: accuracy (orders) | {s}: same" for s in sets) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(sets))]
    keys = list(dict.fromkeys((r["variant"], r["rule"]) for r in results))
    for variant, rule in keys:
        cells = []
        for s in sets:
            r = next(x for x in results if (x["variant"], x["rule"], x["set"]) == (variant, rule, s))
            cells += [" / ".join(f"{a:.2f}" for a in r["accuracy"].values()), f"{r['same_in_every_order']:.2f}"]
        answer = VARIANTS[variant][1]
        lines.append(f"| {variant} | `{answer}` | {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of: {', '.join(SETS)}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from embedkit.config import DEFAULT_GENERATOR
    from embedkit.generation.model import resolve_generator

    tok = AutoTokenizer.from_pretrained(resolve_generator(DEFAULT_GENERATOR))
    data = [json.loads(line) for line in DATA.read_text().splitlines()]
    sets = args.sets.split(",")
    results = []
    work = Path(tempfile.mkdtemp(prefix="bench-classify-"))
    try:
        for name in args.variants.split(","):
            for s in sets:
                results += measure(name, s, [r for r in data if r["set"] == s], work, args.device, tok)
                print(f"{name} / {s}: done", flush=True)
                if args.json:  # after each set: a long run that stops keeps what it measured
                    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for s in sets:
        print(f"{s} orders: " + "; ".join(f"{k} ({', '.join(v)})" for k, v in orders(SETS[s]).items()))
    print(table(results, sets))


if __name__ == "__main__":
    main()
