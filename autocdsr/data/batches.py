"""Batching: truncation to max_len (most recent events), right padding with seq_lens,
SASRec next-item targets and BERT4Rec cloze masking. Domain id -1 marks padding.

The ids come from the model's token spec (autocdsr.models.tokens.TokenSpec): a [MASK]
replaces only the item id and keeps the masked item's domain (the [MASK] appended at
evaluation carries the target's), unless the spec gives [MASK]s a domain of their own choosing
(the wildcard of data.mask_domain=hidden).

Training batches have fixed shapes, so a training step never depends on the data's sizes:
every batch has `batch_size` rows (a row index < 0 is an empty row, used to fill the last
batch) and carries `target_slots` / `target_weight`: the flat [B * L] positions that hold a
target, padded to a fixed capacity with weight 0. The loss gathers those rows with a
fixed-size index, not a boolean mask (which would need the count on the host).
"""
from typing import TypedDict

import numpy as np
import torch

from .dataset import PAD

HELD_OUT_PREFIX = "held_"  # the keys of a held-out batch carried inside a training batch


class Batch(TypedDict):
    """What every batch holds: int64 tensors, B rows, L positions."""
    items: torch.Tensor     # [B, L] item ids: 0 = padding, num_items + 1 = [MASK]
    domains: torch.Tensor   # [B, L] domain ids: -1 = padding
    seq_lens: torch.Tensor  # [B] each row's valid prefix
    targets: torch.Tensor   # training [B, L] (0 = no target there), evaluation [B]


class TrainBatch(Batch):
    """A training batch: fixed shapes whatever the data (see the module docstring)."""
    target_slots: torch.Tensor   # [capacity] flat B * L positions that hold a target
    target_weight: torch.Tensor  # [capacity] float32: 1 for a target, 0 for a filler slot
    target_domains: torch.Tensor  # [B, L] the target's domain at a target, -1 elsewhere


class EvalBatch(Batch):
    """An evaluation batch: one target per row."""
    target_domains: torch.Tensor  # [B] the target's domain id
    rows: torch.Tensor            # [B] the rows of the split these are


def _pad_rows(seqs, rows, length, take_last):
    """[B, length] items and domains (right-padded), and lengths, of the last `take_last`
    events of each row."""
    batch = len(rows)
    items = np.full((batch, length), PAD, dtype=np.int64)
    domains = np.full((batch, length), -1, dtype=np.int64)
    lengths = np.zeros(batch, dtype=np.int64)
    for b, r in enumerate(rows):
        if r < 0:  # an empty row that fills the last batch
            continue
        it, dom = seqs.row(r)
        it, dom = it[-take_last:], dom[-take_last:]
        n = len(it)
        items[b, :n], domains[b, :n], lengths[b] = it, dom, n
    return items, domains, lengths


def sasrec_train_batch(seqs, rows, max_len) -> TrainBatch:
    """Inputs = events[:-1], targets = events[1:] over the last max_len + 1 events."""
    items, domains, lengths = _pad_rows(seqs, rows, max_len + 1, max_len + 1)
    inputs, input_domains = items[:, :-1].copy(), domains[:, :-1].copy()
    targets, target_domains = items[:, 1:].copy(), domains[:, 1:].copy()
    lengths = np.maximum(lengths - 1, 0)
    # The position past each row's end is not an input: blank it.
    for b, n in enumerate(lengths):
        inputs[b, n:], input_domains[b, n:] = PAD, -1
        targets[b, n:], target_domains[b, n:] = PAD, -1
    return _train_tensors(inputs, input_domains, lengths, targets, targets.size, target_domains)


def bert4rec_train_batch(seqs, rows, max_len, tokens, mask_prob, rng) -> TrainBatch:
    """Cloze: each real position is masked with probability mask_prob (at least one per
    row); targets are the hidden items at masked positions, PAD elsewhere."""
    items, domains, lengths = _pad_rows(seqs, rows, max_len, max_len)
    real = items != PAD
    masked = (rng.random(items.shape) < mask_prob) & real
    for b, n in enumerate(lengths):
        if n and not masked[b].any():
            masked[b, rng.integers(n)] = True
    capacity = cloze_capacity(len(rows), max_len, mask_prob)
    extra = np.flatnonzero(masked.reshape(-1))[capacity:]
    masked.reshape(-1)[extra] = False  # beyond the capacity (practically never): unmasked
    targets, target_domains = np.where(masked, items, PAD), np.where(masked, domains, -1)
    items = np.where(masked, tokens.mask_item, items)
    if tokens.mask_domain is not None:
        domains = np.where(masked, tokens.mask_domain, domains)
    return _train_tensors(items, domains, lengths, targets, capacity, target_domains)


def cloze_capacity(batch, length, mask_prob):
    """Target slots of a cloze batch: 1.5 x the expected masks plus one per row (the count is
    Binomial, so exceeding this is vanishingly rare at real batch sizes)."""
    return int(min(batch * length, np.ceil(1.5 * batch * length * mask_prob) + batch))


