"""Plot time versus sequence length per provider from bench_attention JSON files.

    python -m bench.plot_attention RESULTS.json [MORE.json ...] --out plot.png

One panel per (device, dtype, mode, pass) group that has at least two lengths.
"""
import argparse
import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", default="bidir")
    parser.add_argument("--pass", dest="pass_", default="fwd+bwd")
    args = parser.parse_args(argv)
    panels = defaultdict(lambda: defaultdict(list))
    for path in args.results:
        with open(path) as f:
            result = json.load(f)
        for r in result["rows"]:
            if r["mode"] != args.mode or r["pass"] != args.pass_ or r["ms_median"] != r["ms_median"]:
                continue
            batch, heads, length, head_dim = r["shape"]
            key = f"{result['device']}\n{r['dtype']}, H={heads}, D={head_dim}, {r['mode']}, {r['pass']}"
            panels[key][r["provider"]].append((length, r["ms_median"]))
    panels = {k: v for k, v in panels.items() if any(len(p) > 1 for p in v.values())}
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4.5), squeeze=False)
    for ax, (title, providers) in zip(axes[0], sorted(panels.items())):
        for name, points in sorted(providers.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (B x L fixed)")
        ax.set_ylabel("ms per call (median)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out} ({len(panels)} panels)")


if __name__ == "__main__":
    main()
