"""`autocdsr compare RUN_DIR ... [--group-by KEYS] [--baseline KEY=VALUE,...]`: one table of
test metrics (overall and per target domain), mean +- std over the seeds of each group, and
each group's difference to a baseline group with a paired t-test over the seeds both have.

Runs are grouped by config keys (default DEFAULT_GROUP_BY: the backbone, the objective and its
weighting, the sampled softmax's negatives, the loss's domain weights, the single-domain
views, the scoring's history); runs that differ in data or protocol are refused in one table.
"""
import csv
import io
import json
import math
import os

import numpy as np
from omegaconf import OmegaConf

from .config import Config

DEFAULT_GROUP_BY = ("model.arch", "objective", "weighting.mode", "weighting.lam",
                    "weighting.layers", "weighting.per_domain", "weighting.gate",
                    "weighting.held_out", "weighting.shared", "train.negatives",
                    "train.domain_balance", "train.domain_weight_max", "data.domain_views",
                    "eval.history")
# weighting variants left out of a group's label where they have their default (the official
# step's: every layer, one L_cd, no gate, the `reached` Gram set)
VARIANT_KEYS = {"weighting.layers": [], "weighting.per_domain": False, "weighting.gate": False,
                "weighting.held_out": False, "weighting.shared": "reached"}
# how a run was trained or scored beyond its objective, left out of the label where it has its
# default (for every objective, base included)
DEFAULTED_KEYS = {"train.negatives": "uniform", "train.domain_balance": 0.0,
                  "train.domain_weight_max": 20.0, "data.domain_views": False,
                  "eval.history": "all"}
# Keys that must agree across every run of one table (the data and the protocol).
SAME_FOR_ALL = ("data.path", "data.name", "data.split", "data.max_len", "data.synthetic_users",
                "data.synthetic_spurious", "data.synthetic_mode", "data.domains", "data.target_domains",
                "data.mask_domain", "eval.protocol", "eval.ks", "eval.negative_draws")


class CompareError(ValueError):
    """Runs that cannot share one table, phrased for the user."""
    pass


def load_run(run_dir):
    """(config, metrics) of a finished run."""
    paths = [os.path.join(run_dir, n) for n in ("config.yaml", "metrics.json")]
    for path in paths:
        if not os.path.isfile(path):
            raise CompareError(f"{run_dir}: no {os.path.basename(path)} (not a finished run)")
    with open(paths[1]) as f:
        metrics = json.load(f)
    # keys added after a run was made take their defaults, so old and new runs compare
    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(paths[0])), metrics


def _value(cfg, key):
    value = OmegaConf.select(cfg, key)
    if key == "weighting.lam" and OmegaConf.select(cfg, "weighting.mode") != "fixed":
        return "-"  # lam only means something for fixed weighting
    if key == "weighting.mode" and cfg.objective == "base":
        return "-"
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if key in VARIANT_KEYS and (cfg.objective == "base" or value == VARIANT_KEYS[key]):
        return "-"
    if key in DEFAULTED_KEYS and value == DEFAULTED_KEYS[key]:
        return "-"
    return value


def group_runs(runs, group_by):
    """{group label: [(seed, metrics, run_dir)]}, refusing runs of different data/protocol."""
    first = runs[0]
    for run_dir, cfg, _ in runs[1:]:
        for key in SAME_FOR_ALL:
            a, b = _value(first[1], key), _value(cfg, key)
            if a != b:
                raise CompareError(f"runs differ in {key} ({first[0]}: {a!r}, {run_dir}: {b!r}): "
                                   "they cannot share one table")
    groups = {}
    for run_dir, cfg, metrics in runs:
        label = ", ".join(f"{k.split('.')[-1]}={_value(cfg, k)}" for k in group_by
                          if _value(cfg, k) != "-")
        groups.setdefault(label, []).append((cfg.train.seed, metrics, run_dir))
    for label, members in groups.items():
        seeds = [s for s, _, _ in members]
        if len(set(seeds)) != len(seeds):
            raise CompareError(f"group '{label}' has two runs with one seed ({seeds}); add the "
                               "key that tells them apart to --group-by")
    return groups


