"""The PyTorch backends against a direct per-row formula, and input validation."""
import functools
import math

import pytest
import torch

import kernels
from kernels.attention.reference import reference_attention
from kernels.attention.sdpa import sdpa_attention

from .attention_cases import make_inputs, with_grads


def direct_formula(q, k, v, domains, causal, nb, seq_lens):
    """Row by row, straight from the op's contract (no masking tricks)."""
    batch, heads, length, head_dim = q.shape
    W = kernels.WILDCARD_DOMAIN
    same = lambda b, i, j: bool(domains[b, i] == domains[b, j] or domains[b, i] == W
                                or domains[b, j] == W)
    out = torch.zeros_like(q, dtype=torch.float64)
    mass = torch.zeros(batch, heads, length, dtype=torch.float64)
    for b in range(batch):
        valid = [domains[b, j] >= 0 and (seq_lens is None or j < seq_lens[b]) for j in range(length)]
        for i in range(length):
            if not valid[i]:
                continue
            keys = [j for j in range(length) if valid[j] and (not causal or j <= i)
                    and (nb == 0 or i < nb or j < nb or same(b, i, j))]
            if not keys:
                continue
            for h in range(heads):
                s = torch.stack([q[b, h, i].double() @ k[b, h, j].double() for j in keys])
                p = torch.softmax(s / math.sqrt(head_dim), dim=0)
                out[b, h, i] = sum(p[n] * v[b, h, j].double() for n, j in enumerate(keys))
                cross = [(j < nb <= i) if nb else not same(b, i, j) for j in keys]
                mass[b, h, i] = sum(p[n] for n, c in enumerate(cross) if c)
    return out, mass


SDPA_KNOWN_DOMAINS = functools.partial(sdpa_attention, num_domains=3)


@pytest.mark.parametrize("causal,nb", [(False, 0), (True, 0), (False, 2), (True, 2)])
@pytest.mark.parametrize("fn", [reference_attention, sdpa_attention, SDPA_KNOWN_DOMAINS])
def test_against_direct_formula(fn, causal, nb):
    q, k, v, domains, seq_lens = make_inputs(4, 2, 9, 16, torch.float64, "cpu")
    assert (domains == kernels.WILDCARD_DOMAIN).any()
    out, mass = fn(q, k, v, domains, causal=causal, num_bottleneck=nb, seq_lens=seq_lens)
    exp_out, exp_mass = direct_formula(q, k, v, domains, causal, nb, seq_lens)
    assert torch.allclose(out.double(), exp_out, atol=1e-6)
    assert torch.allclose(mass.double(), exp_mass, atol=1e-6)


def test_edge_rows_zero_not_nan():
    q, k, v, domains, seq_lens = make_inputs(4, 2, 9, 16, torch.float32, "cpu")
    for fn in (reference_attention, sdpa_attention):
        out, mass, dq, dk, dv = with_grads(fn, q, k, v, domains, seq_lens, causal=False,
                                           num_bottleneck=0)
        for t in (out, mass, dq, dk, dv):
            assert torch.isfinite(t).all()
        assert (out[2] == 0).all() and (mass[2] == 0).all()  # all-padding row
        assert (dq[2] == 0).all()
        # single-domain row: no cross key (sdpa gets it as 1 - P(own domain): rounding only)
        assert mass[1].abs().max() <= 1e-6
        assert (out[0, :, 4] == 0).all()                      # padding query inside a row


@pytest.mark.parametrize("causal,nb", [(False, 0), (True, 0), (False, 3)])
def test_sdpa_equals_reference_in_value_and_gradient(causal, nb):
    inputs = make_inputs(4, 3, 23, 32, torch.float64, "cpu")
    a = with_grads(reference_attention, *inputs, causal=causal, num_bottleneck=nb)
    b = with_grads(sdpa_attention, *inputs, causal=causal, num_bottleneck=nb)
    for name, x, y in zip(("out", "mass", "dq", "dk", "dv"), a, b):
        # the mass is float32 by contract (sdpa) while these inputs are float64
        assert torch.allclose(x.double(), y.double(), atol=1e-6 if name == "mass" else 1e-9), name


