"""Base vs AutoCDSR vs AutoCDSR+ on one dataset, several seeds, one table.

    python -m bench.compare_objectives --out bench/results/synthetic --seeds 0 1 2
    python -m bench.compare_objectives --out DIR --seeds 0 \\
        --set data.path=../shared/data/kuairand1k data.split=files data.max_len=200 \\
              train.loss=sampled eval.protocol=uni100_vocab train.epochs=3

Each run is a normal training run (its own run directory under OUT/runs; one that already
has a metrics.json is reused, not retrained); the summary gives
mean and spread (population std) over seeds of HR@10 / NDCG@10 overall and per target domain,
the final cross-domain mass L_cd, lambda in the first and last epoch, and seconds per step.
"""
import argparse
import json
import os

import numpy as np

from autocdsr.config import load_config
from autocdsr.train import train

VARIANTS = {
    "sasrec/base": ["model.arch=sasrec", "objective=base"],
    "sasrec/autocdsr": ["model.arch=sasrec", "objective=autocdsr"],
    "bert4rec/base": ["model.arch=bert4rec", "objective=base"],
    "bert4rec/autocdsr": ["model.arch=bert4rec", "objective=autocdsr"],
    "bert4rec/autocdsr_plus": ["model.arch=bert4rec", "objective=autocdsr_plus"],
}


def summarize(results, ks=(10,)):
    rows = []
    for name, runs in results.items():
        row = {"variant": name, "seeds": [r["seed"] for r in runs]}
        for key in [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks]:
            values = [r["test"]["overall"][key] for r in runs]
            row[key] = (float(np.mean(values)), float(np.std(values)))
            domains = sorted({d for r in runs for d in r["test"]["per_domain"]})
            for d in domains:
                v = [r["test"]["per_domain"][d][key] for r in runs if d in r["test"]["per_domain"]]
                row[f"{key}[{d}]"] = (float(np.mean(v)), float(np.std(v)))
        row["L_cd"] = float(np.mean([r["history"][-1]["cd_mass"] for r in runs]))
        row["lambda_first"] = float(np.mean([r["history"][0]["lambda"] for r in runs]))
        row["lambda_last"] = float(np.mean([r["history"][-1]["lambda"] for r in runs]))
        row["ms_per_step"] = 1000 * float(np.mean([np.mean([h["seconds_per_step"] for h in r["history"]])
                                                   for r in runs]))
        rows.append(row)
    return rows


def markdown(rows, protocol, settings):
    metric_keys = [k for k in rows[0] if k.startswith(("HR@", "NDCG@"))]
    lines = [f"Protocol: {protocol}. Settings: {' '.join(settings) or 'defaults'}. "
             "Test split, mean ± std over seeds; [d] = target domain d.", "",
             "| variant | seeds | " + " | ".join(metric_keys) +
             " | L_cd (last epoch) | lambda first → last | ms/step |",
             "|" + "---|" * (len(metric_keys) + 5)]
    for r in rows:
        cells = [f"{r[k][0]:.4f} ± {r[k][1]:.4f}" for k in metric_keys]
        lines.append(f"| {r['variant']} | {len(r['seeds'])} | " + " | ".join(cells) +
                     f" | {r['L_cd']:.4f} | {r['lambda_first']:+.3f} → {r['lambda_last']:+.3f} | "
                     f"{r['ms_per_step']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], help="key=value for every run")
    args = parser.parse_args(argv)
    results, protocol = {}, None
    for name in args.variants:
        for seed in args.seeds:
            run_dir = os.path.join(args.out, "runs", name.replace("/", "_"), f"seed{seed}")
            done = os.path.join(run_dir, "metrics.json")
            if os.path.exists(done):  # finished earlier (e.g. run by hand): reuse it
                with open(done) as f:
                    metrics = json.load(f)
            else:
                cfg = load_config(None, VARIANTS[name] + args.set + [f"train.seed={seed}",
                                                                     f"run_dir={run_dir}"])
                metrics = train(cfg)
            protocol = metrics["protocol"]
            results.setdefault(name, []).append(metrics)
    rows = summarize(results)
    table = markdown(rows, protocol, args.set)
    print(table)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
