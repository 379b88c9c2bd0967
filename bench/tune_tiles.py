"""Tile sweep for the attention kernels: for each kernel, head dim, sequence length and mask
mode, time every candidate configuration (tile sizes, warps, the mask-free interior path on
or off) against the untuned rule of kernels.attention.tiles, after checking that the candidate computes
what the rule computes. Prints, and saves, the entries of kernels.attention.tiles.TUNED the
measurements support (a candidate that beats the rule by more than `--min-gain` in every mode
of its length bucket).

    python -m bench.tune_tiles --out bench/results/DIR          # a GPU, bf16, D 32
    python -m bench.tune_tiles --aot 90                         # no GPU: registers, spills
    bash bench/gpu_tune.sh bench/results/DIR                    # the same, under 3 minutes

What is timed: "forward" the forward kernel alone (out, LSE, mass); "dkdv" and "dq" the whole
backward of a loss of out and mass (preprocess, dK/dV and dQ kernels) with the candidate used
for that one kernel and the rule for the other, so the differences between rows of one kernel
are that kernel's. CUDA events (triton.testing.do_bench) on a GPU; under TRITON_INTERPRET=1 on
a CPU the sweep runs (for the tests) but its times mean nothing.
"""
import argparse
import json

import torch

from bench.bench_attention import MODES, make_case
from bench.report import device_name, save
from bench.timing import quantiles, wall_times_ms
from kernels.attention import tiles, triton_backward, triton_forward

# Candidate overrides per kernel (merged into the rule's settings; {} is the rule itself).
CANDIDATES = {
    "forward": [{}, {"INTERIOR": False}, {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8},
                {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4},
                {"BLOCK_M": 64, "BLOCK_N": 32}, {"BLOCK_M": 32, "BLOCK_N": 64}],
    "dkdv": [{}, {"INTERIOR": False}, {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8},
             {"BLOCK_M": 64, "BLOCK_N": 32}, {"BLOCK_M": 32, "BLOCK_N": 32},
             {"BLOCK_M": 16, "BLOCK_N": 64}],
    "dq": [{}, {"INTERIOR": False}, {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8},
           {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8}, {"BLOCK_M": 32, "BLOCK_N": 32}],
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _timer(fn, device):
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=[0.5])
    return quantiles(wall_times_ms(fn, device, warmup=0, reps=1))[0]


def _case(shape, dtype, mode, device):
    """(forward(), backward(), check()) for one shape: check() returns the tensors a
    candidate must reproduce (out, mass, dq, dk, dv)."""
    causal, nb = MODES[mode]
    q, k, v, domains, seq_lens = make_case(shape, dtype, device)
    domains, seq_lens = domains.to(torch.int32), seq_lens.to(torch.int32)
    scale = shape[-1] ** -0.5
    nb = min(nb, shape[2])
    gen = torch.Generator().manual_seed(1)
    d_out = torch.randn(q.shape, generator=gen).to(device, dtype)
    d_mass = torch.randn(q.shape[:3], generator=gen).to(device)

    def forward():
        return triton_forward(q, k, v, domains, seq_lens, causal, nb, scale)

    saved = forward()

    def backward():
        out, lse, mass = saved
        return triton_backward(q, k, v, domains, seq_lens, out, lse, mass, d_out, d_mass,
                               causal, nb, scale)

    def check():
        out, lse, mass = forward()
        grads = triton_backward(q, k, v, domains, seq_lens, out, lse, mass, d_out, d_mass,
                                causal, nb, scale)
        return [out, mass, *grads]

    return forward, backward, check


