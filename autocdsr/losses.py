"""Recommendation losses over the positions that carry a target (target id != 0).

full: softmax cross-entropy over every item, in row chunks recomputed in the backward
      (activation checkpointing), so peak memory is chunk x num_items, not rows x num_items.
sampled: softmax over the target and `num_negatives` uniformly sampled items (shared by the
      batch); a sampled negative equal to the target is masked out.
inbatch: contrastive over the batch's target embeddings, cosine / tau (tau = 0.1), a proper
      softmax in which positions sharing the row's target are left out of the negatives.
inbatch_official: the official AutoCDSR code's in-batch loss, exactly: numerator
      exp(s_ii / tau); in the denominator every entry whose label equals the row's label (the
      diagonal included) enters as exp(0) = 1, the others as exp(s_ij / tau).

full and sampled score with `logits`: "dot" (h . e, plus the item's bias b when the model has
one) or "cosine" (cos(h, e) / temperature, the paper's r(x) = cos(Emb(x), h)).
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import CHOICES

FULL_CHUNK_ELEMENTS = 1 << 26  # rows x items per chunk (256 MiB of fp32 logits)
INBATCH_TAU = 0.1
LOSSES = CHOICES["train.loss"]
LOGITS = CHOICES["train.logits"]


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


def uniform_negatives(num_items, count, device):
    """[count] item ids drawn uniformly, with replacement, from 1..num_items (never padding 0
    nor the [MASK] id num_items + 1), from the global generator."""
    return torch.randint(1, num_items + 1, (count,), device=device)


def sampled_softmax_loss(states, weights, targets, row_weight, num_negatives, denominator=None,
                         bias=None):
    """weights: the scoring table [num_items + 1, H] (row 0 padding)."""
    negatives = uniform_negatives(weights.shape[0] - 1, num_negatives, states.device)
    positive = (states * weights[targets]).sum(-1, keepdim=True)
    negative = states @ weights[negatives].T
    if bias is not None:
        positive, negative = positive + bias[targets, None], negative + bias[negatives][None]
    negative = negative.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([positive, negative], dim=1).float()
    per_row = F.cross_entropy(logits, torch.zeros_like(targets), reduction="none")
    return _weighted_mean(per_row, row_weight, denominator)


def recommendation_loss(kind, hidden, weights, targets, slots, slot_weight, num_negatives=1000,
                        logits="dot", temperature=1.0, denominator=None, bias=None):
    """hidden [B, L, H], targets [B, L] (0 = no target), weights = item table [V, H], bias
    [V] per-item score offsets or None (full and sampled with dot logits only);
    slots [C] / slot_weight [C]: the flat positions holding a target (fixed count C, weight 0
    for the padding slots), see autocdsr.data.batches.target_slots. denominator: the target
    count to normalise by (default: this batch's). With data parallelism the in-batch losses
    see the rank's targets as negatives (as per-device in-batch negatives do)."""
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
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
    return sampled_softmax_loss(states, weights, targets, slot_weight, num_negatives, denominator,
                                bias)
