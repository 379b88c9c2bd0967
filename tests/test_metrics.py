"""Metric functions against hand-computed cases."""
import math

import numpy as np

from autocdsr.metrics import hit_rate, metric_table, metrics_by_domain, mrr, ndcg


def test_hand_computed_cases():
    ranks = np.array([0, 1, 4, 12])  # 0-based ranks of the target
    assert hit_rate(ranks, 1) == 0.25
    assert hit_rate(ranks, 5) == 0.75
    assert math.isclose(ndcg(ranks, 5), (1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)
    assert math.isclose(ndcg(ranks, 20), (1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(14)) / 4)
    assert math.isclose(mrr(ranks), (1 + 1 / 2 + 1 / 5 + 1 / 13) / 4)


def test_table_and_per_domain_keys():
    ranks = np.array([0, 3, 30])
    table = metric_table(ranks, [5, 10])
    assert set(table) == {"HR@5", "NDCG@5", "HR@10", "NDCG@10", "MRR"}
    result = metrics_by_domain(ranks, np.array([0, 1, 1]), np.array([9, 4]), [10])
    assert result["per_domain"]["9"]["HR@10"] == 1.0
    assert result["per_domain"]["4"]["HR@10"] == 0.5
    assert result["per_domain"]["4"]["count"] == 2
    assert result["overall"]["count"] == 3


def test_empty_is_zero_not_nan():
    assert hit_rate(np.array([]), 10) == 0.0 and ndcg(np.array([]), 10) == 0.0
