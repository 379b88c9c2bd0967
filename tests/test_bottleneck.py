"""AutoCDSR+: in bottleneck layers cross-domain information flows only through IB tokens."""
import pytest
import torch

from autocdsr.config import ModelConfig
from autocdsr.models import Recommender
from autocdsr.models.encoder import Block
from kernels.attention import triton_available


def _two_bottleneck_layers(x, domains, nb, backend="reference"):
    torch.manual_seed(0)
    blocks = [Block(32, 2, 0.0, backend) for _ in range(2)]
    seq_lens = torch.full((x.shape[0],), x.shape[1])
    h1, _ = blocks[0](x, domains, seq_lens, False, nb)
    h2, _ = blocks[1](h1, domains, seq_lens, False, nb)
    return h1, h2


def test_other_domain_reaches_a_token_only_through_ib_tokens():
    nb, length = 2, 10
    domains = torch.tensor([[5, 5, 0, 1, 0, 1, 0, 1, 0, 0]])  # positions 0, 1: IB tokens
    x = torch.randn(1, length, 32)
    i, j = 2, 3                    # ordinary token i (domain 0), other-domain token j
    changed = x.clone()
    changed[0, j] += torch.randn(32)  # (a constant shift would vanish in LayerNorm)
    h1, h2 = _two_bottleneck_layers(x, domains, nb)
    c1, c2 = _two_bottleneck_layers(changed, domains, nb)
    # one layer: i reads its own domain and the IB tokens' inputs, never j
    assert torch.allclose(h1[0, i], c1[0, i], atol=1e-6)
    # the IB tokens read j, so after a second layer j reaches i through them
    assert not torch.allclose(h1[0, :nb], c1[0, :nb], atol=1e-4)
    assert not torch.allclose(h2[0, i], c2[0, i], atol=1e-4)
    # without IB tokens there is no path at all, however many layers
    no_ib = torch.tensor([[0, 0, 0, 1, 0, 1, 0, 1, 0, 0]])
    _, d2 = _two_bottleneck_layers(x, no_ib, 0)
    no_ib_changed = _two_bottleneck_layers(changed, no_ib, 0)[1]
    assert not torch.allclose(d2[0, i], no_ib_changed[0, i], atol=1e-4)  # plain mode: full path


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_backends_agree_on_the_bottleneck_model(backend):
    if backend == "triton" and not triton_available(torch.device("cpu")):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    outs = {}
    for name in ("reference", backend):
        torch.manual_seed(0)
        cfg = ModelConfig(arch="bert4rec", hidden=32, heads=2, layers=2, dropout=0.0,
                          bottleneck_tokens=3)
        model = Recommender(cfg, 40, 3, 12, backend=name)
        items = torch.randint(1, 41, (3, 12), generator=torch.Generator().manual_seed(1))
        domains = torch.randint(0, 3, (3, 12), generator=torch.Generator().manual_seed(2))
        domains[2, 8:] = -1
        seq_lens = torch.tensor([12, 12, 8])
        hidden, masses = model(items, domains, seq_lens)
        assert masses[0].shape[-1] == 12  # IB positions are not returned
        loss = hidden.sum() + masses[0].sum()
        loss.backward()
        outs[name] = (hidden.detach(), masses[0].detach(),
                      [p.grad.clone() for p in model.parameters() if p.grad is not None])
    ref, got = outs["reference"], outs[backend]
    assert torch.allclose(ref[0], got[0], atol=1e-5) and torch.allclose(ref[1], got[1], atol=1e-5)
    for a, b in zip(ref[2], got[2]):
        assert torch.allclose(a, b, atol=1e-4)
    # the mass of a bottleneck layer is attention paid to IB tokens by ordinary tokens
    assert (ref[1][2, :, 8:] == 0).all() and (ref[1][:2] > 0).all()


def test_causal_encoder_with_bottleneck_tokens_is_refused():
    with pytest.raises(ValueError, match="future leakage"):
        Recommender(ModelConfig(arch="sasrec", bottleneck_tokens=4), 10, 2, 8)


def test_the_attention_inputs_are_checked_once_per_forward(monkeypatch):
    """The first layer checks the attention inputs; the later layers (same kind of inputs,
    made by the model) skip the checks."""
    import kernels.attention.dispatch
    calls = []
    check = kernels.attention.dispatch.check_attention_inputs
    monkeypatch.setattr(kernels.attention.dispatch, "check_attention_inputs",
                        lambda *a: calls.append(a) or check(*a))
    cfg = ModelConfig(arch="bert4rec", hidden=32, heads=2, layers=3, dropout=0.0,
                      bottleneck_tokens=2, bottleneck_layers=1)
    model = Recommender(cfg, 50, 3, 12, backend="sdpa")
    items = torch.randint(1, 50, (2, 12))
    model(items, torch.randint(0, 3, (2, 12)), torch.full((2,), 12))
    assert len(calls) == 1
