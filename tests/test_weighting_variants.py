"""The weighting variants beyond the paper: weighting.layers (which layers' mass enters L_cd,
and so the Gram set), weighting.per_domain (one L_cd_d and one lambda_d per query domain),
weighting.gate (no penalty where the gradients conflict). Each against a direct computation:
autograd's reach, the official solver ported on host floats, the global L_cd."""
import copy

import numpy as np
import pytest
import torch

import kernels
from autocdsr.config import ModelConfig, TrainConfig, ConfigError, load_config
from autocdsr.data.batches import bert4rec_train_batch, sasrec_train_batch
from autocdsr.data.dataset import build_leave_one_out
from autocdsr.data.synthetic import generate
from autocdsr.models import Recommender
from autocdsr.objectives import cross_domain_loss, cross_domain_loss_per_domain, domain_query_counts
from autocdsr.optim import make_optimizer
from autocdsr.step import TrainStep
from kernels import reference_pareto as ref

from .step_checks import assert_compiled_step_matches_eager


DATA = build_leave_one_out(generate(40, min_len=10, max_len=20, seed=0), "s")


def _model(arch="sasrec", layers=3, bottleneck=0, num_domains=3, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, hidden=32, heads=2, layers=layers, dropout=0.0,
                      bottleneck_tokens=bottleneck)
    return Recommender(cfg, DATA.num_items, num_domains, 16, backend="sdpa")


def _inputs(num_domains=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    items = torch.randint(1, 41, (3, 16), generator=gen)
    domains = torch.randint(0, num_domains, (3, 16), generator=gen)
    domains[0, 12:] = -1  # padding
    return items, domains, torch.tensor([12, 16, 16])


@pytest.mark.parametrize("arch,bottleneck,layers,chosen", [
    ("sasrec", 0, 3, [0]), ("sasrec", 0, 3, [1]), ("bert4rec", 0, 3, [0, 2]),
    ("bert4rec", 2, 4, [1])])
def test_layers_choose_the_masses_and_the_gram_set_follows_the_reach(arch, bottleneck, layers,
                                                                      chosen):
    model = _model(arch, layers, bottleneck)
    items, domains, lens = _inputs()
    _, masses = model(items, domains, lens)
    picked = model.objective_masses(masses, chosen)
    assert len(picked) == len(chosen)
    assert all(a is masses[i] for a, i in zip(picked, chosen))
    loss = cross_domain_loss(picked, model.cd_query_mask(domains))
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    table = model.item_embedding.weight
    reached = {id(p) for p, g in zip(params, grads) if g is not None and p is not table}
    assert {id(p) for p in model.gram_parameters("reached", chosen)} == reached
    if max(chosen) < model.mass_layers()[-1]:  # a lower layer: a smaller Gram set
        assert len(model.gram_parameters("reached", chosen)) < len(model.gram_parameters())


def test_layers_outside_the_mass_layers_are_refused():
    with pytest.raises(ValueError, match="bottleneck layers"):
        _model("bert4rec", 4, bottleneck=2).mass_layers([2])
    with pytest.raises(ConfigError, match="weighting.layers"):
        load_config(None, ["weighting.layers=[5]", "objective=autocdsr"])


def test_per_domain_losses_weighted_by_query_counts_sum_to_the_global_loss():
    gen = torch.Generator().manual_seed(1)
    domains = torch.randint(0, 3, (4, 10), generator=gen)
    domains[1, 6:] = -1
    domains[2, 3] = kernels.WILDCARD_DOMAIN  # left out of every L_cd
    masses = [torch.rand(4, 2, 10, generator=gen) for _ in range(2)]
    query_mask = (domains >= 0) & (domains != kernels.WILDCARD_DOMAIN)
    per = cross_domain_loss_per_domain(masses, query_mask, domains, 3)
    counts = domain_query_counts(query_mask, domains, 3)
    total = cross_domain_loss(masses, query_mask)
    assert torch.allclose((per * counts).sum() / counts.sum(), total, atol=1e-6)
    # and each L_cd_d is the global formula over that domain's queries alone
    for d in range(3):
        alone = cross_domain_loss(masses, query_mask & (domains == d))
        assert torch.allclose(per[d], alone, atol=1e-6)


def _step(model, **kw):
    return TrainStep(model, make_optimizer(model, TrainConfig(), fused=False), loss="full",
                     objective="autocdsr", **kw)


def _sasrec_batch():
    return sasrec_train_batch(DATA.train, np.arange(6), 16)


def _host(tensors):
    return [t.double().flatten() for t in tensors]


def test_each_per_domain_lambda_is_the_official_solver_on_that_domains_gram_matrix():
    model = _model("sasrec", 2)
    batch = _sasrec_batch()
    step = _step(model, per_domain=True)
    step.table_in_gram = True  # the dense path: g_cd of every parameter, to check the update
    grads, _, _, out = step.gradients(batch, step.lam, True)
    # the same quantities taken directly, one autograd pass per loss
    fwd = step.losses(batch)
    loss_rec, tasks = fwd.loss_rec, fwd.tasks
    params, gram_index = step.params, step.gram_index
    g_rec = torch.autograd.grad(loss_rec, params, retain_graph=True, allow_unused=True)
    g_rec = [torch.zeros_like(p) if g is None else g for g, p in zip(g_rec, params)]
    expected = list(g_rec)
    lams = []
    for d in range(3):
        g_cd = torch.autograd.grad(tasks[d], params, retain_graph=True, allow_unused=True)
        g_cd = [torch.zeros_like(p) if g is None else g for g, p in zip(g_cd, params)]
        a, b = torch.cat(_host([g_cd[i] for i in gram_index])), torch.cat(
            _host([g_rec[i] for i in gram_index]))
        gram = [[float(a @ a), float(a @ b)], [float(b @ a), float(b @ b)]]
        lam, ok = ref.pareto_lambda(gram, [tasks[d].detach().item(), loss_rec.detach().item()], "pareto")
        assert ok
        lams.append(lam)
        expected = [e + lam * g for e, g in zip(expected, g_cd)]
    assert out["lam"] == pytest.approx(lams, abs=1e-5)
    assert len({round(x, 4) for x in lams}) > 1  # the domains do get different weights
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, atol=1e-6)


