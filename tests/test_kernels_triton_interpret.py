"""The fused Triton kernels against kernels.attention.reference. On a CPU they run under
TRITON_INTERPRET=1 (set in conftest); shapes stay tiny and odd so every tile edge is hit."""
import functools

import pytest
import torch

import kernels
from kernels.attention import tiles
from kernels.attention import triton_available
from kernels.attention.reference import reference_attention

from .attention_cases import make_inputs, with_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_available(torch.device(DEVICE)),
                                reason="needs CUDA or TRITON_INTERPRET=1")
NAMES = ("out", "mass", "dq", "dk", "dv")
MODES = {"bidir": (False, 0), "causal": (True, 0), "bottleneck": (False, 3),
         "causal+bottleneck": (True, 3)}
TOL = {torch.float32: 2e-5, torch.float16: 1e-2}
fused = functools.partial(kernels.cross_domain_attention, backend="triton")


def _compare(dtype, head_dim, length, mode, batch=3, heads=2, use_out=True, use_mass=True):
    causal, nb = MODES[mode]
    nb = min(nb, length)
    inputs = make_inputs(batch, heads, length, head_dim, dtype, DEVICE)
    got = with_grads(fused, *inputs, causal=causal, num_bottleneck=nb, use_out=use_out,
                     use_mass=use_mass)
    q, k, v, domains, seq_lens = inputs
    want = with_grads(reference_attention, q.float(), k.float(), v.float(), domains, seq_lens,
                      causal=causal, num_bottleneck=nb, use_out=use_out, use_mass=use_mass)
    for name, a, b in zip(NAMES, got, want):
        assert torch.isfinite(a).all(), name
        scale = max(1.0, b.abs().max().item())
        err = (a.float() - b.float()).abs().max().item()
        assert err <= TOL[dtype] * scale, f"{name}: max error {err:.2e}"


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("length", [1, 17, 64, 70])
def test_modes_and_odd_lengths_fp32(mode, length):
    """64 is a multiple of every fp32 tile (full rows are interior tiles only); 70 mixes
    interior tiles with a boundary tile and a causal diagonal."""
    _compare(torch.float32, 16, length, mode)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_tile_through_the_boundary_path(mode):
    """INTERIOR=False (a tuning option): the same results with no interior fast path."""
    entries = {(kernel, "fp32", 16, tiles.length_bucket(70)): {"INTERIOR": False}
               for kernel in tiles.KERNELS}
    with tiles.trying(entries):
        assert not tiles.config("dq", 16, torch.float32, 70)["INTERIOR"]
        _compare(torch.float32, 16, 70, mode)


@pytest.mark.parametrize("head_dim", [16, 24, 32, 64, 128])
def test_head_dims_fp32(head_dim):
    _compare(torch.float32, head_dim, 19, "causal", batch=3, heads=1)


@pytest.mark.parametrize("mode", ["bidir", "causal", "bottleneck"])
@pytest.mark.parametrize("length", [37, 150])
def test_fp16(mode, length):
    """fp16 tiles are 32..64 wide: only at 150 do rows have interior and boundary tiles."""
    _compare(torch.float16, 32, length, mode)


@pytest.mark.parametrize("mode", ["bidir", "bottleneck"])
def test_gradient_through_mass_alone(mode):
    _compare(torch.float32, 16, 29, mode, use_out=False)


def test_gradient_through_out_alone():
    _compare(torch.float32, 16, 29, "causal", use_mass=False)


def test_strided_inputs_from_a_fused_projection():
    """q, k, v as views of one [B, L, 3, H, D] tensor: no copies needed, same results."""
    batch, length, heads, head_dim = 2, 21, 2, 16
    qkv = torch.randn(batch, length, 3, heads, head_dim, device=DEVICE, requires_grad=True)
    domains = torch.randint(0, 3, (batch, length), device=DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    out, mass = fused(q, k, v, domains, causal=True)
    (out.sum() + mass.sum()).backward()
    grad = qkv.grad.clone()
    qkv.grad = None
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    ref_out, ref_mass = reference_attention(q, k, v, domains, causal=True)
    (ref_out.sum() + ref_mass.sum()).backward()
    assert torch.allclose(out, ref_out, atol=2e-5) and torch.allclose(mass, ref_mass, atol=2e-5)
    assert torch.allclose(grad, qkv.grad, atol=2e-5)


def test_seq_lens_only_padding_matches_domain_padding():
    """Padding given by seq_lens alone (domains still >= 0 past the end) is padding."""
    q, k, v, _, _ = make_inputs(2, 2, 33, 16, torch.float32, DEVICE, padding=False)
    domains = torch.randint(0, 2, (2, 33), device=DEVICE)
    seq_lens = torch.tensor([33, 12], device=DEVICE)
    out, mass = fused(q, k, v, domains, seq_lens=seq_lens)
    masked = domains.clone()
    masked[1, 12:] = -1
    ref_out, ref_mass = reference_attention(q, k, v, masked)
    assert torch.allclose(out, ref_out, atol=2e-5) and torch.allclose(mass, ref_mass, atol=2e-5)


def _packed(q, k, v, domains, **kw):
    """The packed op on q, k, v stacked into a QKV projection's [B, L, 3, H, D] layout."""
    qkv = torch.stack([t.transpose(1, 2) for t in (q, k, v)], dim=2)
    return kernels.cross_domain_attention_packed(qkv, domains, backend="triton", **kw)


@pytest.mark.parametrize("mode", ["causal", "bottleneck"])
@pytest.mark.parametrize("use_out", [True, False])
def test_packed_qkv_op_equals_the_three_tensor_op(mode, use_out):
    """Gradients written straight into the [B, L, 3, H, D] buffer are the three-tensor op's
    (and so the reference's), with and without dO."""
    causal, nb = MODES[mode]
    inputs = make_inputs(3, 2, 23, 16, torch.float32, DEVICE)
    kw = dict(causal=causal, num_bottleneck=nb, use_out=use_out)
    got = with_grads(_packed, *inputs, **kw)
    want = with_grads(fused, *inputs, **kw)
    for name, a, b in zip(NAMES, got, want):
        assert torch.allclose(a, b, atol=1e-6), name
    assert got[2].abs().max() > 0  # the gradient reached q


def test_packed_qkv_op_refuses_another_shape():
    q = torch.zeros(2, 5, 4, 16)
    with pytest.raises(ValueError, match=r"\[B, L, 3, H, D\]"):
        kernels.cross_domain_attention_packed(q, torch.zeros(2, 5, dtype=torch.long))
