"""The objective study: base, AutoCDSR (pareto), AutoCDSR+, fixed lambda (the paper's
static-weight ablation), mgda; several seeds; each run trained with early stopping on the
validation metric (patience long enough that a noisy curve does not stop one twin early);
then one table per backbone (autocdsr compare: mean ± std, paired t-test against base), the
attention-mass matrices before/after (autocdsr analyze) and the lambda / cosine trajectories.

    python -m bench.compare_objectives --out bench/results/study-synthetic --seeds 0 1 2
    python -m bench.compare_objectives --out DIR --variants sasrec/base sasrec/autocdsr \\
        --single-domains 0 3 --set data.synthetic_mode=negative eval.protocol=full_domain
    python -m bench.compare_objectives --out DIR --variants bert4rec/base bert4rec/autocdsr \\
        --set data.path=PATH/TO/kuairand1k data.split=files train.loss=inbatch_official \\
              eval.protocol=uni100_vocab
    python -m bench.compare_objectives --out DIR --config configs/amazon-food-kitchen/bert4rec.yaml \\
        --variants bert4rec/base bert4rec/autocdsr bert4rec/autocdsr_plus --negative-draws 10 \\
        --set data.path=PATH/TO/amazon-food-kitchen

--config FILE starts every run from a recipe (its budget replaces the study's 30 epochs);
--negative-draws N re-scores each best checkpoint over N draws of a sampled protocol's
negatives and reports that table (the numbers to quote) beside the trained one.

A run directory that already has metrics.json is reused, not retrained, so the study can be
stopped and restarted, and seeds added later. The run folders under OUT/runs are meant to be
committed with the results (git ignores their checkpoints): on a fresh machine the same
command then rebuilds every table from them and trains only what is missing (re-scored
folders, OUT/runs_*, are reused the same way; the pair-mass analysis needs the checkpoints:
pass --no-analysis there).
"""
import argparse
import json
import os
import shutil

import numpy as np

from autocdsr.analyze import analyze, plot_trajectory
from autocdsr.compare import compare, transfer_table
from autocdsr.config import load_config
from autocdsr.reevaluate import reevaluate
from autocdsr.train import train