def _metric(metrics, key, domain=None):
    table = metrics["test"]["overall"] if domain is None else \
        metrics["test"]["per_domain"].get(domain, {})
    return table.get(key)


def paired_t_test(a, b):
    """Two-sided paired t-test p-value of a - b (NaN with fewer than 2 pairs or no spread)."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(diff) < 2 or np.std(diff, ddof=1) == 0:
        return float("nan")
    from scipy import stats
    return float(stats.ttest_rel(a, b).pvalue)


def summarize(groups, baseline, metric_keys, domains):
    """Rows: one per group, with mean/std per column and the paired comparison to baseline."""
    columns = [(key, None) for key in metric_keys] + [(key, d) for d in domains for key in metric_keys[:1]]
    base = {seed: m for seed, m, _ in groups[baseline]} if baseline else {}
    rows = []
    for label, members in groups.items():
        row = {"group": label, "seeds": sorted(s for s, _, _ in members), "cells": []}
        for key, domain in columns:
            values = [_metric(m, key, domain) for _, m, _ in members]
            values = [v for v in values if v is not None]
            cell = {"column": key if domain is None else f"{key}[{domain}]",
                    "mean": float(np.mean(values)) if values else float("nan"),
                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
            paired = [(_metric(m, key, domain), _metric(base[s], key, domain))
                      for s, m, _ in members if s in base]
            paired = [(a, b) for a, b in paired if a is not None and b is not None]
            if baseline and label != baseline and paired:
                a, b = zip(*paired)
                cell["diff"] = float(np.mean(np.subtract(a, b)))
                cell["p"] = paired_t_test(a, b)
            row["cells"].append(cell)
        rows.append(row)
    return rows


def _fmt_cell(cell):
    text = f"{cell['mean']:.4f} ± {cell['std']:.4f}"
    if "diff" in cell:
        p = "=n/a" if math.isnan(cell["p"]) else "<0.01" if cell["p"] < 0.01 else f"={cell['p']:.2f}"
        text += f" ({cell['diff']:+.4f}, p{p})"
    return text


def markdown(rows, header):
    """The comparison table as Markdown."""
    columns = [c["column"] for c in rows[0]["cells"]]
    lines = [header, "", "| group | seeds | " + " | ".join(columns) + " |",
             "|" + "---|" * (len(columns) + 2)]
    for row in rows:
        lines.append(f"| {row['group']} | {len(row['seeds'])} | " +
                     " | ".join(_fmt_cell(c) for c in row["cells"]) + " |")
    return "\n".join(lines)


def to_csv(rows):
    """The comparison table as CSV text."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["group", "seeds", "column", "mean", "std", "diff_to_baseline", "p_paired"])
    for row in rows:
        for c in row["cells"]:
            writer.writerow([row["group"], " ".join(map(str, row["seeds"])), c["column"],
                             c["mean"], c["std"], c.get("diff", ""), c.get("p", "")])
    return out.getvalue()


def compare(run_dirs, group_by=DEFAULT_GROUP_BY, baseline=None, metric_keys=("HR@10", "NDCG@10"),
            out=None):
    """Build the comparison table; returns (markdown text, rows). baseline: a group label,
    or "key=value,..." matched against the labels (default: the group with objective=base)."""
    if not run_dirs:
        raise CompareError("no run directories given")
    runs = [(d, *load_run(d)) for d in run_dirs]
    groups = group_runs(runs, list(group_by))
    if baseline is None:
        # the plain base (fewest labels), not the base scored another way
        bases = [g for g in groups if "objective=base" in g]
        baseline = min(bases, key=lambda g: g.count(",")) if bases else None
    elif baseline not in groups:
        wanted = [part.split("=", 1)[-1] for part in baseline.split(",")]
        matches = [g for g in groups if all(f"={w}" in g for w in wanted)]
        if len(matches) != 1:
            raise CompareError(f"baseline '{baseline}' matches {len(matches)} groups of "
                               f"{list(groups)}")
        baseline = matches[0]
    if baseline:  # the baseline first, the others as found
        groups = {baseline: groups[baseline], **{g: v for g, v in groups.items() if g != baseline}}
    domains = sorted({d for ms in groups.values() for _, m, _ in ms for d in m["test"]["per_domain"]},
                     key=lambda d: (len(d), d))
    rows = summarize(groups, baseline, list(metric_keys), domains)
    first_cfg, first_metrics = runs[0][1], runs[0][2]
    from .evaluate import protocol_text
    header = (f"Protocol: {protocol_text(*scored_as(first_metrics)[:2])}; data: "
              f"{first_metrics.get('dataset', '?')}, max_len {first_cfg.data.max_len}; test split; "
              f"mean ± std (sample) over seeds; in brackets: mean paired difference to "
              f"'{baseline}' and the paired t-test p-value over shared seeds; [d] = target domain d.")
    text = markdown(rows, header)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "compare.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(out, "compare.csv"), "w") as f:
            f.write(to_csv(rows))
    return text, rows


