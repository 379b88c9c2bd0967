"""Recommendations out of a trained model.

`autocdsr recommend --checkpoint RUN_DIR/best.pt --k K --out recs.tsv [--users FILE]
[--domain TOKEN] [--include-history]`: top-K items per user from the full catalogue, scored on
each user's whole known history (every event the data holds for them), batched, written as
TSV `user_id  item_id  rank  score` in original tokens; items the user has seen are left out
unless --include-history; --domain restricts the candidates to one domain (and, for BERT4Rec,
gives the appended [MASK] that domain; without it the [MASK] takes the domain of the user's
last event).

`autocdsr export --checkpoint RUN_DIR/best.pt --out DIR`: items.npy [num_items, H] and
users.npy [num_users, H] (float32) with items.tsv / users.tsv id maps (row i = token) and
meta.json; the model's score of (user, item) is users[u] . items[i] (both already normalised
when the model scores by cosine), so any inner-product nearest-neighbour index serves it.
"""
import csv
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from .data.batches import eval_batch, to_device
from .data.dataset import Sequences, select_rows
from .evaluate import uses_cosine


class ServeError(ValueError):
    """A serving request that cannot be met, phrased for the user."""
    pass


def load_for_serving(checkpoint, device="cpu"):
    """(cfg, data, model in eval mode) of a checkpoint."""
    from .build import load_checkpoint
    return load_checkpoint(checkpoint, (), device)


def full_histories(data):
    """Every user's whole known sequence (training rows, then evaluation histories with their
    target appended; a user in several splits keeps the longest, i.e. the latest)."""
    parts = [data.train]
    for split in (data.valid, data.test):
        ends = split.offsets[1:] + np.arange(1, len(split) + 1)
        items = np.insert(split.items, split.offsets[1:], split.targets)
        domains = np.insert(split.domains, split.offsets[1:], split.target_domains)
        parts.append(Sequences(np.r_[0, ends], items, domains, users=split.users))
    latest = {}
    for part in parts:
        for r, user in enumerate(part.users):
            if user not in latest or np.diff(part.offsets)[r] >= latest[user][2]:
                latest[user] = (part, r, np.diff(part.offsets)[r])
    users = np.array(sorted(latest), dtype=object)
    chunks = [latest[u][0].row(latest[u][1]) for u in users]
    offsets = np.r_[0, np.cumsum([len(i) for i, _ in chunks])]
    return Sequences(offsets, np.concatenate([i for i, _ in chunks]),
                     np.concatenate([d for _, d in chunks]), users=users)


@torch.no_grad()
def user_states(cfg, data, model, seqs, mask_domains, batch_size=256, device="cpu"):
    """[N, H] float32 prediction states over each row's whole sequence ([N, H + 1] with a
    trailing 1 when the model has an item bias, which item_vectors carries as a last column)."""
    seqs.targets = np.zeros(len(seqs), dtype=np.int64)
    seqs.target_domains = mask_domains
    states = []
    for lo in range(0, len(seqs), batch_size):
        rows = np.arange(lo, min(lo + batch_size, len(seqs)))
        batch = to_device(eval_batch(seqs, rows, cfg.data.max_len, cfg.model.arch,
                                     model.tokens), device)
        hidden, _ = model(batch["items"], batch["domains"], batch["seq_lens"])
        states.append(model.prediction_states(hidden, batch["seq_lens"]).float())
    states = torch.cat(states)
    if uses_cosine(cfg):
        return F.normalize(states, dim=-1)
    if model.item_biases() is not None:  # [h, 1] . [e, b] = h . e + b: still one dot product
        states = torch.cat([states, torch.ones_like(states[:, :1])], dim=1)
    return states


def item_vectors(cfg, model):
    """[num_items + 1, H] item vectors to score states against ([H + 1] with the item bias as a
    last column)."""
    weights = model.item_weights()[1:].float().detach()
    if uses_cosine(cfg):
        return F.normalize(weights, dim=-1)
    if model.item_biases() is not None:
        weights = torch.cat([weights, model.item_biases()[1:].float().detach()[:, None]], dim=1)
    return weights


