"""Would a mass-only attention backward speed up the CPU path? Side by side, one run: the
backward of the fused CPU SDPA kernel that the sdpa backend uses (q, k zero-padded to the
augmented v's width; it computes dQ, dK and dV for a gradient on out and mass), against the
mass-only backward written in PyTorch: with dO = 0 outside the mass columns,
dS = P * (g[i, domain(j)] - sum_c g[i, c] m[i, c]), so dQ = scale dS K and dK = scale dS^T Q,
and no dO V^T, no P^T dO, no dV; P is recomputed from the saved log-sum-exp, chunked over the
batch-head rows to bound memory. Both compute the same dQ, dK (checked here).

    python -m bench.mass_only_backward_cpu [--shapes B,H,L,D ...] [--out DIR]
"""
import argparse
import time

import torch

from bench.report import device_name, save

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
DOMAINS = 4


def make_case(batch, heads, length, head_dim, seed=0):
    """q, k padded to v_aug's width, v_aug (v + one-hot domain columns), the additive causal
    mask, the forward's out and log-sum-exp, and a gradient on the mass columns only."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=gen) for _ in range(3))
    onehot = torch.nn.functional.one_hot(torch.randint(0, DOMAINS, (batch, length), generator=gen),
                                         DOMAINS).float()[:, None].expand(batch, heads, length, DOMAINS)
    width = -(-(head_dim + DOMAINS) // 8) * 8
    v_aug = torch.nn.functional.pad(torch.cat([v, onehot], -1), (0, width - head_dim - DOMAINS))
    q, k = (torch.nn.functional.pad(t, (0, width - head_dim)) for t in (q, k))
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = torch.zeros(batch, 1, length, length).masked_fill(~causal, float("-inf"))
    scale = head_dim ** -0.5
    out, lse = FLASH(q, k, v_aug, 0.0, False, attn_mask=mask, scale=scale)
    g_mass = torch.randn(batch, heads, length, DOMAINS, generator=gen)
    grad_out = torch.zeros_like(out)
    grad_out[..., head_dim:head_dim + DOMAINS] = g_mass
    return dict(q=q, k=k, v_aug=v_aug, onehot=onehot, mask=mask, scale=scale, out=out, lse=lse,
                g_mass=g_mass, grad_out=grad_out, head_dim=head_dim)


def fused_backward(c):
    return FLASH_BACKWARD(c["grad_out"], c["q"], c["k"], c["v_aug"], c["out"], c["lse"], 0.0,
                          False, attn_mask=c["mask"], scale=c["scale"])[:2]


def mass_only_backward(c, elements=1 << 22):
    q, k, d = c["q"], c["k"], c["head_dim"]
    batch, heads, length, width = q.shape
    rows = batch * heads
    qf, kf = q.reshape(rows, length, width), k.reshape(rows, length, width)
    lse = c["lse"].reshape(rows, length, 1)
    mask = c["mask"].expand(batch, heads, length, length).reshape(rows, length, length)
    g = c["g_mass"].reshape(rows, length, DOMAINS)
    onehot_t = c["onehot"].transpose(-1, -2).reshape(rows, DOMAINS, length)
    mass = c["out"][..., d:d + DOMAINS].reshape(rows, length, DOMAINS)
    delta = (g * mass).sum(-1, keepdim=True)
    dq, dk = torch.empty_like(qf), torch.empty_like(kf)
    chunk = max(1, elements // (length * length))
    for i in range(0, rows, chunk):
        s = slice(i, i + chunk)
        p = torch.baddbmm(mask[s] - lse[s], qf[s], kf[s].transpose(1, 2), alpha=c["scale"]).exp_()
        p.mul_(torch.baddbmm(-delta[s].expand(-1, -1, length), g[s], onehot_t[s]))
        dq[s] = torch.bmm(p, kf[s]) * c["scale"]
        dk[s] = torch.bmm(p.transpose(1, 2), qf[s]) * c["scale"]
    return dq.view_as(q), dk.view_as(k)


def median_ms(fn, reps=7):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[reps // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["64,4,200,32", "16,4,800,32", "64,2,50,32"])
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    rows, lines = [], ["| shape (B,H,L,D) | fused SDPA backward (dQ, dK, dV) | mass-only backward "
                       "(dQ, dK) | mass-only / fused | max abs difference |", "|---|---|---|---|---|"]
    for text in args.shapes:
        shape = tuple(int(x) for x in text.split(","))
        case = make_case(*shape)
        difference = max((a - b).abs().max().item()
                         for a, b in zip(fused_backward(case), mass_only_backward(case)))
        fused, mass_only = median_ms(lambda: fused_backward(case)), median_ms(lambda: mass_only_backward(case))
        rows.append({"shape": list(shape), "fused_ms": fused, "mass_only_ms": mass_only,
                     "ratio": mass_only / fused, "max_abs_difference": difference})
        lines.append(f"| {shape} | {fused:.1f} ms | {mass_only:.1f} ms | {mass_only / fused:.2f} "
                     f"| {difference:.1e} |")
    table = (f"Device: {device_name(torch.device('cpu'))}, {torch.get_num_threads()} thread(s); "
             "median of 7 after one warm-up.\n\n" + "\n".join(lines))
    print(table)
    if args.out:
        save(args.out, "mass_only_backward", rows, table, torch.device("cpu"))


if __name__ == "__main__":
    main()
