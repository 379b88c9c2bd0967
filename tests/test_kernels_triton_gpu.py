"""Fused kernels on a real GPU, with the FlashAttention rule: the error against an fp32
reference is at most twice that of the same-precision PyTorch reference, plus 1e-5."""
import functools

import pytest
import torch

import kernels
from kernels.attention.reference import reference_attention

from .attention_cases import make_inputs, with_grads

pytestmark = pytest.mark.gpu
NAMES = ("out", "mass", "dq", "dk", "dv")
MODES = {"bidir": (False, 0), "causal": (True, 0), "bottleneck": (False, 4)}


def _check(dtype, head_dim, length, mode, batch=3, heads=2):
    causal, nb = MODES[mode]
    nb = min(nb, length)
    inputs = make_inputs(batch, heads, length, head_dim, dtype, "cuda")
    q, k, v, domains, seq_lens = inputs
    kw = dict(causal=causal, num_bottleneck=nb)
    fused = with_grads(functools.partial(kernels.cross_domain_attention, backend="triton"),
                       *inputs, **kw)
    same = with_grads(reference_attention, *inputs, **kw)
    exact = with_grads(reference_attention, q.float(), k.float(), v.float(), domains,
                       seq_lens, **kw)
    for name, a, b, ref in zip(NAMES, fused, same, exact):
        assert torch.isfinite(a).all(), name
        err = (a.float() - ref.float()).abs().max().item()
        base = (b.float() - ref.float()).abs().max().item()
        assert err <= 2 * base + 1e-5, f"{name}: fused error {err:.3e} > 2 x {base:.3e} + 1e-5"


@pytest.mark.parametrize("length", [1, 17, 50, 200, 800, 1000])
@pytest.mark.parametrize("mode", list(MODES))
def test_lengths_and_modes_bf16(length, mode):
    _check(torch.bfloat16, 32, length, mode)


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("mode", list(MODES))
def test_head_dims_bf16(head_dim, mode):
    _check(torch.bfloat16, head_dim, 77, mode)


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["bidir", "causal"])
def test_dtypes(dtype, head_dim, mode):
    _check(dtype, head_dim, 200, mode)


def test_no_host_sync_in_fused_attention():
    q, k, v, domains, seq_lens = make_inputs(2, 2, 64, 32, torch.bfloat16, "cuda")
    q.requires_grad_(True)
    kernels.cross_domain_attention(q, k, v, domains, seq_lens=seq_lens, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, mass = kernels.cross_domain_attention(q, k, v, domains, seq_lens=seq_lens,
                                                   backend="triton")
        (out.float().sum() + mass.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
