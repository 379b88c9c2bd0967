"""The masking rules of the attention op as dense [B, L, L] tensors (used by the PyTorch
backends; the Triton kernels apply the same rules per tile).

Domain ids: a value < 0 is padding; WILDCARD_DOMAIN marks a token whose domain is hidden
(a BERT4Rec [MASK] under `data.mask_domain=hidden`): it may attend and be attended by every
token, and a pair that involves it never counts as cross-domain.
"""
import torch

WILDCARD_DOMAIN = 2**31 - 1  # the largest int32: the kernels read domain ids as int32


def padding_mask(domains, seq_lens=None):
    """[B, L] bool: True where the position holds a real token (domain >= 0, inside seq_lens)."""
    valid = domains >= 0
    if seq_lens is not None:
        positions = torch.arange(domains.shape[1], device=domains.device)
        valid = valid & (positions[None, :] < seq_lens[:, None])
    return valid


def allowed_and_cross(domains, *, causal=False, num_bottleneck=0, seq_lens=None):
    """Return (allowed, cross), both [B, L(query), L(key)] bool.

    allowed[b,i,j]: query i may attend key j. Padding queries have no allowed key.
    cross[b,i,j]: the pair counts towards the cross-domain mass of query i.
    """
    length = domains.shape[1]
    valid = padding_mask(domains, seq_lens)
    allowed = valid[:, :, None] & valid[:, None, :]
    positions = torch.arange(length, device=domains.device)
    if causal:
        allowed = allowed & (positions[None, :, None] >= positions[None, None, :])
    wild = domains == WILDCARD_DOMAIN
    either_wild = wild[:, :, None] | wild[:, None, :]
    same_domain = (domains[:, :, None] == domains[:, None, :]) | either_wild
    if num_bottleneck > 0:
        query_is_ib = positions[None, :, None] < num_bottleneck
        key_is_ib = positions[None, None, :] < num_bottleneck
        allowed = allowed & (query_is_ib | key_is_ib | same_domain)
        cross = key_is_ib & ~query_is_ib
        cross = cross.expand_as(allowed)
    else:
        cross = ~same_domain
    return allowed, cross
