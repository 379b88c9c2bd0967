"""The objective as the official AutoCDSR code defines it: [MASK] domains, the Gram set, the
fallback step, the in-batch loss, and tie handling in the sampled protocols."""
import functools

import numpy as np
import pytest
import torch

import kernels
from autocdsr.config import ModelConfig
from autocdsr.data.batches import bert4rec_train_batch, target_slots
from autocdsr.data.dataset import build_leave_one_out
from autocdsr.data.synthetic import generate
from autocdsr.evaluate import _rank
from autocdsr.losses import inbatch_official_loss, recommendation_loss
from autocdsr.models import Recommender
from autocdsr.objectives import cross_domain_loss
from autocdsr.balancing import balanced_gradients
from kernels import pareto
from kernels import reference_pareto as ref
from kernels.attention import triton_available

BACKENDS = ["reference", "sdpa"] + (["triton"] if triton_available(torch.device("cpu")) else [])


def _model(arch="bert4rec", backend="reference", bottleneck=0, layers=2, seed=0,
           num_items=40, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, hidden=32, heads=2, layers=layers, dropout=0.0,
                      bottleneck_tokens=bottleneck)
    return Recommender(cfg, num_items, 3, 16, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_domain", ["target", "hidden"])
@pytest.mark.parametrize("bottleneck", [0, 2])
def test_single_domain_batch_with_masks_has_zero_cd_loss(backend, mask_domain, bottleneck):
    """Real tokens all of domain 1, [MASK]s among them: no attention is cross-domain, in
    either [MASK] mode, with every backend (the bug: [MASK] as a domain of its own)."""
    data = build_leave_one_out(generate(30, min_len=20, max_len=20, seed=0), "s")
    data.train.domains[:] = 1
    model = _model(backend=backend, bottleneck=bottleneck, mask_domain=mask_domain,
                   num_items=data.num_items)
    batch = bert4rec_train_batch(data.train, list(range(6)), 16, model.tokens, 0.3,
                                 np.random.default_rng(0))
    assert (batch["items"] == model.mask_item).sum() >= 6
    _, masses = model(batch["items"], batch["domains"], batch["seq_lens"])
    loss = cross_domain_loss(model.objective_masses(masses), model.cd_query_mask(batch["domains"]))
    if bottleneck:  # the objective is then the mass paid to the IB tokens: positive
        assert loss.item() > 0.01
        batch["domains"][0, 3] = 2  # and still defined with another domain present
    else:
        assert abs(loss.item()) < 1e-6
    if mask_domain == "hidden" and not bottleneck:
        # a wildcard query's mass is left out of L_cd, a wildcard key is never cross
        wild = batch["domains"] == kernels.WILDCARD_DOMAIN
        assert wild.any() and not model.cd_query_mask(batch["domains"])[wild].any()


def test_hidden_mask_is_a_wildcard_key_and_query():
    q, k, v = (torch.randn(1, 1, 4, 16) for _ in range(3))
    W = kernels.WILDCARD_DOMAIN
    domains = torch.tensor([[0, 1, W, 0]])
    probs = torch.softmax(q[0, 0] @ k[0, 0].T / 4.0, dim=-1)
    for backend in BACKENDS:
        _, mass = kernels.cross_domain_attention(q, k, v, domains, backend=backend)
        assert mass[0, 0, 2].item() == 0.0
        assert mass[0, 0, 0].item() == pytest.approx(probs[0, 1].item(), abs=1e-5)  # W not cross
        assert mass[0, 0, 1].item() == pytest.approx((probs[1, 0] + probs[1, 3]).item(), abs=1e-5)


@pytest.mark.parametrize("arch,bottleneck,layers", [("sasrec", 0, 2), ("bert4rec", 0, 3),
                                                    ("bert4rec", 2, 4)])
def test_reached_set_is_what_the_cd_loss_reaches(arch, bottleneck, layers):
    model = _model(arch, "sdpa", bottleneck, layers)
    items = torch.randint(1, 41, (3, 16))
    domains = torch.randint(0, 3, (3, 16))
    _, masses = model(items, domains, torch.full((3,), 16))
    loss = cross_domain_loss(model.objective_masses(masses), model.cd_query_mask(domains))
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    table = model.item_embedding.weight
    reached = {id(p) for p, g in zip(params, grads) if g is not None and p is not table}
    assert {id(p) for p in model.gram_parameters("reached")} == reached
    assert len(model.gram_parameters("all")) == len(params)
    assert all(p is not table for p in model.gram_parameters("all_but_items"))
    assert len(reached) < len(params) - 1  # the last block's FFN, the final norm are left out


def test_fallback_step_uses_g_rec_alone_when_g_cd_is_nan():
    model = _model("sasrec", "sdpa")
    items = torch.randint(1, 41, (3, 16))
    domains = torch.randint(0, 3, (3, 16))

    def losses():
        hidden, masses = model(items, domains, torch.full((3,), 16))
        loss_rec = (hidden @ model.item_weights().T).logsumexp(-1).mean()
        loss_cd = cross_domain_loss(model.objective_masses(masses), model.cd_query_mask(domains))
        return loss_rec, loss_cd * float("nan")

    params = list(model.parameters())
    grads, lam, _, ok = balanced_gradients(params, list(range(len(params))), *losses(),
                                           "pareto", torch.zeros(()), True)
    losses()[0].backward()
    assert lam.item() == 0.0 and not ok
    for got, p in zip(grads, params):
        assert torch.isfinite(got).all()
        assert torch.allclose(got, p.grad, atol=1e-7)


@pytest.mark.parametrize("solver", ["device", "reference"])
def test_mgda_alpha_zero_gives_the_capped_lambda(solver):
    # G_cc <= G_rc: the cd gradient alone is the min-norm point, alpha = 0
    gram = [[1.0, 2.0], [2.0, 9.0]]
    if solver == "device":
        lam, ok = pareto.pareto_lambda(torch.tensor(gram), torch.tensor([0.5, 2.0]), "mgda")
        lam, ok = lam.item(), bool(ok)
    else:
        lam, ok = ref.pareto_lambda(gram, [0.5, 2.0], "mgda")
    assert ok and lam == pytest.approx(pareto.MGDA_MAX_LAMBDA)


def test_inbatch_official_matches_a_line_by_line_transcription():
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(7, 16, generator=gen, dtype=torch.float64)
    weights = torch.randn(12, 16, generator=gen, dtype=torch.float64)
    targets = torch.tensor([3, 5, 3, 1, 7, 5, 3])
    got = inbatch_official_loss(states, weights, targets)
    tau = 0.1
    total = 0.0
    for i in range(len(targets)):
        s = [float(torch.nn.functional.cosine_similarity(states[i], weights[targets[j]], dim=0))
             for j in range(len(targets))]
        numerator = np.exp(s[i] / tau)
        denominator = sum(1.0 if targets[j] == targets[i] else np.exp(s[j] / tau)
                          for j in range(len(targets)))
        total += -np.log(numerator / denominator)
    assert got.item() == pytest.approx(total / len(targets), rel=1e-6)  # fp32 logits by design


def test_cosine_logits_are_scale_free():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=gen)
    weights = torch.randn(20, 8, generator=gen)
    targets = torch.randint(1, 20, (2, 5), generator=gen)
    slots, weight = (torch.from_numpy(a) for a in target_slots(targets.numpy(), 10))
    loss = functools.partial(recommendation_loss, "full", targets=targets, slots=slots,
                             slot_weight=weight, logits="cosine", temperature=0.2)
    assert loss(hidden, weights).item() == pytest.approx(loss(3 * hidden, 5 * weights).item())
    assert loss(hidden, weights).item() != pytest.approx(
        recommendation_loss("full", hidden, weights, targets, slots, weight).item())


def test_rank_counts_half_ties_among_the_other_candidates():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 30), generator=gen).float()  # many ties
    target = torch.randint(0, 4, (50,), generator=gen).float()
    got = _rank(scores, target)
    for r in range(50):
        higher = sum(float(s) > float(target[r]) for s in scores[r])
        tied = sum(float(s) == float(target[r]) for s in scores[r])
        assert got[r].item() == higher + 0.5 * tied
    one_tie = _rank(torch.tensor([[1.0, 0.0]]), torch.tensor([1.0]))
    assert one_tie.item() == 0.5
