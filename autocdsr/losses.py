"""Recommendation losses over the positions that carry a target (target id != 0).

full: softmax cross-entropy over every item, in row chunks recomputed in the backward
      (activation checkpointing), so peak memory is chunk x num_items, not rows x num_items.
sampled: softmax over the target and `num_negatives` sampled items; a sampled negative equal
      to the target is masked out. Which items (train.negatives):
        uniform: drawn uniformly from every item, shared by the batch;
        domain:  drawn uniformly from the target's domain (each domain's draws shared by the
                 batch's targets of that domain), so a small domain's targets learn to beat
                 their own domain's items, the ranking a per-domain protocol asks for, instead
                 of mostly other domains' items (costs num_domains x the uniform scores);
        mixed:   both sets, 2 x num_negatives negatives per target.
inbatch: contrastive over the batch's target embeddings, cosine / tau (tau = 0.1), a proper
      softmax in which positions sharing the row's target are left out of the negatives.
inbatch_official: the official AutoCDSR code's in-batch loss, exactly: numerator
      exp(s_ii / tau); in the denominator every entry whose label equals the row's label (the
      diagonal included) enters as exp(0) = 1, the others as exp(s_ij / tau).

full and sampled score with `logits`: "dot" (h . e, plus the item's bias b when the model has
one) or "cosine" (cos(h, e) / temperature, the paper's r(x) = cos(Emb(x), h)).

Every loss is a weighted mean over the batch's targets. By default each target weighs 1;
train.domain_balance weighs a target by its domain instead (domain_loss_weights), so a small
domain's targets carry more of the gradient than their count alone gives them.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import CHOICES

FULL_CHUNK_ELEMENTS = 1 << 26  # rows x items per chunk (256 MiB of fp32 logits)
INBATCH_TAU = 0.1
LOSSES = CHOICES["train.loss"]
LOGITS = CHOICES["train.logits"]
NEGATIVES = CHOICES["train.negatives"]


def _ce_chunk(states, weights, targets, row_weight, bias=None):
    logits = states @ weights.T
    if bias is not None:
        logits = logits + bias
    return (F.cross_entropy(logits.float(), targets, reduction="none") * row_weight).sum()


def _weighted_mean(per_row, row_weight, denominator=None):
    """sum(w * loss) / denominator; the denominator defaults to sum(w) (a data-parallel step
    passes the global count, so per-rank losses sum to the union batch's loss)."""
    if denominator is None:
        denominator = row_weight.sum()
    return (per_row * row_weight).sum() / denominator.clamp(min=1.0)


def full_softmax_loss(states, weights, targets, row_weight, denominator=None, bias=None):
    """Cross-entropy over every item, in row chunks recomputed in the backward."""
    rows = max(1, FULL_CHUNK_ELEMENTS // weights.shape[0])
    total = states.new_zeros((), dtype=torch.float32)
    for lo in range(0, states.shape[0], rows):
        chunk = (states[lo:lo + rows], weights, targets[lo:lo + rows], row_weight[lo:lo + rows],
                 bias)
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_chunk, *chunk, use_reentrant=False)
        else:
            total = total + _ce_chunk(*chunk)
    return total / (row_weight.sum() if denominator is None else denominator).clamp(min=1.0)


def _cosine_logits(states, target_vectors):
    return F.normalize(states, dim=-1) @ F.normalize(target_vectors, dim=-1).T / INBATCH_TAU


def _inbatch_masks(targets, row_weight):
    """(same target [C, C], usable column [C, C]): empty slots are nobody's negative."""
    eye = torch.eye(len(targets), dtype=torch.bool, device=targets.device)
    return targets[:, None] == targets[None, :], (row_weight > 0)[None, :] | eye, eye


def inbatch_loss(states, weights, targets, row_weight, denominator=None):
    """Contrastive loss over the batch's targets: cosine / tau, same-target positions masked."""
    logits = _cosine_logits(states, weights[targets]).float()
    same, usable, eye = _inbatch_masks(targets, row_weight)
    # Positions sharing a target item are not each other's negatives.
    logits = logits.masked_fill((same & ~eye) | ~usable, float("-inf"))
    per_row = F.cross_entropy(logits, torch.arange(len(targets), device=targets.device),
                              reduction="none")
    return _weighted_mean(per_row, row_weight, denominator)


def inbatch_official_loss(states, weights, targets, row_weight=None, denominator=None):
    """The official AutoCDSR code's in-batch loss, exactly (see the module docstring)."""
    if row_weight is None:
        row_weight = torch.ones(len(targets), device=states.device)
    logits = _cosine_logits(states, weights[targets]).float()
    same, usable, _ = _inbatch_masks(targets, row_weight)
    lse = torch.logsumexp(logits.masked_fill(same, 0.0).masked_fill(~usable, float("-inf")),
                          dim=1)
    return _weighted_mean(lse - logits.diagonal(), row_weight, denominator)


def domain_loss_weights(counts, balance, max_weight):
    """[num_domains] float32: the loss weight of a target of domain d, (n_max / n_d) ** balance
    cut to max_weight, where n_d counts domain d's training events and n_max the largest
    domain's. balance 0 weighs every target alike; 1 gives each domain the same total weight
    (up to the cut, which keeps a domain of a handful of events from dominating a batch). The
    loss divides by the batch's summed weight, so only the ratios matter. A domain without
    training events gets 0 (it has no training targets)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.ndim != 1 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"counts must be non-negative per-domain event counts, got {counts}")
    weights = (counts.max() / counts.clamp(min=1)).pow(balance).clamp(max=max_weight)
    return torch.where(counts > 0, weights, 0.0).float()


def uniform_negatives(num_items, count, device):
    """[count] item ids drawn uniformly, with replacement, from 1..num_items (never padding 0
    nor the [MASK] id num_items + 1), from the global generator."""
    return torch.randint(1, num_items + 1, (count,), device=device)


class DomainPools(NamedTuple):
    """Every domain's items in one flat tensor: domain d's are items[offsets[d]:offsets[d + 1]]
    (an item of several domains appears in each)."""
    items: torch.Tensor    # int64
    offsets: torch.Tensor  # [num_domains + 1] int64

    @classmethod
    def build(cls, domain_items, device):
        """From a list of per-domain item-id arrays (SequenceData.domain_items)."""
        sizes = torch.tensor([len(pool) for pool in domain_items], dtype=torch.int64)
        items = torch.cat([torch.as_tensor(pool, dtype=torch.int64) for pool in domain_items])
        offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
        return cls(items.to(device), offsets.to(device))


def negatives_per_domain(pools, count):
    """[num_domains, count]: row d holds `count` items drawn uniformly, with replacement, from
    domain d's pool (global generator; no host sync: the pool sizes stay on the device). An
    empty domain's row holds some valid item id; no target is of that domain, so none reads it."""
    sizes = pools.offsets[1:] - pools.offsets[:-1]
    uniform = torch.rand(len(sizes), count, device=pools.items.device, dtype=torch.float64)
    index = (uniform * sizes[:, None]).long().minimum((sizes - 1).clamp(min=0)[:, None])
    return pools.items[(pools.offsets[:-1, None] + index).clamp(max=len(pools.items) - 1)]


def _negative_logits(states, weights, targets, negatives, bias):
    """[rows, count] scores of the negatives; a negative equal to the row's target gets -inf."""
    logits = states @ weights[negatives].T
    if bias is not None:
        logits = logits + bias[negatives][None]
    return logits.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))


