"""train.negatives: the sampled softmax's negatives drawn from the target's domain (domain) or
from both every item and the target's domain (mixed), against the loss written out row by row;
the training batches' target domains they rest on; the step with them traced whole."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from autocdsr.config import ConfigError, ModelConfig, TrainConfig, load_config
from autocdsr.data.batches import bert4rec_train_batch, sasrec_train_batch, shard_batch
from autocdsr.data.dataset import build_leave_one_out
from autocdsr.data.synthetic import generate
from autocdsr.losses import (DomainPools, negatives_per_domain, recommendation_loss,
                             uniform_negatives)
from autocdsr.models import Recommender
from autocdsr.models.tokens import TokenSpec
from autocdsr.optim import make_optimizer
from autocdsr.step import TrainStep, compile_step
from autocdsr.train import Trainer


@pytest.fixture(scope="module")
def data():
    return build_leave_one_out(generate(60, min_len=10, max_len=20, seed=5), "s")


def test_each_domains_draws_come_uniformly_from_its_pool_alone():
    pools = [np.array([3, 4, 5]), np.array([], dtype=np.int64), np.array([1, 2, 5, 7, 9])]
    built = DomainPools.build(pools, "cpu")
    torch.manual_seed(0)
    draws = torch.cat([negatives_per_domain(built, 500) for _ in range(20)], dim=1)
    assert draws.shape == (3, 10000)
    for d in (0, 2):
        assert set(draws[d].tolist()) == set(pools[d].tolist())  # all of the pool, nothing else
        counts = torch.bincount(draws[d])[torch.as_tensor(pools[d])].numpy()
        assert stats.chisquare(counts).pvalue > 1e-3
    assert draws[1].min() >= 1  # the empty domain's row: still item ids (never read)


def _written_out(states, table, targets, columns):
    """Softmax cross-entropy of each row over [target, its columns], a column equal to the
    row's target masked out; the mean over rows."""
    losses = []
    for r in range(len(targets)):
        negative = states[r] @ table[columns[r]].T
        negative = negative.masked_fill(columns[r] == targets[r], -torch.inf)
        logits = torch.cat([(states[r] * table[targets[r]]).sum()[None], negative])
        losses.append(-F.log_softmax(logits, 0)[0])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("negatives", ["domain", "mixed"])
def test_sampled_loss_ranks_each_target_against_its_domains_draws(data, negatives):
    pools = DomainPools.build(data.domain_items, "cpu")
    torch.manual_seed(1)
    rows = 12
    domains = torch.randint(0, data.num_domains, (rows,))
    targets = torch.stack([torch.as_tensor(np.random.default_rng(r).choice(
        data.domain_items[d])) for r, d in enumerate(domains.tolist())])
    states, table = torch.randn(rows, 8), torch.randn(data.num_items + 1, 8)
    slots, weight = torch.arange(rows), torch.ones(rows)
    torch.manual_seed(7)
    loss = recommendation_loss("sampled", states[:, None], table, targets[:, None], slots, weight,
                               num_negatives=30, negatives=negatives,
                               target_domains=domains[:, None], pools=pools)
    torch.manual_seed(7)  # the same draws, in the loss's order: uniform first, then per domain
    uniform = uniform_negatives(data.num_items, 30, "cpu") if negatives == "mixed" else None
    own = negatives_per_domain(pools, 30)[domains]
    assert all(set(own[r].tolist()) <= set(data.domain_items[d].tolist())
               for r, d in enumerate(domains.tolist()))
    columns = own if uniform is None else torch.cat([uniform.expand(rows, -1), own], 1)
    assert torch.allclose(loss, _written_out(states, table, targets, columns), atol=1e-5)


