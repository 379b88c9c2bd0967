"""The uni999_domain sampler: never the history or the target, distinct where the pool allows,
uniform over the allowed pool (chi-square), vectorised over rows."""
import numpy as np
import pytest
from scipy import stats

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
