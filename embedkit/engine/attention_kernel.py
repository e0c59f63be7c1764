"""The Triton kernels of `attention.slot_attention` and `attention.prefill_attention`, in a
module of their own: importing Triton is slow and optional, so `attention` imports this module
only when a kernel first runs."""

import triton
import triton.language as tl


@triton.jit
def _online_softmax(m, total, acc, s, v):
    """One block of keys into a running softmax (as in flash attention): `s` the block's scores
    (rows x keys, masked ones -inf), `v` its values; returns the new max, sum and weighted values."""
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    return m_new, total * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)


@triton.jit
def slot_attention_kernel(
    Q, K, V, O, LENGTHS, PK, PV, KN, VN, n_prefix, scale,
    q_s, q_h, q_g, k_s, k_h, k_n, v_s, v_h, v_n, o_s, o_h, o_g, pk_n, pk_h, pv_n, pv_h, kn_s, kn_h, vn_s, vn_h,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, APPEND: tl.constexpr,
):  # fmt: skip
    slot = tl.program_id(0)
    head = tl.program_id(1)
    n_valid = tl.load(LENGTHS + slot)
    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK)
    row_ok = rows[:, None] < GROUP
    q = tl.load(Q + slot * q_s + head * q_h + rows[:, None] * q_g + dims[None, :], mask=row_ok, other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    k_base = K + slot * k_s + head * k_h
    v_base = V + slot * v_s + head * v_h
    pk_base = PK + head * pk_h
    pv_base = PV + head * pv_h
    if APPEND:
        # the step's own key and value: stored at the row's last position here (no separate
        # scatter kernel per layer), and attended from registers after the cached ones
        kn = tl.load(KN + slot * kn_s + head * kn_h + dims)
        vn = tl.load(VN + slot * vn_s + head * vn_h + dims)
        tl.store(k_base + (n_valid - 1) * k_n + dims, kn)
        tl.store(v_base + (n_valid - 1) * v_n + dims, vn)
        n_valid -= 1
    # the shared prefix (one place all slots read, so from L2), then the row's own positions
    # in loops of their own: each block loads one key and one value tile, not two masked ones
    for start in range(0, n_prefix, BLOCK):
        pos = start + cols
        ok = pos < n_prefix
        k = tl.load(pk_base + pos[:, None] * pk_n + dims[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(pv_base + pos[:, None] * pv_n + dims[None, :], mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        m, total, acc = _online_softmax(m, total, acc, tl.where(ok[None, :], s, float("-inf")), v)
    for start in range(0, n_valid, BLOCK):
        pos = start + cols
        ok = pos < n_valid
        k = tl.load(k_base + pos[:, None] * k_n + dims[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_base + pos[:, None] * v_n + dims[None, :], mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        m, total, acc = _online_softmax(m, total, acc, tl.where(ok[None, :], s, float("-inf")), v)
    if APPEND:
        s = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * scale
        m_new = tl.maximum(m, s)
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        total = total * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * vn.to(tl.float32)[None, :]
    out = acc / total[:, None]
    tl.store(O + slot * o_s + head * o_h + rows[:, None] * o_g + dims[None, :], out.to(O.dtype.element_ty), mask=row_ok)


@triton.jit
def prefill_attention_kernel(
    Q, K, V, O, CU, PK, PV, CK, CV, SLOT, n_prefix, scale, heads,
    q_t, q_h, k_t, k_h, v_t, v_h, o_t, o_h, pk_n, pk_h, pv_n, pv_h, ck_s, ck_h, ck_n, cv_s, cv_h, cv_n,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WRITE: tl.constexpr,
):  # fmt: skip
    # program (prompt x heads + head, query block): the query heads that share a key head are
    # neighbours in launch order, so the key/value tiles one loads the next ones find in L2
    prompt = tl.program_id(0) // heads
    head = tl.program_id(0) % heads
    first = tl.program_id(1) * BLOCK_M
    start = tl.load(CU + prompt)
    length = tl.load(CU + prompt + 1) - start
    if first < length:
        kv = head // GROUP
        rows = first + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        cols = tl.arange(0, BLOCK_N)
        row_ok = (rows < length)[:, None]
        q = tl.load(Q + (start + rows)[:, None] * q_t + head * q_h + dims[None, :], mask=row_ok, other=0.0)
        if WRITE:
            if head % GROUP == 0:  # this block's keys and values into the prompt's slot, once per key head
                slot = tl.load(SLOT + prompt)
                k = tl.load(K + (start + rows)[:, None] * k_t + kv * k_h + dims[None, :], mask=row_ok, other=0.0)
                v = tl.load(V + (start + rows)[:, None] * v_t + kv * v_h + dims[None, :], mask=row_ok, other=0.0)
                tl.store(CK + slot * ck_s + kv * ck_h + rows[:, None] * ck_n + dims[None, :], k, mask=row_ok)
                tl.store(CV + slot * cv_s + kv * cv_h + rows[:, None] * cv_n + dims[None, :], v, mask=row_ok)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        # the shared prefix, which every token sees (one copy for all prompts: read from L2)
        for s in range(0, n_prefix, BLOCK_N):
            pos = s + cols
            ok = pos < n_prefix
            k = tl.load(PK + pos[:, None] * pk_n + kv * pk_h + dims[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(PV + pos[:, None] * pv_n + kv * pv_h + dims[None, :], mask=ok[:, None], other=0.0)
            x = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            m, total, acc = _online_softmax(m, total, acc, tl.where(ok[None, :], x, float("-inf")), v)
        # the prompt's own tokens, causal: token i sees tokens 0..i of its prompt
        end = tl.minimum(length, first + BLOCK_M)
        for s in range(0, end, BLOCK_N):
            pos = s + cols
            ok = pos < end
            k = tl.load(K + (start + pos)[:, None] * k_t + kv * k_h + dims[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(V + (start + pos)[:, None] * v_t + kv * v_h + dims[None, :], mask=ok[:, None], other=0.0)
            x = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            m, total, acc = _online_softmax(m, total, acc, tl.where(ok[None, :] & (pos[None, :] <= rows[:, None]), x, float("-inf")), v)
        out = acc / total[:, None]
        tl.store(O + (start + rows)[:, None] * o_t + head * o_h + dims[None, :], out.to(O.dtype.element_ty), mask=row_ok)