def _select_users(seqs, users_file):
    if not users_file:
        return np.arange(len(seqs))
    with open(users_file) as f:
        wanted = [line.strip() for line in f if line.strip()]
    index = {u: i for i, u in enumerate(seqs.users)}
    missing = [u for u in wanted if u not in index]
    if missing:
        raise ServeError(f"{users_file}: {len(missing)} users not in the data (e.g. "
                         f"'{missing[0]}')")
    return np.array([index[u] for u in wanted], dtype=np.int64)


def recommend(checkpoint, k, out, users_file=None, domain=None, include_history=False,
              batch_size=256, device="cpu"):
    """Write the top-k items per user as TSV; returns the number of lines written."""
    cfg, data, model = load_for_serving(checkpoint, device)
    seqs = full_histories(data)
    rows = _select_users(seqs, users_file)
    tokens = [str(t) for t in data.domain_tokens]
    if domain is not None and str(domain) not in tokens:
        raise ServeError(f"--domain {domain}: not a domain of the data ({', '.join(tokens)})")
    last_domain = seqs.domains[seqs.offsets[1:] - 1]
    mask_domains = np.full(len(seqs), tokens.index(str(domain))) if domain is not None \
        else last_domain
    if not 1 <= k <= data.num_items:
        raise ServeError(f"--k must be in 1..{data.num_items}, got {k}")
    items = item_vectors(cfg, model)
    allowed = torch.ones(data.num_items, dtype=torch.bool, device=device)
    if domain is not None:
        allowed[:] = False
        allowed[torch.as_tensor(data.domain_items[tokens.index(str(domain))] - 1)] = True
    lines = 0
    with open(out, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["user_id", "item_id", "rank", "score"])
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo:lo + batch_size]
            picked = select_rows(seqs, chunk)
            states = user_states(cfg, data, model, picked, mask_domains[chunk], batch_size, device)
            scores = states @ items.T
            scores[:, ~allowed] = -torch.inf
            if not include_history:
                for b in range(len(chunk)):  # the user's own items, by row
                    seen = torch.as_tensor(np.unique(picked.row(b)[0]) - 1, device=device)
                    scores[b, seen] = -torch.inf
            top = torch.topk(scores, k, dim=1)
            for b, user in enumerate(picked.users):
                for rank, (score, item) in enumerate(zip(top.values[b].tolist(),
                                                         top.indices[b].tolist()), start=1):
                    if score == -np.inf:
                        break  # fewer than k candidates left
                    writer.writerow([user, data.item_tokens[item], rank, f"{score:.6g}"])
                    lines += 1
    return lines


def export(checkpoint, out, batch_size=256, device="cpu"):
    """Write item vectors and user states as .npy files with a metadata JSON; returns the metadata.
    """
    cfg, data, model = load_for_serving(checkpoint, device)
    seqs = full_histories(data)
    os.makedirs(out, exist_ok=True)
    items = item_vectors(cfg, model).cpu().numpy()
    users = user_states(cfg, data, model, seqs, seqs.domains[seqs.offsets[1:] - 1],
                        batch_size, device).cpu().numpy()
    np.save(os.path.join(out, "items.npy"), items)
    np.save(os.path.join(out, "users.npy"), users)
    with open(os.path.join(out, "items.tsv"), "w") as f:
        f.write("index\titem_id\tdomains\n")
        domains_of = {}
        for d, pool in enumerate(data.domain_items):
            for item in pool:
                domains_of.setdefault(int(item), []).append(str(data.domain_tokens[d]))
        for i, token in enumerate(data.item_tokens):
            f.write(f"{i}\t{token}\t{','.join(domains_of.get(i + 1, []))}\n")
    with open(os.path.join(out, "users.tsv"), "w") as f:
        f.write("index\tuser_id\n")
        for i, user in enumerate(seqs.users):
            f.write(f"{i}\t{user}\n")
    meta = {"score": "inner product of users.npy and items.npy rows",
            "normalised": uses_cosine(cfg), "arch": cfg.model.arch, "objective": cfg.objective,
            "num_items": int(items.shape[0]), "num_users": int(users.shape[0]),
            "user_state": "prediction state over the user's whole known history; BERT4Rec's "
                          "[MASK] takes the domain of the last event"}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta
