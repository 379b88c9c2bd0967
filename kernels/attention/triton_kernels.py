"""The fused Triton kernels of cross-domain attention: forward, and the backward's
preprocess, dK/dV and dQ kernels (host side: launch.py; the torch.library op: op.py).

Forward: one online-softmax pass; the mass is accumulated beside the row sum
(mass_acc = mass_acc * alpha + sum_j p_ij c_ij), so it costs one FMA per score.
Backward: with g = dL/dmass, dS = P * (dO.V^T + g c - (Delta + g mass)), so the mass adds one
per-row scalar to the usual preprocess and one FMA per score; dK/dV and dQ run as two kernels
that recompute P (deterministic; no atomics).
"""
import triton
import triton.language as tl

from .masks import WILDCARD_DOMAIN

WILDCARD = tl.constexpr(WILDCARD_DOMAIN)


@triton.jit
def _pair_masks(q_pos, k_pos, dom_q, dom_k, seq_len, num_bottleneck,
                CAUSAL: tl.constexpr, BOTTLENECK: tl.constexpr, BOUNDARY: tl.constexpr):
    """(allowed, cross) for a tile. The four position/domain arguments come pre-broadcast
    ([M, 1] and [1, N] for a query-major tile, [1, M] and [N, 1] for a key-major one), so one
    rule serves both. Out-of-range positions carry domain -1. BOUNDARY=False is an interior
    tile: every position lies inside the valid prefix and, when causal, every key at or before
    every query, so only the domains are compared."""
    allowed = (dom_q >= 0) & (dom_k >= 0)
    if BOUNDARY:
        allowed = allowed & (q_pos < seq_len) & (k_pos < seq_len)
        if CAUSAL:
            allowed = allowed & (k_pos <= q_pos)
    # A wildcard (hidden-domain [MASK]) token matches every domain.
    same = (dom_q == dom_k) | (dom_q == WILDCARD) | (dom_k == WILDCARD)
    if BOTTLENECK:
        query_is_ib = q_pos < num_bottleneck
        key_is_ib = k_pos < num_bottleneck
        allowed = allowed & (query_is_ib | key_is_ib | same)
        cross = key_is_ib & (q_pos >= num_bottleneck)
    else:
        cross = ~same
    return allowed, cross