def target_slots(targets, capacity):
    """(slots [capacity] int64, weight [capacity] float32): flat positions of the non-PAD
    targets, then zeros with weight 0."""
    flat = np.flatnonzero(targets.reshape(-1) != PAD)
    if len(flat) > capacity:
        raise ValueError(f"{len(flat)} targets exceed the batch's capacity {capacity}")
    slots = np.zeros(capacity, dtype=np.int64)
    weight = np.zeros(capacity, dtype=np.float32)
    slots[:len(flat)], weight[:len(flat)] = flat, 1.0
    return slots, weight


def shard_batch(batch, rank, world) -> TrainBatch:
    """Rows rank, rank + world, ... of a global training batch (data parallelism), with the
    target slots recomputed for those rows; capacity: the rows' share of the batch's. A
    held-out batch riding along (HELD_OUT_PREFIX keys) is sharded the same way."""
    part = _shard_rows(batch, rank, world)
    held = {key[len(HELD_OUT_PREFIX):]: value for key, value in batch.items()
            if key.startswith(HELD_OUT_PREFIX)}
    if held:
        part.update({HELD_OUT_PREFIX + key: value
                     for key, value in _shard_rows(held, rank, world).items()})
    return part


def _shard_rows(batch, rank, world):
    part = {key: batch[key][rank::world]
            for key in ("items", "domains", "seq_lens", "targets", "target_domains")}
    rows, length = part["items"].shape
    targets = part["targets"].numpy()
    capacity = min(rows * length, -(-len(batch["target_slots"]) * 2 // world))
    if (targets != PAD).sum() > capacity:  # an uneven share (tiny batches): the whole capacity
        capacity = len(batch["target_slots"])
    slots, weight = target_slots(targets, capacity)
    part["target_slots"], part["target_weight"] = torch.from_numpy(slots), torch.from_numpy(weight)
    return part


def _train_tensors(items, domains, lengths, targets, capacity, target_domains) -> TrainBatch:
    batch = _tensors(items, domains, lengths, targets)
    batch["target_domains"] = torch.from_numpy(target_domains)
    slots, weight = target_slots(targets, capacity)
    batch["target_slots"], batch["target_weight"] = torch.from_numpy(slots), torch.from_numpy(weight)
    return batch


def eval_batch(seqs, rows, max_len, arch, tokens) -> EvalBatch:
    """Histories for scoring. SASRec reads the last max_len events and predicts from the last
    position; BERT4Rec appends [MASK] after the last max_len - 1 events and predicts there."""
    if arch == "sasrec":
        items, domains, lengths = _pad_rows(seqs, rows, max_len, max_len)
    else:
        items, domains, lengths = _pad_rows(seqs, rows, max_len, max_len - 1)
        b = np.arange(len(rows))
        mask_domain = seqs.target_domains[rows] if tokens.mask_domain is None else tokens.mask_domain
        items[b, lengths], domains[b, lengths] = tokens.mask_item, mask_domain
        lengths = lengths + 1
    targets = seqs.targets[rows]
    batch = _tensors(items, domains, lengths, targets)
    batch["target_domains"] = torch.from_numpy(seqs.target_domains[rows])
    batch["rows"] = torch.from_numpy(np.asarray(rows))
    return batch


def held_out_batch(seqs, rows, max_len, arch, tokens) -> dict:
    """A training-shaped batch of evaluation rows (weighting.held_out): each row's history as
    eval_batch builds it, its one target at the last position (SASRec: the prediction from the
    last event; BERT4Rec: the appended [MASK]), under keys prefixed HELD_OUT_PREFIX so that it
    rides inside a training batch through prefetching, sharding and graph capture."""
    held = eval_batch(seqs, rows, max_len, arch, tokens)
    lengths = held["seq_lens"].numpy()
    targets = np.zeros(held["items"].shape, dtype=np.int64)
    target_domains = np.full(held["items"].shape, -1, dtype=np.int64)
    filled = np.flatnonzero(lengths > 0)
    targets[filled, lengths[filled] - 1] = held["targets"].numpy()[filled]
    target_domains[filled, lengths[filled] - 1] = held["target_domains"].numpy()[filled]
    batch = _train_tensors(held["items"].numpy(), held["domains"].numpy(), lengths, targets,
                           len(rows), target_domains)
    return {HELD_OUT_PREFIX + key: value for key, value in batch.items()}


def _tensors(items, domains, lengths, targets) -> Batch:
    return {"items": torch.from_numpy(items), "domains": torch.from_numpy(domains),
            "seq_lens": torch.from_numpy(lengths), "targets": torch.from_numpy(targets)}


def to_device(batch, device):
    """The batch's tensors on `device` (non-blocking: pinned host tensors copy asynchronously)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
