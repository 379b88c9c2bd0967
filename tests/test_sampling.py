"""The evaluation candidates: the uni999_domain sampler (never the history or the target, distinct where the pool allows,
uniform over the allowed pool (chi-square), vectorised over rows) and the full_domain ranking."""
import numpy as np
import pytest
from scipy import stats

from autocdsr.config import load_config
from autocdsr.data.dataset import build_leave_one_out
from autocdsr.data.synthetic import generate
from autocdsr.evaluate import domain_negatives


@pytest.fixture(scope="module")
def data():
    return build_leave_one_out(generate(200, min_len=10, max_len=30, seed=3), "s")


def _allowed(data, split, r):
    pool = set(data.domain_items[split.target_domains[r]].tolist())
    return pool - set(split.row(r)[0].tolist()) - {int(split.targets[r])}


@pytest.mark.parametrize("count", [20, 999])
def test_never_history_or_target_and_distinct_when_possible(data, count):
    split = data.test
    rows = np.arange(len(split))
    negatives = domain_negatives(data, split, rows, np.random.default_rng(0), count=count)
    assert negatives.shape == (len(rows), count)
    for r in rows:
        allowed = _allowed(data, split, r)
        assert set(negatives[r].tolist()) <= allowed
        if len(allowed) >= count:
            assert len(set(negatives[r].tolist())) == count  # without replacement


def test_uniform_over_the_allowed_pool(data):
    split, row = data.test, 5
    allowed = sorted(_allowed(data, split, row))
    rng = np.random.default_rng(1)
    draws = np.concatenate([domain_negatives(data, split, np.array([row] * 50), rng, count=20)
                            for _ in range(20)]).ravel()
    counts = np.array([np.sum(draws == item) for item in allowed])
    assert counts.sum() == len(draws)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_same_seed_same_negatives(data):
    rows = np.arange(30)
    a = domain_negatives(data, data.valid, rows, np.random.default_rng(7))
    b = domain_negatives(data, data.valid, rows, np.random.default_rng(7))
    assert np.array_equal(a, b)


def test_several_negative_draws_average_independent_sets(data):
    """eval.negative_draws: draw 0 is the single draw's negatives; the others are different
    sets; the metrics are the means of the per-draw metrics."""
    from autocdsr.evaluate import table_scorer, target_ranks
    from autocdsr.metrics import metrics_by_domain
    scores = np.random.default_rng(0).random((len(data.test), data.num_items + 1))
    score = table_scorer(scores, "cpu")
    cfg = lambda draws: load_config(None, ["eval.protocol=uni999_domain", "eval.batch_size=64",
                                           "train.seed=5", "data.max_len=20",
                                           f"eval.negative_draws={draws}"])
    one = target_ranks(score, data, data.test, cfg(1), "cpu")
    three = target_ranks(score, data, data.test, cfg(3), "cpu")
    assert three.shape == (len(data.test), 3)
    assert np.array_equal(three[:, 0], one)
    assert not np.array_equal(three[:, 1], three[:, 0])
    ks = [10]
    both = metrics_by_domain(three, data.test.target_domains, data.domain_tokens, ks)
    each = [metrics_by_domain(three[:, d], data.test.target_domains, data.domain_tokens, ks)
            for d in range(3)]
    for key in ("HR@10", "NDCG@10", "MRR"):
        assert both["overall"][key] == pytest.approx(np.mean([e["overall"][key] for e in each]))
    assert both["overall"]["count"] == len(data.test)


def test_full_domain_ranks_the_target_among_its_domains_items(data):
    from autocdsr.evaluate import table_scorer, target_ranks
    scores = np.random.default_rng(1).random((len(data.test), data.num_items + 1))
    cfg = lambda protocol: load_config(None, [f"eval.protocol={protocol}", "data.max_len=20"])
    ranks = target_ranks(table_scorer(scores, "cpu"), data, data.test, cfg("full_domain"), "cpu")
    for r in range(0, len(data.test), 17):
        target = data.test.targets[r]
        pool = [i for i in data.domain_items[data.test.target_domains[r]] if i != target]
        assert ranks[r] == (scores[r, pool] > scores[r, target]).sum()
    full = target_ranks(table_scorer(scores, "cpu"), data, data.test, cfg("full"), "cpu")
    assert (ranks <= full).all() and (ranks < full).any()