VARIANTS = {
    "sasrec/base": ["model.arch=sasrec", "objective=base"],
    "sasrec/autocdsr": ["model.arch=sasrec", "objective=autocdsr"],
    "sasrec/fixed0.1": ["model.arch=sasrec", "objective=autocdsr", "weighting.mode=fixed", "weighting.lam=0.1"],
    "sasrec/fixed0.5": ["model.arch=sasrec", "objective=autocdsr", "weighting.mode=fixed", "weighting.lam=0.5"],
    "sasrec/fixed1.0": ["model.arch=sasrec", "objective=autocdsr", "weighting.mode=fixed", "weighting.lam=1.0"],
    "sasrec/mgda": ["model.arch=sasrec", "objective=autocdsr", "weighting.mode=mgda"],
    # the weighting variants beyond the paper
    "sasrec/layers0": ["model.arch=sasrec", "objective=autocdsr", "weighting.layers=[0]"],
    "sasrec/gate": ["model.arch=sasrec", "objective=autocdsr", "weighting.gate=true"],
    "sasrec/per_domain": ["model.arch=sasrec", "objective=autocdsr", "weighting.per_domain=true"],
    "sasrec/per_domain_gate": ["model.arch=sasrec", "objective=autocdsr",
                               "weighting.per_domain=true", "weighting.gate=true"],
    "sasrec/held_out": ["model.arch=sasrec", "objective=autocdsr", "weighting.held_out=true"],
    "sasrec/per_domain_held_out": ["model.arch=sasrec", "objective=autocdsr",
                                   "weighting.per_domain=true", "weighting.held_out=true"],
    "sasrec/layers0_per_domain": ["model.arch=sasrec", "objective=autocdsr", "weighting.layers=[0]",
                                  "weighting.per_domain=true"],
    # the one-layer Gram set with one combined backward (the cheap step)
    "sasrec/autocdsr_last_layer": ["model.arch=sasrec", "objective=autocdsr", "weighting.shared=last_layer"],
    "sasrec/layers0_last_layer": ["model.arch=sasrec", "objective=autocdsr", "weighting.layers=[0]",
                                  "weighting.shared=last_layer"],
    "bert4rec/base": ["model.arch=bert4rec", "objective=base"],
    "bert4rec/autocdsr": ["model.arch=bert4rec", "objective=autocdsr"],
    "bert4rec/autocdsr_plus": ["model.arch=bert4rec", "objective=autocdsr_plus"],
    "bert4rec/fixed0.1": ["model.arch=bert4rec", "objective=autocdsr", "weighting.mode=fixed", "weighting.lam=0.1"],
    "bert4rec/fixed0.5": ["model.arch=bert4rec", "objective=autocdsr", "weighting.mode=fixed", "weighting.lam=0.5"],
    "bert4rec/fixed1.0": ["model.arch=bert4rec", "objective=autocdsr", "weighting.mode=fixed", "weighting.lam=1.0"],
    "bert4rec/mgda": ["model.arch=bert4rec", "objective=autocdsr", "weighting.mode=mgda"],
    "bert4rec/layers0": ["model.arch=bert4rec", "objective=autocdsr", "weighting.layers=[0]"],
    "bert4rec/gate": ["model.arch=bert4rec", "objective=autocdsr", "weighting.gate=true"],
    # AutoCDSR+'s topology (bottleneck tokens, domain-isolated first layers) without its
    # penalty: tells a gain of the topology from a gain of the balancing
    "bert4rec/plus_topology": ["model.arch=bert4rec", "objective=autocdsr_plus", "weighting.mode=none"],
    "bert4rec/per_domain": ["model.arch=bert4rec", "objective=autocdsr", "weighting.per_domain=true"],
    "bert4rec/per_domain_gate": ["model.arch=bert4rec", "objective=autocdsr",
                                 "weighting.per_domain=true", "weighting.gate=true"],
    "bert4rec/held_out": ["model.arch=bert4rec", "objective=autocdsr", "weighting.held_out=true"],
    "bert4rec/per_domain_held_out": ["model.arch=bert4rec", "objective=autocdsr",
                                     "weighting.per_domain=true", "weighting.held_out=true"],
    "bert4rec/layers0_per_domain": ["model.arch=bert4rec", "objective=autocdsr",
                                    "weighting.layers=[0]", "weighting.per_domain=true"],
    "bert4rec/autocdsr_last_layer": ["model.arch=bert4rec", "objective=autocdsr", "weighting.shared=last_layer"],
    "bert4rec/autocdsr_plus_last_layer": ["model.arch=bert4rec", "objective=autocdsr_plus",
                                          "weighting.shared=last_layer"],
}
STUDY_DEFAULTS = ["train.epochs=30", "train.patience=6"]


def run_dir_of(out, name, seed):
    return os.path.join(out, "runs", name.replace("/", "_"), f"seed{seed}")


def study_overrides(recipe, settings):
    """What every run starts from: the study's budget, or a recipe's (config file) own."""
    return settings if recipe else STUDY_DEFAULTS + settings


def _train_once(run_dir, overrides, seed, recipe=None):
    """Train the study run with these overrides (on top of the recipe file, if any) into
    run_dir, unless it has finished already."""
    if not os.path.exists(os.path.join(run_dir, "metrics.json")):
        train(load_config(recipe, study_overrides(recipe, overrides) +
                          [f"train.seed={seed}", f"run_dir={run_dir}"]))
    return run_dir


def run_variant(out, name, seed, settings, recipe=None):
    return _train_once(run_dir_of(out, name, seed), VARIANTS[name] + settings, seed, recipe)


def run_single_domain(out, arch, domain, seed, settings, recipe=None):
    """The single-domain base of `arch` on `domain`, scored on the cross-domain run's targets."""
    return _train_once(run_dir_of(out, f"{arch}/single{domain}", seed),
                       [f"model.arch={arch}", "objective=base"] + settings +
                       [f"data.domains=[{domain}]", "data.shared_targets=true"], seed, recipe)


def reevaluate_run(run_dir, overrides, out_dir):
    """best.pt of a finished run evaluated again with these eval overrides (another protocol,
    more negative draws), written as a run folder that autocdsr compare reads. Reused when it
    exists."""
    if not os.path.exists(os.path.join(out_dir, "metrics.json")):
        reevaluate(os.path.join(run_dir, "best.pt"), overrides, out_dir)
    return out_dir


def sibling_dir(run_dir, tag):
    """OUT/runs/NAME/seedS -> OUT/runs_TAG/NAME/seedS: where a re-evaluation of it goes."""
    return run_dir.replace(os.sep + "runs" + os.sep, f"{os.sep}runs_{tag}{os.sep}")


