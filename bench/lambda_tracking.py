"""How closely does the one-layer Gram set's lambda (weighting.shared=last_layer) track the
official `reached` set's over a whole training run? The run trains with one Gram set; at
every solver step the other set's lambda is computed on the same batch with the same dropout
masks (the generator state is restored between the two), without updating anything.

    python -m bench.lambda_tracking --out bench/results/DIR [key=value ...]

Prints and writes the correlation of the two lambda series, their largest and mean absolute
difference, and the same per epoch.
"""
import argparse
import json
import os

import numpy as np
import torch

from autocdsr.config import load_config
from autocdsr.step import TrainStep
from autocdsr.train import Trainer, setup_logging


def shadow_step(trainer, shared):
    """A TrainStep on the trainer's model and optimizer that only computes gradients."""
    return TrainStep.from_config(trainer.model, trainer.optimizer, trainer.cfg, shared=shared,
                                 domain_items=trainer.data.domain_items,
                                 domain_counts=trainer.data.training_domain_counts(),
                                 compile=False, cuda_graph=False)


def track(cfg, other):
    trainer = Trainer(cfg)
    shadow = shadow_step(trainer, other)
    pairs = []  # (epoch, lambda of the trained set, lambda of the other set)
    for epoch in range(cfg.train.epochs):
        trainer.epoch = epoch
        order = np.random.default_rng([cfg.train.seed, epoch]).permutation(len(trainer.data.train))
        trainer.model.train()
        for batch in trainer._epoch_batches(order):
            state = torch.get_rng_state()
            other_lam = shadow.gradients(batch, shadow.lam, True)[3]["lam"].detach().clone()
            torch.set_rng_state(state)  # the training step sees the same dropout and negatives
            trainer.train_step(batch)
            pairs.append((epoch + 1, float(trainer.step.lam.float().mean()),
                          float(other_lam.float().mean())))
        trainer.pending.clear()
        trainer.step_in_epoch = 0
    return np.array(pairs)


def summary(pairs):
    a, b = pairs[:, 1], pairs[:, 2]
    out = {"steps": len(pairs), "correlation": float(np.corrcoef(a, b)[0, 1]),
           "max_abs_diff": float(np.abs(a - b).max()), "mean_abs_diff": float(np.abs(a - b).mean()),
           "mean_trained": float(a.mean()), "mean_other": float(b.mean()), "per_epoch": []}
    for epoch in np.unique(pairs[:, 0]):
        rows = pairs[pairs[:, 0] == epoch]
        out["per_epoch"].append({"epoch": int(epoch), "trained": float(rows[:, 1].mean()),
                                 "other": float(rows[:, 2].mean()),
                                 "max_abs_diff": float(np.abs(rows[:, 1] - rows[:, 2]).max())})
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--train-with", default="reached", choices=("reached", "last_layer"),
                        help="the Gram set the run trains with; the other one shadows it")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    other = "last_layer" if args.train_with == "reached" else "reached"
    cfg = load_config(None, ["objective=autocdsr", f"weighting.shared={args.train_with}",
                             f"run_dir={os.path.join(args.out, 'run')}", *args.overrides])
    setup_logging(cfg.run_dir)
    pairs = track(cfg, other)
    result = {"trained_with": args.train_with, "shadow": other,
              "settings": [f"weighting.shared={args.train_with}", *args.overrides],
              **summary(pairs)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lambda_tracking.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{result['steps']} solver steps, trained with {args.train_with}: lambda "
          f"{result['mean_trained']:+.4f} vs {other} {result['mean_other']:+.4f}; correlation "
          f"{result['correlation']:.4f}, largest difference {result['max_abs_diff']:.4f}, "
          f"mean {result['mean_abs_diff']:.4f}")


if __name__ == "__main__":
    main()
