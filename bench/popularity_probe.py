"""Can the training recipe learn item popularity alone within a step budget? A bias-only model
(score(item) = b_item, no sequence at all) trained the way the recommenders are (sampled
softmax over uniform negatives, 12,500 training events per step drawn from the training
data), then ranked under the run's protocol beside the count-based most-popular baseline.
If this model stays below MostPop at a budget, a sequence model trained for that budget
cannot be expected to clear MostPop through popularity either.

    python -m bench.popularity_probe --data PATH/TO/kuairand1k --split files
"""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from autocdsr.config import load_config
from autocdsr.evaluate import evaluate_split, popularity_scorer, table_scorer
from autocdsr.build import load_data

SETTINGS = [("adam", 1e-3, 1000), ("adam", 1e-2, 1000), ("sgd", 1.0, 1000)]


def train_bias(events, num_items, optimizer, lr, negatives, steps, rows=12500, seed=0):
    torch.manual_seed(seed)
    bias = torch.zeros(num_items + 1, requires_grad=True)
    opt = torch.optim.Adam([bias], lr=lr) if optimizer == "adam" else torch.optim.SGD([bias], lr=lr)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        targets = torch.from_numpy(events[rng.integers(0, len(events), rows)])
        sampled = torch.randint(1, num_items + 1, (negatives,))
        logits = torch.cat([bias[targets][:, None], bias[sampled][None].expand(rows, -1)], 1)
        loss = F.cross_entropy(logits, torch.zeros(rows, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return bias.detach().double().numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="files")
    parser.add_argument("--protocol", default="uni100_vocab")
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args(argv)
    cfg = load_config(None, [f"data.path={args.data}", f"data.split={args.split}",
                             f"eval.protocol={args.protocol}", "train.device=cpu"])
    data, _ = load_data(cfg)
    device = torch.device("cpu")

    def metrics(scorer):
        result = evaluate_split(scorer, data, data.test, cfg, device, "test")["overall"]
        return f"HR@10 {result['HR@10']:.3f} NDCG@10 {result['NDCG@10']:.4f}"
    print(f"protocol {args.protocol}, test split; MostPop: "
          f"{metrics(popularity_scorer(data.popularity, device))}")
    for optimizer, lr, negatives in SETTINGS:
        t0 = time.time()
        bias = train_bias(data.train.items, data.num_items, optimizer, lr, negatives, args.steps)
        print(f"bias only, {optimizer} lr {lr}, {negatives} uniform negatives, {args.steps} "
              f"steps: {metrics(table_scorer(bias, device))} ({time.time() - t0:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