def scored_as(metrics):
    """(protocol, negative draws, history) a run's test metrics were scored under."""
    return metrics["protocol"], metrics.get("negative_draws", 1), metrics.get("eval_history", "all")


def _refuse_repeated_seeds(what, runs):
    """Pairing is by seed: two runs of one seed on one side would be averaged silently."""
    seeds = [cfg.train.seed for _, cfg, _ in runs]
    if len(set(seeds)) != len(seeds):
        raise CompareError(f"{what}: two runs with one seed ({seeds}); give one run per seed")


def transfer_table(cross_dirs, single_dirs, metric_keys=("HR@10", "NDCG@10")):
    """Negative transfer, per domain: single-domain base runs (data.domains=[d],
    data.shared_targets=true) against the cross-domain base's rows of target domain d, which
    are the same test targets. single_dirs: {domain token: [run dirs]}; cross_dirs: the
    cross-domain base runs (one per seed). A positive difference (cross - single) is positive
    transfer, a negative one negative transfer. Returns (markdown text, rows)."""
    from .evaluate import protocol_text
    cross = [(d, *load_run(d)) for d in cross_dirs]
    protocol = scored_as(cross[0][2])
    for run_dir, _, metrics in cross[1:]:  # one table, one scoring of the cross-domain side
        if scored_as(metrics) != protocol:
            raise CompareError(f"{run_dir}: scored as {scored_as(metrics)}; {cross[0][0]} as "
                               f"{protocol}")
    _refuse_repeated_seeds("cross-domain runs", cross)
    lines = [f"Protocol: {protocol_text(*protocol)}; test split; the cross-domain base's rows "
             "of target domain d against a base trained on domain d alone, scored on the same "
             "targets; mean ± std "
             "over seeds; in brackets: cross - single and the paired t-test p-value over the seeds "
             "both have.", "",
             "| target domain | targets (cross / single) | " +
             " | ".join(f"single {k} | cross {k}" for k in metric_keys) + " |",
             "|" + "---|" * (2 + 2 * len(metric_keys))]
    all_rows = []
    for domain, dirs in sorted(single_dirs.items()):
        single = [(d, *load_run(d)) for d in dirs]
        _refuse_repeated_seeds(f"single-domain runs of domain {domain}", single)
        for run_dir, _, metrics in single:
            # a single-domain history is its target domain's, whichever eval.history it ran
            if scored_as(metrics)[:2] != protocol[:2]:
                raise CompareError(f"{run_dir}: protocol, negative draws {scored_as(metrics)[:2]}; "
                                   f"the cross-domain runs use {protocol[:2]}")
        token = str(domain)
        as_domain = lambda m: {**m, "test": {"overall": m["test"]["per_domain"][token],
                                             "per_domain": {}}}
        groups = {"single": [(c.train.seed, m, d) for d, c, m in single],
                  "cross": [(c.train.seed, as_domain(m), d) for d, c, m in cross]}
        rows = summarize(groups, "single", list(metric_keys), [])
        count = lambda g: groups[g][0][1]["test"]["overall"]["count"]
        cells = [_fmt_cell(c) for pair in zip(rows[0]["cells"], rows[1]["cells"]) for c in pair]
        lines.append(f"| {token} | {count('cross')} / {count('single')} | " + " | ".join(cells) + " |")
        all_rows.append({"domain": token, "rows": rows})
    return "\n".join(lines), all_rows
