"""Does the uni999_domain evaluation depend on how its negatives are drawn? Two checks on a
dataset and a trained checkpoint:

1. The samplers' distributions. For a set of evaluation rows, many draws from the vectorised
   sampler (autocdsr.evaluate.domain_negatives) and from the protocol written out row by row
   (direct_domain_negatives, the sampler of earlier versions): how often a negative is in the
   row's history, is its target, is padding or lies in another domain (all must be 0), repeats
   within a row, and a chi-square test of each row's inclusion counts against uniform.
2. The metrics. The checkpoint's test ranks under both samplers and several negative seeds:
   mean and spread of HR@10 / NDCG@10 per sampler, and how many candidates tie the target
   (the tie rule counts half of each tie; an older rule counted one tie as none).

    python -m bench.eval_negatives --checkpoint RUN_DIR/best.pt [--seeds 5] [key=value ...]
"""
import argparse
import json
import time

import numpy as np
import torch
from scipy import stats

from autocdsr.build import load_checkpoint
from autocdsr.data.batches import eval_batch, to_device
from autocdsr.evaluate import (_rank, direct_domain_negatives, domain_negatives, model_scorer,
                               uses_cosine)
from autocdsr.metrics import metrics_by_domain

SAMPLERS = {"vectorised": domain_negatives, "direct": direct_domain_negatives}


def sampler_report(data, split, rows, draws, seed=0):
    """Per sampler: violation rates, repeats, and the chi-square p-values of the rows."""
    report = {}
    for name, sampler in SAMPLERS.items():
        rng = np.random.default_rng(seed)
        negatives = np.stack([sampler(data, split, rows, rng) for _ in range(draws)], 1)
        bad = {"history": 0, "target": 0, "padding": 0, "other_domain": 0, "repeats": 0}
        pvalues = []
        for b, r in enumerate(rows):
            pool = data.domain_items[split.target_domains[r]]
            allowed = np.setdiff1d(pool, np.union1d(split.row(r)[0], [split.targets[r]]))
            row = negatives[b]                          # [draws, 999]
            bad["history"] += int(np.isin(row, split.row(r)[0]).sum())
            bad["target"] += int((row == split.targets[r]).sum())
            bad["padding"] += int((row == 0).sum())
            bad["other_domain"] += int((~np.isin(row, pool)).sum())
            bad["repeats"] += int(sum(row.shape[1] - len(np.unique(d)) for d in row))
            counts = np.bincount(np.searchsorted(allowed, row.ravel()), minlength=len(allowed))
            pvalues.append(float(stats.chisquare(counts).pvalue))
        report[name] = {"violations": bad, "chi2_pvalues": pvalues,
                        "rows_with_p_below_0.01": int(sum(p < 0.01 for p in pvalues))}
    return report


@torch.no_grad()
def ranks_with(score, data, split, cfg, tokens, sampler, seed, device):
    """Test ranks with the negatives of `sampler`, and the count of candidates tied with the
    target per row."""
    ranks, ties = [], []
    rng = np.random.default_rng(seed)
    for lo in range(0, len(split), cfg.eval.batch_size):
        rows = np.arange(lo, min(lo + cfg.eval.batch_size, len(split)))
        batch = to_device(eval_batch(split, rows, cfg.data.max_len, cfg.model.arch,
                                     tokens), device)
        negatives = torch.from_numpy(sampler(data, split, rows, rng)).to(device)
        scores = score(batch, torch.cat([batch["targets"][:, None], negatives], 1)).float()
        target, others = scores[:, 0], scores[:, 1:]
        ranks.append(_rank(others, target).cpu().numpy())
        ties.append((others == target[:, None]).sum(1).cpu().numpy())
    return np.concatenate(ranks), np.concatenate(ties)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--seeds", type=int, default=5, help="negative seeds per sampler")
    parser.add_argument("--rows", type=int, default=20, help="rows in the distribution check")
    parser.add_argument("--draws", type=int, default=200, help="draws per row")
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg, data, model = load_checkpoint(args.checkpoint, args.overrides)
    split = data.test
    rows = np.random.default_rng(0).choice(len(split), size=min(args.rows, len(split)),
                                           replace=False)
    t0 = time.perf_counter()
    report = {"checkpoint": args.checkpoint, "protocol": "uni999_domain",
              "distribution": sampler_report(data, split, rows, args.draws)}
    print(f"distribution check ({len(rows)} test rows x {args.draws} draws, "
          f"{time.perf_counter() - t0:.0f}s):")
    for name, part in report["distribution"].items():
        print(f"  {name:>10}: violations {part['violations']}, rows with chi-square p < 0.01: "
              f"{part['rows_with_p_below_0.01']} of {len(rows)}")
    score = model_scorer(model, None, uses_cosine(cfg))
    ks = list(cfg.eval.ks)
    report["metrics"] = {}
    print("test, uni999_domain, per negative seed:")
    for name, sampler in SAMPLERS.items():
        rows_out = []
        for seed in range(args.seeds):
            ranks, ties = ranks_with(score, data, split, cfg, model.tokens, sampler, seed,
                                     torch.device("cpu"))
            overall = metrics_by_domain(ranks, split.target_domains, data.domain_tokens,
                                        ks)["overall"]
            rows_out.append({"seed": seed, "HR@10": overall["HR@10"],
                             "NDCG@10": overall["NDCG@10"], "rows_with_ties": int((ties > 0).sum()),
                             "tied_candidates": int(ties.sum())})
        hr = np.array([r["HR@10"] for r in rows_out])
        nd = np.array([r["NDCG@10"] for r in rows_out])
        report["metrics"][name] = {"per_seed": rows_out, "HR@10_mean": hr.mean(),
                                   "HR@10_std": hr.std(ddof=1), "NDCG@10_mean": nd.mean(),
                                   "NDCG@10_std": nd.std(ddof=1)}
        print(f"  {name:>10}: HR@10 {hr.mean():.4f} +- {hr.std(ddof=1):.4f} "
              f"(range {hr.min():.4f}..{hr.max():.4f}), NDCG@10 {nd.mean():.4f} +- "
              f"{nd.std(ddof=1):.4f}, candidates tied with the target: "
              f"{sum(r['tied_candidates'] for r in rows_out)} in {args.seeds} seeds")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
