"""Ranking metrics from the 0-based rank of the single target (0 = ranked first). Ranks may be
[rows] or [rows, draws] (several negative sets per target): a metric is then the mean over
rows and draws, i.e. the mean of the per-draw metrics."""
import numpy as np


def hit_rate(ranks, k):
    """HR@k: the share of targets ranked in the top k."""
    return float(np.mean(ranks < k)) if len(ranks) else 0.0


def ndcg(ranks, k):
    """NDCG@k with one relevant item: 1 / log2(rank + 2) inside the top k."""
    return float(np.mean(np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0))) if len(ranks) else 0.0


def mrr(ranks):
    """Mean reciprocal rank."""
    return float(np.mean(1.0 / (ranks + 1.0))) if len(ranks) else 0.0


def metric_table(ranks, ks):
    """{HR@k, NDCG@k for each k, MRR} of some ranks."""
    table = {}
    for k in ks:
        table[f"HR@{k}"] = hit_rate(ranks, k)
        table[f"NDCG@{k}"] = ndcg(ranks, k)
    table["MRR"] = mrr(ranks)
    return table


def metrics_by_domain(ranks, target_domains, domain_tokens, ks):
    """{"overall": {...}, "per_domain": {token: {..., "count": n}}}."""
    per_domain = {}
    for d, token in enumerate(domain_tokens):
        sel = target_domains == d
        if sel.any():
            per_domain[str(token)] = dict(metric_table(ranks[sel], ks), count=int(sel.sum()))
    return {"overall": dict(metric_table(ranks, ks), count=int(len(ranks))),
            "per_domain": per_domain}
