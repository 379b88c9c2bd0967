"""`autocdsr analyze RUN_DIR [--against RUN_DIR ...]`: figures (PNG) and the numbers behind
them (JSON) in RUN_DIR/analysis/:

- pair_mass.json / pair_mass.png: per layer, the attention mass from query domain (rows) to
  key domain (columns) on the test histories, for the model at initialisation (same seed),
  the trained model (best.pt), and each --against run's trained model;
- trajectory.png: per epoch, lambda, the gradient cosine, L_cd, the training loss and the
  validation metric (the task-weight trajectory), from metrics.json;
- with --single RUN_DIR (a run of the same backbone trained on the target domain's events
  alone, data.domains=[d]): strata.json / strata.png, the paper's outcome strata. Test users
  whose target (user, item) both runs share are split at HR@10 into both hit / only the
  cross-domain model hits / only the single-domain model hits / neither, and each
  cross-domain run's mean cross-domain attention mass is given per stratum.
"""
import json
import os

from omegaconf import OmegaConf

import numpy as np

from .analysis import STRATA, domain_pair_mass, outcome_strata, user_cd_mass
from .checkpoint import load_safe
from .config import load_config


def _load_model(run_dir, checkpoint="best.pt", device="cpu"):
    """(cfg, data, trained model, model at initialisation) of a run."""
    from .build import build_model, load_data, seed_everything
    cfg = load_config(None, (), base=OmegaConf.load(os.path.join(run_dir, "config.yaml")))
    cfg.train.device = "cpu"
    data, _ = load_data(cfg)
    seed_everything(cfg.train.seed)  # the trainer seeds, then builds: the same initial weights
    initial = build_model(cfg, data).to(device)
    trained = build_model(cfg, data).to(device)
    state = load_safe(os.path.join(run_dir, checkpoint), map_location=device)
    trained.load_state_dict(state["model"])
    return cfg, data, trained, initial


def pair_masses(run_dir, max_rows=512):
    """Attention mass between domains per layer, at initialisation and trained, of a run."""
    cfg, data, trained, initial = _load_model(run_dir)
    kw = dict(max_len=cfg.data.max_len, max_rows=max_rows)
    return {"init": domain_pair_mass(initial, data, data.test, **kw),
            "trained": domain_pair_mass(trained, data, data.test, **kw),
            "objective": cfg.objective, "arch": cfg.model.arch}


def _title(run_dir):
    """arch objective/weighting, its weighting variants if any, and the seed."""
    with open(os.path.join(run_dir, "metrics.json")) as f:
        m = json.load(f)
    mode = f"/{m.get('weighting')}" if m.get("objective") != "base" else ""
    variants = ""
    if m.get("objective") != "base" and os.path.exists(os.path.join(run_dir, "config.yaml")):
        weighting = OmegaConf.load(os.path.join(run_dir, "config.yaml")).get("weighting", {})
        parts = [f"layers={list(weighting.get('layers'))}" if weighting.get("layers") else "",
                 "per_domain" if weighting.get("per_domain") else "",
                 "gate" if weighting.get("gate") else "",
                 "held_out" if weighting.get("held_out") else ""]
        variants = " ".join(p for p in parts if p)
        variants = f" {variants}" if variants else ""
    return f"{m['arch']} {m['objective']}{mode}{variants} (seed {m['seed']})"


def plot_pair_mass(panels, path):
    """panels: [(title, {"labels", "layers"})]; one column per panel, one row per layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = max(len(p["layers"]) for _, p in panels)
    fig, axes = plt.subplots(layers, len(panels), figsize=(3.4 * len(panels), 3.0 * layers),
                             squeeze=False)
    for col, (title, panel) in enumerate(panels):
        labels = panel["labels"]
        for row in range(layers):
            ax = axes[row][col]
            if row >= len(panel["layers"]):
                ax.axis("off")
                continue
            matrix = panel["layers"][row]
            ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
            for i, line in enumerate(matrix):
                for j, value in enumerate(line):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if value < 0.6 else "black")
            ax.set_xticks(range(len(labels)), labels, fontsize=7)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            ax.set_title(f"{title}\nlayer {row + 1}", fontsize=8)
            if col == 0:
                ax.set_ylabel("query domain", fontsize=8)
            if row == layers - 1:
                ax.set_xlabel("key domain", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_trajectory(histories, path, metric="NDCG@10"):
    """histories: [(label, metrics.json history)]; five panels against the epoch (a
    per-domain run adds a dashed lambda and cosine line per domain)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [("lambda", "lambda"), ("cosine", "cos(g_rec, g_cd); held_out: running, held-out g_rec"),
            ("cd_mass", "L_cd"), ("train_loss", "train loss"), (metric, f"valid {metric}")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0))
    for label, history in histories:
        epochs = [h["epoch"] for h in history]
        for ax, (key, name) in zip(axes, keys):
            values = [h["valid"][key] if key == metric else h[key] for h in history]
            if key in ("lambda", "cosine") and not any(values):
                ax.plot([], [], label=label)  # base has no lambda, fixed weighting no cosine
                continue
            line, = ax.plot(epochs, values, marker=".", label=label)
            per_domain = {"lambda": "lambda_per_domain", "cosine": "cosine_per_domain"}.get(key)
            domains = list(history[0].get(per_domain) or {}) if per_domain else []
            for n, domain in enumerate(domains):
                # a per-domain run: one line per domain beside the mean, in the run's colour
                ax.plot(epochs, [h[per_domain][domain] for h in history],
                        linestyle=(0, (1 + n, 1 + n)), color=line.get_color(), alpha=0.6,
                        label=f"{label}, domain {domain}")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _test_ranks(cfg, data, model):
    from .evaluate import model_scorer, target_ranks, uses_cosine
    return target_ranks(model_scorer(model, None, uses_cosine(cfg)), data, data.test, cfg, "cpu",
                        desc="strata")