def test_per_domain_with_one_domain_is_the_official_step():
    """One domain: its L_cd_1 is L_cd and its problem the official one (AutoCDSR+, whose IB
    mass is positive with a single domain)."""
    model = _model("bert4rec", 2, bottleneck=2, num_domains=1)
    data = copy.deepcopy(DATA)
    data.train.domains[:] = 0
    batch = bert4rec_train_batch(data.train, np.arange(6), 16, model.tokens, 0.3,
                                 np.random.default_rng(0))
    twin = copy.deepcopy(model)
    official = _step(model)
    per_domain = _step(twin, per_domain=True)
    a = official.gradients(batch, official.lam, True)
    b = per_domain.gradients(batch, per_domain.lam, True)
    assert a[3]["lam"].item() != 0.0
    assert torch.allclose(a[3]["lam"], b[3]["lam"][0], atol=1e-7)
    for x, y in zip(a[0], b[0]):
        assert torch.allclose(x, y, atol=1e-7)


def test_gate_zeroes_lambda_exactly_where_the_gradients_conflict():
    model = _model("sasrec", 2)
    batch = _sasrec_batch()
    ungated = _step(model, per_domain=True).gradients(batch, None, True)[3]
    gated = _step(model, per_domain=True, gate=True).gradients(batch, None, True)[3]
    want = torch.where(ungated["cosine"] >= 0, ungated["lam"], 0.0)
    assert torch.equal(gated["lam"], want)
    assert (ungated["cosine"] < 0).any()  # the gate does act here


@pytest.mark.parametrize("variant", [dict(layers=[0]), dict(per_domain=True),
                                     dict(per_domain=True, layers=[0], gate=True)])
def test_variant_steps_compile_fullgraph_and_match_eager(variant):
    """No graph break: the variants stay free of host synchronisation."""
    assert_compiled_step_matches_eager(
        _model("sasrec", 2), _sasrec_batch(),
        lambda m, compile: _step(m, compile=compile, **variant))
