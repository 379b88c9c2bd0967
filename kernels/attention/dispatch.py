"""The attention op's one entry point: input checks, then the backend.

Backends (each computes the same out and mass; see cross_domain_attention):
  triton     the fused kernels (triton_kernels.py, launch.py, op.py), CUDA or TRITON_INTERPRET=1
  sdpa       PyTorch scaled_dot_product_attention with indicator columns (sdpa.py)
  reference  P materialised (reference.py), the test oracle
  auto       triton on CUDA, sdpa elsewhere
"""
import torch

from .launch import triton_available
from .op import fused_attention, fused_attention_packed, unpack_qkv
from .reference import reference_attention
from .sdpa import sdpa_attention
from .validation import check_attention_inputs

BACKENDS = {"triton": fused_attention, "sdpa": sdpa_attention, "reference": reference_attention}


def resolve_backend(backend, device):
    """The backend that runs: "auto" is triton on CUDA and sdpa elsewhere."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "sdpa"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
    return backend


def cross_domain_attention(q, k, v, domains, *, causal=False, num_bottleneck=0, seq_lens=None,
                           scale=None, backend="auto", num_domains=None, check_inputs=True):
    """Masked attention and the cross-domain attention mass.

    q, k, v: [B, H, L, D]; domains: [B, L] integers (< 0 padding, WILDCARD_DOMAIN a token
    that matches every domain). Key j is allowed for query i when both are real tokens, j <= i
    if causal, and with num_bottleneck > 0 when i or j is a bottleneck token or their domains
    match. mass[b,h,i] = sum_j P[b,h,i,j] c[i,j] with c = "different domains, neither a
    wildcard" (plain mode) or "j a bottleneck token, i not" (bottleneck mode).
    num_domains (optional): ids lie in 0..num_domains - 1; lets the sdpa backend size its
    columns without reading the ids on the host. check_inputs=False skips the argument checks
    (for a caller that checked the same kind of inputs already: a model's later layers).

    Returns (out [B, H, L, D] in q.dtype, mass [B, H, L] float32).
    """
    backend = resolve_backend(backend, q.device)
    if check_inputs:
        check_attention_inputs(q, k, v, domains, causal, num_bottleneck, seq_lens, scale)
    if backend == "triton" and not triton_available(q.device):
        raise ValueError(f"backend='triton' needs a CUDA device (or TRITON_INTERPRET=1), "
                         f"got q on {q.device}")
    extra = {"num_domains": num_domains} if backend == "sdpa" else {}
    return BACKENDS[backend](q, k, v, domains, causal=causal, num_bottleneck=num_bottleneck,
                             seq_lens=seq_lens, scale=scale, **extra)


def cross_domain_attention_packed(qkv, domains, *, causal=False, num_bottleneck=0, seq_lens=None,
                                  scale=None, backend="auto", num_domains=None,
                                  check_inputs=True):
    """cross_domain_attention of q, k, v packed as a QKV projection's output [B, L, 3, H, D]
    (q = qkv[:, :, 0] as [B, H, L, D], and so on). The triton backend returns the gradient in
    that layout, written once by the kernels; the others compute on the three views."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError("qkv must be a tensor of shape [B, L, 3, H, D], got "
                         f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    q, k, v = unpack_qkv(qkv)
    backend = resolve_backend(backend, qkv.device)
    if backend != "triton" or not triton_available(qkv.device):
        return cross_domain_attention(q, k, v, domains, causal=causal,
                                      num_bottleneck=num_bottleneck, seq_lens=seq_lens,
                                      scale=scale, backend=backend, num_domains=num_domains,
                                      check_inputs=check_inputs)
    if check_inputs:
        check_attention_inputs(q, k, v, domains, causal, num_bottleneck, seq_lens, scale)
    return fused_attention_packed(qkv, domains, causal=causal, num_bottleneck=num_bottleneck,
                                  seq_lens=seq_lens, scale=scale)
