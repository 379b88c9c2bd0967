"""Time per training step and peak memory: SASRec / BERT4Rec x base / AutoCDSR / AutoCDSR+
x attention backend, and a paper-code-style AutoCDSR step (three backward passes, gradients
flattened and concatenated, the solver on the host with .item() calls) on the same model.
Overheads are reported as ratios to the base model with the same arch and backend
(the paper reports +9.34% for AutoCDSR and +19.96% for AutoCDSR+).

    python -m bench.bench_train --device cuda --out bench/results/DIR
    python -m bench.bench_train --device cpu --quick
"""
import argparse
import datetime
import json
import os

import torch

from autocdsr.config import ModelConfig
from autocdsr.data.batches import cloze_capacity, target_slots
from autocdsr.models import Recommender
from autocdsr.step import TrainStep
from bench.timing import quantiles, wall_times_ms
from kernels import reference_pareto as host_solver

FULL = dict(batch=128, length=200, items=20000, hidden=64, heads=2, layers=2, steps=20)
QUICK = dict(batch=16, length=40, items=2000, hidden=32, heads=2, layers=2, steps=4)
CPU = dict(batch=64, length=50, items=5000, hidden=64, heads=2, layers=2, steps=8)


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
    batch = dict(items=items, domains=domains, seq_lens=seq_lens, targets=targets,
                 target_slots=torch.from_numpy(slots), target_weight=torch.from_numpy(weight))
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


def step_fn(model, optimizer, batch, objective, loss_kind, compile=False):
    """The project's step (autocdsr.step.TrainStep), or the paper-code-style step."""
    if objective == "paper_autocdsr":
        reference = TrainStep(model, optimizer, loss=loss_kind)  # for its forward only

        def step():
            optimizer.zero_grad(set_to_none=True)
            paper_style_backward(model, *reference.losses(batch)[:2])
            optimizer.step()
        return step
    train_step = TrainStep(model, optimizer, loss=loss_kind, compile=compile,
                           objective="base" if objective == "base" else "autocdsr",
                           amp_dtype=torch.bfloat16 if batch["items"].is_cuda else None)
    return lambda: train_step(batch)


def measure(step, device, steps):
    """(median, p20, p80) ms per step and peak MiB (CUDA) over `steps` timed steps."""
    if device.type == "cuda":
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = wall_times_ms(step, device, warmup=2, reps=steps)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return (*quantiles(times), peak)


def run(device, size, backends, loss_kind="full", log=print):
    rows = []
    cases = [("sasrec", "base"), ("sasrec", "autocdsr"), ("sasrec", "paper_autocdsr"),
             ("bert4rec", "base"), ("bert4rec", "autocdsr"), ("bert4rec", "paper_autocdsr"),
             ("bert4rec", "autocdsr_plus")]
    for backend in backends:
        for arch, objective in cases:
            torch.manual_seed(0)
            model_cfg = ModelConfig(arch=arch, hidden=size["hidden"], heads=size["heads"],
                                    layers=size["layers"], dropout=0.0,
                                    bottleneck_tokens=4 if objective == "autocdsr_plus" else 0)
            model = Recommender(model_cfg, size["items"], 4, size["length"],
                                backend=backend).to(device)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            batch = make_batch(arch, size, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                median, p20, p80, peak = measure(step_fn(model, optimizer, batch, objective, loss_kind),
                                                 device, size["steps"])
            row = {"backend": backend, "arch": arch, "objective": objective, "ms_median": median,
                   "ms_p20": p20, "ms_p80": p80, "peak_mib": peak}
            rows.append(row)
            log(json.dumps(row))
    base = {(r["backend"], r["arch"]): r["ms_median"] for r in rows if r["objective"] == "base"}
    for r in rows:
        r["overhead_vs_base"] = r["ms_median"] / base[(r["backend"], r["arch"])] - 1
    return rows


def markdown(rows, device_name, size):
    lines = [f"Device: {device_name}. Batch {size['batch']} x L {size['length']}, "
             f"{size['items']} items, hidden {size['hidden']}, {size['layers']} layers, "
             f"full softmax; ms per optimizer step (median [p20, p80]); overhead = vs the base "
             f"model with the same arch and backend.", "",
             "| backend | arch | objective | ms / step | peak MiB | overhead |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        lines.append(f"| {r['backend']} | {r['arch']} | {r['objective']} | {r['ms_median']:.2f} "
                     f"[{r['ms_p20']:.2f}, {r['ms_p80']:.2f}] | {peak} | "
                     f"{100 * r['overhead_vs_base']:+.1f}% |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI / dry runs)")
    parser.add_argument("--cpu-size", action="store_true", help="a size a 2-core CPU times in a minute")
    parser.add_argument("--backends", nargs="+")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    size = QUICK if args.quick else CPU if args.cpu_size else FULL
    backends = args.backends or (["triton", "sdpa", "reference"] if device.type == "cuda"
                                 else ["sdpa", "reference"])
    rows = run(device, size, backends)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({os.cpu_count()} cores, torch {torch.__version__})"
    table = markdown(rows, name, size)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "train.json"), "w") as f:
            json.dump({"device": name, "date": datetime.date.today().isoformat(), "size": size,
                       "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "train.md"), "w") as f:
            f.write(table + "\n")
    return rows


if __name__ == "__main__":
    main()
