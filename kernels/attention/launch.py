"""Host side of the fused kernels: tile flags per call and the launches (forward, and the
backward's three kernels); tensors in, tensors out, no autograd (that is op.py)."""
import math
import os

import torch
import triton
from torch.library import wrap_triton

from . import tiles
from .triton_kernels import PREPROCESS_KERNEL, TILED_KERNELS

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device):
    """The fused kernels run on CUDA, or anywhere under TRITON_INTERPRET=1 (tests)."""
    return INTERPRET or device.type == "cuda"


def dot_precision(dtype):
    # fp32 inputs must not silently drop to TF32: the fp32 oracle would then be 1e-3 away.
    """The tl.dot input precision for a dtype."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def prepare(t):
    """The kernels take any batch/head/row strides (e.g. q, k, v as views of one fused QKV
    projection) but need unit stride along D."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _bhm_strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def kernel_flags(kernel, head_dim, dtype, causal, bottleneck, length, has_dout=True):
    """The constexpr arguments and launch options of one attention kernel for one call
    (has_dout: the backward kernels' dO-free variant when False); tiles from tiles.py."""
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
    wrap_triton(TILED_KERNELS["forward"])[grid](
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
    d_out = prepare(d_out)
    d_mass = d_mass.contiguous().float()
    delta = torch.empty_like(lse)
    if grads is None:  # contiguous, whatever the inputs' layout (autograd accepts that)
        grads = tuple(torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    dq, dk, dv = grads
    # the kernels address dK and dV with dQ's strides
    assert dk.stride() == dq.stride() == dv.stride() and dq.stride(-1) == 1
    rows_grid = (triton.cdiv(length, dq_flags["BLOCK_M"]), batch * heads)
    wrap_triton(PREPROCESS_KERNEL)[rows_grid](
        out, d_out, mass, d_mass, delta, *_bhm_strides(out), *_bhm_strides(d_out),
        heads, length, head_dim, BLOCK_M=dq_flags["BLOCK_M"], BLOCK_D=dq_flags["BLOCK_D"],
        EVEN_D=dq_flags["EVEN_D"], HAS_DOUT=has_dout, num_warps=dq_flags["num_warps"], num_stages=1)
    common = (*_bhm_strides(q), *_bhm_strides(k), *_bhm_strides(v), *_bhm_strides(d_out),
              domains.stride(0), *_bhm_strides(dq), heads, length, head_dim, num_bottleneck,
              scale, scale * math.log2(math.e))
    wrap_triton(TILED_KERNELS["dkdv"])[(triton.cdiv(length, dkdv_flags["BLOCK_N"]), batch * heads)](
        q, k, v, domains, seq_lens, d_out, lse, delta, d_mass, dk, dv, *common, **dkdv_flags)
    wrap_triton(TILED_KERNELS["dq"])[rows_grid](
        q, k, v, domains, seq_lens, d_out, lse, delta, d_mass, dq, *common, **dq_flags)
    return dq, dk, dv