def test_domain_negatives_need_the_sampled_loss_and_the_pools(data):
    with pytest.raises(ConfigError, match="train.loss=sampled"):
        load_config(None, ["train.negatives=domain", "train.loss=full"])
    with pytest.raises(ConfigError):
        load_config(None, ["train.negatives=popular"])
    states, table = torch.randn(2, 1, 8), torch.randn(data.num_items + 1, 8)
    with pytest.raises(ValueError, match="pools"):
        recommendation_loss("sampled", states, table, torch.ones(2, 1, dtype=torch.long),
                            torch.arange(2), torch.ones(2), negatives="domain")
    model = Recommender(ModelConfig(hidden=32, heads=2, layers=1), data.num_items,
                        data.num_domains, 12)
    optimizer = make_optimizer(model, TrainConfig(), fused=False)
    with pytest.raises(ValueError, match="domain_items"):
        TrainStep(model, optimizer, loss="sampled", negatives="mixed")


def test_sasrec_batch_targets_carry_the_next_events_domain(data):
    rows = np.arange(8)
    batch = sasrec_train_batch(data.train, rows, 12)
    targets, target_domains = batch["targets"].numpy(), batch["target_domains"].numpy()
    assert ((targets == 0) == (target_domains == -1)).all()
    for b, r in enumerate(rows):
        items, domains = data.train.row(r)
        n = min(len(items) - 1, 12)
        assert (targets[b, :n] == items[-n:]).all()
        assert (target_domains[b, :n] == domains[-n:]).all()


def test_cloze_targets_keep_their_domain_when_the_mask_hides_it(data):
    tokens = TokenSpec.for_run(data.num_items, data.num_domains, mask_domain="hidden")
    batch = bert4rec_train_batch(data.train, np.arange(8), 12, tokens, 0.3,
                                 np.random.default_rng(0))
    masked = batch["targets"] != 0
    assert (batch["domains"][masked] == tokens.mask_domain).all()  # the input hides it
    for b in range(8):
        items, domains = data.train.row(b)
        n = min(len(items), 12)
        at = masked[b, :n].numpy()
        assert (batch["target_domains"][b, :n].numpy()[at] == domains[-n:][at]).all()
    assert (batch["target_domains"][~masked] == -1).all()
    part = shard_batch(batch, 1, 2)
    assert torch.equal(part["target_domains"], batch["target_domains"][1::2])


def _step_and_batch(data, arch, negatives):
    torch.manual_seed(0)
    model = Recommender(ModelConfig(arch=arch, hidden=32, heads=2, layers=2, dropout=0.0),
                        data.num_items, data.num_domains, 12, backend="sdpa")
    optimizer = make_optimizer(model, TrainConfig(lr=1e-2), fused=False)
    step = TrainStep(model, optimizer, loss="sampled", objective="autocdsr", num_negatives=20,
                     negatives=negatives, domain_items=data.domain_items)
    if arch == "sasrec":
        return model, step, sasrec_train_batch(data.train, np.arange(6), 12)
    return model, step, bert4rec_train_batch(data.train, np.arange(6), 12, model.tokens, 0.3,
                                             np.random.default_rng(0))


@pytest.mark.parametrize("arch", ["sasrec", "bert4rec"])
def test_step_with_domain_negatives_compiles_fullgraph_and_matches_eager(data, arch):
    outs, params = [], []
    for compiled in (False, True):
        model, step, batch = _step_and_batch(data, arch, "mixed")
        if compiled:
            step.function = compile_step(step.run, backend="aot_eager")
        torch.manual_seed(3)  # the same negatives in both
        outs.append([step(batch) for _ in range(2)])
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*outs):
        for key in ("train_loss", "cd_mass", "lambda"):
            assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*params))


def test_domain_negatives_change_the_loss_only_through_the_negatives(data):
    """The same model, batch and generator state: domain negatives give another loss than
    uniform ones (this data's domains are a fraction of the items each). A whole trained run
    with them: tests/test_train.py."""
    losses = {}
    for negatives in ("uniform", "domain"):
        model, step, batch = _step_and_batch(data, "sasrec", negatives)
        torch.manual_seed(3)
        losses[negatives] = step(batch)["train_loss"].item()
    assert np.isfinite(list(losses.values())).all()
    assert losses["uniform"] != pytest.approx(losses["domain"], rel=1e-3)
