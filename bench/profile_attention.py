"""Where the time of one fused attention forward+backward goes: GPU kernel time per kernel
(torch.profiler) against the wall time per call, to tell kernel-bound from host-bound shapes.

    python -m bench.profile_attention --out bench/results/DIR
"""
import argparse
import json
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

import kernels
from bench.bench_attention import MODES, make_case

SHAPES = [(256, 2, 200, 32), (64, 2, 800, 32), (32, 8, 800, 64)]


def one_call(q, k, v, domains, seq_lens, causal, nb):
    out, mass = kernels.cross_domain_attention(q, k, v, domains, causal=causal, num_bottleneck=nb,
                                               seq_lens=seq_lens, backend="triton")
    torch.autograd.backward((out, mass), (torch.ones_like(out), torch.ones_like(mass)))


def profile_case(shape, mode, reps=20):
    causal, nb = MODES[mode]
    q, k, v, domains, seq_lens = make_case(shape, torch.bfloat16, torch.device("cuda"))
    domains, seq_lens = domains.int(), seq_lens.int()
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    for _ in range(3):
        one_call(q, k, v, domains, seq_lens, causal, nb)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        one_call(q, k, v, domains, seq_lens, causal, nb)
    host_ms = 1000 * (time.perf_counter() - t0) / reps  # launch-side time per call
    torch.cuda.synchronize()
    wall_ms = 1000 * (time.perf_counter() - t0) / reps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            one_call(q, k, v, domains, seq_lens, causal, nb)
        torch.cuda.synchronize()
    kernels_us = {}
    for event in prof.key_averages():
        if event.device_type.name == "CUDA" and event.self_device_time_total > 0:
            kernels_us[event.key[:60]] = event.self_device_time_total / reps
    return {"shape": list(shape), "mode": mode, "host_ms_per_call": host_ms,
            "wall_ms_per_call": wall_ms, "gpu_kernel_us_per_call": kernels_us,
            "gpu_total_ms": sum(kernels_us.values()) / 1000}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    rows = []
    for shape in SHAPES:
        for mode in ("causal", "bidir"):
            row = profile_case(shape, mode)
            rows.append(row)
            top = sorted(row["gpu_kernel_us_per_call"].items(), key=lambda kv: -kv[1])[:4]
            print(f"{tuple(shape)} {mode:>6}: wall {row['wall_ms_per_call']:.3f} ms, host "
                  f"{row['host_ms_per_call']:.3f} ms, GPU kernels {row['gpu_total_ms']:.3f} ms: "
                  + ", ".join(f"{k.split('(')[0]} {v:.0f}us" for k, v in top))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
