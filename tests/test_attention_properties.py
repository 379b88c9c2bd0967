"""Property-based: random shapes, masks, padding, domains and wildcards against the direct
formula."""
import functools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels

from .test_kernels_reference import direct_formula


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 2), length=st.integers(1, 9),
       head_dim=st.sampled_from([16, 24, 32]), causal=st.booleans(),
       nb=st.integers(0, 3), num_domains=st.integers(1, 4), pad_prob=st.floats(0, 0.6),
       wild_prob=st.floats(0, 0.4), backend=st.sampled_from(["reference", "sdpa", "sdpa_known"]),
       seed=st.integers(0, 2**16))
def test_backends_match_the_direct_formula(batch, heads, length, head_dim, causal, nb,
                                           num_domains, pad_prob, wild_prob, backend, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=gen, dtype=torch.float64)
               for _ in range(3))
    domains = torch.randint(0, num_domains, (batch, length), generator=gen)
    domains[torch.rand(batch, length, generator=gen) < wild_prob] = kernels.WILDCARD_DOMAIN
    domains[torch.rand(batch, length, generator=gen) < pad_prob] = -1
    seq_lens = torch.randint(0, length + 1, (batch,), generator=gen)
    nb = min(nb, length)
    fn = {"reference": kernels.reference_attention, "sdpa": kernels.sdpa_attention,
          "sdpa_known": functools.partial(kernels.sdpa_attention, num_domains=num_domains)}[backend]
    out, mass = fn(q, k, v, domains, causal=causal, num_bottleneck=nb, seq_lens=seq_lens)
    exp_out, exp_mass = direct_formula(q, k, v, domains, causal, nb, seq_lens)
    assert torch.isfinite(out).all() and torch.isfinite(mass).all()
    assert torch.allclose(out.double(), exp_out, atol=1e-6)
    assert torch.allclose(mass.double(), exp_mass, atol=1e-6)