def rescored_section(dirs, overrides, out, tag, title):
    """Every run's best.pt scored again with `overrides` into OUT/runs_TAG, compared into
    OUT/ARCH_TAG; returns the report lines."""
    again = [reevaluate_run(d, overrides, sibling_dir(d, tag)) for d in dirs]
    text, _ = compare(again, out=out)
    return [title, "", text, ""]


def mean_trajectory(run_dirs):
    """Per-epoch mean over seeds (up to the shortest run) of the history entries."""
    histories = []
    for d in run_dirs:
        with open(os.path.join(d, "metrics.json")) as f:
            histories.append(json.load(f)["history"])
    n = min(len(h) for h in histories)
    mean = []
    for e in range(n):
        rows = [h[e] for h in histories]
        entry = {k: float(np.mean([r[k] for r in rows]))
                 for k in ("lambda", "cosine", "cd_mass", "train_loss")}
        for key in ("lambda_per_domain", "cosine_per_domain"):
            if key in rows[0]:
                entry[key] = {d: float(np.mean([r[key][d] for r in rows])) for d in rows[0][key]}
        entry["epoch"] = e + 1
        entry["valid"] = {k: float(np.mean([r["valid"][k] for r in rows])) for k in rows[0]["valid"]}
        mean.append(entry)
    return mean


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], help="key=value for every run")
    parser.add_argument("--config", help="a recipe (config file) every run starts from; its "
                        "budget replaces the study's default (30 epochs, patience 6)")
    parser.add_argument("--negative-draws", type=int, metavar="N",
                        help="re-score every best.pt over N draws of the sampled protocol's "
                             "negatives and add that table (the numbers to quote)")
    parser.add_argument("--no-analysis", action="store_true")
    parser.add_argument("--single-domains", type=int, nargs="*", default=[], metavar="D",
                        help="also train a base on each domain D alone (same targets) and report "
                             "the transfer per domain: single- against cross-domain base")
    parser.add_argument("--also-protocol", help="evaluate every best.pt under this protocol too "
                        "(e.g. full) and add its table")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    runs = {name: [] for name in args.variants}
    singles = {}  # arch -> {domain: [run dirs]}
    for seed in args.seeds:  # seed-major: a partial study already has every variant
        for name in args.variants:
            runs[name].append(run_variant(args.out, name, seed, args.set, args.config))
        for arch in ("sasrec", "bert4rec"):
            if f"{arch}/base" in runs:
                for domain in args.single_domains:
                    singles.setdefault(arch, {}).setdefault(domain, []).append(
                        run_single_domain(args.out, arch, domain, seed, args.set, args.config))
    settings = study_overrides(args.config, args.set)
    start = f"the recipe {args.config}, then " if args.config else "the driver's defaults, then "
    report = [f"Settings for every run: {start}{' '.join(settings)}; seeds {args.seeds}.", ""]
    for arch in ("sasrec", "bert4rec"):
        names = [n for n in args.variants if n.startswith(arch + "/")]
        if not names:
            continue
        dirs = [d for n in names for d in runs[n]]
        text, _ = compare(dirs, out=os.path.join(args.out, arch))
        report += [f"## {arch}", "", text, ""]
        if arch in singles:
            text, _ = transfer_table(runs[f"{arch}/base"], singles[arch])
            report += [f"## {arch}: transfer per domain (single- vs cross-domain base)", "", text, ""]
        if args.negative_draws:
            tag = f"draws{args.negative_draws}"
            report += rescored_section(
                dirs, [f"eval.negative_draws={args.negative_draws}"],
                os.path.join(args.out, f"{arch}_{tag}"), tag,
                f"## {arch}, the same checkpoints over {args.negative_draws} negative draws")
        if args.also_protocol:
            report += rescored_section(
                dirs, [f"eval.protocol={args.also_protocol}"],
                os.path.join(args.out, f"{arch}_{args.also_protocol}"), args.also_protocol,
                f"## {arch}, the same checkpoints under {args.also_protocol}")
        plot_trajectory([(n, mean_trajectory(runs[n])) for n in names],
                        os.path.join(args.out, f"{arch}_trajectory.png"))
        base = f"{arch}/base"
        if not args.no_analysis and base in runs:
            against = [runs[n][0] for n in names if n != base]
            folder = analyze(runs[base][0], against)
            for name in ("pair_mass.json", "pair_mass.png", "trajectory.png"):
                # beside summary.md under stable names, the paths the docs link to
                shutil.copy(os.path.join(folder, name), os.path.join(args.out, f"{arch}_seed{args.seeds[0]}_{name}"))
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    main()
