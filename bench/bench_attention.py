"""Attention + cross-domain mass, forward and forward+backward, provider against provider
in one run. Reports median and 20/80 percentiles (ms), GB/s against the minimum bytes moved,
peak memory, and each provider's time as a ratio to the fused Triton kernels.

    python -m bench.bench_attention --device cuda --out bench/results/DIR
    python -m bench.bench_attention --device cpu --quick     # dry run on a CPU

Providers: triton (fused), sdpa_mass (SDPA with one-hot domain columns, the number of domains
given: no host sync), flex (FlexAttention, two compiled calls returning the LSE, mass =
exp(LSE_cross - LSE_all), block masks built once outside the timed region), flex_per_batch (the
same with the masks built in every call, as training needs), reference (materialised P),
sdpa_plain (SDPA without the mass: the speed without the objective). On a GPU every case is
also captured as a CUDA graph and replayed: that time is the kernels' own, and GB/s is
computed against it.
"""
import argparse
import json
import math

import torch
import torch.nn.functional as F

import kernels
from bench.report import device_name, save
from bench.timing import quantiles, wall_times_ms
from kernels.attention.masks import padding_mask

HEADLINE_SHAPES = [(256, 2, 200, 32), (64, 2, 800, 32), (128, 4, 50, 16), (32, 8, 800, 64)]
QUICK_SHAPES = [(4, 2, 50, 16), (2, 2, 120, 32)]
MODES = {"causal": (True, 0), "bidir": (False, 0), "bottleneck": (False, 4)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
NUM_DOMAINS = 4  # make_case draws domain ids in 0..3


def make_case(shape, dtype, device, seed=0):
    batch, heads, length, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=gen).to(device, dtype)
               for _ in range(3))
    domains = torch.randint(0, 4, (batch, length), generator=gen)
    seq_lens = torch.randint(length // 2, length + 1, (batch,), generator=gen)
    seq_lens[0] = length
    positions = torch.arange(length)
    domains = torch.where(positions[None] < seq_lens[:, None], domains, -1)
    return q, k, v, domains.to(device), seq_lens.to(device)


def sdpa_plain(q, k, v, domains, *, causal, num_bottleneck, seq_lens, scale=None):
    """Attention without mass: what a user gets by dropping the objective."""
    if causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True), None
    keys = padding_mask(domains, seq_lens)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keys), None


def _per_call(fn, **fixed):
    """A provider whose every call takes the batch as it is: prepare() only binds arguments."""
    def prepare(q, k, v, domains, **kw):
        return lambda: fn(q, k, v, domains, **kw, **fixed)
    return prepare


