"""Random inputs for the attention tests: odd lengths, padding in the middle and at the end,
rows with no allowed key, rows with no cross-domain key, wildcard ([MASK]) tokens."""
import torch

from kernels import WILDCARD_DOMAIN


def make_inputs(batch, heads, length, head_dim, dtype, device, *, num_domains=3, seed=0,
                padding=True, wildcards=True):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=gen).to(device=device, dtype=dtype)
               for _ in range(3))
    domains = torch.randint(0, num_domains, (batch, length), generator=gen)
    seq_lens = torch.full((batch,), length, dtype=torch.int64)
    if padding and length > 2:
        domains[0, length // 2] = -1                 # padding inside a row
        seq_lens[-1] = max(1, length - length // 3)  # padding at the end of another
        domains[-1, seq_lens[-1]:] = -1
    if batch > 1 and length > 1:
        domains[1 % batch] = 1                       # a row whose tokens have no cross key
    if batch > 2:
        domains[2] = -1                              # an all-padding row: zeros, no NaN
        seq_lens[2] = 0
    if wildcards and length > 4:
        domains[0, 1] = WILDCARD_DOMAIN              # hidden-domain [MASK] tokens
        domains[-1, 3] = WILDCARD_DOMAIN
    return q, k, v, domains.to(device), seq_lens.to(device)


def with_grads(fn, q, k, v, domains, seq_lens, *, causal, num_bottleneck, use_out=True,
               use_mass=True, seed=1):
    """(out, mass, dq, dk, dv) of sum(out * go) + sum(mass * gm)."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, mass = fn(q, k, v, domains, causal=causal, num_bottleneck=num_bottleneck,
                   seq_lens=seq_lens)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    go = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    gm = torch.randn(mass.shape, generator=gen).to(mass.device)
    loss = 0.0
    if use_out:
        loss = loss + (out.float() * go.float()).sum()
    if use_mass:
        loss = loss + (mass * gm).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v), allow_unused=True)
    zeros = torch.zeros_like
    return (out.detach(), mass.detach(), dq if dq is not None else zeros(q),
            dk if dk is not None else zeros(k), dv if dv is not None else zeros(v))
