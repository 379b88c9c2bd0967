"""The training step and the protocols against their plainest definitions, so that a change
that alters what a run computes shows up here rather than as a drift in a study:
- a TrainStep (eager with torch's fused AdamW, clipping folded into its grad_scale; and the
  written-out update of the compiled / graph-captured step) equals a plain loop of
  loss.backward(), clip_grad_norm_ and torch.optim.AdamW on the same batches, clipping active;
- the learning rate the trainer applies at each step follows the documented schedule;
- the sampled softmax's negatives are uniform over the real items;
- the uni999_domain negatives follow the same distribution as the protocol written out row
  by row (the sampler of earlier versions)."""
import copy

import numpy as np
import pytest
import torch
from scipy import stats

from autocdsr.config import ModelConfig, TrainConfig, load_config
from autocdsr.data.batches import sasrec_train_batch
from autocdsr.data.dataset import build_leave_one_out
from autocdsr.data.synthetic import generate
from autocdsr.evaluate import direct_domain_negatives, domain_negatives
from autocdsr.losses import recommendation_loss, uniform_negatives
from autocdsr.models import Recommender
from autocdsr.optim import make_optimizer
from autocdsr.step import TrainStep
from autocdsr.train import Trainer


@pytest.fixture(scope="module")
def data():
    return build_leave_one_out(generate(60, min_len=10, max_len=20, seed=5), "s")


def _batches(data, count, batch_size=8, max_len=12):
    return [sasrec_train_batch(data.train, np.arange(i * batch_size, (i + 1) * batch_size),
                               max_len) for i in range(count)]


@pytest.mark.parametrize("loss", ["full", "sampled"])
@pytest.mark.parametrize("fused", [True, False])
def test_trainstep_equals_clip_grad_norm_then_torch_adamw(data, loss, fused):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="sasrec", hidden=32, heads=2, layers=2, dropout=0.1)
    model = Recommender(cfg, data.num_items, data.num_domains, 12, backend="sdpa")
    twin = copy.deepcopy(model)
    optimizer = make_optimizer(model, TrainConfig(lr=3e-3, weight_decay=0.05), fused=fused)
    # eps well above the float noise of gradients that are zero in exact arithmetic (the key
    # bias: softmax ignores it), which Adam would otherwise scale up to +-lr in either run
    optimizer.param_groups[0]["eps"] = 1e-4
    # grad_clip 0.05: far below the gradients' norm, so every step is clipped
    step = TrainStep(model, optimizer, loss=loss, grad_clip=0.05, num_negatives=50)
    params = [p for p in twin.parameters() if p.requires_grad]
    reference = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.05, eps=1e-4, foreach=False)
    model.train(), twin.train()
    for index, batch in enumerate(_batches(data, 4)):
        batch = {k: v for k, v in batch.items()}
        torch.manual_seed(100 + index)  # the same dropout masks and sampled negatives
        ours = step(batch)
        torch.manual_seed(100 + index)
        hidden, _ = twin(batch["items"], batch["domains"], batch["seq_lens"])
        targets = batch["targets"]
        keep = (targets.reshape(-1) != 0).nonzero()[:, 0]
        plain = recommendation_loss(loss, hidden, twin.item_weights(), targets, keep,
                                    torch.ones(len(keep)), num_negatives=50)
        reference.zero_grad()
        plain.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 0.05)
        assert norm > 0.5  # clipping was active
        reference.step()
        assert torch.allclose(ours["train_loss"], plain.detach(), atol=1e-6)
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.allclose(a, b, atol=1e-6, rtol=0), index


