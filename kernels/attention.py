"""Fused Triton attention + cross-domain mass (forward and backward), registered as
torch.library ops with their autograd (the backend dispatch is kernels.dispatch).

Forward: one online-softmax pass; the mass is accumulated beside the row sum
(mass_acc = mass_acc * alpha + sum_j p_ij c_ij), so it costs one FMA per score.
Backward: with g = dL/dmass, dS = P * (dO.V^T + g c - (Delta + g mass)), so the mass adds one
per-row scalar to the usual preprocess and one FMA per score; dK/dV and dQ run as two kernels
that recompute P (deterministic; no atomics).
"""
import math
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import tiles
from .masks import WILDCARD_DOMAIN

WILDCARD = tl.constexpr(WILDCARD_DOMAIN)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device):
    """The fused kernels run on CUDA, or anywhere under TRITON_INTERPRET=1 (tests)."""
    return INTERPRET or device.type == "cuda"


# ----------------------------------------------------------------------------- kernels

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


# ----------------------------------------------------------------------------- host side

def dot_precision(dtype):
    # fp32 inputs must not silently drop to TF32: the fp32 oracle would then be 1e-3 away.
    """The tl.dot input precision for a dtype."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _prepare(t):
    """The kernels take any batch/head/row strides (e.g. q, k, v as views of one fused QKV
    projection) but need unit stride along D."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _bhm_strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def kernel_flags(kernel, head_dim, dtype, causal, bottleneck, length, has_dout=True):
    """The constexpr arguments and launch options of one attention kernel for one call
    (has_dout: the backward kernels' dO-free variant when False); tiles from kernels.tiles."""
    cfg = tiles.config(kernel, head_dim, dtype, length)
    flags = dict(CAUSAL=causal, BOTTLENECK=bottleneck,
                 BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
                 EVEN_D=cfg["BLOCK_D"] == head_dim, INTERIOR=cfg["INTERIOR"],
                 DOT_PRECISION=dot_precision(dtype),
                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if kernel != "forward":
        flags["HAS_DOUT"] = has_dout
    return flags


def triton_forward(q, k, v, domains, seq_lens, causal, num_bottleneck, scale):
    """Launch the forward kernel; return (out, lse, mass). seq_lens is int32 [B]."""
    batch, heads, length, head_dim = q.shape
    flags = kernel_flags("forward", head_dim, q.dtype, causal, num_bottleneck > 0, length)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, heads, length, device=q.device, dtype=torch.float32)
    mass = torch.empty_like(lse)
    grid = (triton.cdiv(length, flags["BLOCK_M"]), batch * heads)
    wrap_triton(_forward_kernel)[grid](
        q, k, v, domains, seq_lens, out, lse, mass,
        *_bhm_strides(q), *_bhm_strides(k), *_bhm_strides(v), *_bhm_strides(out),
        domains.stride(0), heads, length, head_dim, num_bottleneck, scale * math.log2(math.e),
        **flags)
    return out, lse, mass


def triton_backward(q, k, v, domains, seq_lens, out, lse, mass, d_out, d_mass,
                    causal, num_bottleneck, scale, has_dout=True, grads=None):
    """Launch preprocess, dK/dV and dQ kernels; return (dq, dk, dv). has_dout=False: the
    loss does not depend on out (d_out is then not read). grads: three [B, H, L, D] tensors
    of one layout (unit stride along D) to write into, e.g. views of a packed gradient;
    default: new contiguous ones."""
    batch, heads, length, head_dim = q.shape
    dkdv_flags = kernel_flags("dkdv", head_dim, q.dtype, causal, num_bottleneck > 0, length,
                              has_dout)
    dq_flags = kernel_flags("dq", head_dim, q.dtype, causal, num_bottleneck > 0, length,
                            has_dout)
    d_out = _prepare(d_out)
    d_mass = d_mass.contiguous().float()
    delta = torch.empty_like(lse)
    if grads is None:  # contiguous, whatever the inputs' layout (autograd accepts that)
        grads = tuple(torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    dq, dk, dv = grads
    # the kernels address dK and dV with dQ's strides
    assert dk.stride() == dq.stride() == dv.stride() and dq.stride(-1) == 1
    rows_grid = (triton.cdiv(length, dq_flags["BLOCK_M"]), batch * heads)
    wrap_triton(_backward_preprocess_kernel)[rows_grid](
        out, d_out, mass, d_mass, delta, *_bhm_strides(out), *_bhm_strides(d_out),
        heads, length, head_dim, BLOCK_M=dq_flags["BLOCK_M"], BLOCK_D=dq_flags["BLOCK_D"],
        EVEN_D=dq_flags["EVEN_D"], HAS_DOUT=has_dout, num_warps=dq_flags["num_warps"], num_stages=1)
    common = (*_bhm_strides(q), *_bhm_strides(k), *_bhm_strides(v), *_bhm_strides(d_out),
              domains.stride(0), *_bhm_strides(dq), heads, length, head_dim, num_bottleneck,
              scale, scale * math.log2(math.e))
    wrap_triton(_backward_dkdv_kernel)[(triton.cdiv(length, dkdv_flags["BLOCK_N"]), batch * heads)](
        q, k, v, domains, seq_lens, d_out, lse, delta, d_mass, dk, dv, *common, **dkdv_flags)
    wrap_triton(_backward_dq_kernel)[rows_grid](
        q, k, v, domains, seq_lens, d_out, lse, delta, d_mass, dq, *common, **dq_flags)
    return dq, dk, dv


# The fused op is registered with torch.library (triton_op + wrap_triton), so torch.compile
# traces through it without a graph break and, on CUDA, Inductor sees the Triton kernels. The
# fake implementations give output shapes without running anything (they also let Dynamo
# trace the op under TRITON_INTERPRET=1, where the kernels are not compiled objects).

@triton_op("autocdsr::cross_domain_attention_forward", mutates_args={})
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, domains: torch.Tensor,
                seq_lens: torch.Tensor, causal: bool, num_bottleneck: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, mass)."""
    return triton_forward(q, k, v, domains, seq_lens, causal, num_bottleneck, scale)


@_forward_op.register_fake
def _(q, k, v, domains, seq_lens, causal, num_bottleneck, scale):
    rows = q.new_empty(q.shape[:3], dtype=torch.float32)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), rows, torch.empty_like(rows)


@triton_op("autocdsr::cross_domain_attention_backward", mutates_args={})
def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, domains: torch.Tensor,
                 seq_lens: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 mass: torch.Tensor, d_out: torch.Tensor, d_mass: torch.Tensor, causal: bool,
                 num_bottleneck: int, scale: float, has_dout: bool) -> tuple[
                     torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), written contiguous."""
    return triton_backward(q, k, v, domains, seq_lens, out, lse, mass, d_out, d_mass, causal,
                           num_bottleneck, scale, has_dout)


@_backward_op.register_fake
def _(q, k, v, domains, seq_lens, out, lse, mass, d_out, d_mass, causal, num_bottleneck, scale,
      has_dout):
    return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, domains, seq_lens, causal, num_bottleneck, scale = inputs
    out, lse, mass = output
    ctx.save_for_backward(q, k, v, domains, seq_lens, out, lse, mass)
    ctx.causal, ctx.num_bottleneck, ctx.scale = causal, num_bottleneck, scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None


def _backward(ctx, d_out, _d_lse, d_mass):
    q, k, v, domains, seq_lens, out, lse, mass = ctx.saved_tensors
    # A loss of the mass alone (the L_cd pass) has no dO: the kernels' dO-free variant skips
    # the dO . V^T and P^T dO matmuls; out stands in for the pointer it never reads.
    has_dout = d_out is not None
    d_mass = torch.zeros_like(mass) if d_mass is None else d_mass
    dq, dk, dv = _backward_op(q, k, v, domains, seq_lens, out, lse, mass,
                              d_out if has_dout else out, d_mass, ctx.causal,
                              ctx.num_bottleneck, ctx.scale, has_dout)
    return dq, dk, dv, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# The packed variant takes the QKV projection's output as it is, [B, L, 3, H, D], and returns
# its gradient in that layout: the backward kernels write dQ, dK, dV straight into one
# [B, L, 3, H, D] buffer, so autograd neither stacks three gradients nor copies them back into
# the projection's layout.

def unpack_qkv(qkv):
    """[B, L, 3, H, D] -> q, k, v as [B, H, L, D] views (no copy)."""
    return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))


