"""Pure-PyTorch oracle of the attention op: P materialised, then out = P V and the
cross-domain mass. Every fused path is tested against it (the solver's oracle is
kernels.reference_pareto)."""
import math

import torch

from .masks import allowed_and_cross


def reference_probabilities(q, k, domains, *, causal=False, num_bottleneck=0, seq_lens=None,
                            scale=None):
    """(P [B, H, L, L] float32 or wider, cross [B, 1, L, L] bool): the attention
    probabilities under the mask (rows with no allowed key are zero) and the cross pairs.

    Scores are computed in the input dtype (so a low-precision call is the "same-precision
    PyTorch reference" of the FlashAttention test rule); the softmax runs in float32.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    allowed, cross = allowed_and_cross(domains, causal=causal, num_bottleneck=num_bottleneck,
                                       seq_lens=seq_lens)
    allowed, cross = allowed[:, None], cross[:, None]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    # A finite fill keeps rows with no allowed key finite (uniform), then they are zeroed:
    # -inf would give NaN there, and NaN poisons the gradient even behind torch.where.
    work = torch.promote_types(scores.dtype, torch.float32)  # fp64 stays fp64 (gradcheck)
    scores = scores.to(work).masked_fill(~allowed, torch.finfo(work).min)
    has_key = allowed.any(dim=-1, keepdim=True)
    probs = torch.where(has_key, torch.softmax(scores, dim=-1), 0.0)
    return probs, cross


def reference_attention(q, k, v, domains, *, causal=False, num_bottleneck=0, seq_lens=None,
                        scale=None):
    """Materialise P; return (out = P V in v.dtype, mass float32)."""
    probs, cross = reference_probabilities(q, k, domains, causal=causal,
                                           num_bottleneck=num_bottleneck, seq_lens=seq_lens,
                                           scale=scale)
    out = torch.matmul(probs.to(v.dtype), v)
    mass = (probs * cross).sum(dim=-1)
    return out, mass
