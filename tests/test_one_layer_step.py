"""weighting.shared=last_layer: the one-layer Gram set and the single combined backward.
Checked against the two-pass step: the Gram matrix from the partial passes equals the Gram
matrix of the full gradients restricted to those parameters, lambda is the same, and the one
combined backward equals g_rec + lambda g_cd from two full passes; the step traces whole
(no host synchronisation) and is exact under data parallelism."""
import copy
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autocdsr.config import ModelConfig, TrainConfig
from autocdsr.data.batches import bert4rec_train_batch, sasrec_train_batch, shard_batch
from autocdsr.data.dataset import build_leave_one_out
from autocdsr.data.synthetic import generate
from autocdsr.distributed import Comm
from autocdsr.models import Recommender
from autocdsr.optim import make_optimizer
from autocdsr.step import TrainStep
from kernels.pareto import gram_matrix, pareto_lambda

from .step_checks import assert_compiled_step_matches_eager, run_without_host_sync

DATA = build_leave_one_out(generate(40, min_len=10, max_len=20, seed=0), "s")
CASES = {  # arch, objective, layers of the model, weighting variant
    "sasrec": ("sasrec", "autocdsr", 3, {}),
    "sasrec/layers0": ("sasrec", "autocdsr", 3, dict(layers=[0])),
    "sasrec/per_domain": ("sasrec", "autocdsr", 2, dict(per_domain=True)),
    "bert4rec": ("bert4rec", "autocdsr", 2, {}),
    "bert4rec/plus": ("bert4rec", "autocdsr_plus", 4, {}),
    "sasrec/bias/sampled": ("sasrec", "autocdsr", 2, {}),
}


def _setup(case, seed=0):
    arch, objective, layers, variant = CASES[case]
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, hidden=32, heads=2, layers=layers, dropout=0.0,
                      bottleneck_tokens=2 if objective == "autocdsr_plus" else 0,
                      item_bias="zero" if "bias" in case else "none")
    model = Recommender(cfg, DATA.num_items, DATA.num_domains, 16, backend="sdpa")
    if model.item_bias is not None:
        torch.nn.init.normal_(model.item_bias)
    rows = np.arange(8)
    if arch == "sasrec":
        batch = sasrec_train_batch(DATA.train, rows, 16)
    else:
        batch = bert4rec_train_batch(DATA.train, rows, 16, model.tokens, 0.3,
                                     np.random.default_rng(seed))
    return model, batch, variant, "sampled" if "sampled" in case else "full"


def _step(model, shared, variant, loss="full", **kw):
    return TrainStep(model, make_optimizer(model, TrainConfig(), fused=False), loss=loss,
                     objective="autocdsr", shared=shared, num_negatives=30, **variant, **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_one_combined_backward_equals_two_passes_on_the_same_gram_set(case):
    model, batch, variant, loss = _setup(case)
    one = _step(model, "last_layer", variant, loss)
    two = _step(copy.deepcopy(model), "last_layer", variant, loss)
    two.one_layer = False  # the two-pass step over the same (one-layer) Gram set
    two.table_in_gram = True  # and dense g_cd of every parameter
    torch.manual_seed(3)  # the sampled loss draws its negatives: the same in both
    got, _, _, out = one.gradients(batch, None, True)
    torch.manual_seed(3)
    want, _, _, ref = two.gradients(batch, None, True)
    assert (out["lam"] != 0).all()
    assert torch.allclose(out["lam"], ref["lam"], atol=1e-6)
    assert torch.allclose(out["cosine"], ref["cosine"], atol=1e-6)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_the_one_layer_gram_matrix_is_the_full_gradients_restricted_to_it():
    model, batch, variant, _ = _setup("sasrec")
    step = _step(model, "last_layer", variant)
    last = model.mass_layers()[-1]
    expected_set = list(model.encoder.blocks[last].norm1.parameters()) + \
        list(model.encoder.blocks[last].attn.qkv.parameters())
    assert [step.params[i] for i in step.gram_index] == expected_set
    fwd = step.losses(batch)
    params = step.params
    g_rec = torch.autograd.grad(fwd.loss_rec, params, retain_graph=True)
    g_cd = torch.autograd.grad(fwd.loss_cd, params, retain_graph=True, allow_unused=True)
    full = gram_matrix([[g_cd[i] for i in step.gram_index], [g_rec[i] for i in step.gram_index]])
    out = step.gradients(batch, None, True)[3]
    assert torch.allclose(out["cosine"], full[0, 1] / (full[0, 0] * full[1, 1]).sqrt(), atol=1e-6)
    lam, _ = pareto_lambda(full, torch.stack([fwd.loss_cd.detach(), fwd.loss_rec.detach()]))
    assert torch.allclose(out["lam"], lam, atol=1e-6)


@pytest.mark.parametrize("case", ["sasrec", "sasrec/per_domain", "bert4rec/plus"])
def test_one_layer_step_compiles_fullgraph_and_matches_eager(case):
    model, batch, variant, _ = _setup(case)
    assert_compiled_step_matches_eager(
        model, batch, lambda m, compile: _step(m, "last_layer", variant, compile=compile))


def _worker(rank, path, results):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        model, batch, variant, _ = _setup("sasrec/per_domain")
        step = _step(model, "last_layer", variant, comm=Comm(rank, 2))
        grads, _, _, out = step.gradients(shard_batch(batch, rank, 2), step.lam, True)
        torch.save({"grads": grads, "lam": out["lam"]}, os.path.join(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_one_layer_step_under_data_parallelism_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model, batch, variant, _ = _setup("sasrec/per_domain")
    grads, _, _, single = _step(model, "last_layer", variant).gradients(batch, None, True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(result["lam"], single["lam"], atol=1e-6)
        for got, want in zip(result["grads"], grads):
            assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["sasrec", "sasrec/per_domain", "bert4rec/plus"])
def test_one_layer_step_on_gpu_is_sync_free_and_replays_as_a_graph(case):
    """The last_layer step with the fused kernels: no host sync (sync debug mode "error"), and
    graph replay (every=2: both branches captured) equals the eager step."""
    model, batch, variant, _ = _setup(case)
    model.encoder.blocks.apply(lambda m: setattr(m, "backend", "triton")
                               if hasattr(m, "backend") else None)
    model = model.cuda()
    batch = {k: v.cuda() for k, v in batch.items()}
    step = _step(model, "last_layer", variant, amp_dtype=torch.bfloat16)
    assert torch.isfinite(run_without_host_sync(step, batch)["train_loss"])
    eager, graph = copy.deepcopy(model), copy.deepcopy(model)
    runs = []
    for m, captured in ((eager, False), (graph, True)):
        s = _step(m, "last_layer", dict(variant, every=2), cuda_graph=captured)
        runs.append([{k: v.clone() for k, v in s(batch).items()} for _ in range(6)])
    for a, b in zip(*runs):
        assert torch.allclose(a["lambda"], b["lambda"], atol=1e-5, rtol=1e-5)
        assert torch.allclose(a["train_loss"], b["train_loss"], atol=1e-5, rtol=1e-5)
    for a, b in zip(eager.parameters(), graph.parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
