"""Gram matrix + Pareto solver latency: on-device (kernels.pareto) against the paper code's
host solver (gradients concatenated, Gram with .item(), Frank-Wolfe in Python).

    python -m bench.bench_solver --device cuda
"""
import argparse

import torch

from bench.timing import quantiles, wall_times_ms
from kernels import pareto
from kernels import reference_pareto as host


def _gradients(device, sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen).to(device) for s in sizes] for _ in range(2)]


SIZES = ((64, 64),) * 8 + ((256, 64), (64, 256)) * 4


def solver_calls(device, sizes=SIZES):
    """{name: closure}: Gram matrix + solver on the device, compiled (CUDA), and the paper's
    host path."""
    grads = _gradients(device, sizes)
    losses = torch.tensor([0.3, 2.5], device=device)

    def on_device():
        gram = pareto.gram_matrix(grads)
        return pareto.pareto_lambda(gram, losses)

    def paper_host():
        flat = torch.stack([torch.cat([g.flatten() for g in task]) for task in grads])
        gram = [[float(torch.dot(flat[i], flat[j]).item()) for j in range(2)] for i in range(2)]
        return host.pareto_lambda(gram, [float(losses[0].item()), float(losses[1].item())])

    def on_device_compiled():
        gram = pareto.gram_matrix(grads)
        return pareto.pareto_lambda_fused(gram, losses)

    providers = {"device": on_device, "reference_host": paper_host}
    if device.type == "cuda":
        providers["device_compiled"] = on_device_compiled
        eager, compiled = on_device()[0], on_device_compiled()[0]
        assert torch.allclose(eager, compiled, atol=1e-6), (eager, compiled)
    return providers


def run(device, reps=50, sizes=SIZES):
    rows = []
    for name, fn in solver_calls(device, sizes).items():
        median_ms = quantiles(wall_times_ms(fn, device, warmup=1, reps=reps))[0]
        rows.append({"solver": name, "us_median": 1000 * median_ms,
                     "parameters": sum(a * b for a, b in sizes)})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    rows = run(torch.device(args.device))
    for r in rows:
        print(f"{r['solver']:>15}: {r['us_median']:8.1f} us (Gram + solver, {r['parameters']} params)")


if __name__ == "__main__":
    main()
