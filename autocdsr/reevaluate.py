"""A finished run's checkpoint evaluated again (another protocol, more negative draws),
written as a run folder (config.yaml + metrics.json) that `autocdsr compare` reads like a
trained run's. Training can then validate on one negative draw per epoch (fast) and the
reported numbers average over many (less noise), from the same checkpoint."""
import json
import os

import torch
from omegaconf import OmegaConf

from .build import load_checkpoint, resolve_device
from .checkpoint import write_text_atomic
from .evaluate import evaluate_split, format_table, model_scorer, popularity_scorer, uses_cosine

# what the trained run recorded about itself, carried over so tables can still group by it
_CARRIED = ("seed", "dataset", "arch", "objective", "weighting", "loss", "max_len", "best_epoch")


def reevaluate(checkpoint, overrides=(), out_dir=None, device="auto", log=print):
    """Metrics of checkpoint's valid and test splits (and MostPop's test) under the run's
    config with overrides on top. With out_dir, also writes config.yaml and metrics.json there
    (metrics.json names the checkpoint it came from). Returns the metrics dict."""
    device = resolve_device(device)
    cfg, data, model = load_checkpoint(checkpoint, overrides, device)
    amp = torch.bfloat16 if device.type == "cuda" else None  # as the trainer evaluates
    scorer = model_scorer(model, amp, uses_cosine(cfg))
    draws, ks = cfg.eval.negative_draws, list(cfg.eval.ks)
    metrics = {"protocol": cfg.eval.protocol, "negative_draws": draws, "eval_history": cfg.eval.history,
               "reevaluated_from": os.path.abspath(checkpoint)}
    trained = os.path.join(os.path.dirname(checkpoint), "metrics.json")
    if os.path.exists(trained):
        with open(trained) as f:
            recorded = json.load(f)
        metrics.update({k: recorded[k] for k in _CARRIED if k in recorded})
    tables = (("valid", data.valid, scorer), ("test", data.test, scorer),
              ("baseline_mostpop_test", data.test, popularity_scorer(data.popularity, device)))
    for name, split, score in tables:
        metrics[name] = evaluate_split(score, data, split, cfg, device, name)
        log(format_table(f"{data.name} {cfg.model.arch} {cfg.objective} | {name}",
                         cfg.eval.protocol, metrics[name], ks, draws, cfg.eval.history))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        cfg.run_dir = out_dir
        write_text_atomic(OmegaConf.to_yaml(cfg), os.path.join(out_dir, "config.yaml"))
        write_text_atomic(json.dumps(metrics, indent=1), os.path.join(out_dir, "metrics.json"))
    return metrics
