"""The held-out gate (weighting.held_out): the held-out batch puts each validation row's target
where the model predicts it; the gate zeroes lambda exactly while the running cosine between
g_cd and L_rec's gradient on the held-out batch (checked against autograd) is negative; the
step traces whole (fullgraph) and the config refuses combinations that cannot run."""
import copy

import numpy as np
import pytest
import torch

from autocdsr.balancing import HELD_OUT_DECAY, HeldOut, solve_lambdas
from autocdsr.config import ConfigError, ModelConfig, TrainConfig, load_config
from autocdsr.data.batches import HELD_OUT_PREFIX, eval_batch, held_out_batch, shard_batch
from autocdsr.data.dataset import build_leave_one_out
from autocdsr.data.synthetic import generate
from autocdsr.losses import recommendation_loss
from autocdsr.models import Recommender
from autocdsr.objectives import cross_domain_loss
from autocdsr.optim import make_optimizer
from autocdsr.step import TrainStep, compile_step

from .test_step import _setup


def _data():
    return build_leave_one_out(generate(40, min_len=10, max_len=20, seed=0), "s")


@pytest.mark.parametrize("arch", ["sasrec", "bert4rec"])
def test_held_out_batch_puts_each_target_where_the_model_predicts_it(arch):
    data = _data()
    model = Recommender(ModelConfig(arch=arch, hidden=32, heads=2, layers=2), data.num_items,
                        data.num_domains, 12, backend="sdpa")
    rows = np.array([3, 0, 3, 17, 5])  # drawn with replacement: a row may repeat
    held = held_out_batch(data.valid, rows, 12, arch, model.tokens)
    scored = eval_batch(data.valid, rows, 12, arch, model.tokens)
    assert all(key.startswith(HELD_OUT_PREFIX) for key in held)
    for key in ("items", "domains", "seq_lens"):
        assert torch.equal(held[HELD_OUT_PREFIX + key], scored[key])
    targets, lengths = held[HELD_OUT_PREFIX + "targets"], scored["seq_lens"]
    b = torch.arange(len(rows))
    assert torch.equal(targets[b, lengths - 1], scored["targets"])  # the last position
    assert int((targets != 0).sum()) == len(rows)                    # and nowhere else
    slots = held[HELD_OUT_PREFIX + "target_slots"]
    assert torch.equal(slots, b * 12 + lengths - 1)
    assert held[HELD_OUT_PREFIX + "target_weight"].eq(1).all()


def test_sharding_splits_the_held_out_batch_by_rows_too():
    data = _data()
    train = held_out_batch(data.valid, np.arange(4), 12, "sasrec", None)  # any training batch
    train = {key[len(HELD_OUT_PREFIX):]: value for key, value in train.items()}
    rows = np.arange(6)
    held = held_out_batch(data.valid, rows, 12, "sasrec", None)
    for rank in range(2):
        part = shard_batch({**train, **held}, rank, 2)
        for key in ("items", "domains", "seq_lens", "targets"):
            assert torch.equal(part[HELD_OUT_PREFIX + key], held[HELD_OUT_PREFIX + key][rank::2])
        targets = part[HELD_OUT_PREFIX + "targets"].reshape(-1)
        slots = part[HELD_OUT_PREFIX + "target_slots"]
        weight = part[HELD_OUT_PREFIX + "target_weight"]
        assert torch.equal(targets[slots[weight > 0]],
                           torch.as_tensor(data.valid.targets[rows[rank::2]]))


def _grads(*vectors):
    return [[torch.tensor(v, dtype=torch.float32)] for v in vectors]


@pytest.mark.parametrize("held_direction, gated", [(1.0, False), (-1.0, True)])
def test_the_gate_follows_the_sign_of_the_running_held_out_cosine(held_direction, gated):
    g_cd, g_rec = _grads([1.0, 0.5, 0.0], [-0.2, 1.0, 0.3])
    losses = (torch.tensor(0.4), torch.tensor(5.0))
    plain, _, ok = solve_lambdas([g_cd], g_rec, *losses, "pareto")
    held = HeldOut([held_direction * g_cd[0]], torch.zeros(1))
    lam, running, ok_held = solve_lambdas([g_cd], g_rec, *losses, "pareto", held_out=held)
    assert ok and ok_held and plain.item() > 0
    # the held gradient is +-g_cd: cosine +-1, the running mean moves a (1 - decay) step to it
    assert running.item() == pytest.approx(held_direction * (1 - HELD_OUT_DECAY))
    assert lam.item() == (0.0 if gated else pytest.approx(plain.item()))
    # the memory: a history of agreement outweighs one conflicting batch
    remembered = HeldOut([-g_cd[0]], torch.ones(1))
    lam, running, _ = solve_lambdas([g_cd], g_rec, *losses, "pareto", held_out=remembered)
    assert running.item() == pytest.approx(2 * HELD_OUT_DECAY - 1)
    assert lam.item() == pytest.approx(plain.item())


