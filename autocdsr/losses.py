"""Recommendation losses over the positions that carry a target (target id != 0).

full: softmax cross-entropy over every item, in row chunks recomputed in the backward
      (activation checkpointing), so peak memory is chunk x num_items, not rows x num_items.
inbatch: the AutoCDSR code's contrastive loss: cosine similarity to the batch's target
      embeddings, temperature 0.1, the other targets as negatives.
sampled: softmax over the target and `num_negatives` uniformly sampled items (shared by the
      batch); a sampled negative equal to the target is masked out.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

FULL_CHUNK_ELEMENTS = 1 << 26  # rows x items per chunk (256 MiB of fp32 logits)


def _ce_chunk(states, weights, targets):
    logits = states @ weights.T
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def full_softmax_loss(states, weights, targets):
    rows = max(1, FULL_CHUNK_ELEMENTS // weights.shape[0])
    total = states.new_zeros((), dtype=torch.float32)
    for lo in range(0, states.shape[0], rows):
        chunk = (states[lo:lo + rows], weights, targets[lo:lo + rows])
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_chunk, *chunk, use_reentrant=False)
        else:
            total = total + _ce_chunk(*chunk)
    return total / max(1, states.shape[0])


def inbatch_loss(states, weights, targets, temperature=0.1):
    target_vectors = F.normalize(weights[targets], dim=-1)
    logits = F.normalize(states, dim=-1) @ target_vectors.T / temperature
    # Positions sharing a target item are not each other's negatives.
    same = targets[:, None] == targets[None, :]
    eye = torch.eye(len(targets), dtype=torch.bool, device=targets.device)
    logits = logits.float().masked_fill(same & ~eye, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(targets), device=targets.device))


def sampled_softmax_loss(states, weights, targets, num_negatives, generator=None):
    negatives = torch.randint(1, weights.shape[0], (num_negatives,), device=states.device,
                              generator=generator)
    positive = (states * weights[targets]).sum(-1, keepdim=True)
    negative = states @ weights[negatives].T
    negative = negative.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([positive, negative], dim=1).float()
    return F.cross_entropy(logits, torch.zeros_like(targets))


def recommendation_loss(kind, hidden, weights, targets, num_negatives=1000):
    """hidden [B, L, H], targets [B, L] (0 = no target); weights = item table [V, H]."""
    keep = targets.reshape(-1) != 0
    states = hidden.reshape(-1, hidden.shape[-1])[keep]
    targets = targets.reshape(-1)[keep]
    if kind == "full":
        return full_softmax_loss(states, weights, targets)
    if kind == "inbatch":
        return inbatch_loss(states, weights, targets)
    if kind == "sampled":
        return sampled_softmax_loss(states, weights, targets, num_negatives)
    raise ValueError(f"loss must be full, inbatch or sampled, got {kind!r}")
