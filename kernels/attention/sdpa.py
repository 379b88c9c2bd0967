"""Attention + mass through PyTorch's scaled_dot_product_attention.

V is augmented with indicator columns, so the extra output columns are attention mass:
one column per domain plus one for wildcard keys in plain mode (mass = 1 - mass on the
query's own domain - mass on wildcards), one column "key is a bottleneck token" in bottleneck
mode. Memory stays O(L) per row where SDPA's fused CPU/GPU paths apply.

With `num_domains` given (ids in 0..num_domains - 1, padding and wildcards aside) the column
count is known up front and nothing reads the data on the host; without it the ids present are
found with torch.unique, a host synchronisation.
"""
import math

import torch
import torch.nn.functional as F

from .masks import WILDCARD_DOMAIN, allowed_and_cross


def _domain_columns(domains, num_domains):
    """([B, L] column of each position, column count C, wildcard column)."""
    wild = domains == WILDCARD_DOMAIN
    if num_domains is None:
        ids = torch.where(wild, -1, domains.clamp(min=-1))
        values, column = torch.unique(ids, return_inverse=True)
        count = values.numel()
    else:
        column, count = domains.clamp(0, num_domains - 1), num_domains
    return torch.where(wild, count, column).long(), count + 1, count


def sdpa_attention(q, k, v, domains, *, causal=False, num_bottleneck=0, seq_lens=None,
                   scale=None, num_domains=None):
    """cross_domain_attention's sdpa backend: V augmented with domain indicator columns."""
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
        column, count, wild_column = _domain_columns(domains, num_domains)
        indicators = F.one_hot(column, num_classes=count).bool()
    extra = indicators.shape[-1]
    pad_to = -(-(head_dim + extra) // 8) * 8  # keep the augmented width a multiple of 8
    v_aug = torch.cat([v, indicators[:, None].to(v.dtype).expand(batch, heads, length, extra),
                       v.new_zeros(batch, heads, length, pad_to - head_dim - extra)], dim=-1)
    if q.device.type == "cpu":
        # The CPU's fused (flash) SDPA needs one head width for q, k and v; with a wider v it
        # falls back to the unfused math path, 2x slower forward and backward at L = 200-800.
        # Zero columns in q and k leave every score, and so every output and gradient, as is.
        widen = (0, pad_to - head_dim)
        q, k = F.pad(q, widen), F.pad(k, widen)
    out_aug = F.scaled_dot_product_attention(q, k, v_aug, attn_mask=attn_mask, scale=scale)

    keep = has_key[:, None, :]
    out = out_aug[..., :head_dim] * keep[..., None].to(q.dtype)
    extra_mass = out_aug[..., head_dim:head_dim + extra].float()
    if num_bottleneck > 0:
        is_ordinary = (torch.arange(length, device=q.device) >= num_bottleneck)[None, None, :]
        mass = extra_mass[..., 0] * is_ordinary
    else:
        own = extra_mass.gather(-1, column[:, None, :, None].expand(batch, heads, length, 1))
        mass = 1.0 - own[..., 0] - extra_mass[..., wild_column]
        keep = keep & (domains != WILDCARD_DOMAIN)[:, None, :]  # a wildcard query has no cross
    mass = torch.where(keep, mass, 0.0)
    return out, mass
