"""Attention + mass through PyTorch's scaled_dot_product_attention.

V is augmented with indicator columns, so the extra output columns are attention mass:
one column per domain in plain mode (mass = 1 - mass on the query's own domain), one column
"key is a bottleneck token" in bottleneck mode. Memory stays O(L) per row where SDPA's fused
CPU/GPU paths apply.
"""
import math

import torch
import torch.nn.functional as F

from .masks import allowed_and_cross


def sdpa_attention(q, k, v, domains, *, causal=False, num_bottleneck=0, seq_lens=None,
                   scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    batch, heads, length, head_dim = q.shape
    allowed, _ = allowed_and_cross(domains, causal=causal, num_bottleneck=num_bottleneck,
                                   seq_lens=seq_lens)
    has_key = allowed.any(dim=-1)  # [B, L]
    # Rows with no allowed key attend to themselves so no backend sees an all-masked row;
    # their output is zeroed below, which also zeroes their gradients.
    eye = torch.eye(length, dtype=torch.bool, device=q.device)
    attn_mask = (allowed | (eye & ~has_key[:, :, None]))[:, None]

    if num_bottleneck > 0:
        indicators = (torch.arange(length, device=q.device) < num_bottleneck)[None, :, None]
        indicators = indicators.expand(batch, length, 1)
    else:
        # Domain ids are arbitrary integers: map them to columns by their rank among the values
        # present (torch.unique costs a host sync, acceptable on this non-fused path).
        values, column = torch.unique(domains.clamp(min=-1), return_inverse=True)
        indicators = F.one_hot(column, num_classes=values.numel()).bool()
    extra = indicators.shape[-1]
    pad_to = -(-(head_dim + extra) // 8) * 8  # keep the augmented width a multiple of 8
    v_aug = torch.cat([v, indicators[:, None].to(v.dtype).expand(batch, heads, length, extra),
                       v.new_zeros(batch, heads, length, pad_to - head_dim - extra)], dim=-1)
    out_aug = F.scaled_dot_product_attention(q, k, v_aug, attn_mask=attn_mask, scale=scale)

    keep = has_key[:, None, :]
    out = out_aug[..., :head_dim] * keep[..., None].to(q.dtype)
    extra_mass = out_aug[..., head_dim:head_dim + extra].float()
    if num_bottleneck > 0:
        is_ordinary = (torch.arange(length, device=q.device) >= num_bottleneck)[None, None, :]
        mass = extra_mass[..., 0] * is_ordinary
    else:
        own = extra_mass.gather(-1, column[:, None, :, None].expand(batch, heads, length, 1))
        mass = 1.0 - own[..., 0]
    mass = torch.where(keep, mass, 0.0)
    return out, mass