def test_trainer_applies_the_documented_learning_rate_schedule():
    """Linear warm-up to train.lr over min(warmup_steps, a tenth of all steps), then linear
    decay to 10 % of it at the last step, one scheduler step per training step (the first
    values written out)."""
    cfg = load_config(None, ["data.synthetic_users=80", "train.epochs=4", "train.batch_size=8",
                             "train.lr=0.01", "train.warmup_steps=4", "train.device=cpu",
                             "train.prefetch=0", "model.hidden=32", "run_dir=/tmp/unused"])
    trainer = Trainer(cfg)
    seen = []
    original = trainer.step.__call__

    def record(batch):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        out = original(batch)
        assert torch.equal(trainer.step.lr, torch.tensor(seen[-1], dtype=trainer.step.lr.dtype))
        return out

    trainer.step = type("Recorded", (), {"__call__": lambda self, b: record(b),
                                         "bad_in_row": trainer.step.bad_in_row,
                                         "lr": trainer.step.lr})()
    order = np.arange(len(trainer.data.train))
    for batch in trainer._epoch_batches(order):
        trainer.train_step(batch)
    total = trainer.steps_per_epoch * cfg.train.epochs
    warmup = 4
    assert total >= 40  # so the warm-up is train.warmup_steps long
    expected = [0.01 * min((s + 1) / warmup, max(0.1, 1 - 0.9 * (s - warmup) / (total - warmup)))
                for s in range(len(seen))]
    assert seen[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert seen == pytest.approx(expected)
    assert len(seen) == trainer.steps_per_epoch


def test_sampled_softmax_negatives_are_uniform_over_real_items():
    torch.manual_seed(0)
    num_items = 30
    draws = torch.cat([uniform_negatives(num_items, 1000, "cpu") for _ in range(30)])
    assert draws.min() >= 1 and draws.max() <= num_items  # never padding, never [MASK]
    counts = torch.bincount(draws, minlength=num_items + 1)[1:].numpy()
    assert (counts > 0).all()
    assert stats.chisquare(counts).pvalue > 1e-3


def test_sampled_softmax_loss_uses_those_negatives(data):
    """The loss equals softmax over [target, negatives] with the negatives drawn by
    uniform_negatives from the same generator state (a negative equal to the target masked)."""
    torch.manual_seed(1)
    states, table = torch.randn(6, 8), torch.randn(data.num_items + 1, 8)
    targets = torch.randint(1, data.num_items + 1, (6,))
    slots, weight = torch.arange(6), torch.ones(6)
    torch.manual_seed(7)
    loss = recommendation_loss("sampled", states[:, None], table, targets[:, None], slots, weight,
                               num_negatives=40)
    torch.manual_seed(7)
    negatives = uniform_negatives(data.num_items, 40, "cpu")
    logits = torch.cat([(states * table[targets]).sum(1, keepdim=True), states @ table[negatives].T], 1)
    logits[:, 1:] = logits[:, 1:].masked_fill(negatives[None] == targets[:, None], -torch.inf)
    direct = torch.nn.functional.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    assert torch.allclose(loss, direct, atol=1e-6)


@pytest.mark.parametrize("count", [15, 999])
def test_domain_negatives_follow_the_direct_samplers_distribution(data, count):
    """Inclusion counts per item of the vectorised sampler and of the row-by-row protocol, for
    the same rows: a chi-square test of homogeneity (and the same support). count=999 exceeds
    every row's allowed pool here: both then sample with replacement."""
    split = data.test
    rows = np.array([3, 11, 20])
    fast = np.concatenate([domain_negatives(data, split, rows, np.random.default_rng(s), count)
                           for s in range(60)])
    slow = np.concatenate([direct_domain_negatives(data, split, rows, np.random.default_rng(s),
                                                   count) for s in range(60)])
    for b in range(len(rows)):
        a, d = fast[b::len(rows)].ravel(), slow[b::len(rows)].ravel()
        support = np.union1d(a, d)
        assert np.array_equal(np.unique(a), np.unique(d))
        table = np.stack([np.searchsorted(support, x)[:, None] == np.arange(len(support))
                          for x in (a, d)]).sum(1)
        assert stats.chi2_contingency(table).pvalue > 1e-3
