"""The on-device Pareto solver against the paper-code port, and the balanced step."""
import math

import pytest
import torch

from kernels import pareto
from kernels import reference_pareto as ref


def _random_problem(rng, trial):
    """A Gram matrix and loss pair; a third of them near-parallel or opposite gradients."""
    a = torch.randn(6, dtype=torch.float64, generator=rng)
    b = torch.randn(6, dtype=torch.float64, generator=rng)
    if trial % 3 == 0:
        sign = 1.0 if trial % 2 else -1.0
        b = sign * a + 0.05 * b
    b = b * (0.1 + 10 * torch.rand((), dtype=torch.float64, generator=rng))
    gram = torch.stack([torch.stack([a @ a, a @ b]), torch.stack([b @ a, b @ b])])
    # both constraint regimes: L_rec above and below L_cd (and below 0.414 L_cd)
    losses = torch.rand(2, dtype=torch.float64, generator=rng) * torch.tensor([3.0, 10.0],
                                                                              dtype=torch.float64)
    return gram, losses + 1e-3


@pytest.mark.parametrize("mode", ["pareto", "mgda"])
def test_device_solver_matches_reference_on_1000_problems(mode):
    rng = torch.Generator().manual_seed(0)
    problems = [_random_problem(rng, t) for t in range(1000)]
    grams = torch.stack([g for g, _ in problems])
    losses = torch.stack([l for _, l in problems])
    lam, ok = pareto.pareto_lambda(grams, losses, mode)  # batched: one call for all
    regimes = set()
    for i, (gram, loss) in enumerate(problems):
        expected, expected_ok = ref.pareto_lambda(gram.tolist(), loss.tolist(), mode)
        assert bool(ok[i]) == expected_ok
        # lambda is returned in float32: pareto's lies in (-1, 1], mgda's is unbounded, so
        # mgda is compared relative to its size (float32 keeps ~7 significant digits).
        scale = max(1.0, abs(expected)) if mode == "mgda" else 1.0
        assert abs(lam[i].item() - expected) <= 1e-4 * scale, (i, lam[i].item(), expected)
        regimes.add((loss[1] > loss[0]).item())
    assert regimes == {True, False}


def test_both_constraints_active_closed_form():
    """With both constraints active, lambda = (1 - 2c) / (2 - c)."""
    for c in (-0.9, -0.3, 0.0, 0.2, 0.45):
        gram = torch.tensor([[1.0, c], [c, 1.0]], dtype=torch.float64)
        lam, ok = pareto.pareto_lambda(gram, torch.tensor([0.5, 2.0], dtype=torch.float64))
        assert ok and abs(lam.item() - (1 - 2 * c) / (2 - c)) < 1e-5, c


@pytest.mark.parametrize("gram", [
    [[0.0, 0.0], [0.0, 1.0]],                   # zero cd gradient
    [[1.0, 0.0], [0.0, 0.0]],                   # zero rec gradient
    [[math.nan, 0.0], [0.0, 1.0]],              # NaN
    [[math.inf, 1.0], [1.0, 1.0]],              # inf
])
@pytest.mark.parametrize("mode", ["pareto", "mgda"])
def test_degenerate_inputs_fall_back_to_zero(gram, mode):
    lam, ok = pareto.pareto_lambda(torch.tensor(gram), torch.tensor([1.0, 2.0]), mode)
    assert not ok and lam.item() == 0.0


def test_gram_matrix_matches_host_and_skips_missing_grads():
    gen = torch.Generator().manual_seed(0)
    g1 = [torch.randn(3, 4, generator=gen), None, torch.randn(5, generator=gen)]
    g2 = [torch.randn(3, 4, generator=gen), torch.randn(2, generator=gen), torch.randn(5, generator=gen)]
    device = pareto.gram_matrix([g1, g2])
    cross = ref.gram_matrix([[g1[0], g1[2]], [g2[0], g2[2]]])  # None contributes nothing
    full = ref.gram_matrix([g2, g2])
    expected = torch.tensor([[cross[0][0], cross[0][1]], [cross[1][0], full[0][0]]], dtype=torch.float64)
    assert torch.allclose(device.double(), expected, atol=1e-5)