@pytest.mark.parametrize("causal,nb", [(True, 0), (False, 3)])
def test_sdpa_equals_reference_in_float32(causal, nb):
    """float32, where the CPU's fused SDPA kernel runs (q and k zero-padded to v's width)."""
    inputs = make_inputs(4, 3, 23, 32, torch.float32, "cpu")
    a = with_grads(reference_attention, *inputs, causal=causal, num_bottleneck=nb)
    b = with_grads(sdpa_attention, *inputs, causal=causal, num_bottleneck=nb)
    for name, x, y in zip(("out", "mass", "dq", "dk", "dv"), a, b):
        assert torch.allclose(x, y, atol=1e-5), name


def test_reference_backward_of_the_mass_alone_never_reaches_v():
    """A loss of the mass alone: the reference's backward is mass-only by construction (the
    P V product is not on the path, so dV is not computed), with sdpa's dQ and dK."""
    q, k, v, domains, seq_lens = make_inputs(3, 2, 17, 16, torch.float64, "cpu", seed=4)
    grads = {}
    for name, fn in (("reference", reference_attention), ("sdpa", sdpa_attention)):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        mass = fn(*leaves, domains, causal=True, seq_lens=seq_lens)[1]
        grads[name] = torch.autograd.grad((mass * torch.arange(17.0)).sum(), leaves,
                                          allow_unused=True)
    dq, dk, dv = grads["reference"]
    assert dv is None
    assert dq.abs().max() > 1e-3
    assert torch.allclose(dq, grads["sdpa"][0], atol=1e-6)
    assert torch.allclose(dk, grads["sdpa"][1], atol=1e-6)
    assert grads["sdpa"][2] is not None and grads["sdpa"][2].abs().max() < 1e-12


def test_reference_gradcheck_through_mass():
    q, k, v, domains, seq_lens = make_inputs(2, 1, 5, 16, torch.float64, "cpu", seed=3)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    fn = lambda q, k, v: reference_attention(q, k, v, domains, seq_lens=seq_lens)[1]
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_auto_backend_on_cpu_is_sdpa():
    inputs = make_inputs(2, 2, 7, 16, torch.float32, "cpu")
    out, mass = kernels.cross_domain_attention(*inputs[:4], seq_lens=inputs[4])
    ref_out, ref_mass = sdpa_attention(*inputs[:4], seq_lens=inputs[4])
    assert torch.equal(out, ref_out) and torch.equal(mass, ref_mass)


def _call(**changes):
    q, k, v, domains, _ = make_inputs(2, 2, 7, 16, torch.float32, "cpu", padding=False)
    args = dict(q=q, k=k, v=v, domains=domains)
    kwargs = dict(causal=False, num_bottleneck=0, seq_lens=None, scale=None, backend="reference")
    for key, value in changes.items():
        (args if key in args else kwargs)[key] = value
    return kernels.cross_domain_attention(*args.values(), **kwargs)


@pytest.mark.parametrize("changes,word", [
    (dict(q=torch.randn(2, 2, 7)), "q"),
    (dict(k=torch.randn(2, 2, 7, 32)), "share one shape"),
    (dict(v=torch.randn(2, 2, 7, 16, dtype=torch.float64)), "v"),
    (dict(q=torch.randn(2, 2, 7, 8), k=torch.randn(2, 2, 7, 8), v=torch.randn(2, 2, 7, 8)), "head dim"),
    (dict(q=torch.randn(2, 2, 7, 256), k=torch.randn(2, 2, 7, 256), v=torch.randn(2, 2, 7, 256)), "head dim"),
    (dict(domains=torch.zeros(2, 6, dtype=torch.long)), "domains"),
    (dict(domains=torch.zeros(2, 7)), "domains"),
    (dict(seq_lens=torch.tensor([7])), "seq_lens"),
    (dict(num_bottleneck=9), "num_bottleneck"),
    (dict(num_bottleneck=-1), "num_bottleneck"),
    (dict(backend="cuda"), "backend"),
    (dict(scale=-1.0), "scale"),
    (dict(causal=1), "causal"),
    (dict(domains=torch.full((2, 7), 2**33)), "fit in int32"),
    (dict(domains=torch.full((2, 7), -2**31 - 5)), "fit in int32"),
])
def test_bad_input_raises_value_error_naming_the_argument(changes, word):
    with pytest.raises(ValueError, match=word):
        _call(**changes)