def sampled_softmax_loss(states, weights, targets, row_weight, num_negatives, denominator=None,
                         bias=None, negatives="uniform", target_domains=None, pools=None):
    """weights: the scoring table [num_items + 1, H] (row 0 padding); with negatives domain or
    mixed, target_domains [rows] (-1 on filler rows) and pools (DomainPools)."""
    positive = (states * weights[targets]).sum(-1, keepdim=True)
    if bias is not None:
        positive = positive + bias[targets, None]
    columns = [positive]
    if negatives in ("uniform", "mixed"):
        drawn = uniform_negatives(weights.shape[0] - 1, num_negatives, states.device)
        columns.append(_negative_logits(states, weights, targets, drawn, bias))
    if negatives in ("domain", "mixed"):
        own = None  # each row keeps the scores of its target's domain's draws
        for d, drawn in enumerate(negatives_per_domain(pools, num_negatives)):
            scores = _negative_logits(states, weights, targets, drawn, bias)
            own = scores if own is None else torch.where((target_domains == d)[:, None],
                                                         scores, own)
        columns.append(own)
    logits = torch.cat(columns, dim=1).float()
    per_row = F.cross_entropy(logits, torch.zeros_like(targets), reduction="none")
    return _weighted_mean(per_row, row_weight, denominator)


def recommendation_loss(kind, hidden, weights, targets, slots, slot_weight, num_negatives=1000,
                        logits="dot", temperature=1.0, denominator=None, bias=None,
                        negatives="uniform", target_domains=None, pools=None):
    """hidden [B, L, H], targets [B, L] (0 = no target), weights = item table [V, H], bias
    [V] per-item score offsets or None (full and sampled with dot logits only);
    slots [C] / slot_weight [C]: the flat positions holding a target (fixed count C, weight 0
    for the padding slots), see autocdsr.data.batches.target_slots. denominator: the target
    count to normalise by (default: this batch's). With data parallelism the in-batch losses
    see the rank's targets as negatives (as per-device in-batch negatives do).
    negatives (sampled only): uniform | domain | mixed, see the module docstring; domain and
    mixed need target_domains [B, L] (the batch's) and pools (DomainPools)."""
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    if negatives != "uniform" and (kind != "sampled" or target_domains is None or pools is None):
        raise ValueError(f"negatives={negatives} needs the sampled loss, the targets' domains "
                         "and the domains' item pools")
    if logits not in LOGITS:
        raise ValueError(f"logits must be one of {LOGITS}, got {logits!r}")
    states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, slots)
    targets = targets.reshape(-1).index_select(0, slots)
    if kind == "inbatch":
        return inbatch_loss(states, weights, targets, slot_weight, denominator)
    if kind == "inbatch_official":
        return inbatch_official_loss(states, weights, targets, slot_weight, denominator)
    if bias is not None and (kind.startswith("inbatch") or logits == "cosine"):
        raise ValueError("an item bias needs the full or sampled loss with dot logits")
    if logits == "cosine":
        states = F.normalize(states, dim=-1) / temperature
        weights = F.normalize(weights, dim=-1)
    if kind == "full":
        return full_softmax_loss(states, weights, targets, slot_weight, denominator, bias)
    if target_domains is not None:
        target_domains = target_domains.reshape(-1).index_select(0, slots)
    return sampled_softmax_loss(states, weights, targets, slot_weight, num_negatives, denominator,
                                bias, negatives, target_domains, pools)
