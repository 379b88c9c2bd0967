"""Evaluation: the target's rank under a protocol, metrics overall and per target domain.

Protocols
  full           every item is a candidate (batched on the device)
  full_domain    every item of the target's domain is a candidate (a single-domain model's
                 full ranking, so single- and cross-domain models rank the same candidates)
  uni100_vocab   the target and 100 uniform negatives from the whole vocabulary
                 (the AutoCDSR code's protocol)
  uni999_domain  the target and 999 negatives from the items of the target's domain,
                 excluding the user's history
Negatives are drawn from a generator seeded by the run seed, so a protocol is repeatable.
With eval.history=target_domain the model reads each history cut to its events of the
target's domain, while the candidates (the negatives, and the history they exclude) stay those
of the whole history: the two scorings of one model differ only in the context it reads.
The rank counts the other candidates with a strictly higher score, plus half of those tied
with the target. Models trained with a cosine score (the in-batch losses, train.logits=cosine)
are ranked by cosine.
"""
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data.batches import eval_batch, to_device
from .data.dataset import target_domain_history
from .metrics import metrics_by_domain
from .models.tokens import TokenSpec

PROTOCOL_TEXT = {
    "full": "full ranking over all items",
    "full_domain": "full ranking over the items of the target's domain",
    "uni100_vocab": "target + 100 uniform negatives from the vocabulary",
    "uni999_domain": "target + 999 negatives from the target's domain, history excluded",
}


def _rank(scores, target_scores):
    """0-based rank of the target among candidates `scores` that exclude the target itself."""
    higher = (scores > target_scores[:, None]).sum(dim=1).float()
    ties = (scores == target_scores[:, None]).sum(dim=1).float()
    return higher + 0.5 * ties


def sample_negatives(protocol, data, split, rows, rng):
    """[B, n] negative item ids for the sampled protocols."""
    targets = split.targets[rows]
    if protocol == "uni100_vocab":
        negatives = rng.integers(1, data.num_items + 1, size=(len(rows), 100))
        while True:  # redraw collisions with the target
            clash = negatives == targets[:, None]
            if not clash.any():
                return negatives
            negatives[clash] = rng.integers(1, data.num_items + 1, size=int(clash.sum()))
    return domain_negatives(data, split, rows, rng)