@triton_op("autocdsr::cross_domain_attention_packed_forward", mutates_args={})
def _packed_forward_op(qkv: torch.Tensor, domains: torch.Tensor, seq_lens: torch.Tensor,
                       causal: bool, num_bottleneck: int,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, mass) of q, k, v = unpack_qkv(qkv)."""
    return triton_forward(*unpack_qkv(qkv), domains, seq_lens, causal, num_bottleneck, scale)


@_packed_forward_op.register_fake
def _(qkv, domains, seq_lens, causal, num_bottleneck, scale):
    batch, length, _, heads, head_dim = qkv.shape
    rows = qkv.new_empty((batch, heads, length), dtype=torch.float32)
    return qkv.new_empty((batch, heads, length, head_dim)), rows, torch.empty_like(rows)


@triton_op("autocdsr::cross_domain_attention_packed_backward", mutates_args={})
def _packed_backward_op(qkv: torch.Tensor, domains: torch.Tensor, seq_lens: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor, mass: torch.Tensor,
                        d_out: torch.Tensor, d_mass: torch.Tensor, causal: bool,
                        num_bottleneck: int, scale: float, has_dout: bool) -> torch.Tensor:
    """d qkv, [B, L, 3, H, D]."""
    d_qkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    triton_backward(*unpack_qkv(qkv), domains, seq_lens, out, lse, mass, d_out, d_mass,
                    causal, num_bottleneck, scale, has_dout, grads=unpack_qkv(d_qkv))
    return d_qkv


@_packed_backward_op.register_fake
def _(qkv, domains, seq_lens, out, lse, mass, d_out, d_mass, causal, num_bottleneck, scale,
      has_dout):
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


def _packed_setup_context(ctx, inputs, output):
    qkv, domains, seq_lens, causal, num_bottleneck, scale = inputs
    out, lse, mass = output
    ctx.save_for_backward(qkv, domains, seq_lens, out, lse, mass)
    ctx.causal, ctx.num_bottleneck, ctx.scale = causal, num_bottleneck, scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _packed_backward(ctx, d_out, _d_lse, d_mass):
    qkv, domains, seq_lens, out, lse, mass = ctx.saved_tensors
    has_dout = d_out is not None  # as in _backward: the L_cd pass has no dO
    d_mass = torch.zeros_like(mass) if d_mass is None else d_mass
    d_qkv = _packed_backward_op(qkv, domains, seq_lens, out, lse, mass,
                                d_out if has_dout else out, d_mass, ctx.causal,
                                ctx.num_bottleneck, ctx.scale, has_dout)
    return d_qkv, None, None, None, None, None


_packed_forward_op.register_autograd(_packed_backward, setup_context=_packed_setup_context)


def _row_inputs(domains, seq_lens, batch, length, device):
    domains = domains.to(torch.int32).contiguous()
    if seq_lens is None:  # one code path: "no seq_lens" is "every row is L long"
        seq_lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    return domains, seq_lens.to(torch.int32).contiguous()


def fused_attention(q, k, v, domains, *, causal=False, num_bottleneck=0, seq_lens=None,
                    scale=None):
    """cross_domain_attention's triton backend: (out, mass) from the fused kernels."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = _prepare(q), _prepare(k), _prepare(v)
    domains, seq_lens = _row_inputs(domains, seq_lens, q.shape[0], q.shape[2], q.device)
    out, _, mass = _forward_op(q, k, v, domains, seq_lens, causal, num_bottleneck, scale)
    return out, mass


def fused_attention_packed(qkv, domains, *, causal=False, num_bottleneck=0, seq_lens=None,
                           scale=None):
    """fused_attention of unpack_qkv(qkv), qkv [B, L, 3, H, D]; its gradient comes back in
    qkv's layout, written once by the kernels."""
    scale = 1.0 / math.sqrt(qkv.shape[-1]) if scale is None else float(scale)
    qkv = qkv.contiguous()
    domains, seq_lens = _row_inputs(domains, seq_lens, qkv.shape[0], qkv.shape[1], qkv.device)
    out, _, mass = _packed_forward_op(qkv, domains, seq_lens, causal, num_bottleneck, scale)
    return out, mass