def strata(run_dir, single_dir, against=(), k=10):
    """The outcome strata (see the module docstring) as a JSON-ready dict."""
    single_cfg, single_data, single_model, _ = _load_model(single_dir)
    single = {(u, single_data.item_tokens[t - 1]): r < k for u, t, r in
              zip(single_data.test.users, single_data.test.targets,
                  _test_ranks(single_cfg, single_data, single_model))}
    result = {"k": k, "strata": list(STRATA), "single": single_dir, "runs": {}}
    for d in (run_dir, *against):
        cfg, data, model, _ = _load_model(d)
        keys = [(u, data.item_tokens[t - 1]) for u, t in zip(data.test.users, data.test.targets)]
        shared = np.array([key in single for key in keys])
        hits = _test_ranks(cfg, data, model) < k
        labels = outcome_strata(hits[shared], np.array([single[key] for key, s in
                                                        zip(keys, shared) if s], dtype=bool))
        mass = user_cd_mass(model, data.test, cfg.data.max_len)[shared]
        result["runs"][d] = {"title": _title(d), "users": int(shared.sum()),
                             "count": [int((labels == s).sum()) for s in range(4)],
                             "cd_mass": [float(mass[labels == s].mean()) if (labels == s).any()
                                         else None for s in range(4)]}
    return result


def plot_strata(result, path):
    """Bar chart of the outcome strata (counts and mean cross-domain mass) of strata()."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = list(result["runs"].values())
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(1, len(runs))
    for i, run in enumerate(runs):
        values = [v if v is not None else 0.0 for v in run["cd_mass"]]
        bars = ax.bar(np.arange(4) + i * width, values, width, label=run["title"])
        for bar, n in zip(bars, run["count"]):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"n={n}",
                    ha="center", va="bottom", fontsize=6)
    ax.set_xticks(np.arange(4) + width * (len(runs) - 1) / 2, result["strata"], fontsize=8)
    ax.set_ylabel("cross-domain attention mass", fontsize=8)
    ax.set_title(f"test users by HR@{result['k']} outcome vs the single-domain model", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyze(run_dir, against=(), max_rows=512, single=None):
    """Write a run's pair-mass matrices, trajectory plot (and strata with `single`); returns the
    folder."""
    out = os.path.join(run_dir, "analysis")
    os.makedirs(out, exist_ok=True)
    result = pair_masses(run_dir, max_rows)
    result["against"] = {d: pair_masses(d, max_rows)["trained"] for d in against}
    with open(os.path.join(out, "pair_mass.json"), "w") as f:
        json.dump(result, f, indent=1)
    title = _title(run_dir)
    panels = [(f"{title}: init", result["init"]), (f"{title}: trained", result["trained"])]
    panels += [(_title(d), m) for d, m in result["against"].items()]
    plot_pair_mass(panels, os.path.join(out, "pair_mass.png"))
    histories = []
    for d in (run_dir, *against):
        with open(os.path.join(d, "metrics.json")) as f:
            histories.append((_title(d), json.load(f)["history"]))
    with open(os.path.join(run_dir, "config.yaml")) as f:
        metric = OmegaConf.load(f).eval.metric
    plot_trajectory(histories, os.path.join(out, "trajectory.png"), metric)
    if single:
        result = strata(run_dir, single, against)
        with open(os.path.join(out, "strata.json"), "w") as f:
            json.dump(result, f, indent=1)
        plot_strata(result, os.path.join(out, "strata.png"))
    return out

