"""Summarize throughput: embedkit's generate against transformers' `generate`, in one run.

A model of SmolLM2-135M's shape (RANDOM WEIGHTS unless --model is given: throughput does not
depend on the values, and greedy decoding of random weights rarely meets an end-of-sequence
token, so every prompt gets --max-new-tokens) summarizes pydocs paragraphs with the default
summarize prompt in the model's chat template.

First embedkit's default (batch_size unset: as many KV-cache slots as memory allows, up to
4096) over all --docs documents, end to end. Then, for each --batch-sizes B, on the same random
sample of --baseline-batches x B documents whose prompts have at most --baseline-max-prompt
tokens (sorted by prompt length, cut into batches of B):
- transformers `model.generate(do_sample=False)`, bf16, default dynamic cache;
- the same with `cache_implementation="static"` (compiles the decode step), timed on a second
  pass after a warm-up pass over the same batches;
- embedkit's `generate(task="summarize", batch_size=B)` end to end (parquet in, Lance out),
  timed like the static cache on a second pass (the first pass's seconds reported beside it).

Before timing, a check on --check-docs prompts: embedkit's decoder with its CUDA-graph step
must give exactly the tokens of the same decoder run eagerly; agreement with transformers'
greedy tokens (bf16: kernels differ, so ties can flip a token) is reported, not required.

    python benchmarks/bench_generate.py --corpus pydocs.parquet --docs 20000 --batch-sizes 1024,256,32
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PROMPT = "Summarize in one sentence:\n{text}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="32,256,1024")
    ap.add_argument("--baseline-batches", type=int, default=4, help="batches per transformers configuration")
    ap.add_argument("--baseline-max-prompt", type=int, default=512,
                    help="per-batch comparisons draw prompts of at most this many tokens (0: any): transformers pads a batch "
                         "to its longest prompt, and pydocs' few 5k-token prompts put batch 1024 out of memory")  # fmt: skip
    ap.add_argument("--check-docs", type=int, default=256)
    ap.add_argument("--model", default=None, help="a transformers folder (default: SmolLM2-135M shape, random weights)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for the random model (default: the default generator's)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-static", action="store_true", help="skip the static-cache baseline")
    ap.add_argument("--no-dynamic", action="store_true", help="skip the dynamic-cache baseline (the slower of the two)")
    ap.add_argument("--default-slots", default="",
                    help="comma-separated slot counts: more default-configuration rows over all --docs with these many slots at most")  # fmt: skip
    ap.add_argument("--precisions", default="", help="also run the default row at these precisions (e.g. fp8), each in its own process")
    ap.add_argument("--ab-prefix", action="store_true",
                    help="also run the default row with the prompts' shared start kept in every slot (not stored once)")
    ap.add_argument("--ab-prefill-kernel", action="store_true",
                    help="also the default row with the prefill through flash attention (not the prefill kernel), twice each, alternating")
    ap.add_argument("--ab-warm-up", action="store_true",
                    help="also the default row without the decoder's host-side warm-up beside the model's load (twice each, alternating)")
    ap.add_argument("--check-only", action="store_true", help="only the decoder's check on --check-docs prompts, then exit")
    ap.add_argument("--headline-only", action="store_true", help="only embedkit's default run over all --docs (no check, no baselines)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="only profile embedkit's decoder on N docs at --profile-slots slots (top GPU kernels), then exit")  # fmt: skip
    ap.add_argument("--profile-slots", type=int, default=16_384,
                    help="slots of the --profile and --first-call runs (runs 3 to 15 used 4,096; --first-call 1,024)")
    ap.add_argument("--first-call", type=int, default=0, metavar="N",
                    help="only: where a fresh process's first decoder run over N prompts spends its time (cProfile), then a second run")
    ap.add_argument("--shard-rows", type=int, default=None, help="embedkit's rows per shard (default: the stage's, one shard for these corpora)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="embedkit-bench-gen-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = Path(args.model) if args.model else random_model(work, args.tokenizer)
    texts = pq.read_table(args.corpus, columns=["text"]).column("text").combine_chunks().slice(0, args.docs).to_pylist()
    ids = prompts(folder, texts)
    lengths = np.array([len(p) for p in ids])
    print(f"model {folder} ({'RANDOM WEIGHTS' if not args.model else 'as given'}); {len(texts)} docs; prompt tokens "
          f"mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, p99 {np.percentile(lengths, 99):.0f}, max {lengths.max()}", flush=True)  # fmt: skip
    report: dict = {"model": str(folder), "random_weights": not args.model, "docs": len(texts), "max_new_tokens": args.max_new_tokens,
                    "prompt_tokens_mean": float(lengths.mean()), "device": device_name(args.device)}  # fmt: skip
    if args.profile:
        print(isolated(profile, folder, ids[: args.profile], args), flush=True)
        return
    if args.first_call:
        print(isolated(first_call, folder, ids[: args.first_call], args), flush=True)
        return
    rows = []
    if args.check_only:
        report["check"] = isolated(check, folder, [ids[i] for i in range(min(args.check_docs, len(ids)))], args)
        print(json.dumps(report["check"]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        return
    if not args.headline_only:
        report["check"] = isolated(check, folder, [ids[i] for i in range(min(args.check_docs, len(ids)))], args)
        print(json.dumps(report["check"]), flush=True)
    attempt(rows, bench_embedkit, folder, texts, None, args, work)  # the headline row first: a long run may be cut short
    for slots in (int(x) for x in args.default_slots.split(",") if x):
        attempt(rows, bench_embedkit, folder, texts, slots, args, work)
    if args.ab_prefix:
        attempt(rows, bench_embedkit, folder, texts, None, args, work, share_prefix=False)
    for _ in range(2) if args.ab_prefill_kernel else ():
        attempt(rows, bench_embedkit, folder, texts, None, args, work, prefill_kernel=False)
        attempt(rows, bench_embedkit, folder, texts, None, args, work)
    for _ in range(2) if args.ab_warm_up else ():
        attempt(rows, bench_embedkit, folder, texts, None, args, work, warm_up=False)
        attempt(rows, bench_embedkit, folder, texts, None, args, work)
    for precision in (p for p in args.precisions.split(",") if p):
        attempt(rows, bench_embedkit, folder, texts, None, args, work, precision=precision)
    for r in rows:  # every document, the default options (or only the slot count changed): not an equal-batch row
        r["default_docs"] = True
    rng = np.random.default_rng(0)
    pool = np.flatnonzero(lengths <= args.baseline_max_prompt) if args.baseline_max_prompt else np.arange(len(texts))
    report["baseline_max_prompt"] = args.baseline_max_prompt
    for bs in (int(x) for x in args.batch_sizes.split(",")) if not args.headline_only else ():
        subset = np.sort(rng.choice(pool, size=min(len(pool), bs * args.baseline_batches), replace=False))
        if not args.no_dynamic:
            attempt(rows, bench_transformers, folder, [ids[i] for i in subset], bs, args, static=False)
        if not args.no_static:
            attempt(rows, bench_transformers, folder, [ids[i] for i in subset], bs, args, static=True)
        # timed on a second pass like the static cache (its warm-up pass compiles the step): the first
        # pass pays this process's one-time costs (kernel loads, captured steps), reported beside it
        attempt(rows, bench_embedkit, folder, [texts[i] for i in subset], bs, args, work, second_pass=True)
    best = max((r["new_tok_s"] for r in rows if r["engine"] == "transformers"), default=float("nan"))
    # equal batch sizes on the same prompts first; then embedkit's default configuration, labelled
    equal = [r for r in rows if not r.get("default_docs")]
    print("\n| engine | cache | batch | docs | new tokens | seconds | new tok/s | x best transformers | decoder s | decoder new tok/s | x best transformers |")
    print("|---" * 11 + "|")
    for r in equal + [r for r in rows if r.get("default_docs")]:
        dec = r.get("decoder_s")
        tail = f"{dec:.1f} | {r['new_tokens'] / dec:,.0f} | {r['new_tokens'] / dec / best:.2f}x" if dec else "- | - | -"
        batch = f"{r['batch']} (all docs)" if r.get("default_docs") else r["batch"]
        print(f"| {r['engine']} | {r['cache']} | {batch} | {r['docs']:,} | {r['new_tokens']:,} | {r['seconds']:.1f} | "
              f"{r['new_tok_s']:,.0f} | {r['new_tok_s'] / best:.2f}x | {tail} |")  # fmt: skip
    report["rows"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def isolated(fn, *a, **kw):
    """fn in a fresh process: each configuration gets the whole GPU (compiled graphs and caches
    of an earlier one would otherwise hold its memory)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(fn, *a, **kw).result()