@triton.jit
def _load_tile(ptrs, rows_ok, d_ok, ROW_MASK: tl.constexpr, EVEN_D: tl.constexpr):
    """A [rows, D] tile: masked only along what can run out (rows past the tensor in a boundary
    tile, columns past head_dim when BLOCK_D > head_dim), zeros there."""
    if ROW_MASK:
        if EVEN_D:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _load_rows(ptrs, rows_ok, other, ROW_MASK: tl.constexpr):
    """A per-row vector (domains, LSE, Delta, g), masked only in a boundary tile."""
    if ROW_MASK:
        x = tl.load(ptrs, mask=rows_ok, other=other)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _forward_tile(acc, m_i, l_i, mass_i, q, dom_q, offs_m, start_n, K, V, DOM,
                  stride_kn, stride_vn, offs_d, d_ok, length, seq_len, num_bottleneck, scale_log2,
                  CAUSAL: tl.constexpr, BOTTLENECK: tl.constexpr, BLOCK_N: tl.constexpr,
                  EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, BOUNDARY: tl.constexpr):
    """One key tile of the online softmax (K, V, DOM already offset to this batch/head)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < length
    k = _load_tile(K + offs_n[:, None] * stride_kn + offs_d[None, :], n_ok, d_ok, BOUNDARY, EVEN_D)
    v = _load_tile(V + offs_n[:, None] * stride_vn + offs_d[None, :], n_ok, d_ok, BOUNDARY, EVEN_D)
    dom_k = _load_rows(DOM + offs_n, n_ok, -1, BOUNDARY)
    allowed, cross = _pair_masks(offs_m[:, None], offs_n[None, :], dom_q[:, None],
                                 dom_k[None, :], seq_len, num_bottleneck, CAUSAL, BOTTLENECK,
                                 BOUNDARY)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked so far: no NaN
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    mass_i = mass_i * alpha + tl.sum(tl.where(cross, p, 0.0), axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i, mass_i


@triton.jit
def _query_major_split(start_m, seq_len, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, INTERIOR: tl.constexpr):
    """(mid, hi) for a query tile: key tiles [0, mid) are interior, [mid, hi) boundary
    (INTERIOR=False: all boundary). Key tiles past the valid prefix, or above the diagonal
    when causal, are never visited."""
    hi = seq_len
    mid = (seq_len // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M)
        mid = tl.minimum(mid, ((start_m + 1) // BLOCK_N) * BLOCK_N)  # keys <= the first query
    if start_m >= seq_len:
        hi = 0
    if not INTERIOR:
        mid = 0
    return tl.minimum(mid, hi), hi


@triton.jit
def _forward_kernel(
    Q, K, V, DOM, SEQ_LENS, OUT, LSE, MASS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_db,
    num_heads, length, head_dim, num_bottleneck, scale_log2,
    CAUSAL: tl.constexpr, BOTTLENECK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    INTERIOR: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # b * stride_b can pass 2^31 elements
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    seq_len = tl.minimum(tl.load(SEQ_LENS + b), length)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = offs_m < length
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                   row_ok, d_ok, True, EVEN_D)
    # queries past the prefix get domain -1 here, so interior tiles need no position test
    dom_q = tl.load(DOM + b * stride_db + offs_m, mask=offs_m < seq_len, other=-1)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DOM += b * stride_db

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    mass_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mid, hi = _query_major_split(start_m, seq_len, CAUSAL, BLOCK_M, BLOCK_N, INTERIOR)
    for start_n in range(0, mid, BLOCK_N):
        acc, m_i, l_i, mass_i = _forward_tile(
            acc, m_i, l_i, mass_i, q, dom_q, offs_m, start_n, K, V, DOM, stride_kn, stride_vn,
            offs_d, d_ok, length, seq_len, num_bottleneck, scale_log2,
            CAUSAL, BOTTLENECK, BLOCK_N, EVEN_D, DOT_PRECISION, False)
    for start_n in range(mid, hi, BLOCK_N):
        acc, m_i, l_i, mass_i = _forward_tile(
            acc, m_i, l_i, mass_i, q, dom_q, offs_m, start_n, K, V, DOM, stride_kn, stride_vn,
            offs_d, d_ok, length, seq_len, num_bottleneck, scale_log2,
            CAUSAL, BOTTLENECK, BLOCK_N, EVEN_D, DOT_PRECISION, True)

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    out_mask = row_ok[:, None] & (d_ok[None, :] | EVEN_D)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=out_mask)
    row = pid_bh * length + offs_m
    tl.store(MASS + row, mass_i / l_safe, mask=row_ok)
    # LSE in log2 units of the scaled scores; +inf for rows with no key makes P = 0 there.
    tl.store(LSE + row, tl.where(has_key, m_i + tl.log2(l_safe), float("inf")), mask=row_ok)


@triton.jit
def _backward_preprocess_kernel(
    OUT, DOUT, MASS, DMASS, DELTA,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    num_heads, length, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, HAS_DOUT: tl.constexpr,
):
    """DELTA_i = rowsum(dO_i * O_i) + g_i * mass_i: the only per-row term the mass adds.
    Without dO (a loss of the mass alone, the L_cd pass) DELTA_i = g_i * mass_i."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # b * stride_b can pass 2^31 elements
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row = pid_bh * length + offs_m
    row_ok = offs_m < length
    mass = tl.load(MASS + row, mask=row_ok, other=0.0)
    g = tl.load(DMASS + row, mask=row_ok, other=0.0)
    delta = g * mass
    if HAS_DOUT:
        o = _load_tile(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
                       + offs_d[None, :], row_ok, d_ok, True, EVEN_D).to(tl.float32)
        do = _load_tile(DOUT + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                        + offs_d[None, :], row_ok, d_ok, True, EVEN_D).to(tl.float32)
        delta += tl.sum(o * do, axis=1)
    tl.store(DELTA + row, delta, mask=row_ok)


