"""The evaluation candidates: the uni999_domain sampler (never the history or the target, distinct where the pool allows,
uniform over the allowed pool (chi-square), vectorised over rows) and the full_domain ranking."""
import numpy as np
import pytest
import torch
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


def test_target_domain_history_keeps_the_target_domains_events_or_the_last_one():
    from autocdsr.data.dataset import Sequences, target_domain_history
    seqs = Sequences(offsets=np.array([0, 4, 6, 6]), items=np.array([1, 2, 3, 4, 5, 6]),
                     domains=np.array([0, 1, 0, 1, 1, 1]), targets=np.array([7, 8, 9]),
                     target_domains=np.array([0, 0, 1]), users=np.array([10, 11, 12]))
    cut = target_domain_history(seqs)
    assert cut.row(0)[0].tolist() == [1, 3]        # domain-0 events, in order
    assert cut.row(1)[0].tolist() == [6]           # no domain-0 event: the last event
    assert cut.row(2)[0].tolist() == []            # an empty history stays empty
    assert cut.targets is seqs.targets and cut.users is seqs.users


def test_target_domain_history_changes_the_context_not_the_candidates(data):
    """eval.history=target_domain: the model reads only the target domain's events (the last
    max_len of them), scored against the very candidates of the whole-history scoring."""
    from autocdsr.evaluate import target_ranks
    calls = {}

    def recording(history):
        def score(batch, candidates):
            calls.setdefault(history, []).append((batch, candidates.clone()))
            return torch.rand(candidates.shape, generator=torch.Generator().manual_seed(0))
        return score
    for history in ("all", "target_domain"):
        cfg = load_config(None, ["eval.protocol=uni999_domain", "eval.batch_size=64",
                                 "data.max_len=5", "model.arch=sasrec", f"eval.history={history}"])
        target_ranks(recording(history), data, data.test, cfg, "cpu")
    mixed = 0
    for (whole, cand_a), (cut, cand_b) in zip(calls["all"], calls["target_domain"]):
        assert torch.equal(cand_a, cand_b)
        for b, r in enumerate(cut["rows"].tolist()):
            items, domains = data.test.row(r)
            own = items[domains == data.test.target_domains[r]]
            expected = own[-5:] if len(own) else items[-1:]
            n = int(cut["seq_lens"][b])
            assert cut["items"][b, :n].tolist() == expected.tolist()
            mixed += int(not torch.equal(whole["items"][b], cut["items"][b]))
    assert mixed > 0  # the synthetic histories mix domains, so some contexts changed
