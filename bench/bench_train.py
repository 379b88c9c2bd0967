"""Time per training step and peak memory: SASRec / BERT4Rec x base / AutoCDSR / AutoCDSR+
x attention backend x step mode (eager; compiled: torch.compile of the whole step; graph: the
whole step captured as CUDA graphs and replayed, the batch copied into its static buffers
inside the timed region), and a paper-code-style AutoCDSR step (three
backward passes, gradients flattened and concatenated, the solver on the host with .item()
calls) on the same model. Every step but the paper-style one is autocdsr.step.TrainStep, the
trainer's own. Times are ratios to the base model with the same arch, backend and mode (the
paper reports +9.34% for AutoCDSR and +19.96% for AutoCDSR+).

    python -m bench.bench_train --device cuda --out bench/results/DIR
    python -m bench.bench_train --preset paper --out bench/results/DIR      # official shape
    python -m bench.bench_train --device cpu --quick
"""
import argparse
import json

import torch

from autocdsr.config import ModelConfig, TrainConfig
from autocdsr.data.batches import cloze_capacity, target_slots
from autocdsr.models import Recommender
from autocdsr.optim import make_optimizer
from autocdsr.step import TrainStep
from bench.report import device_name, save
from bench.timing import interleaved_wall_times_ms, quantiles
from kernels import reference_pareto as host_solver

FULL = dict(batch=128, length=200, items=20000, hidden=64, heads=2, layers=2, steps=20)
QUICK = dict(batch=16, length=40, items=2000, hidden=32, heads=2, layers=2, steps=4)
CPU = dict(batch=64, length=50, items=5000, hidden=64, heads=2, layers=2, steps=8)
# The official AutoCDSR model's shape: BERT4Rec, 6 layers, hidden 32, 4 heads of width 32 (its
# T5 attention is wider than the hidden size), feed-forward 32, 1M items, in-batch loss.
PAPER = dict(items=1_000_000, hidden=32, heads=4, head_dim=32, ffn=32, layers=6, steps=5)
PAPER_SHAPES = ((16, 800), (64, 200))
# The same at hidden 32 split into 2 heads of 16 with the default 4x feed-forward: the shape
# the previous version of this project could run (before/after comparisons on the CPU).
PAPER_D16 = dict(PAPER, heads=2, head_dim=0, ffn=0)
# "_last": the same objective with weighting.shared=last_layer (the one-layer Gram set and one
# combined backward) instead of the official `reached` set with two full backward passes
PAPER_CASES = [("bert4rec", "base"), ("bert4rec", "autocdsr"), ("bert4rec", "autocdsr_last"),
               ("bert4rec", "autocdsr_plus"), ("bert4rec", "autocdsr_plus_last")]
# --reuse: the steps between two solver steps under weighting.every=N (lambda reused: one
# backward pass of L_rec + lambda L_cd). A step amortised over N is (solve + (N-1) reuse) / N.
REUSE_CASES = [("bert4rec", "autocdsr_reuse"), ("bert4rec", "autocdsr_plus_reuse")]


DEFAULT_CASES = [("sasrec", "base"), ("sasrec", "autocdsr"), ("sasrec", "autocdsr_last"),
                 ("sasrec", "paper_autocdsr"), ("bert4rec", "base"), ("bert4rec", "autocdsr"),
                 ("bert4rec", "autocdsr_last"), ("bert4rec", "paper_autocdsr"),
                 ("bert4rec", "autocdsr_plus"), ("bert4rec", "autocdsr_plus_last")]


def gram_set(objective):
    """The Gram set a case's solver steps use (its rows carry it as `shared`)."""
    if objective == "base" or objective.endswith("_reuse"):
        return "-"
    if objective == "paper_autocdsr":
        return "reached (host solver)"
    return "last_layer" if objective.endswith("_last") else "reached"


