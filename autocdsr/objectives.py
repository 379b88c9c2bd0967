"""The AutoCDSR objective: the cross-domain attention loss.

L_cd = mean over the objective's layers of the mean mass over (b, h, query), the queries being
the real tokens that have a domain (padding and hidden-domain [MASK]s left out). The balanced
step that weighs it against L_rec is autocdsr.step.

Per query domain (weighting.per_domain): L_cd_d is the same mean over the queries of domain d
only. With N_d such queries out of N, sum_d (N_d / N) L_cd_d = L_cd.
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


def cross_domain_loss_per_domain(masses, query_mask, domains, num_domains, denominators=None):
    """[num_domains] L_cd_d: the mean mass over (b, h, query of domain d), averaged over the
    layers; a domain without queries gets 0. denominators: [num_domains] query counts to
    normalise by (default: this batch's; a data-parallel step passes the global ones)."""
    member = _domain_members(query_mask, domains, num_domains)                  # [B, L, D]
    counts = member.sum((0, 1)) if denominators is None else denominators
    terms = [torch.einsum("bhl,bld->d", mass, member) / (counts * mass.shape[1]).clamp(min=1)
             for mass in masses]
    return torch.stack(terms).mean(0)


def domain_query_counts(query_mask, domains, num_domains):
    """[num_domains] float: how many queries of each domain enter L_cd."""
    return _domain_members(query_mask, domains, num_domains).sum((0, 1))


def _domain_members(query_mask, domains, num_domains):
    """[B, L, num_domains] float: 1 where the position is a query of L_cd in that domain."""
    ids = torch.arange(num_domains, device=domains.device)
    return ((domains[..., None] == ids) & query_mask[..., None]).float()
