"""train.domain_balance: each target's loss weighted by its domain's size, against the
per-domain losses it combines; the weights; the step with them traced whole."""
import numpy as np
import pytest
import torch

from autocdsr.config import ConfigError, ModelConfig, TrainConfig, load_config
from autocdsr.data.batches import bert4rec_train_batch, sasrec_train_batch
from autocdsr.data.dataset import build_leave_one_out
from autocdsr.data.synthetic import generate
from autocdsr.losses import domain_loss_weights
from autocdsr.models import Recommender
from autocdsr.optim import make_optimizer
from autocdsr.step import TrainStep

from .step_checks import assert_compiled_step_matches_eager


@pytest.fixture(scope="module")
def data():
    return build_leave_one_out(generate(60, min_len=10, max_len=20, seed=5), "s")


def test_weights_scale_each_domain_to_the_largest_up_to_the_cut():
    counts = [800, 200, 10, 0]
    assert domain_loss_weights(counts, 0.0, 20.0).tolist() == [1.0, 1.0, 1.0, 0.0]
    half = domain_loss_weights(counts, 0.5, 20.0)
    assert torch.allclose(half[:3], torch.tensor([1.0, 2.0, 80 ** 0.5]))
    full = domain_loss_weights(counts, 1.0, 1000.0)
    totals = torch.tensor(counts[:3], dtype=torch.float32) * full[:3]
    assert torch.allclose(totals, totals[0].expand(3))  # every domain the same total weight
    assert domain_loss_weights(counts, 1.0, 20.0).tolist() == [1.0, 4.0, 20.0, 0.0]  # 80 cut
    with pytest.raises(ValueError, match="counts"):
        domain_loss_weights([0, 0], 1.0, 20.0)


def _step(data, arch="sasrec", balance=0.0, loss="full", seed=0):
    torch.manual_seed(seed)
    model = Recommender(ModelConfig(arch=arch, hidden=32, heads=2, layers=2, dropout=0.0),
                        data.num_items, data.num_domains, 12, backend="sdpa")
    optimizer = make_optimizer(model, TrainConfig(lr=1e-2), fused=False)
    return model, TrainStep(model, optimizer, loss=loss, objective="autocdsr", num_negatives=20,
                            domain_balance=balance,
                            domain_counts=data.training_domain_counts())


def _batch(data, arch, model):
    if arch == "sasrec":
        return sasrec_train_batch(data.train, np.arange(10), 12)
    return bert4rec_train_batch(data.train, np.arange(10), 12, model.tokens, 0.3,
                                np.random.default_rng(0))


@pytest.mark.parametrize("arch", ["sasrec", "bert4rec"])
def test_balanced_loss_is_the_weighted_mean_of_the_per_domain_losses(data, arch):
    """L = sum_d W_d L_d / sum_d W_d, L_d the plain loss over domain d's targets alone and W_d
    their count times domain d's weight (the full softmax: no draws to align)."""
    model, plain = _step(data, arch)
    _, balanced = _step(data, arch, balance=1.0)
    batch = _batch(data, arch, model)
    weights = domain_loss_weights(data.training_domain_counts(), 1.0, 20.0)
    assert len(set(weights.tolist())) > 1  # the domains differ in size, so the test can fail
    slot_domains = batch["target_domains"].reshape(-1)[batch["target_slots"]]
    total = norm = 0.0
    for d in range(data.num_domains):
        mine = batch["target_weight"] * (slot_domains == d)
        if mine.sum() == 0:
            continue
        loss_d = plain.losses({**batch, "target_weight": mine}).loss_rec
        total, norm = total + weights[d] * mine.sum() * loss_d, norm + weights[d] * mine.sum()
    got = balanced.losses(batch).loss_rec
    assert torch.allclose(got, total / norm, atol=1e-5)
    assert not torch.allclose(got, plain.losses(batch).loss_rec, atol=1e-4)


def test_balance_needs_counts_and_a_valid_setting(data):
    with pytest.raises(ConfigError, match="domain_balance"):
        load_config(None, ["train.domain_balance=-1"])
    with pytest.raises(ConfigError, match="domain_weight_max"):
        load_config(None, ["train.domain_balance=1", "train.domain_weight_max=0.5"])
    model = Recommender(ModelConfig(hidden=32, heads=2, layers=1), data.num_items,
                        data.num_domains, 12)
    optimizer = make_optimizer(model, TrainConfig(), fused=False)
    with pytest.raises(ValueError, match="domain_counts"):
        TrainStep(model, optimizer, domain_balance=0.5)


def test_step_with_domain_balance_compiles_fullgraph_and_matches_eager(data):
    model, _ = _step(data, balance=1.0)
    counts = data.training_domain_counts()
    def make_step(m, compiled):
        optimizer = make_optimizer(m, TrainConfig(lr=1e-2), fused=False)
        return TrainStep(m, optimizer, loss="full", objective="autocdsr", domain_balance=1.0,
                         domain_counts=counts)
    assert_compiled_step_matches_eager(model, _batch(data, "sasrec", model), make_step)