def sweep(device, dtype, head_dims, lengths, modes, tokens=12800, heads=4, candidates=None,
          log=print):
    """One row per (kernel, D, L, mode, candidate): ms, ratio to the rule, or why it failed."""
    candidates = candidates or CANDIDATES
    rows = []
    for head_dim in head_dims:
        for length in lengths:
            shape = (max(1, tokens // length), heads, length, head_dim)
            for mode in modes:
                forward, backward, check = _case(shape, dtype, mode, device)
                want = check()
                for kernel, options in candidates.items():
                    rule_ms = None
                    for option in options:
                        key = (kernel, tiles.precision(dtype), tiles.block_d(head_dim),
                               tiles.length_bucket(length))
                        row = {"kernel": kernel, "head_dim": head_dim, "length": length,
                               "mode": mode, "shape": shape, "candidate": option,
                               "settings": dict(tiles.rule(kernel, key[2], key[1] == "fp32"),
                                                **option)}
                        try:
                            with tiles.trying({key: option}):
                                got = check()
                                err = max((a.float() - b.float()).abs().max().item()
                                          for a, b in zip(got, want))
                                scale = max(b.float().abs().max().item() for b in want)
                                if err > 1e-2 * max(1.0, scale):
                                    raise AssertionError(f"differs from the rule by {err:.2e}")
                                ms = _timer(forward if kernel == "forward" else backward, device)
                            row.update(ms=ms, error=None)
                        except Exception as exc:  # noqa: BLE001 (a candidate that cannot run)
                            row.update(ms=None, error=f"{type(exc).__name__}: {str(exc)[:160]}")
                        if option == {}:
                            rule_ms = row["ms"]
                        row["ratio_to_rule"] = (row["ms"] / rule_ms if row["ms"] and rule_ms
                                                else None)
                        rows.append(row)
                        log(json.dumps(row))
    return rows


def proposals(rows, min_gain=0.03):
    """TUNED entries the rows support: per (kernel, D bucket, length bucket), the candidate
    with the lowest mean ratio to the rule, if it beats the rule by > min_gain in every row
    of that bucket (every length and mode measured there)."""
    groups = {}
    for r in rows:
        key = (r["kernel"], tiles.block_d(r["head_dim"]), tiles.length_bucket(r["length"]))
        groups.setdefault(key, {}).setdefault(json.dumps(r["candidate"], sort_keys=True),
                                              []).append(r["ratio_to_rule"])
    out = {}
    for (kernel, block_d, bucket), by_candidate in groups.items():
        best, best_mean = None, 1.0
        for candidate, ratios in by_candidate.items():
            if candidate == "{}" or any(x is None for x in ratios):
                continue
            mean = sum(ratios) / len(ratios)
            if max(ratios) < 1.0 - min_gain and mean < best_mean:
                best, best_mean = candidate, mean
        if best is not None:
            out[(kernel, block_d, bucket)] = (json.loads(best), best_mean)
    return out


def compile_candidates(arch, dtype, head_dims, modes, candidates=None):
    """Without a GPU: compile every candidate ahead of time for `arch` (kernels.compile_check)
    and report its registers, spills and shared memory, so a sweep on a GPU need not time a
    candidate that spills."""
    import itertools

    from kernels import compile_check
    from kernels.attention import TILED_KERNELS, kernel_flags
    candidates = candidates or CANDIDATES
    tensors = compile_check.pointer_types(dtype)
    rows = []
    for head_dim, mode, (kernel, options) in itertools.product(head_dims, modes,
                                                               candidates.items()):
        causal, nb = MODES[mode]
        for option in options:
            key = (kernel, tiles.precision(dtype), tiles.block_d(head_dim), tiles.length_bucket(1))
            with tiles.trying({key: option}):
                flags = kernel_flags(kernel, head_dim, dtype, causal, nb > 0, 1)
            warps, stages = flags.pop("num_warps"), flags.pop("num_stages")
            row = {"arch": arch, "kernel": kernel, "head_dim": head_dim, "mode": mode,
                   "candidate": option, "num_warps": warps}
            row.update(compile_check.compile_variant(TILED_KERNELS[kernel], tensors, flags, warps,
                                                     stages, arch))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(rows, proposed, device, dtype_name):
    lines = [f"Device: {device}. {dtype_name}; ms per call (forward: the forward kernel; dkdv, "
             "dq: the whole backward with that kernel's candidate); ratio = candidate / the "
             "untuned rule (< 1: faster).", "",
             "| kernel | D | L | mode | candidate | ms | ratio | error |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = f"{r['ms']:.4f}" if r["ms"] is not None else "-"
        ratio = f"{r['ratio_to_rule']:.2f}" if r["ratio_to_rule"] is not None else "-"
        lines.append(f"| {r['kernel']} | {r['head_dim']} | {r['length']} | {r['mode']} | "
                     f"{json.dumps(r['candidate']) if r['candidate'] else 'rule'} | {ms} | "
                     f"{ratio} | {r['error'] or ''} |")
    lines += ["", "Proposed kernels.attention.tiles.TUNED entries (precision of this run):"]
    lines += [f"- {key}: {candidate} (mean ratio {mean:.2f})"
              for key, (candidate, mean) in sorted(proposed.items())] or ["- none"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[32])
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 200, 800])
    parser.add_argument("--modes", nargs="+", default=["bidir", "causal"], choices=sorted(MODES))
    parser.add_argument("--tokens", type=int, default=12800, help="batch x length per call")
    parser.add_argument("--min-gain", type=float, default=0.03)
    parser.add_argument("--aot", type=int, metavar="ARCH",
                        help="instead of timing: compile the candidates for this compute "
                             "capability (80, 90) and report registers and spills (no GPU)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.aot:
        rows = compile_candidates(args.aot, dtype, args.head_dims, args.modes)
        lines = [f"Ahead-of-time compile for sm_{args.aot}, {args.dtype}: registers per thread, "
                 "spilled bytes, shared memory per block.", "",
                 "| kernel | D | mode | candidate | warps | registers | spills | shared B |",
                 "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['kernel']} | {r['head_dim']} | {r['mode']} | "
                  f"{json.dumps(r['candidate']) if r['candidate'] else 'rule'} | "
                  f"{r['num_warps']} | {r['registers']} | {r['spill_bytes']} | "
                  f"{r['shared_bytes']} |" for r in rows]
        if args.out:
            save(args.out, f"tile_candidates_sm{args.aot}", rows, "\n".join(lines),
                 torch.device("cpu"), dtype=args.dtype)
        return rows
    rows = sweep(device, dtype, args.head_dims, args.lengths, args.modes, args.tokens)
    proposed = proposals(rows, args.min_gain)
    table = markdown(rows, proposed, device_name(device), args.dtype)
    print(table)
    if args.out:
        save(args.out, "tiles", rows, table, device, dtype=args.dtype,
             proposed=[{"key": [k[0], tiles.precision(dtype), k[1], k[2]], "settings": c,
                        "mean_ratio": m} for k, (c, m) in proposed.items()])
    return rows


if __name__ == "__main__":
    main()