def make_batch(arch, size, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, length = size["batch"], size["length"]
    items = torch.randint(1, size["items"] + 1, (b, length), generator=gen)
    domains = torch.randint(0, 4, (b, length), generator=gen)
    seq_lens = torch.randint(length // 2, length + 1, (b,), generator=gen)
    pad = torch.arange(length)[None] >= seq_lens[:, None]
    items[pad], domains[pad] = 0, -1
    targets = torch.where(pad, 0, torch.randint(1, size["items"] + 1, (b, length), generator=gen))
    if arch == "bert4rec":
        targets = torch.where(torch.rand(b, length, generator=gen) < 0.15, targets, 0)
    capacity = cloze_capacity(b, length, 0.15) if arch == "bert4rec" else b * length
    slots, weight = target_slots(targets.numpy(), capacity)
    target_domains = torch.where(targets > 0, domains, -1)  # random ids: any domain serves
    batch = dict(items=items, domains=domains, seq_lens=seq_lens, targets=targets,
                 target_slots=torch.from_numpy(slots), target_weight=torch.from_numpy(weight),
                 target_domains=target_domains)
    return {k: t.to(device) for k, t in batch.items()}


def paper_style_backward(model, loss_rec, loss_cd):
    """The AutoCDSR code's pareto_optimization_loop_: three backward passes, flattened
    concatenated gradients, host solver."""
    table = model.item_embedding.weight
    named = [(n, p) for n, p in model.named_parameters() if p is not table]
    loss_cd.backward(retain_graph=True)
    members = {n for n, p in named if p.grad is not None}
    g_cd = torch.cat([p.grad.clone().flatten() for n, p in named if n in members])
    model.zero_grad(set_to_none=True)
    loss_rec.backward(retain_graph=True)
    g_rec = torch.cat([p.grad.clone().flatten() for n, p in named
                       if n in members and p.grad is not None])
    model.zero_grad(set_to_none=True)
    grads = torch.stack([g_cd, g_rec])
    losses = [loss_cd.item(), loss_rec.item()]
    gram = (grads @ grads.T).tolist()
    try:
        w_cd, w_rec = host_solver.pareto_weights(gram, losses)
        lam = w_cd / w_rec
    except (ZeroDivisionError, FloatingPointError):
        lam = 1.0
    (loss_rec + loss_cd * lam).backward()


def step_fn(model, batch, objective, loss_kind, mode="eager"):
    """The project's step (autocdsr.step.TrainStep), or the paper-code-style step."""
    if objective == "paper_autocdsr":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        amp = torch.bfloat16 if batch["items"].is_cuda else None  # the same precision as ours
        reference = TrainStep(model, optimizer, loss=loss_kind, amp_dtype=amp)  # its forward

        def step():
            optimizer.zero_grad(set_to_none=True)
            paper_style_backward(model, *reference.losses(batch)[:2])
            optimizer.step()
        return step
    optimizer = make_optimizer(model, TrainConfig(lr=1e-3), fused=mode == "eager")
    train_step = TrainStep(model, optimizer, loss=loss_kind, compile=mode == "compiled",
                           cuda_graph=mode == "graph",
                           objective="base" if objective == "base" else "autocdsr",
                           every=10**9 if objective.endswith("_reuse") else 1,
                           shared="last_layer" if objective.endswith("_last") else "reached",
                           amp_dtype=torch.bfloat16 if batch["items"].is_cuda else None)
    return lambda: train_step(batch)


def case_step(arch, objective, size, device, backend, loss_kind="full", mode="eager"):
    """A no-argument closure: one training step of (arch, objective) at `size`."""
    torch.manual_seed(0)
    model_cfg = ModelConfig(arch=arch, hidden=size["hidden"], heads=size["heads"],
                            layers=size["layers"], dropout=0.0,
                            head_dim=size.get("head_dim", 0), ffn_hidden=size.get("ffn", 0),
                            bottleneck_tokens=4 if objective.startswith("autocdsr_plus") else 0)
    model = Recommender(model_cfg, size["items"], 4, size["length"], backend=backend).to(device)
    return step_fn(model, make_batch(arch, size, device), objective, loss_kind, mode)


def warm_up(step, device, warmup=2):
    """Run `step` `warmup` times; return the peak MiB it needs on CUDA beyond what was allocated
    before it (its model, optimizer state and working memory; other cases' resident memory is
    left out), None elsewhere. Call it right after building the step."""
    if device.type != "cuda":
        for _ in range(warmup):
            step()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def run(device, size, backends, loss_kind="full", cases=None, modes=("eager",), log=print):
    """One row per (backend, mode, case). The cases of one (backend, mode) are all built first
    and then timed in interleaved rounds, so the ratios to base compare steps timed under the
    same conditions."""
    rows = []
    cases = cases or DEFAULT_CASES
    for backend in backends:
        for mode in modes:
            if mode == "graph" and device.type != "cuda":
                continue
            # the official procedure reads values on the host: eager only
            group = [(arch, objective) for arch, objective in cases
                     if objective != "paper_autocdsr" or mode == "eager"]
            steps, peaks = [], []
            for arch, objective in group:
                resident = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else 0
                step = case_step(arch, objective, size, device, backend, loss_kind, mode)
                peak = warm_up(step, device)
                steps.append(step)
                peaks.append(peak - resident if peak is not None else None)
            for (arch, objective), times, peak in zip(
                    group, interleaved_wall_times_ms(steps, device, size["steps"]), peaks):
                median, p20, p80 = quantiles(times)
                row = {"backend": backend, "mode": mode, "arch": arch, "objective": objective,
                       "shared": gram_set(objective), "ms_median": median, "ms_p20": p20, "ms_p80": p80, "peak_mib": peak}
                rows.append(row)
                log(json.dumps(row))
            del steps
    base = {(r["backend"], r["mode"], r["arch"]): r["ms_median"]
            for r in rows if r["objective"] == "base"}
    for r in rows:
        key = (r["backend"], r["mode"], r["arch"])
        r["ratio_to_base"] = r["ms_median"] / base[key] if key in base else None
    return rows


def amortised(rows, every=10):
    """(backend, mode, arch, objective, ratio) of a step under weighting.every=`every`: one
    solver step and every - 1 lambda-reuse steps, (solve + (every - 1) reuse) / every, as a
    ratio to base; for each objective timed both ways."""
    ms = {(r["backend"], r["mode"], r["arch"], r["objective"]): r["ms_median"] for r in rows}
    out = []
    for (backend, mode, arch, objective), reuse in ms.items():
        solve = ms.get((backend, mode, arch, objective.removesuffix("_reuse")))
        base = ms.get((backend, mode, arch, "base"))
        if objective.endswith("_reuse") and solve and base:
            out.append((backend, mode, arch, objective.removesuffix("_reuse"),
                        (solve + (every - 1) * reuse) / every / base))
    return out


def markdown(rows, device_name, size, loss_kind):
    shape = f"batch {size['batch']} x L {size['length']}, {size['items']} items, hidden " \
            f"{size['hidden']}, {size['heads']} heads" + \
            (f" of width {size['head_dim']}" if size.get("head_dim") else "") + \
            f", {size['layers']} layers, {loss_kind} loss"
    lines = [f"Device: {device_name}. {shape}; ms per optimizer step (median [p20, p80], the "
             "cases of one backend and mode timed in interleaved rounds); ratio = vs the base model with the same arch, backend and mode.", "",
             "| backend | mode | arch | objective | Gram set | ms / step | peak MiB | ratio to base |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        ratio = f"{r['ratio_to_base']:.2f}x" if r["ratio_to_base"] else "-"
        lines.append(f"| {r['backend']} | {r['mode']} | {r['arch']} | {r['objective']} | "
                     f"{r.get('shared', '-')} | "
                     f"{r['ms_median']:.2f} [{r['ms_p20']:.2f}, {r['ms_p80']:.2f}] | {peak} | "
                     f"{ratio} |")
    spread = amortised(rows)
    if spread:
        lines += ["", "Amortised over weighting.every = 10 (one solver step, nine reuse steps): " +
                  "; ".join(f"{b} {m} {a} {o} {x:.2f}x" for b, m, a, o, x in spread) + "."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=("full", "cpu", "quick", "paper", "paper_d16"),
                        default=None, help="sizes: full (GPU default), cpu, quick (CI), paper "
                        "(the official model's shape at 16 x 800 and 64 x 200), paper_d16 (the "
                        "same with 2 heads of 16)")
    parser.add_argument("--loss", help="recommendation loss (default: full; inbatch_official "
                                       "for the paper presets)")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick")
    parser.add_argument("--cpu-size", action="store_true", help="same as --preset cpu")
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=("eager", "compiled", "graph"))
    parser.add_argument("--backends", nargs="+")
    parser.add_argument("--reuse", action="store_true",
                        help="also time the lambda-reuse steps of weighting.every=N")
    parser.add_argument("--steps", type=int, help="timed rounds (default: the preset's)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    preset = args.preset or ("quick" if args.quick else "cpu" if args.cpu_size else
                             "full" if device.type == "cuda" else "cpu")
    backends = args.backends or (["triton", "sdpa", "reference"] if device.type == "cuda"
                                 else ["sdpa", "reference"])
    if preset.startswith("paper"):
        base_size = PAPER if preset == "paper" else PAPER_D16
        sizes = [dict(base_size, batch=b, length=length) for b, length in PAPER_SHAPES]
        cases, loss_kind = list(PAPER_CASES), args.loss or "inbatch_official"
    else:
        sizes = [{"full": FULL, "cpu": CPU, "quick": QUICK}[preset]]
        cases, loss_kind = list(DEFAULT_CASES), args.loss or "full"
    if args.reuse:
        cases += REUSE_CASES
    if args.steps:
        sizes = [dict(size, steps=args.steps) for size in sizes]
    tables, all_rows = [], []
    for size in sizes:
        rows = run(device, size, backends, loss_kind, cases, args.modes)
        for r in rows:
            r["size"] = size
        all_rows += rows
        tables.append(markdown(rows, device_name(device), size, loss_kind))
    table = "\n\n".join(tables)
    print(table)
    if args.out:
        save(args.out, f"train_{preset}", all_rows, table, device)
    return all_rows


if __name__ == "__main__":
    main()