def flex_preparers(compile=True):
    """FlexAttention, two calls returning the LSE, mass = exp(LSE_cross - LSE_all): `flex` with
    its block masks built in prepare (outside the timed region, as for a fixed mask) and
    `flex_per_batch` building them in every call (what training needs: the masks depend on
    the batch's domains). {} where the installed torch lacks FlexAttention."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return {}
    attend = torch.compile(flex_attention, dynamic=False) if compile else flex_attention

    def masks(domains, causal, nb, batch, length, device):
        def allowed(b, h, i, j):
            ok = (domains[b, i] >= 0) & (domains[b, j] >= 0)
            if causal:
                ok = ok & (j <= i)
            if nb:
                ok = ok & ((i < nb) | (j < nb) | (domains[b, i] == domains[b, j]))
            return ok

        def cross(b, h, i, j):
            c = (j < nb) & (i >= nb) if nb else domains[b, i] != domains[b, j]
            return allowed(b, h, i, j) & c
        return [create_block_mask(f, batch, None, length, length, device=device, _compile=compile)
                for f in (allowed, cross)]

    def call(q, k, v, m_all, m_cross):
        out, lse = attend(q, k, v, block_mask=m_all, return_lse=True)
        _, lse_cross = attend(q, k, v, block_mask=m_cross, return_lse=True)
        mass = torch.exp(lse_cross.float() - lse.float())
        return out, torch.where(torch.isfinite(mass), mass, 0.0)

    def fixed(q, k, v, domains, *, causal, num_bottleneck, seq_lens, scale=None):
        built = masks(domains, causal, num_bottleneck, q.shape[0], q.shape[2], q.device)
        return lambda: call(q, k, v, *built)

    def per_batch(q, k, v, domains, *, causal, num_bottleneck, seq_lens, scale=None):
        return lambda: call(q, k, v, *masks(domains, causal, num_bottleneck, q.shape[0],
                                            q.shape[2], q.device))
    return {"flex": fixed, "flex_per_batch": per_batch}


def providers(device, names):
    """name -> prepare(q, k, v, domains, **kw) -> call(): (out, mass)."""
    table = {
        "triton": _per_call(kernels.cross_domain_attention, backend="triton"),
        "sdpa_mass": _per_call(kernels.sdpa_attention, num_domains=NUM_DOMAINS),  # no sync
        "reference": _per_call(kernels.reference_attention),
        "sdpa_plain": _per_call(sdpa_plain),
    }
    if device.type == "cuda" and {"flex", "flex_per_batch"} & set(names):
        table.update(flex_preparers())
    if not kernels.triton_available(device):
        table.pop("triton")
    return {n: table[n] for n in names if n in table}


def timer(fn, device, warmup=3, reps=20):
    """[median, p20, p80] in ms: CUDA events (triton.testing.do_bench), or the wall clock."""
    if device.type == "cuda":
        import triton.testing
        return list(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))
    return quantiles(wall_times_ms(fn, device, warmup, reps))


def captured(run):
    """run() captured as one CUDA graph (warmed up on a side stream): its replay, whose time is
    the kernels' time without the host's launch work."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def min_bytes(shape, dtype, backward):
    batch, heads, length, head_dim = shape
    elem = torch.finfo(dtype).bits // 8
    tensors = 4 * batch * heads * length * head_dim * elem      # q, k, v read; out written
    rows = batch * heads * length * 4                             # mass (fp32)
    if backward:
        tensors *= 2                                              # dO read; dq, dk, dv written
        rows *= 2
    return tensors + rows + batch * length * 8


def make_call(prepare, shape, dtype, mode, device, backward):
    """A no-argument closure running one provider call (forward, or forward + backward);
    inputs and anything the provider prepares are built here, outside the timed region."""
    causal, nb = MODES[mode]
    q, k, v, domains, seq_lens = make_case(shape, dtype, device)
    if backward:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    call = prepare(q, k, v, domains, causal=causal, num_bottleneck=nb, seq_lens=seq_lens)
    if backward:
        def run():
            out, mass = call()
            loss = out.float().sum() + (mass.sum() if mass is not None else 0.0)
            loss.backward()
            q.grad = k.grad = v.grad = None
    else:
        def run():
            with torch.no_grad():
                call()
    return run


def bench_one(prepare, shape, dtype, mode, device, backward):
    """(eager [median, p20, p80], graph-replay ms or None, peak MiB, note)."""
    run = make_call(prepare, shape, dtype, mode, device, backward)
    run()  # compile / warm up
    peak, graph_ms, note = None, None, None
    if device.type == "cuda":
        # Peak of one call above the inputs, measured apart from the timing (do_bench holds a
        # 256 MiB cache-flush buffer that would otherwise be counted).
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    eager = timer(run, device)
    if device.type == "cuda":
        try:
            graph_ms = timer(captured(run), device)[0]
        except RuntimeError as exc:  # e.g. a host sync inside the call
            note = f"not capturable: {str(exc)[:80]}"
    return eager, graph_ms, peak, note


