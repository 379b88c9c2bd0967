"""Data parallelism on 2 CPU processes (gloo): the balanced step's combined gradient on every
rank equals the single-process gradient over the union batch, lambda is the same on every rank
and equals the single-process one; torchrun training reproduces a single-process run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autocdsr.config import ModelConfig, TrainConfig
from autocdsr.data.batches import (bert4rec_train_batch, held_out_batch, sasrec_train_batch,
                                   shard_batch)
from autocdsr.data.dataset import build_leave_one_out
from autocdsr.data.synthetic import generate
from autocdsr.distributed import Comm
from autocdsr.models import Recommender
from autocdsr.optim import make_optimizer
from autocdsr.step import TrainStep

WORLD = 2


def _case(arch, objective):
    data = build_leave_one_out(generate(60, min_len=10, max_len=24, seed=0), "s")
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, hidden=32, heads=2, layers=2, dropout=0.0,
                      bottleneck_tokens=2 if objective == "autocdsr_plus" else 0)
    model = Recommender(cfg, data.num_items, data.num_domains, 16, backend="sdpa")
    rows = np.arange(8)
    if arch == "sasrec":
        batch = sasrec_train_batch(data.train, rows, 16)
    else:
        batch = bert4rec_train_batch(data.train, rows, 16, model.tokens, 0.3,
                                     np.random.default_rng(0))
    if objective.endswith("held_out"):  # validation rows ride along, sharded like the rest
        batch.update(held_out_batch(data.valid, np.arange(3, 13), 16, arch, model.tokens))
    return model, batch


VARIANTS = {"autocdsr/per_domain": dict(per_domain=True, layers=[0], gate=True),
            "autocdsr/held_out": dict(per_domain=True, held_out=True)}


def _gradients(model, batch, objective, comm=None):
    step = TrainStep(model, make_optimizer(model, TrainConfig()), loss="full",
                     objective="base" if objective == "base" else "autocdsr", comm=comm,
                     **VARIANTS.get(objective, {}))
    if step.held_out:
        batch = {**batch, "gate_running": step.cosine + 0.01}  # a running cosine from before
    grads, _, _, out = step.gradients(batch, step.lam, solve=True)
    return [g.detach().clone() for g in grads], out


def _worker(rank, path, arch, objective, results):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    try:
        model, batch = _case(arch, objective)
        comm = Comm(rank, WORLD)
        grads, out = _gradients(model, shard_batch(batch, rank, WORLD), objective, comm)
        torch.save({"grads": grads, "lam": out["lam"], "loss": out["loss"], "cd": out["cd"],
                    "cosine": out["cosine"], "bytes": comm.bytes}, os.path.join(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("arch,objective", [("sasrec", "autocdsr"), ("bert4rec", "autocdsr"),
                                            ("bert4rec", "autocdsr_plus"), ("sasrec", "base"),
                                            ("sasrec", "autocdsr/per_domain"),
                                            ("bert4rec", "autocdsr/held_out")])
def test_combined_gradient_equals_the_union_batch_gradient(tmp_path, arch, objective):
    mp.spawn(_worker, args=(str(tmp_path / "init"), arch, objective, str(tmp_path)),
             nprocs=WORLD, join=True)
    model, batch = _case(arch, objective)
    single_grads, single = _gradients(model, batch, objective)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for result in ranks:
        assert torch.equal(result["lam"], ranks[0]["lam"])  # the same lambda everywhere
        assert torch.allclose(result["lam"], single["lam"], atol=1e-6)
        assert torch.allclose(result["cosine"], single["cosine"], atol=1e-6)
        assert result["loss"].item() == pytest.approx(single["loss"].item(), rel=1e-6)
        assert result["cd"].item() == pytest.approx(single["cd"].item(), rel=1e-6)
        for got, want in zip(result["grads"], single_grads):
            assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    if objective != "base":
        assert (single["lam"] != 0.0).any()
    if objective in VARIANTS:  # one Gram part per domain, per-domain query counts, losses
        return
    params = sum(p.numel() for p in model.parameters()) * 4
    gram = sum(p.numel() for p in model.gram_parameters()) * 4
    # plain data parallelism sends every gradient once; the balanced step adds 2 x the Gram set
    extra = 0 if objective == "base" else 2 * gram
    assert ranks[0]["bytes"] == params + extra + 4 * (2 + 2 + (0 if objective == "base" else 2))


def _train(tmp_path, name, objective, nproc):
    run_dir = tmp_path / name
    args = ["data.synthetic_users=120", "data.max_len=12", "model.hidden=32", "model.dropout=0",
            "train.batch_size=16", "train.epochs=2", "train.warmup_steps=2",
            "eval.protocol=uni100_vocab", f"objective={objective}", f"run_dir={run_dir}"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "autocdsr", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "autocdsr", "train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("objective", ["base", "autocdsr"])
def test_torchrun_training_reproduces_a_single_process_run(tmp_path, objective):
    one = _train(tmp_path, "one", objective, 1)
    two = _train(tmp_path, "two", objective, 2)
    assert two["world_size"] == 2
    for a, b in zip(one["history"], two["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["cd_mass"] == pytest.approx(a["cd_mass"], rel=1e-4)
        assert b["lambda"] == pytest.approx(a["lambda"], rel=1e-4, abs=1e-6)
    for split in ("valid", "test"):
        for key, value in one[split]["overall"].items():
            assert two[split]["overall"][key] == pytest.approx(value, abs=1e-6), (split, key)


def test_resume_on_another_world_size_is_refused(tmp_path):
    from autocdsr.config import load_config
    from autocdsr.train import Trainer
    cfg = load_config(None, ["data.synthetic_users=40", "data.max_len=8", "model.hidden=32",
                             f"run_dir={tmp_path}"])
    trainer = Trainer(cfg)
    state = trainer.state()
    state["world_size"] = 2
    with pytest.raises(ValueError, match="resume it on as many"):
        trainer.load_state(state)