@triton.jit
def _dkdv_tile(dk, dv, k, v, dom_k, offs_n, start_m, Q, DOUT, DOM, LSE, DELTA, DMASS,
               stride_qm, stride_dom, row_base, offs_d, d_ok, length, seq_len, num_bottleneck,
               scale_log2, CAUSAL: tl.constexpr, BOTTLENECK: tl.constexpr, BLOCK_M: tl.constexpr,
               EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_DOUT: tl.constexpr,
               BOUNDARY: tl.constexpr):
    """One query tile's contribution to a key tile's dK, dV (Q, DOUT, DOM offset to this
    batch/head; row_base the first row of this batch/head in LSE, DELTA, DMASS)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < length
    q = _load_tile(Q + offs_m[:, None] * stride_qm + offs_d[None, :], m_ok, d_ok, BOUNDARY, EVEN_D)
    dom_q = _load_rows(DOM + offs_m, m_ok, -1, BOUNDARY)
    row = row_base + offs_m
    lse = _load_rows(LSE + row, m_ok, float("inf"), BOUNDARY)
    delta = _load_rows(DELTA + row, m_ok, 0.0, BOUNDARY)
    g = _load_rows(DMASS + row, m_ok, 0.0, BOUNDARY)
    # Key-major tiles ([N, M]) so dV += P^T dO and dK += dS^T Q need no transposed tile.
    allowed_t, cross_t = _pair_masks(offs_m[None, :], offs_n[:, None], dom_q[None, :],
                                     dom_k[:, None], seq_len, num_bottleneck,
                                     CAUSAL, BOTTLENECK, BOUNDARY)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2
    p_t = tl.where(allowed_t, tl.exp2(s_t - lse[None, :]), 0.0)
    ds_t = tl.where(cross_t, g[None, :], 0.0) - delta[None, :]
    if HAS_DOUT:
        do = _load_tile(DOUT + offs_m[:, None] * stride_dom + offs_d[None, :], m_ok, d_ok,
                        BOUNDARY, EVEN_D)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        ds_t += tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * ds_t
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _backward_dkdv_kernel(
    Q, K, V, DOM, SEQ_LENS, DOUT, LSE, DELTA, DMASS, DK, DV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_db,
    stride_gb, stride_gh, stride_gm,
    num_heads, length, head_dim, num_bottleneck, scale, scale_log2,
    CAUSAL: tl.constexpr, BOTTLENECK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    INTERIOR: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_DOUT: tl.constexpr,
):
    """One key tile per program; loops over the query tiles that can see it. Without dO
    (the L_cd pass) dV is 0 and dS = P (g c - g mass): two of the four matmuls go."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # b * stride_b can pass 2^31 elements
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    seq_len = tl.minimum(tl.load(SEQ_LENS + b), length)

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    n_ok = offs_n < length
    k = _load_tile(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                   n_ok, d_ok, True, EVEN_D)
    v = _load_tile(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                   n_ok, d_ok, True, EVEN_D)
    # keys past the prefix get domain -1 here, so interior tiles need no position test
    dom_k = tl.load(DOM + b * stride_db + offs_n, mask=offs_n < seq_len, other=-1)
    Q += b * stride_qb + h * stride_qh
    DOUT += b * stride_dob + h * stride_doh
    DOM += b * stride_db
    row_base = pid_bh * length
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Query tiles [lo, hi) can see this key tile (earlier ones cannot when causal); those in
    # [first_full, last_full) are interior: inside the prefix and, causal, all at or after
    # every key of the tile.
    lo = 0
    first_full = 0
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        first_full = tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    hi = seq_len
    if start_n >= seq_len:
        hi = 0
    first_full = tl.minimum(first_full, tl.cdiv(hi, BLOCK_M) * BLOCK_M)
    last_full = tl.maximum(first_full, (hi // BLOCK_M) * BLOCK_M)
    if not INTERIOR:  # every tile a boundary tile (through the first loop)
        first_full = tl.cdiv(hi, BLOCK_M) * BLOCK_M
        last_full = first_full
    for start_m in range(lo, first_full, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, dom_k, offs_n, start_m, Q, DOUT, DOM, LSE, DELTA,
                            DMASS, stride_qm, stride_dom, row_base, offs_d, d_ok, length,
                            seq_len, num_bottleneck, scale_log2, CAUSAL, BOTTLENECK, BLOCK_M,
                            EVEN_D, DOT_PRECISION, HAS_DOUT, True)
    for start_m in range(first_full, last_full, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, dom_k, offs_n, start_m, Q, DOUT, DOM, LSE, DELTA,
                            DMASS, stride_qm, stride_dom, row_base, offs_d, d_ok, length,
                            seq_len, num_bottleneck, scale_log2, CAUSAL, BOTTLENECK, BLOCK_M,
                            EVEN_D, DOT_PRECISION, HAS_DOUT, False)
    for start_m in range(last_full, hi, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, dom_k, offs_n, start_m, Q, DOUT, DOM, LSE, DELTA,
                            DMASS, stride_qm, stride_dom, row_base, offs_d, d_ok, length,
                            seq_len, num_bottleneck, scale_log2, CAUSAL, BOTTLENECK, BLOCK_M,
                            EVEN_D, DOT_PRECISION, HAS_DOUT, True)

    # dK and dV share dQ's layout (stride_g*), whatever k and v's layout.
    grad_offsets = b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gm + offs_d[None, :]
    kv_mask = n_ok[:, None] & (d_ok[None, :] | EVEN_D)
    tl.store(DK + grad_offsets, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + grad_offsets, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(dq, q, do, dom_q, lse, delta, g, offs_m, start_n, K, V, DOM, stride_kn, stride_vn,
             offs_d, d_ok, length, seq_len, num_bottleneck, scale_log2,
             CAUSAL: tl.constexpr, BOTTLENECK: tl.constexpr, BLOCK_N: tl.constexpr,
             EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_DOUT: tl.constexpr,
             BOUNDARY: tl.constexpr):
    """One key tile's contribution to a query tile's dQ (K, V, DOM offset to this batch/head)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < length
    k = _load_tile(K + offs_n[:, None] * stride_kn + offs_d[None, :], n_ok, d_ok, BOUNDARY, EVEN_D)
    dom_k = _load_rows(DOM + offs_n, n_ok, -1, BOUNDARY)
    allowed, cross = _pair_masks(offs_m[:, None], offs_n[None, :], dom_q[:, None],
                                 dom_k[None, :], seq_len, num_bottleneck, CAUSAL, BOTTLENECK,
                                 BOUNDARY)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
    ds = tl.where(cross, g[:, None], 0.0) - delta[:, None]
    if HAS_DOUT:
        v = _load_tile(V + offs_n[:, None] * stride_vn + offs_d[None, :], n_ok, d_ok, BOUNDARY,
                       EVEN_D)
        ds += tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * ds
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _backward_dq_kernel(
    Q, K, V, DOM, SEQ_LENS, DOUT, LSE, DELTA, DMASS, DQ,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_db,
    stride_gb, stride_gh, stride_gm,
    num_heads, length, head_dim, num_bottleneck, scale, scale_log2,
    CAUSAL: tl.constexpr, BOTTLENECK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    INTERIOR: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_DOUT: tl.constexpr,
):
    """One query tile per program; loops over the key tiles it can see."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # b * stride_b can pass 2^31 elements
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    seq_len = tl.minimum(tl.load(SEQ_LENS + b), length)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    m_ok = offs_m < length
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                   m_ok, d_ok, True, EVEN_D)
    do = q  # unused without dO
    if HAS_DOUT:
        do = _load_tile(DOUT + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                        + offs_d[None, :], m_ok, d_ok, True, EVEN_D)
    # queries past the prefix get domain -1 here, so interior tiles need no position test
    dom_q = tl.load(DOM + b * stride_db + offs_m, mask=offs_m < seq_len, other=-1)
    row = pid_bh * length + offs_m
    lse = tl.load(LSE + row, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
    g = tl.load(DMASS + row, mask=m_ok, other=0.0)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DOM += b * stride_db
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    mid, hi = _query_major_split(start_m, seq_len, CAUSAL, BLOCK_M, BLOCK_N, INTERIOR)
    for start_n in range(0, mid, BLOCK_N):
        dq = _dq_tile(dq, q, do, dom_q, lse, delta, g, offs_m, start_n, K, V, DOM, stride_kn,
                      stride_vn, offs_d, d_ok, length, seq_len, num_bottleneck, scale_log2,
                      CAUSAL, BOTTLENECK, BLOCK_N, EVEN_D, DOT_PRECISION, HAS_DOUT, False)
    for start_n in range(mid, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, dom_q, lse, delta, g, offs_m, start_n, K, V, DOM, stride_kn,
                      stride_vn, offs_d, d_ok, length, seq_len, num_bottleneck, scale_log2,
                      CAUSAL, BOTTLENECK, BLOCK_N, EVEN_D, DOT_PRECISION, HAS_DOUT, True)

    dq_mask = m_ok[:, None] & (d_ok[None, :] | EVEN_D)
    tl.store(DQ + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=dq_mask)


# Every kernel with a tile configuration of its own, by the name the tile table (tiles.py), the
# ahead-of-time compile check (kernels/compile_check.py) and the tuning sweep
# (bench/tune_tiles.py) use; the preprocess kernel takes the dQ kernel's row tile.
TILED_KERNELS = {"forward": _forward_kernel, "dkdv": _backward_dkdv_kernel,
                 "dq": _backward_dq_kernel}
PREPROCESS_KERNEL = _backward_preprocess_kernel