def run_suite(device, shapes, dtypes, modes, names, log=print):
    rows = []
    provs = providers(device, names)
    for shape in shapes:
        for dname in dtypes:
            dtype = DTYPES[dname]
            for mode in modes:
                for backward in (False, True):
                    for name, fn in provs.items():
                        if name == "sdpa_plain" and mode == "bottleneck":
                            continue
                        if name == "reference" and shape[2] * shape[2] * shape[0] * shape[1] > 2**31:
                            continue  # materialised P would not fit: recorded as skipped
                        try:
                            ms, graph_ms, peak, note = bench_one(fn, shape, dtype, mode, device,
                                                                 backward)
                            err = None
                        except Exception as exc:  # a provider that cannot run this case
                            ms, graph_ms, peak, note = [math.nan] * 3, None, None, None
                            err = f"{type(exc).__name__}: {str(exc)[:120]}"
                        row = {"shape": list(shape), "dtype": dname, "mode": mode,
                               "pass": "fwd+bwd" if backward else "fwd", "provider": name,
                               "ms_median": ms[0], "ms_p20": ms[1], "ms_p80": ms[2],
                               "graph_ms": graph_ms,
                               "gbps": (min_bytes(shape, dtype, backward) / (graph_ms * 1e6)
                                        if graph_ms else None),
                               "peak_mib": peak, "error": err, "graph_note": note}
                        rows.append(row)
                        log(json.dumps(row))
    add_ratios(rows)
    return rows


def add_ratios(rows):
    key = lambda r: (tuple(r["shape"]), r["dtype"], r["mode"], r["pass"])
    for column, ratio in (("ms_median", "ratio_to_triton"), ("graph_ms", "graph_ratio_to_triton")):
        fused = {key(r): r[column] for r in rows if r["provider"] == "triton"}
        for r in rows:
            base = fused.get(key(r))
            r[ratio] = r[column] / base if base and r[column] else None


def markdown(rows, device_name):
    lines = [f"Device: {device_name}. eager ms: each call launched from Python (median [p20, "
             "p80]; CUDA events on a GPU, the wall clock on a CPU); graph ms: the same call "
             "captured as a CUDA graph and replayed, i.e. the kernels' time without the host's "
             "launch work; GB/s: the minimum bytes moved over the graph time; ratio = provider "
             "/ triton (> 1: the fused kernels are faster).", "",
             "| shape (B,H,L,D) | dtype | mode | pass | provider | eager ms | graph ms | GB/s | "
             "peak MiB | ratio (eager) | ratio (graph) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x, spec: format(x, spec) if x is not None else "-"
    for r in rows:
        ms = (f"{r['ms_median']:.3f} [{r['ms_p20']:.3f}, {r['ms_p80']:.3f}]"
              if not math.isnan(r["ms_median"]) else f"failed ({r['error']})")
        graph = r["graph_note"] or fmt(r["graph_ms"], ".3f")
        lines.append(f"| {tuple(r['shape'])} | {r['dtype']} | {r['mode']} | {r['pass']} | "
                     f"{r['provider']} | {ms} | {graph} | {fmt(r['gbps'], '.0f')} | "
                     f"{fmt(r['peak_mib'], '.0f')} | {fmt(r['ratio_to_triton'], '.2f')} | "
                     f"{fmt(r['graph_ratio_to_triton'], '.2f')} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CI / dry runs)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--providers", nargs="+",
                        default=["triton", "sdpa_mass", "flex", "flex_per_batch", "reference",
                                 "sdpa_plain"])
    parser.add_argument("--shapes", nargs="+", help="B,H,L,D ...")
    parser.add_argument("--out", help="folder for JSON and Markdown results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    else:
        shapes = QUICK_SHAPES if args.quick else HEADLINE_SHAPES
    rows = run_suite(device, shapes, args.dtypes, args.modes, args.providers)
    name = device_name(device)
    table = markdown(rows, name)
    print(table)
    if args.out:
        save(args.out, "attention", rows, table, device)
    return rows


if __name__ == "__main__":
    main()
