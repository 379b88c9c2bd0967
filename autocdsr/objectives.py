"""The AutoCDSR objective: the cross-domain attention loss.

L_cd = mean over the objective's layers of the mean mass over (b, h, query), the queries being
the real tokens that have a domain (padding and hidden-domain [MASK]s left out). The balanced
step that weighs it against L_rec is autocdsr.step.
"""
import torch


def cross_domain_loss(masses, query_mask, denominator=None):
    """masses: list of [B, H, L] float32; query_mask: [B, L] bool (the queries that count);
    denominator: the query count to normalise by (default: this batch's; a data-parallel step
    passes the global one)."""
    weight = query_mask.float()
    count = weight.sum() if denominator is None else denominator
    terms = [(mass * weight[:, None]).sum() / (count * mass.shape[1]).clamp(min=1)
             for mass in masses]
    return torch.stack(terms).mean()
