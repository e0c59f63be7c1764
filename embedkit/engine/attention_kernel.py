"""The Triton kernel of `attention.slot_attention`, in a module of its own: Triton resolves a
kernel's helper functions through its module's globals, and importing Triton is slow and
optional, so `attention` imports this module only when the kernel first runs."""

import triton
import triton.language as tl


@triton.jit
def block_update(q, k_base, v_base, k_n, v_n, start, n_valid, m, total, acc, scale, dims, cols):
    """One block of keys into the running (max, sum, output) of an online softmax."""
    pos = start + cols
    ok = pos < n_valid
    k = tl.load(k_base + pos[:, None] * k_n + dims[None, :], mask=ok[:, None], other=0.0)
    v = tl.load(v_base + pos[:, None] * v_n + dims[None, :], mask=ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    total = total * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
    return m_new, total, acc


@triton.jit
def slot_attention_kernel(
    Q, K, V, O, LENGTHS, PK, PV, n_prefix, scale,
    q_s, q_h, q_g, k_s, k_h, k_n, v_s, v_h, v_n, o_s, o_h, o_g, pk_n, pk_h, pv_n, pv_h,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
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
    # the shared prefix first: every slot reads the same positions, which stay in L2
    for start in range(0, n_prefix, BLOCK):
        m, total, acc = block_update(q, PK + head * pk_h, PV + head * pv_h, pk_n, pv_n, start, n_prefix, m, total, acc, scale, dims, cols)
    k_base = K + slot * k_s + head * k_h
    v_base = V + slot * v_s + head * v_h
    for start in range(0, n_valid, BLOCK):
        m, total, acc = block_update(q, k_base, v_base, k_n, v_n, start, n_valid, m, total, acc, scale, dims, cols)
    out = acc / total[:, None]
    tl.store(O + slot * o_s + head * o_h + rows[:, None] * o_g + dims[None, :], out.to(O.dtype.element_ty), mask=row_ok)