def attempt(rows: list, fn, *a, **kw) -> None:
    """One configuration in its own process; a failure is printed and the others still run."""
    import traceback

    try:
        rows.append(isolated(fn, *a, **kw))
        print(json.dumps(rows[-1]), flush=True)
    except Exception:
        traceback.print_exc()


def random_model(work: Path, tokenizer: str | None) -> Path:
    """SmolLM2-135M's shape with random weights, and the default model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = work / "smollm2-135m-random"
    if (folder / "config.json").exists():
        return folder
    if tokenizer is None:
        from embedkit.generation.model import resolve_generator

        tokenizer = resolve_generator("SmolLM2-135M-Instruct")
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
    return folder


def prompts(folder: Path, texts: list[str]) -> list[list[int]]:
    """Token ids of the default summarize prompt, exactly as embedkit builds them."""
    from transformers import AutoTokenizer

    from embedkit.generation.prompts import fit_prompts

    tok = AutoTokenizer.from_pretrained(folder)
    return [p for p, _ in fit_prompts(tok, PROMPT, [{"text": t, "id": i} for i, t in enumerate(texts)], 8192 - 64, chat=True)]


def load(folder: Path, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    return model, tok


def check(folder: Path, ids: list[list[int]], args) -> dict:
    """embedkit's decoder: CUDA-graph steps against eager steps (must be equal), and against transformers."""
    import torch

    from embedkit.engine.attention import reference_attention, slot_attention
    from embedkit.engine.decode import SlotDecoder

    model, tok = load(folder, args.device)
    eos = {tok.eos_token_id}
    graphs = SlotDecoder(model, eos_ids=eos, graphs=args.device.startswith("cuda")).run(ids, max_new=args.max_new_tokens, max_slots=64)

    def eager_without(*switches: str) -> tuple[bool, list]:
        """The eager decoder with some of its fast paths switched off: (was the first on, its tokens)."""
        decoder = SlotDecoder(model, eos_ids=eos, graphs=False)
        used = bool(getattr(decoder, switches[0])) if switches else True
        for switch in switches:
            setattr(decoder, switch, False)
        return used, decoder.run(ids, max_new=args.max_new_tokens, max_slots=64)

    _, eager = eager_without()
    reused = reused_decoder(model, eos, ids, args)
    kernel_used, dense = eager_without("kernel", "prefill_kernel")  # dense masked attention instead of the per-slot kernels
    prefill_kernel_used, flash = eager_without("prefill_kernel")  # prefill through flash attention's variable-length kernel
    varlen_used, padded = eager_without("varlen", "prefill_kernel")  # packed prefill through the padded SDPA reference
    fused_used, unfused = eager_without("fuse_kernels")  # norms, rotary and SiLU-and-multiply as plain PyTorch
    prefix_used, whole = eager_without("share_prefix")  # every slot holding its whole prompt, the shared start too
    g = torch.Generator(device=args.device).manual_seed(0)
    q = torch.randn((256, 3, 3, 64), generator=g, device=args.device, dtype=torch.bfloat16)
    k, v = (torch.randn((256, 3, 1100, 64), generator=g, device=args.device, dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.randint(1, 1101, (256,), generator=g, device=args.device)
    err = (slot_attention(q, k, v, lengths, 0.125).float() - reference_attention(q.float(), k.float(), v.float(), lengths, 0.125)).abs().max().item()
    same_hf = 0
    for p, mine in zip(ids[:8], graphs[:8]):
        with torch.inference_mode():
            seq = model.generate(input_ids=torch.tensor([p], device=args.device), attention_mask=torch.ones(1, len(p), dtype=torch.long, device=args.device),
                                 do_sample=False, max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id)  # fmt: skip
        new = seq[0, len(p) :].tolist()
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        same_hf += new == mine
    return {"prompts": len(ids), "graph_equals_eager": sum(a == b for a, b in zip(graphs, eager)), "attention_kernel": kernel_used,
            "kernel_max_abs_error_bf16": err, "kernel_equals_dense_decoding": sum(a == b for a, b in zip(eager, dense)),
            "fused_kernels": fused_used, "fused_equals_unfused": sum(a == b for a, b in zip(eager, unfused)),
            "first_token_fused_equals_unfused": sum(a[:1] == b[:1] for a, b in zip(eager, unfused)),
            "fused_kernels_bf16_equal_share": fused_kernel_agreement(args.device) if args.device.startswith("cuda") else None,
            "prefill_kernel": prefill_kernel_used, "prefill_kernel_equals_flash_prefill": sum(a == b for a, b in zip(eager, flash)),
            "first_token_prefill_kernel_equals_flash": sum(a[:1] == b[:1] for a, b in zip(eager, flash)),
            "prefill_varlen_kernel": varlen_used, "varlen_prefill_equals_padded_prefill": sum(a == b for a, b in zip(eager, padded)),
            "first_token_varlen_equals_padded": sum(a[:1] == b[:1] for a, b in zip(eager, padded)),
            "shared_prefix": prefix_used, "shared_prefix_equals_whole_prompts": sum(a == b for a, b in zip(eager, whole)),
            "first_token_shared_prefix_equals_whole": sum(a[:1] == b[:1] for a, b in zip(eager, whole)),
            "compared_to_transformers": min(8, len(ids)), "equal_to_transformers": same_hf, **reused}  # fmt: skip


def reused_decoder(model, eos: set[int], ids: list[list[int]], args) -> dict:
    """One decoder over runs of other group shapes, like a process over shards (its cache, slot
    buffers and captured steps kept between runs), against a new decoder for each run: the
    tokens must be equal. A small cache budget cuts each run into several groups."""
    from embedkit.engine.decode import SlotDecoder

    graphs, budget = args.device.startswith("cuda"), 64 * 1024
    one = SlotDecoder(model, eos_ids=eos, graphs=graphs, cache_tokens=budget)
    same = total = 0
    for part, slots in ((ids, 64), (ids[len(ids) // 2 :], 32), (ids, 64)):
        got = one.run(part, max_new=args.max_new_tokens, max_slots=slots)
        want = SlotDecoder(model, eos_ids=eos, graphs=graphs, cache_tokens=budget).run(part, max_new=args.max_new_tokens, max_slots=slots)
        same, total = same + sum(a == b for a, b in zip(got, want)), total + len(part)
    return {"reused_decoder_rows": total, "reused_decoder_equals_new": same, "reused_decoder_groups": len(one.stats["groups"]),
            "reused_decoder_last_run_captures": one.stats["captures"]}  # fmt: skip


def fused_kernel_agreement(device: str) -> dict:
    """Share of bf16 output elements where each fused kernel equals the PyTorch code it replaces."""
    import torch

    from embedkit.engine import fused

    g = torch.Generator(device=device).manual_seed(1)

    def rand(*shape):
        return torch.randn(shape, generator=g, device=device).to(torch.bfloat16)

    x, d, w = rand(4096, 576), rand(4096, 576), rand(576)
    qk, angles, gu = rand(4096, 12, 64), torch.rand((4096, 32), generator=g, device=device) * 100, rand(4096, 3072)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(torch.bfloat16), torch.cat([angles.sin()] * 2, -1).to(torch.bfloat16)
    pairs = {
        "rms_norm": [fused.rms_norm(x, w, 1e-5, kernel=k) for k in (True, False)],
        "add_rms_norm": [fused.add_rms_norm(x, d, w, 1e-5, kernel=k)[1] for k in (True, False)],
        "rope": [fused.rope(qk, cos, sin, kernel=k) for k in (True, False)],
        "silu_mul": [fused.silu_mul(gu, kernel=k) for k in (True, False)],
    }
    return {name: round(float((a == b).float().mean()), 5) for name, (a, b) in pairs.items()}


def profile(folder: Path, ids: list[list[int]], args) -> str:
    """Where the decoder's GPU time goes: a warm run, then profiled runs, top kernels by GPU time:
    prefill alone (one new token per prompt), then the whole decode."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from embedkit.engine.decode import SlotDecoder

    model, tok = load(folder, args.device)
    decoder = SlotDecoder(model, eos_ids={tok.eos_token_id})
    decoder.run(ids, max_new=args.max_new_tokens, max_slots=args.profile_slots)  # warm: kernels compiled, steps captured
    parts = []
    for name, max_new in (("prefill only (max_new 1)", 1), ("whole decode", args.max_new_tokens)):
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            decoder.run(ids, max_new=max_new, max_slots=args.profile_slots)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        parts.append(f"== {name}: decoder stats {json.dumps(decoder.stats)}\n{table}")
    return "\n".join(parts)


def first_call(folder: Path, ids: list[list[int]], args) -> str:
    """A fresh process's first decoder run (kernel compiles or cache loads, library set-up) under
    cProfile, its seconds against a second run of the same prompts."""
    import cProfile
    import io
    import pstats

    from embedkit.engine.decode import SlotDecoder

    model, tok = load(folder, args.device)
    sync(args.device)
    decoder = SlotDecoder(model, eos_ids={tok.eos_token_id})
    prof = cProfile.Profile()
    runs = []
    for i in range(2):
        t0 = time.perf_counter()
        if i == 0:
            prof.enable()
        decoder.run(ids, max_new=args.max_new_tokens, max_slots=args.profile_slots)
        sync(args.device)
        if i == 0:
            prof.disable()
        runs.append({"seconds": round(time.perf_counter() - t0, 3), **{k: decoder.stats[k] for k in ("prefill_s", "capture_s", "steps")}})
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(45)
    return f"first run {json.dumps(runs[0])}\nsecond run {json.dumps(runs[1])}\n{out.getvalue()}"


def bench_transformers(folder: Path, ids: list[list[int]], batch: int, args, static: bool) -> dict:
    """transformers' generate over the prompts, grouped by length, greedy, bf16."""
    import torch

    from embedkit.generation.tasks import left_pad

    model, tok = load(folder, args.device)
    order = np.argsort([len(p) for p in ids], kind="stable")
    batches = [order[s : s + batch] for s in range(0, len(order), batch)]
    extra = {"cache_implementation": "static"} if static else {}

    def run(selected) -> int:
        new = 0
        for rows in selected:
            x, m = left_pad([ids[r] for r in rows], tok.pad_token_id)
            width = x.shape[1]
            with torch.inference_mode():
                out = model.generate(input_ids=x.to(args.device), attention_mask=m.to(args.device), do_sample=False,
                                     max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id, **extra)  # fmt: skip
            new += int((out[:, width:] != tok.pad_token_id).sum())
        return new

    warm = 0.0
    if static:
        t = time.perf_counter()
        # warm-up, longest batch first: transformers sizes a static cache to the longest length it
        # has seen, so every later batch reuses the one compiled decode step
        run(batches[::-1])
        warm = time.perf_counter() - t
    sync(args.device)
    t = time.perf_counter()
    new = run(batches)
    sync(args.device)
    seconds = time.perf_counter() - t
    return {"engine": "transformers", "cache": "static" if static else "dynamic", "batch": batch, "docs": len(ids), "new_tokens": new,
            "seconds": seconds, "new_tok_s": new / seconds, "warmup_s": warm}  # fmt: skip


def bench_embedkit(folder: Path, texts: list[str], batch: int | None, args, work: Path, share_prefix: bool = True,
                   precision: str = "auto", warm_up: bool = True, second_pass: bool = False, prefill_kernel: bool = True) -> dict:  # fmt: skip
    """embedkit.generate end to end: parquet in, prompts, decoding, Lance out (model load excluded).
    share_prefix=False: the A/B row, every slot holding its whole prompt; warm_up=False: without
    the decoder's host-side warm-up beside the model's load; prefill_kernel=False: the prefill through
    flash attention; second_pass: the same call twice in this process, the second timed (the first's seconds kept
    as `first_pass_s`). `call_s`: the whole `generate` call, the model's load included."""
    import embedkit
    import embedkit.engine.decode as decode
    import embedkit.generation.tasks as tasks
    from embedkit.run.record import marks

    decode.SHARE_PREFIX = share_prefix  # this configuration's own process
    decode.PREFILL_KERNEL = prefill_kernel
    tasks.HOST_WARM_UP = warm_up
    src = work / f"docs-{len(texts)}.parquet"
    pq.write_table(pa.table({"id": pa.array([f"d{i}" for i in range(len(texts))]), "text": texts}), src)
    first = None
    for attempt_no in range(2 if second_pass else 1):
        out = work / f"gen-{batch or 'default'}-{precision}-{warm_up}-{attempt_no}"
        shutil.rmtree(out, ignore_errors=True)
        called = time.perf_counter()
        s = embedkit.generate(src, out, task="summarize", model=str(folder), device=args.device, max_new_tokens=args.max_new_tokens,
                              batch_size=batch, progress=False, precision=precision, shard_rows=args.shard_rows)  # fmt: skip
        call_s = time.perf_counter() - called
        first = s.seconds if first is None else first
    cache = ("slots" if share_prefix else "slots, whole prompts") + ("" if warm_up else ", no host warm-up")
    cache += "" if prefill_kernel else ", flash prefill"
    row = {"engine": "embedkit", "cache": cache if precision == "auto" else f"{cache}, {precision}", "batch": batch or "default", "docs": s.docs, "new_tokens": s.new_tokens,
           "seconds": s.seconds, "new_tok_s": s.new_tokens / s.seconds, "decoder_s": s.decode.get("seconds"), "decode": s.decode, "phases": s.phases, "call_s": call_s, "marks": marks()}  # fmt: skip
    if second_pass:
        row["first_pass_s"] = first
    if args.model:  # real weights: are the summaries text?
        row["summaries"] = summary_stats(out, args.max_new_tokens)
    return row


def summary_stats(out: Path, max_new: int) -> dict:
    """What real weights wrote: a few summaries beside their documents, the share of summaries
    that ended on the end-of-sequence token before max_new, and the share of their characters
    that are letters, spaces or ordinary punctuation (noise decodes to other symbols and runs on)."""
    import lance

    t = lance.dataset(str(out / "generations.lance")).to_table().to_pylist()
    texts = [r.get("summary") or r.get("text") or "" for r in t]
    counts = [r.get("new_tokens") for r in t if r.get("new_tokens") is not None]
    chars = "".join(texts)
    plain = sum(c.isalpha() or c.isspace() or c in ".,;:'\"()-" for c in chars) / max(1, len(chars))
    return {"examples": texts[:5], "columns": sorted(t[0]) if t else [], "plain_char_share": round(plain, 4),
            "ended_before_max_new": round(sum(c < max_new for c in counts) / len(counts), 4) if counts else None,
            "mean_new_tokens": round(sum(counts) / len(counts), 2) if counts else None}  # fmt: skip


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
