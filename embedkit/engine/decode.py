"""SlotDecoder: batched decoding over fixed KV-cache slots, the decode step replayed as a CUDA graph.

transformers' `generate` spends most of a decode step launching kernels (an eager step of a
135M model costs about the same at batch 32 as at 1024) and its static cache pads every row to
one shared length. For offline decoding of a whole corpus this engine instead:

- keeps one KV-cache *slot* per sequence: a slot holds its prompt from position 0, so rows of
  any length share a batch without left padding, and each row attends to its own prefix only;
- refills slots as sequences finish: the next waiting prompts (shortest first) are prefilled
  straight into the free slots while the others keep their caches, packed end to end with no
  padding (flash attention's variable-length kernel on CUDA);
- groups the corpus by prompt length: each group gets as many slots as fit the memory budget at
  its longest prompt, so short documents run in large batches and the long tail in smaller ones;
- stores the prompts' shared start once: prompts rendered from one template begin with the same
  tokens (the chat template's system turn and the instruction: 32 of SmolLM2's mean 116 on
  pydocs). That *prefix* is prefilled once, its keys and values kept in one place that every
  slot attends to first; each prompt's prefill and each slot's cache hold only the rest.
  Causal attention makes the prefix's keys and values the same in every prompt, so this is
  the same computation with less work (prefill tokens, cache bytes read per step);
- on CUDA, captures the decode step (every layer, all slots) once per attended length bucket as a
  CUDA graph and replays it: one launch per step instead of hundreds.

The weights are the model's own; the layer is computed here with fewer, larger kernels: q/k/v
and gate/up as one product each (weight copies made once), and on CUDA the norms (with the
residual add before them), the rotary embedding and SiLU-and-multiply as fused Triton kernels
(`fused.py`). It covers the decoder-only families whose layer is Llama's (Llama, Mistral
without a sliding window, Qwen2); `supported()` says why a model is not, and the caller falls
back to transformers' own `generate` on length-bucketed batches.

This module is long (about 700 lines) and kept whole on purpose: the slots, the shared prefix,
prefill, the decode step and its captured graphs all read and write one cache layout and one
set of per-slot buffers; split apart, each part would reach into the others' state. The pure
parts (`plan_groups`, `shared_prefix`, `step_width`) are functions tested with tables.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import EmbedkitError
from . import fused
from .attention import kernel_head_dim, prefill_attention, slot_attention, triton_usable

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
PLAIN_ROPE = (None, "default", "linear", "llama3")  # rotary variants that depend on the position only
LENGTH_BUCKET = 64  # attended length of a captured step: the longest active row, rounded up to this
SYNC_EVERY = 8  # decode steps between two looks at which rows finished
REFILL_FRACTION = 4  # refill when a quarter of the slots is free
PREFILL_TOKENS = {"cuda": 65_536, "cpu": 4_096}  # prompt tokens per packed prefill forward (no padding)
FUSE_MAX_BYTES = 2 << 30  # fused projection weights are copies: made only while they stay this small
CACHE_MEMORY_FRACTION = 0.6  # of the free device memory, for the KV cache
CAPTURE_WARM_UPS = 1  # eager steps before a capture: the first call's set-up (cuBLAS workspaces, kernel loads) is done by one
GRAPHS_KEPT = 8  # captured steps kept (least recently used dropped): each holds its logits, up to slots x vocabulary
STEP_WIDTH_MIN = 256  # narrowest decode step: when the running rows all sit below a slot index, steps cover only those slots
PREFIX_MIN = 8  # shortest shared prompt start worth storing once (below it the bookkeeping costs more than it saves)
PREFILL_KERNEL = True  # the prefill's own Triton kernel where the decode kernel runs (bench_generate.py --ab-prefill-kernel turns it off)
SHARE_PREFIX = True  # new decoders store the prompts' shared start once (benchmarks/bench_generate.py --ab-prefix turns it off)


def supported(lm: Any) -> str | None:
    """None when SlotDecoder can run this model, else the reason it cannot."""
    cfg = lm.config
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        return f"model type {kind!r} is not one of {', '.join(SUPPORTED_TYPES)}"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) not in PLAIN_ROPE:
        return f"rope type {rope.get('rope_type')!r} depends on more than the position"
    window = getattr(cfg, "sliding_window", None)
    if window and (kind != "qwen2" or getattr(cfg, "use_sliding_window", False)):
        if window < getattr(cfg, "max_position_embeddings", 0):
            return "sliding-window attention"
    layer = lm.model.layers[0]
    needed = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
    if not all(hasattr(layer, n) for n in needed) or not all(hasattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "its decoder layer is not Llama's"
    if hasattr(layer.self_attn, "q_norm"):
        return "per-head query/key norms"
    return None


class HostWork(Protocol):
    """Host work that `SlotDecoder.run` interleaves with decoding (the caller's, on its rows)."""

    def finished(self, tokens: list[list[int]], rows: list[int]) -> None:
        """Rows (indices into the prompts) whose new tokens are final, and those tokens."""

    def step(self) -> None:
        """A short piece of work (a few milliseconds), done while queued decode steps run on the GPU."""


@dataclass(frozen=True)
class Group:
    """Prompts (indices into the sorted order) decoded with `slots` slots of `capacity` positions."""

    start: int
    stop: int
    slots: int
    capacity: int


def plan_groups(lengths: list[int], max_new: int, max_slots: int, cache_tokens: int) -> list[Group]:
    """Cut prompts sorted by length into groups whose slots fit `cache_tokens` cached positions.

    A group grows while its full slot count still fits at its longest prompt; the next, longer
    prompts start a group with fewer, larger slots. Pure: tested with tables.
    """
    n = len(lengths)
    groups: list[Group] = []
    i = 0
    while i < n:
        cap = _capacity(lengths[i], max_new)
        top = min(max_slots, cache_tokens // cap)  # the most slots this group can have
        if top < 1:
            raise EmbedkitError(f"a prompt of {lengths[i]} tokens does not fit the KV-cache budget of {cache_tokens} positions")
        j = i + 1
        while j < n and min(top, j + 1 - i) * _capacity(lengths[j], max_new) <= cache_tokens:
            cap, j = _capacity(lengths[j], max_new), j + 1
        groups.append(Group(i, j, min(top, j - i, cache_tokens // cap), cap))
        i = j
    return groups


def _capacity(prompt_len: int, max_new: int) -> int:
    """Cache positions for a row: its prompt and max_new - 1 decoded tokens (the last is never fed back)."""
    need = prompt_len + max_new - 1
    return -(-need // LENGTH_BUCKET) * LENGTH_BUCKET


_HOST_WARM_UP: list = []  # the thread `start_host_warm_up` started in this process, if any


def start_host_warm_up() -> None:
    """Start, once per process and in a thread, the host-side set-up of a first decoder run that
    needs no GPU, so that it overlaps what the caller does next (loading the model, tokenizing).

    Triton keys its kernel cache by a hash of its own installed library, computed once per
    process before the first kernel launches: 0.41 s of a fresh process's first run on the H200
    machine (benchmarks.md, generate run 10). The hashing runs in hashlib, which releases the
    GIL. `SlotDecoder.run` waits for the thread before its first forward. Without Triton, or on
    any failure, this does nothing: the first launch computes the key as before."""
    import threading

    if _HOST_WARM_UP:
        return

    def warm() -> None:
        try:
            from triton.runtime.cache import triton_key

            triton_key()  # functools.lru_cache: every later kernel launch in the process reuses it
        except Exception:  # an older or newer Triton without it: the first launch computes its key
            pass

    thread = threading.Thread(target=warm, name="embedkit-host-warm-up", daemon=True)
    _HOST_WARM_UP.append(thread)
    thread.start()


def _wait_for_host_warm_up() -> None:
    for thread in _HOST_WARM_UP:
        thread.join()


class SlotDecoder:
    """Greedy or sampled decoding of many prompts over KV-cache slots (see the module docstring)."""

    def __init__(self, lm: Any, *, eos_ids: set[int], graphs: bool | None = None, cache_tokens: int | None = None):
        import torch

        reason = supported(lm)
        if reason:
            raise ValueError(f"SlotDecoder cannot run this model: {reason}")
        self.torch = torch
        # the parts decoding uses, not the model object: a decoder kept per model (see
        # generation.summarize) must not keep that model alive
        self.model, self.head = lm.model, lm.lm_head
        self.device = next(lm.parameters()).device
        self.dtype = next(lm.parameters()).dtype
        cfg = lm.config
        self.layers = list(lm.model.layers)
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.group = self.heads // self.kv_heads
        self.scale = self.layers[0].self_attn.scaling
        self.eos_set = set(eos_ids)
        self.eos = torch.tensor(sorted(eos_ids), device=self.device, dtype=torch.long)
        self.graphs_on = (self.device.type == "cuda") if graphs is None else graphs
        # per-slot attention kernel: each row reads only its own positions (embedkit/engine/attention.py);
        # then one captured step serves every length. fp32 stays on the reference path (tf32 dots).
        probe = torch.empty(0, device=self.device, dtype=self.dtype)
        self.kernel = (triton_usable(probe) and (self.dtype != torch.float32 or os.environ.get("TRITON_INTERPRET") == "1")
                       and kernel_head_dim(self.head_dim))  # other head sizes take the dense paths  # fmt: skip
        # the prefill's attention in one launch a layer that also fills the slots (else flash
        # attention's variable-length kernel, the prefix laid in front of each prompt, two scatters)
        self.prefill_kernel = self.kernel and PREFILL_KERNEL
        self.cache_tokens = cache_tokens
        self.fused = _fuse_layers(self.layers) if _fused_bytes(self.layers) <= FUSE_MAX_BYTES else None
        # packed prefill attention: flash attention's variable-length kernel where it runs (the
        # benchmark's check compares it with the padded reference on the GPU)
        self.varlen = self.device.type == "cuda" and self.dtype != torch.float32 and hasattr(torch.ops.aten, "_flash_attention_forward")
        # norms, rotary and SiLU-and-multiply as fused Triton kernels (engine/fused.py) where they run
        self.fuse_kernels = fused.usable(probe)
        self.share_prefix = SHARE_PREFIX  # store the prompts' common start once (see the module docstring)
        self.prefix_len = 0
        # (slots, capacity, attended length, step width) -> (graph, logits); the cache and the slots'
        # token and position buffers below live as long as the decoder, so a group of a shape seen
        # before (the next shard's) replays the steps captured for it
        self._graphs: OrderedDict[tuple[int, int, int, int], tuple[Any, Any]] = OrderedDict()
        self._pool = None
        self._store = None  # keys and values of every group: (2, positions x layers x kv_heads x head_dim), viewed per group
        self._budget: int | None = None  # cached positions on CUDA, measured once
        self._slots = self.capacity = 0
        self.stats: dict = {}

    # ---- public ----------------------------------------------------------------------------

    def bytes_per_position(self) -> int:
        """KV-cache bytes of one cached position of one row (all layers, keys and values)."""
        return len(self.layers) * 2 * self.kv_heads * self.head_dim * self.torch.finfo(self.dtype).bits // 8

    def run(self, prompts: list[list[int]], *, max_new: int, max_slots: int, temperature: float = 0.0, seed: int = 0,
            host: HostWork | None = None) -> list[list[int]]:  # fmt: skip
        """New token ids per prompt, cut before the first end-of-sequence token.

        `host`: told of rows as they finish, and given a turn each time decode steps were queued
        on the GPU (the host would only wait for them)."""
        torch = self.torch
        self.max_new, self.temperature, self.host = max_new, temperature, host
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        self.results: list[list[int]] = [[] for _ in prompts]
        self.stats = {"groups": [], "steps": 0, "prefill_s": 0.0, "capture_s": 0.0, "captures": 0, "seconds": 0.0}
        if not prompts:
            return self.results
        start = time.perf_counter()
        _wait_for_host_warm_up()  # else its Triton key and the first launch's would be computed twice
        with torch.inference_mode():
            prefix = shared_prefix(prompts) if self.share_prefix else []
            prefix = prefix if len(prefix) >= PREFIX_MIN else []
            self._set_prefix(prefix)
            self.stats.update(prefix_tokens=len(prefix), prompt_tokens=sum(len(p) for p in prompts))
            prompts = [p[len(prefix) :] for p in prompts]  # what each slot holds: the rest of its prompt
            lengths = [len(prompts[i]) for i in order]
            budget = self._cache_budget()
            for g in plan_groups(lengths, max_new, max_slots, budget):
                # slot_limit: the slots rows of this length get when there are enough of them; budget: the
                # cached positions that fit (dry runs plan a whole run's groups with them)
                self.stats["groups"].append({"rows": g.stop - g.start, "slots": g.slots, "capacity": g.capacity,
                                             "slot_limit": min(max_slots, budget // g.capacity), "budget": budget})  # fmt: skip
                self._run_group(prompts, order[g.start : g.stop], g)
        self.stats["seconds"] = time.perf_counter() - start
        return self.results

    # ---- the shared prefix -----------------------------------------------------------------

    def _set_prefix(self, prefix: list[int]) -> None:
        """Prefill the prompts' shared start once into its own keys/values (layers, tokens, kv_heads, head_dim).

        A new prefix drops the captured steps: they read the old one's buffers."""
        torch = self.torch
        if getattr(self, "_prefix_ids", None) == prefix:
            return
        self._release()  # the captured steps read the old prefix's buffers
        self._prefix_ids, self.prefix_len = list(prefix), len(prefix)
        shape = (len(self.layers), len(prefix), self.kv_heads, self.head_dim)
        self.prefix_keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.prefix_values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if not prefix:
            return
        t0 = time.perf_counter()
        n = len(prefix)
        ids = torch.tensor(prefix, dtype=torch.long, device=self.device)
        x = self.model.embed_tokens(ids)[None]
        cos, sin = self.model.rotary_emb(x, torch.arange(n, device=self.device)[None])
        cu = torch.tensor([0, n], dtype=torch.int32, device=self.device)
        lens = cu[1:] - cu[:-1]

        def attend(i: int, q: Any, k: Any, v: Any) -> Any:
            self.prefix_keys[i].copy_(k[0])
            self.prefix_values[i].copy_(v[0])
            return self._packed_attention(q[0], k[0], v[0], cu, lens, n, None).reshape(1, n, -1)

        self._layers(x, cos, sin, attend)
        self._sync()
        self.stats["prefill_s"] += time.perf_counter() - t0

    def _prefix(self, i: int) -> tuple[Any, Any] | None:
        return (self.prefix_keys[i], self.prefix_values[i]) if self.prefix_len else None

    # ---- one group -------------------------------------------------------------------------

    def _cache_budget(self) -> int:
        """Cached positions (rows x length) that fit: a fraction of free device memory (measured at
        the first run: the cache allocated then serves every later one), or a fixed count."""
        if self.cache_tokens:
            return self.cache_tokens
        if self.device.type == "cuda":
            if self._budget is None:
                self._release()
                free, _ = self.torch.cuda.mem_get_info(self.device)
                self._budget = int(free * CACHE_MEMORY_FRACTION) // self.bytes_per_position()
            return self._budget
        return 1 << 22  # CPU: batches are small; 4M positions of a 135M model are ~1 GB in fp32

    def _run_group(self, prompts: list[list[int]], rows: list[int], g: Group) -> None:
        self._allocate(g.slots, g.capacity)
        waiting = list(reversed(rows))  # pop() takes the shortest
        holder = np.full(g.slots, -1, dtype=np.int64)  # the prompt each slot decodes (numpy: 16k slots are looked at every few steps)
        live = 0
        while waiting or live:
            free = np.flatnonzero(holder < 0)
            if waiting and (len(free) >= max(1, g.slots // REFILL_FRACTION) or live == 0):
                joiners = [waiting.pop() for _ in range(min(len(free), len(waiting)))]
                self._prefill(prompts, joiners, free[: len(joiners)])
                holder[free[: len(joiners)]] = joiners
            live = self._decode_until_sync(holder)

    def _allocate(self, slots: int, capacity: int) -> None:
        """The group's cache and per-slot buffers: views of buffers kept across groups and runs
        (a captured step reads the cache, tok and pos where they were at its capture)."""
        torch = self.torch
        shape = (len(self.layers), slots, self.kv_heads, capacity, self.head_dim)
        size = math.prod(shape)
        if self._store is None or self._store.shape[1] < size or self._tok.shape[0] < slots:
            self._release()  # grown: the captured steps read the old buffers
            # on CUDA the whole budget at once (every group fits in it: plan_groups), so no later group grows it
            room = max(slots * capacity, self._cache_budget() if self.device.type == "cuda" else 0)
            per_position = size // (slots * capacity)  # layers x kv_heads x head_dim
            self._store = torch.empty((2, per_position * room), dtype=self.dtype, device=self.device)
            self._tok = torch.zeros(max(slots, room // LENGTH_BUCKET if self.device.type == "cuda" else 0), dtype=torch.long, device=self.device)
            self._pos = torch.zeros_like(self._tok)
        self.keys, self.values = self._store[0, :size].view(shape), self._store[1, :size].view(shape)
        if not self.kernel:  # the dense path reads every position, masked: none may hold NaN from an earlier use
            self.keys.zero_()
            self.values.zero_()
        self.tok, self.pos = self._tok[:slots], self._pos[:slots]
        self.tok.zero_()
        self.pos.zero_()
        self._slots, self.capacity = slots, capacity
        self.out = torch.zeros((slots, self.max_new), dtype=torch.long, device=self.device)
        self.count = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.active = torch.zeros(slots, dtype=torch.bool, device=self.device)
        self.rows = torch.arange(slots, device=self.device)

    def _release(self) -> None:
        """Drop the cache and the captured steps (they point into the cache)."""
        self._graphs.clear()
        self._pool = None
        self._store = self._tok = self._pos = None
        for name in ("keys", "values", "tok", "pos"):
            if hasattr(self, name):
                delattr(self, name)
        self._slots = self.capacity = 0
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    # ---- prefill ---------------------------------------------------------------------------

    def _prefill(self, prompts: list[list[int]], rows: list[int], slots: np.ndarray) -> None:
        """Run the prompts, write their keys/values into `slots` and record each first new token.

        Prompts (each without the shared prefix) go through the model packed end to end (no
        padding) in forwards of at most PREFILL_TOKENS tokens; each token's key and value go
        straight to (its slot, its position in the slot)."""
        self._sync()  # prefill time is measured from here: the steps before it have finished
        t0 = time.perf_counter()
        budget = PREFILL_TOKENS["cuda" if self.device.type == "cuda" else "cpu"]
        start = 0
        while start < len(rows):
            stop, tokens = start + 1, len(prompts[rows[start]])
            while stop < len(rows) and tokens + len(prompts[rows[stop]]) <= budget:
                tokens += len(prompts[rows[stop]])
                stop += 1
            part = [prompts[r] for r in rows[start:stop]]
            index = self._to_device(np.asarray(slots[start:stop], dtype=np.int64))
            logits, lens = self._prefill_forward(part, index)
            first = self._choose(logits)
            self.tok[index] = first
            self.pos[index] = lens.long()
            self._start(index, first)
            start = stop
        self._sync()
        self.stats["prefill_s"] += time.perf_counter() - t0
        self.stats["prefill_tokens"] = self.stats.get("prefill_tokens", 0) + sum(len(prompts[r]) for r in rows)

    def _to_device(self, array: np.ndarray) -> Any:
        """A host array on the device without waiting for the device: a blocking copy (as
        `torch.tensor(list, device=...)` makes) waits for every queued kernel, and the GPU then
        idles while the host prepares the next forward."""
        host = self.torch.from_numpy(array)
        if self.device.type == "cuda":
            host = host.pin_memory()  # the caching host allocator keeps it alive until the copy is done
        return host.to(self.device, non_blocking=True)

    def _prefill_forward(self, part: list[list[int]], index: Any) -> tuple[Any, Any]:
        """Causal forward of packed prompts after the shared prefix; keys/values go to the slots
        `index`. Returns the logits at each last token and the prompts' lengths (int32, on the device)."""
        torch = self.torch
        lengths = np.fromiter(map(len, part), dtype=np.int64, count=len(part))
        total, longest = int(lengths.sum()), int(lengths.max())
        # numpy packs the ids at a third of the cost of a Python list comprehension into torch.tensor
        ids = self._to_device(np.fromiter(itertools.chain.from_iterable(part), dtype=np.int64, count=total))
        lens = self._to_device(lengths.astype(np.int32))
        cu = torch.zeros(len(part) + 1, dtype=torch.int32, device=self.device)
        torch.cumsum(lens, 0, out=cu[1:])
        row = torch.repeat_interleave(torch.arange(len(part), device=self.device), lens.long(), output_size=total)
        position = torch.arange(total, device=self.device) - cu[:-1].long()[row]  # each token's place in its slot
        x = self.model.embed_tokens(ids)[None]  # (1, tokens, hidden): the model's modules take a batch
        cos, sin = self.model.rotary_emb(x, (position + self.prefix_len)[None])  # its place in the whole prompt
        if self.prefill_kernel:  # one launch a layer: the attention, the prefix read in place, the slots filled
            def attend(i: int, q: Any, k: Any, v: Any) -> Any:  # (1, tokens, heads, head_dim) each
                cache = (self.keys[i], self.values[i], index)
                return prefill_attention(q[0], k[0], v[0], cu, longest, self.scale, prefix=self._prefix(i), cache=cache).reshape(1, total, -1)
        else:
            slot = index[row]
            layout = self._with_prefix_layout(cu, lens, row, position, total) if self.prefix_len else None

            def attend(i: int, q: Any, k: Any, v: Any) -> Any:  # (1, tokens, heads, head_dim) each
                self.keys[i][slot, :, position] = k[0]
                self.values[i][slot, :, position] = v[0]
                prefix = None if layout is None else (self._prefix(i), layout)
                return self._packed_attention(q[0], k[0], v[0], cu, lens, longest, prefix).reshape(1, total, -1)

        x = self._layers(x, cos, sin, attend)
        last = x[0, cu[1:].long() - 1]
        return self.head(self._norm(self.model.norm, last)), lens

    def _with_prefix_layout(self, cu: Any, lens: Any, row: Any, position: Any, total: int) -> dict:
        """Index tensors (the same for every layer of a forward) that lay out each prompt whole,
        the shared prefix in front of its own tokens, for the attention of `_packed_attention`."""
        torch = self.torch
        n = self.prefix_len
        whole_lens = lens + n
        whole_cu = torch.zeros_like(cu)
        torch.cumsum(whole_lens, 0, out=whole_cu[1:])
        rows = lens.shape[0]
        whole_total = total + rows * n
        whole_row = torch.repeat_interleave(torch.arange(rows, device=cu.device), whole_lens.long(), output_size=whole_total)
        at = torch.arange(whole_total, device=cu.device) - whole_cu[:-1].long()[whole_row]  # place in the whole prompt
        # where each whole-prompt token comes from in cat([prefix, packed tokens])
        source = torch.where(at < n, at, n + cu[:-1].long()[whole_row] + at - n)
        target = whole_cu[:-1].long()[row] + n + position  # where each packed token sits in the whole layout
        return {"cu": whole_cu, "lens": whole_lens, "source": source, "target": target, "total": whole_total}

    def _packed_attention(self, q: Any, k: Any, v: Any, cu: Any, lens: Any, longest: int, prefix: tuple | None) -> Any:
        """Causal attention of every packed token over its own prompt's tokens: (tokens, heads, head_dim).

        With `prefix` ((prefix keys, prefix values), layout), each prompt's tokens also attend to
        the shared prefix before them: the prompts are laid out whole (prefix keys and values
        copied in front of each, queries there left zero and their outputs dropped), which keeps
        the causal mask aligned as in a plain prefill.

        On CUDA flash attention's variable-length kernel, which takes the prompts' boundaries and
        the shared key heads as they are; elsewhere the padded reference (SDPA, right padding)."""
        torch = self.torch
        if prefix is not None and self.varlen and _flash_causal_is_bottom_right():
            # flash's causal mask aligns the last query with the last key, so the prompts' own
            # tokens can query their whole layout directly: no zero queries, no output gather
            (pk, pv), layout = prefix
            whole_k = torch.cat([pk, k])[layout["source"]]
            whole_v = torch.cat([pv, v])[layout["source"]]
            return torch.ops.aten._flash_attention_forward(q, whole_k, whole_v, cu, layout["cu"], longest, longest + self.prefix_len,
                                                           0.0, True, False, scale=self.scale)[0]  # fmt: skip
        if prefix is not None:
            (pk, pv), layout = prefix
            whole_q = torch.zeros((layout["total"], q.shape[1], q.shape[2]), dtype=q.dtype, device=q.device)
            whole_q[layout["target"]] = q
            whole_k = torch.cat([pk, k])[layout["source"]]
            whole_v = torch.cat([pv, v])[layout["source"]]
            out = self._packed_attention(whole_q, whole_k, whole_v, layout["cu"], layout["lens"], longest + self.prefix_len, None)
            return out[layout["target"]]
        if self.varlen:
            return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, longest, longest, 0.0, True, False, scale=self.scale)[0]
        b = lens.shape[0]
        mask = torch.arange(longest, device=q.device)[None, :] < lens[:, None].long()
        padded = []
        for src in (q, k, v):
            dst = torch.zeros(b, longest, src.shape[1], src.shape[2], dtype=src.dtype, device=src.device)
            dst[mask] = src
            padded.append(dst.transpose(1, 2))
        pq, pk, pv = padded
        if self.group > 1:
            pk, pv = pk.repeat_interleave(self.group, 1), pv.repeat_interleave(self.group, 1)
        # right padding and a causal mask: real tokens never see the padding after them
        out = torch.nn.functional.scaled_dot_product_attention(pq, pk, pv, is_causal=True, scale=self.scale)
        return out.transpose(1, 2)[mask]

    def _layers(self, x: Any, cos: Any, sin: Any, attend: Any) -> Any:
        """The decoder layers over x (batch, tokens, hidden), before the final norm.

        `attend(i, q, k, v)` (each (batch, tokens, heads, head_dim)) stores layer i's keys and
        values and returns the attention output (batch, tokens, heads x head_dim). Each residual
        add is fused with the norm after it."""
        layers = self.layers
        h = self._norm(layers[0].input_layernorm, x)
        for i, layer in enumerate(layers):
            q, k, v = self._qkv(i, layer, h, cos, sin)
            x, h = self._add_norm(x, layer.self_attn.o_proj(attend(i, q, k, v)), layer.post_attention_layernorm)
            m = self._mlp(i, layer, h)
            if i + 1 < len(layers):
                x, h = self._add_norm(x, m, layers[i + 1].input_layernorm)
            else:
                x = x + m
        return x

    def _norm(self, norm: Any, x: Any) -> Any:
        if not _is_rms_norm(norm):
            return norm(x)
        return fused.rms_norm(x, norm.weight, norm.variance_epsilon, kernel=self.fuse_kernels)

    def _add_norm(self, x: Any, delta: Any, norm: Any) -> tuple[Any, Any]:
        if not _is_rms_norm(norm):
            x = x + delta
            return x, norm(x)
        return fused.add_rms_norm(x, delta, norm.weight, norm.variance_epsilon, kernel=self.fuse_kernels)

    def _qkv(self, i: int, layer: Any, h: Any, cos: Any, sin: Any) -> tuple[Any, Any, Any]:
        """Projected, rotated queries and keys, and values: (batch, tokens, heads, head_dim).

        With fused weights: one product for q, k and v, and one rotation for q and k together."""
        b, t, _ = h.shape
        heads, kv, d = self.heads, self.kv_heads, self.head_dim
        if self.fused is None:
            attn = layer.self_attn
            q = attn.q_proj(h).view(b * t, heads, d)
            k = attn.k_proj(h).view(b * t, kv, d)
            v = attn.v_proj(h).view(b, t, kv, d)
            rot = self._rope(q, cos, sin), self._rope(k, cos, sin)
            return rot[0].view(b, t, heads, d), rot[1].view(b, t, kv, d), v
        qkv = self.fused[i]["qkv"](h)
        qk = qkv[..., : (heads + kv) * d].view(b * t, heads + kv, d)
        q, k = self._rope(qk, cos, sin).view(b, t, heads + kv, d).split([heads, kv], 2)
        return q, k, qkv[..., (heads + kv) * d :].view(b, t, kv, d)

    def _rope(self, x: Any, cos: Any, sin: Any) -> Any:
        """x (tokens, heads, head_dim) rotated by cos, sin (batch, tokens, head_dim)."""
        d = x.shape[-1]
        kernel = self.fuse_kernels and d % 2 == 0 and (d // 2) & (d // 2 - 1) == 0
        return fused.rope(x, cos.reshape(-1, d), sin.reshape(-1, d), kernel=kernel)

    def _mlp(self, i: int, layer: Any, h: Any) -> Any:
        """The layer's MLP; with fused weights one product for the gate and up projections."""
        if self.fused is None or "gate_up" not in self.fused[i]:
            return layer.mlp(h)
        mlp = layer.mlp
        gate_up = self.fused[i]["gate_up"](h)
        if type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation"):
            return mlp.down_proj(fused.silu_mul(gate_up, kernel=self.fuse_kernels))
        gate, up = gate_up.chunk(2, -1)
        return mlp.down_proj(mlp.act_fn(gate) * up)

    # ---- decode ----------------------------------------------------------------------------

    def _decode_until_sync(self, holder: np.ndarray) -> int:
        """Decode steps until the next look; finished rows are handed out. Returns the rows still running.

        The GPU idles from each look until the next step is launched, so the host's part between
        them works on numpy arrays, not per-slot Python loops (16,384 slots)."""
        count, active = self._state()
        t0 = time.perf_counter()
        running = np.flatnonzero((holder >= 0) & active)
        steps = min(SYNC_EVERY, int((self.max_new - count[running]).max())) if running.size else 0
        if running.size:
            if self.kernel:  # rows read their own lengths: one step shape for the whole group
                length = self.capacity
            else:  # dense attention over the longest row's positions, rounded up
                attended = max(self.pos[self._to_device(running)].max().item() + steps, 1)
                length = min(self.capacity, -(-attended // LENGTH_BUCKET) * LENGTH_BUCKET)
            width = step_width(int(running[-1]) + 1, self._slots)
            self.stats["steps"] += steps
            self.stats["narrow_steps"] = self.stats.get("narrow_steps", 0) + (steps if width < self._slots else 0)
            self.stats["bookkeeping_s"] = self.stats.get("bookkeeping_s", 0.0) + time.perf_counter() - t0
            for _ in range(steps):
                logits = self._step(length, width)
                self._advance(self._choose(logits), width)
            if self.host is not None:
                self.host.step()  # while the queued steps run
        count, active = self._state()
        t0 = time.perf_counter()
        done = np.flatnonzero((holder >= 0) & ~active)
        if done.size:
            whole = len(done) > self._slots // 8  # the finished rows' tokens in one copy (every row's when many finished)
            out = self.out.cpu().numpy() if whole else self.out[self._to_device(done)].cpu().numpy()
            for i, s in enumerate(done):
                self.results[holder[s]] = out[s if whole else i][: count[s]].tolist()
            if self.host is not None:
                self.host.finished([self.results[r] for r in holder[done]], holder[done].tolist())
            holder[done] = -1
        self.stats["bookkeeping_s"] = self.stats.get("bookkeeping_s", 0.0) + time.perf_counter() - t0
        return int((holder >= 0).sum())

    def _state(self) -> tuple[np.ndarray, np.ndarray]:
        """Each slot's new-token count and whether it is still running, in one copy to the host."""
        both = self.torch.stack([self.count, self.active.long()]).cpu().numpy()
        return both[0], both[1].astype(bool)

    def _start(self, index: Any, first: Any) -> None:
        """Record the first new token of freshly prefilled rows (an EOS ends a row with no tokens)."""
        torch = self.torch
        ends = torch.isin(first, self.eos)
        self.out[index, 0] = first
        count = (~ends).long()
        self.count[index] = count
        self.active[index] = ~ends & (count < self.max_new)

    def _advance(self, tokens: Any, width: int) -> None:
        """Append each active row's new token unless it ends the row (EOS or max_new tokens), for
        the first `width` slots (the step's; every slot past them is idle).

        Rows that are not active keep their count and position: their steps are discarded.
        """
        torch = self.torch
        active, count, rows = self.active[:width], self.count[:width], self.rows[:width]
        keep = active & ~torch.isin(tokens, self.eos)
        at = count.clamp(max=self.max_new - 1)
        self.out[rows, at] = torch.where(keep, tokens, self.out[rows, at])
        count += keep.long()
        active.copy_(keep & (count < self.max_new))
        self.pos[:width] += active.long()  # the token just chosen is fed at the next position
        self.tok[:width].copy_(tokens)

    def _choose(self, logits: Any) -> Any:
        return choose_tokens(logits, self.temperature, self.gen)

    def _step(self, length: int, width: int) -> Any:
        """Logits of one decode step over the first `width` slots, attending to the first `length` positions."""
        if not self.graphs_on:
            return self._step_forward(length, width)
        key = (self._slots, self.capacity, length, width)
        if key in self._graphs:
            self._graphs.move_to_end(key)
        else:
            while len(self._graphs) >= GRAPHS_KEPT:
                self._graphs.popitem(last=False)
            try:
                self._graphs[key] = self._capture(length, width)
            except RuntimeError as e:  # a kernel that cannot be captured: decoding stays correct, only slower
                import warnings

                warnings.warn(f"decoding without CUDA graphs: capture failed ({str(e).splitlines()[0]})", stacklevel=2)
                self.graphs_on = False
                return self._step_forward(length, width)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits

    def _capture(self, length: int, width: int) -> tuple[Any, Any]:
        """The decode step as a CUDA graph over the static slot buffers (tok, pos, cache)."""
        torch = self.torch
        t0 = time.perf_counter()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(CAPTURE_WARM_UPS):  # warm-up on a side stream, as capture requires; writes are idempotent
                self._step_forward(length, width)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._step_forward(length, width)
        self.stats["captures"] += 1
        self.stats["capture_s"] += time.perf_counter() - t0
        return graph, logits

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def _step_forward(self, length: int, width: int) -> Any:
        """One token for each of the first `width` slots: write its key/value at the slot's
        position, attend to its own positions (the dense path reads [0, length) of every slot, masked)."""
        n = width
        pos = self.pos[:n]
        x = self.model.embed_tokens(self.tok[:n, None])
        cos, sin = self.model.rotary_emb(x, pos[:, None] + self.prefix_len)
        lengths = pos + 1

        def attend(i: int, q: Any, k: Any, v: Any) -> Any:  # (slots, 1, heads, head_dim) each
            keys, values = self.keys[i][:n], self.values[i][:n]
            # the query heads that share a key head become that head's query rows: no repeated keys
            q = q.reshape(n, self.kv_heads, self.group, self.head_dim)
            # the step's key and value are written at each row's last position (the kernel does it in the same launch)
            o = slot_attention(q, keys, values, lengths, self.scale, prefix=self._prefix(i), kernel=self.kernel, append=(k[:, 0], v[:, 0]),
                               span=None if self.kernel else length)  # fmt: skip
            return o.reshape(n, 1, -1)

        x = self._layers(x, cos, sin, attend)
        return self.head(self._norm(self.model.norm, x[:, 0]))


def step_width(running_below: int, slots: int) -> int:
    """Slots a decode step covers: all of them, or, when every running row sits below slot
    `running_below` and that is under half of them, the smallest power of two (at least
    STEP_WIDTH_MIN) that holds those rows. Refills take the lowest free slots, so a group's last
    rows (all finishing at once frees every slot) run in a narrow step instead of the full width.

    >>> step_width(16384, 16384), step_width(523, 16384), step_width(100, 16384), step_width(9000, 16384)
    (16384, 1024, 256, 16384)
    """
    if running_below * 2 > slots:
        return slots
    width = STEP_WIDTH_MIN
    while width < running_below:
        width *= 2
    return min(width, slots)


@functools.cache
def _flash_causal_is_bottom_right() -> bool:
    """Whether flash attention's variable-length causal mask, given fewer queries than keys,
    lets the last query see every key (flash-attention 2.1 and later do; the older rule aligned
    the first query with the first key). Checked once on a small random case against an
    explicit mask."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn((n, 2, 64), generator=g, device="cuda", dtype=torch.bfloat16) for n in (3, 8, 8))
    cu_q, cu_k = (torch.tensor([0, n], dtype=torch.int32, device="cuda") for n in (3, 8))
    got = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, 3, 8, 0.0, True, False, scale=0.125)[0]
    visible = torch.arange(8, device="cuda")[None, :] <= torch.arange(3, device="cuda")[:, None] + 5
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(),
                                                            attn_mask=visible, scale=0.125).transpose(0, 1)  # fmt: skip
    return bool((got.float() - want).abs().max() < 0.02)


def shared_prefix(prompts: list[list[int]]) -> list[int]:
    """The tokens every prompt starts with, less one: each prompt keeps at least one token of its
    own, whose logits give its first new token."""
    first = min(prompts, key=len)
    n = len(first) - 1
    for p in prompts:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
        if n == 0:
            break
    return list(first[:n])


def _is_rms_norm(norm: Any) -> bool:
    """A Llama-family RMSNorm (normalize in float32, cast back, scale by the weight), which the
    fused kernels compute; any other norm module is called as it is."""
    return type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon") and hasattr(norm, "weight")


def _fused_bytes(layers: list) -> int:
    """Bytes the fused copies of the q/k/v and gate/up weights would take."""
    total = 0
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for module in (attn.q_proj, attn.k_proj, attn.v_proj, getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)):
            if module is not None:
                total += module.weight.numel() * module.weight.element_size()
    return total


def _fuse_layers(layers: list) -> list[dict]:
    """Per layer, the q/k/v projections as one linear layer, and the MLP's gate and up
    projections as one, so that a step runs one product where the model runs three and two.
    Copies, made once: the model's own modules are left as they are. A model quantized to fp8
    (engine/fp8.py) gets fp8 copies, quantized the same way."""
    import torch

    from .fp8 import is_fp8, plain_weight, to_fp8

    quantized = is_fp8(layers[0].self_attn.q_proj.weight)

    def cat(modules: list) -> Any:
        weight = torch.cat([plain_weight(m.weight) for m in modules], 0)
        biases = [m.bias for m in modules]
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=any(b is not None for b in biases), device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if linear.bias is not None:
            linear.bias.copy_(torch.cat([b if b is not None else torch.zeros(m.weight.shape[0], dtype=weight.dtype, device=weight.device)
                                         for m, b in zip(modules, biases)]))  # fmt: skip
        if quantized:
            to_fp8(linear)
        return linear

    fused = []
    with torch.no_grad():
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            entry = {"qkv": cat([attn.q_proj, attn.k_proj, attn.v_proj])}
            if all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                entry["gate_up"] = cat([mlp.gate_proj, mlp.up_proj])
            fused.append(entry)
    return fused


def choose_tokens(logits: Any, temperature: float, generator: Any) -> Any:
    """The next token per row: argmax when temperature is 0, else a sample at that temperature."""
    import torch

    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