def _first_occurrences(draws):
    """[B, M] bool: True where draws[b, m] did not occur earlier in row b."""
    order = np.argsort(draws, axis=1, kind="stable")
    ordered = np.take_along_axis(draws, order, axis=1)
    repeat = np.zeros_like(draws, dtype=bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    first = np.empty_like(repeat)
    np.put_along_axis(first, order, ~repeat, axis=1)
    return first


def domain_negatives(data, split, rows, rng, count=999):
    """[B, count] negatives per row, uniform over the target domain's items minus the row's
    history and target (the uni999_domain protocol), with no Python loop over rows.

    Rejection sampling: draw uniformly from the domain's pool and keep, in draw order, the
    first `count` draws that are allowed and (where the allowed pool has at least `count`
    items) not drawn before: sequential rejection of repeats is sampling without replacement.
    Rows whose allowed pool is smaller than `count` keep repeats (sampling with replacement);
    a row with nothing allowed draws from the whole catalogue minus its history.
    """
    rows = np.asarray(rows)
    batch = len(rows)
    stride = data.num_items + 2
    pools = [data.domain_items[d] for d in range(data.num_domains)]
    sizes = np.array([len(p) for p in pools])
    offsets = np.r_[0, np.cumsum(sizes)]
    flat_pools = np.concatenate(pools)
    domains = split.target_domains[rows]
    lo, hi = split.offsets[rows], split.offsets[rows + 1]
    lengths = hi - lo
    starts = np.repeat(lo - (np.cumsum(lengths) - lengths), lengths)
    history = split.items[starts + np.arange(lengths.sum())]
    seen = np.unique(np.r_[np.repeat(np.arange(batch), lengths) * stride + history,
                           np.arange(batch) * stride + split.targets[rows]])
    # allowed pool size of each row: pool minus the distinct seen items that lie in it
    in_pool = np.zeros((data.num_domains, stride), dtype=bool)
    in_pool[np.repeat(np.arange(data.num_domains), sizes), flat_pools] = True
    seen_rows = seen // stride
    allowed = sizes[domains] - np.bincount(seen_rows, in_pool[domains[seen_rows], seen % stride],
                                           minlength=batch).astype(np.int64)
    distinct = allowed >= count
    out = np.zeros((batch, count), dtype=np.int64)
    todo = np.flatnonzero(allowed > 0)
    margin = 1.25
    while len(todo):
        ratio = sizes[domains[todo]] / allowed[todo]  # draws per accepted one, on average
        width = int(min(margin * count * ratio.max() + 64, (1 << 22) // len(todo) + count))
        picks = (rng.random((len(todo), width)) * sizes[domains[todo], None]).astype(np.int64)
        draws = flat_pools[offsets[domains[todo], None] + picks]
        keys = todo[:, None] * stride + draws
        at = np.searchsorted(seen, keys).clip(max=len(seen) - 1)
        ok = seen[at] != keys
        if distinct[todo].any():
            ok &= _first_occurrences(draws) | ~distinct[todo, None]
        done = ok.sum(axis=1) >= count
        first = ok & (np.cumsum(ok, axis=1) <= count)  # the first `count` accepted draws
        out[todo[done]] = draws[done][first[done]].reshape(-1, count)
        todo = todo[~done]
        margin *= 2
    for b in np.flatnonzero(allowed <= 0):  # nothing allowed in the domain (degenerate)
        excluded = np.r_[history[np.repeat(np.arange(batch), lengths) == b], split.targets[rows[b]]]
        out[b] = rng.choice(np.setdiff1d(np.arange(1, data.num_items + 1), excluded), size=count)
    return out


def direct_domain_negatives(data, split, rows, rng, count=999):
    """The uni999_domain protocol written out row by row (the reference the vectorised
    domain_negatives is checked against): `count` items drawn uniformly without replacement
    from the target domain's items minus the row's history and target (with replacement
    where fewer are allowed; from the whole catalogue minus the history where none are)."""
    out = np.zeros((len(rows), count), dtype=np.int64)
    for b, r in enumerate(rows):
        seen = np.union1d(split.row(r)[0], [split.targets[r]])
        allowed = np.setdiff1d(data.domain_items[split.target_domains[r]], seen)
        if len(allowed) == 0:
            allowed = np.setdiff1d(np.arange(1, data.num_items + 1), seen)
        out[b] = rng.choice(allowed, size=count, replace=len(allowed) < count)
    return out


@torch.no_grad()
def target_ranks(score_fn, data, split, cfg, device, desc="eval", comm=None):
    """score_fn(batch, candidates) -> scores of the [B, n] candidate ids, or of every id
    ([B, num_items + 1], column 0 = padding) when candidates is None. cfg: the run's config
    (eval.protocol, eval.batch_size, eval.negative_draws = draws, train.seed = seed, and the
    batch layout: data.max_len, model.arch, data.mask_domain). Returns the ranks
    [rows], or [rows, draws] for a sampled protocol with draws > 1: that many independent
    negative sets per row (draw 0 is the single draw's), scored in one call; the metrics of
    such ranks are their means over the draws.

    Each batch draws its negatives from a generator seeded by (seed, first row), so a batch's
    candidates do not depend on which process scores it: with comm (data parallelism) the
    batches are dealt out to the ranks and the ranks gathered, equal to one process's."""
    protocol, batch_size, draws = cfg.eval.protocol, cfg.eval.batch_size, cfg.eval.negative_draws
    seed, max_len, arch = cfg.train.seed, cfg.data.max_len, cfg.model.arch
    tokens = TokenSpec.for_run(data.num_items, data.num_domains, cfg.data.mask_domain)
    rank, world = (comm.rank, comm.world) if comm is not None else (0, 1)
    context = target_domain_history(split) if cfg.eval.history == "target_domain" else split
    ranks = {}
    starts = list(range(0, len(split), batch_size))[rank::world]
    if protocol == "full_domain":  # [domains, num_items + 1]: which ids each domain ranks
        member = torch.zeros(len(data.domain_items), data.num_items + 1, dtype=torch.bool)
        for d, pool in enumerate(data.domain_items):
            member[d, torch.as_tensor(pool, dtype=torch.long)] = True
        member = member.to(device)
    for lo in tqdm(starts, desc=desc, leave=False, mininterval=1.0, disable=None if rank == 0 else True):
        rng = np.random.default_rng([seed, lo])
        rows = np.arange(lo, min(lo + batch_size, len(split)))
        batch = to_device(eval_batch(context, rows, max_len, arch, tokens), device)
        if protocol in ("full", "full_domain"):
            scores = score_fn(batch, None).float()
            target_scores = scores.gather(1, batch["targets"][:, None])[:, 0]
            if protocol == "full_domain":
                scores.masked_fill_(~member[batch["target_domains"]], -torch.inf)
            scores[:, 0] = -torch.inf  # padding is never a candidate
            scores.scatter_(1, batch["targets"][:, None], -torch.inf)  # nor the target itself
        else:
            rngs = [rng] + [np.random.default_rng([seed, lo, d]) for d in range(1, draws)]
            sets = [sample_negatives(protocol, data, split, rows, r) for r in rngs]
            negatives = torch.from_numpy(np.concatenate(sets, 1)).to(device)
            # column 0 is the target: only the 1 + draws x n candidates are scored
            scores = score_fn(batch, torch.cat([batch["targets"][:, None], negatives], 1)).float()
            target_scores = scores[:, 0]
            scores = scores[:, 1:].reshape(len(rows), draws, -1).transpose(0, 1)  # [draws, B, n]
            ranks[lo] = torch.stack([_rank(s, target_scores) for s in scores], 1).cpu().numpy()
            if draws == 1:
                ranks[lo] = ranks[lo][:, 0]
            continue
        ranks[lo] = _rank(scores, target_scores).cpu().numpy()
    if world > 1:
        ranks = {lo: r for part in comm.gather(ranks) for lo, r in part.items()}
    return np.concatenate([ranks[lo] for lo in sorted(ranks)]) if ranks else np.zeros(0)


def uses_cosine(cfg):
    """Whether the model was trained to score items by cosine similarity."""
    return cfg.train.loss.startswith("inbatch") or cfg.train.logits == "cosine"


def model_scorer(model, amp_dtype=None, cosine=False):
    """score_fn of a model for target_ranks (dot scores, or cosine for cosine-trained models)."""
    def score(batch, candidates):
        with torch.autocast(batch["items"].device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            hidden, _ = model(batch["items"], batch["domains"], batch["seq_lens"])
            states = model.prediction_states(hidden, batch["seq_lens"]).float()
        if not cosine:
            return model.scores(states, candidates)
        states, weights = F.normalize(states, dim=-1), F.normalize(model.item_weights().float(), dim=-1)
        if candidates is None:
            return states @ weights.T
        return torch.einsum("bh,bnh->bn", states, weights[candidates])
    return score


def table_scorer(table, device):
    """Scores from a fixed table: [num_items + 1] for every row (most popular), or
    [rows, num_items + 1] per evaluation row (the synthetic data's oracle)."""
    table = torch.as_tensor(np.asarray(table, dtype=np.float32), device=device)

    def score(batch, candidates):
        rows = table if table.dim() == 1 else table[batch["rows"]]
        if table.dim() == 1:
            rows = rows.expand(batch["items"].shape[0], -1)
        return rows.clone() if candidates is None else rows.gather(1, candidates)
    return score


def popularity_scorer(popularity, device):
    """score_fn of the most-popular baseline (training counts)."""
    return table_scorer(popularity[: len(popularity) - 1], device)


def evaluate_split(score_fn, data, split, cfg, device, desc="eval", comm=None):
    """Metrics of one split under cfg.eval.protocol (negatives seeded by cfg.train.seed; for a
    sampled protocol, averaged over cfg.eval.negative_draws independent negative sets)."""
    ranks = target_ranks(score_fn, data, split, cfg, device, desc, comm)
    ks = list(cfg.eval.ks)
    return metrics_by_domain(ranks, split.target_domains, data.domain_tokens, ks)


def protocol_text(protocol, draws=1, history="all"):
    """The protocol's name and meaning, as printed next to every metric."""
    text = f"{protocol} = {PROTOCOL_TEXT[protocol]}"
    if draws > 1 and not protocol.startswith("full"):
        text += f", mean over {draws} negative draws"
    if history == "target_domain":
        text += "; the model reads only the history's events of the target's domain"
    return text


def format_table(title, protocol, result, ks, draws=1, history="all"):
    """Text table of one split's metrics, with the protocol on top."""
    k_show = [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks] + ["MRR"]
    lines = [f"{title}  [protocol: {protocol_text(protocol, draws, history)}]",
             f"{'domain':>10} {'n':>6} " + " ".join(f"{m:>8}" for m in k_show)]
    rows = [("overall", result["overall"])] + sorted(result["per_domain"].items())
    for name, row in rows:
        lines.append(f"{name:>10} {row['count']:>6} " + " ".join(f"{row[m]:8.4f}" for m in k_show))
    return "\n".join(lines)