def _held_step(model, per_domain=False):
    optimizer = make_optimizer(model, TrainConfig(lr=1e-2), fused=False)
    return TrainStep(model, optimizer, loss="full", objective="autocdsr", held_out=True,
                     per_domain=per_domain)


@pytest.mark.parametrize("arch", ["sasrec", "bert4rec"])
def test_the_step_gates_on_the_held_out_cosine_that_autograd_gives(arch):
    model, batch = _setup(arch, "autocdsr", 0)
    data = _data()
    held = held_out_batch(data.valid, np.arange(8), 12, arch, model.tokens)
    # independently: g_cd on the training batch, g_rec on the held-out batch, over the Gram set
    gram = list(model.gram_parameters())
    _, masses = model(batch["items"], batch["domains"], batch["seq_lens"])
    g_cd = torch.autograd.grad(cross_domain_loss(model.objective_masses(masses),
                                                 model.cd_query_mask(batch["domains"])),
                               gram, allow_unused=True)
    h = {k[len(HELD_OUT_PREFIX):]: v for k, v in held.items()}
    hidden, _ = model(h["items"], h["domains"], h["seq_lens"])
    g_held = torch.autograd.grad(recommendation_loss("full", hidden, model.item_weights(),
                                                     h["targets"], h["target_slots"],
                                                     h["target_weight"]), gram, allow_unused=True)
    flat = [torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                       for g, p in zip(gs, gram)]) for gs in (g_cd, g_held)]
    cosine = torch.nn.functional.cosine_similarity(*flat, dim=0).item()

    twin = copy.deepcopy(model)
    official = TrainStep(twin, make_optimizer(twin, TrainConfig(lr=1e-2)), loss="full",
                         objective="autocdsr")
    _, _, _, plain = official.gradients(batch, official.lam, solve=True)
    step = _held_step(model)
    out = step({**batch, **held})
    assert step.cosine.item() == pytest.approx((1 - HELD_OUT_DECAY) * cosine, abs=1e-6)
    if cosine < 0:
        assert out["lambda"].item() == 0.0
    else:
        assert out["lambda"].item() == pytest.approx(plain["lam"].item(), rel=1e-5)
    # the next step's running cosine starts from this one's
    before = step.cosine.clone()
    step({**batch, **held})
    assert step.cosine.item() != pytest.approx(before.item())


def test_the_held_out_step_compiles_fullgraph_and_matches_eager():
    model, batch = _setup("bert4rec", "autocdsr", 0)
    held = held_out_batch(_data().valid, np.arange(6), 12, "bert4rec", model.tokens)
    twin = copy.deepcopy(model)
    eager = _held_step(model, per_domain=True)
    compiled = _held_step(twin, per_domain=True)
    compiled.function = compile_step(compiled.run, backend="aot_eager")
    for _ in range(2):
        a, b = eager({**batch, **held}), compiled({**batch, **held})
        for key in ("train_loss", "lambda", "cosine"):
            assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert eager.cosine.abs().sum() > 0  # the gate saw a held-out gradient
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def test_a_step_without_its_held_out_batch_is_refused():
    model, batch = _setup("sasrec", "autocdsr", 0)
    with pytest.raises(ValueError, match="held-out batch"):
        _held_step(model)(batch)


@pytest.mark.parametrize("overrides, message", [
    (["weighting.held_out=true"], "need objective=autocdsr"),
    (["objective=autocdsr", "weighting.held_out=true", "weighting.mode=fixed"], "need objective"),
    (["objective=autocdsr", "weighting.held_out=true", "weighting.gate=true"], "choose one"),
])
def test_config_refuses_a_held_out_gate_that_cannot_run(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