def test_gram_and_solver_compile_fullgraph():
    """No graph break means no host read in steps 2-3 of the balanced step (.item(), .cpu(),
    a Python branch on a value): Gram matrix and solver trace as one graph."""
    def gram_and_lambda(g_cd, g_rec, losses):
        return pareto.pareto_lambda(pareto.gram_matrix([g_cd, g_rec]), losses)

    compiled = torch.compile(gram_and_lambda, fullgraph=True, backend="eager")
    gen = torch.Generator().manual_seed(0)
    g_cd = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    g_rec = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    losses = torch.tensor([0.5, 3.0])
    lam, ok = compiled(g_cd, g_rec, losses)
    expected, _ = ref.pareto_lambda(ref.gram_matrix([g_cd, g_rec]), [0.5, 3.0])
    assert ok and abs(lam.item() - expected) < 1e-5


def _tiny_model_and_losses(device, seed=0):
    from autocdsr.config import ModelConfig
    from autocdsr.models import Recommender
    from autocdsr.objectives import cross_domain_loss
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="sasrec", hidden=32, heads=2, layers=2, dropout=0.0)
    model = Recommender(cfg, 30, 3, 12,
                        backend="sdpa" if device == "cpu" else "triton").to(device)
    items = torch.randint(1, 31, (4, 12), device=device)
    domains = torch.randint(0, 3, (4, 12), device=device)
    seq_lens = torch.tensor([12, 9, 12, 5], device=device)
    domains[1, 9:] = -1
    domains[3, 5:] = -1

    def losses():
        hidden, masses = model(items, domains, seq_lens)
        loss_rec = (hidden.float() @ model.item_weights().float().T).logsumexp(-1).mean()
        return loss_rec, cross_domain_loss(model.objective_masses(masses),
                                           model.cd_query_mask(domains))
    return model, losses


def _gradients(model, losses, mode="pareto", lam=None, solve=True):
    from autocdsr.balancing import balanced_gradients
    params = list(model.parameters())
    index = [i for i, p in enumerate(params) if any(p is q for q in model.gram_parameters())]
    lam = torch.zeros(()) if lam is None else lam
    return balanced_gradients(params, index, *losses(), mode, lam, solve)


def test_two_passes_equal_third_backward():
    """The combined update equals grad(L_rec + lambda L_cd) from a third backward."""
    model, losses = _tiny_model_and_losses("cpu")
    combined, lam, _, ok = _gradients(model, losses)
    loss_rec, loss_cd = losses()
    (loss_rec + lam.detach() * loss_cd).backward()
    assert ok and lam.item() != 0.0
    for got, p in zip(combined, model.parameters()):
        assert torch.allclose(got, p.grad, atol=1e-6, rtol=1e-5)


def test_reused_lambda_takes_one_backward_pass():
    model, losses = _tiny_model_and_losses("cpu")
    _, first, _, _ = _gradients(model, losses)
    calls = []
    original = torch.autograd.grad
    torch.autograd.grad = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        grads, second, _, _ = _gradients(model, losses, lam=first, solve=False)
    finally:
        torch.autograd.grad = original
    assert len(calls) == 1 and second.item() == first.item()
    loss_rec, loss_cd = losses()
    (loss_rec + first * loss_cd).backward()
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, model.parameters()))


@pytest.mark.gpu
def test_balanced_gradients_run_without_host_sync_on_gpu():
    model, losses = _tiny_model_and_losses("cuda")
    _gradients(model, losses)  # warm up: kernels compiled, constants cached
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, lam, _, _ = _gradients(model, losses)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(lam)
