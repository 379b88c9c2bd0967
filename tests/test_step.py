"""The training step: AdamW written out on the device matches torch.optim.AdamW and skips
non-finite steps exactly; the whole step (forward, both backward passes, solver, combine,
clip, skip, optimizer) traces as one graph with torch.compile(fullgraph=True) and matches
eager. A graph break is where a host read would be, so this is the CPU proof that the step
has no host synchronisation."""
import copy

import numpy as np
import pytest
import torch

from autocdsr.config import ModelConfig, TrainConfig
from autocdsr.data.batches import bert4rec_train_batch, sasrec_train_batch
from autocdsr.data.dataset import build_leave_one_out
from autocdsr.data.synthetic import generate
from autocdsr.models import Recommender
from autocdsr.optim import adamw_update, make_optimizer
from autocdsr.step import TrainStep, compile_step
from kernels.attention import triton_available

from .step_checks import run_without_host_sync


def test_adamw_update_matches_torch_and_skips_exactly():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)]
    ours = [p.clone() for p in params]
    reference = [torch.nn.Parameter(p.clone()) for p in params]
    optimizer = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.1)
    state = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p)) for p in ours]
    steps = [torch.zeros(()) for _ in ours]
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        keep = torch.tensor(0.0 if step == 2 else 1.0)
        before = [p.clone() for p in ours] + [s["m"].clone() for s in state]
        adamw_update(ours, grads, [s["m"] for s in state], [s["v"] for s in state], steps,
                     torch.tensor(1e-2), betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                     keep=keep)
        if step == 2:  # skipped: parameters, moments and the step count unchanged
            after = ours + [s["m"] for s in state]
            assert all(torch.equal(a, b) for a, b in zip(before, after))
            assert steps[0].item() == 2
            continue
        for p, g in zip(reference, grads):
            p.grad = g
        optimizer.step()
        for a, b in zip(ours, reference):
            assert torch.allclose(a, b.detach(), atol=1e-6, rtol=1e-6)


CASES = {
    "sasrec/base": ("sasrec", "base", 0),
    "sasrec/autocdsr": ("sasrec", "autocdsr", 0),
    "bert4rec/autocdsr": ("bert4rec", "autocdsr", 0),
    "bert4rec/autocdsr_plus": ("bert4rec", "autocdsr_plus", 2),
}


def _setup(arch, objective, bottleneck, backend="sdpa", batch_size=6, max_len=12, seed=0):
    data = build_leave_one_out(generate(40, min_len=10, max_len=20, seed=seed), "s")
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, hidden=32, heads=2, layers=2, dropout=0.0,
                      bottleneck_tokens=bottleneck)
    model = Recommender(cfg, data.num_items, data.num_domains, max_len, backend=backend)
    return model, _train_batch(arch, data, model, np.arange(batch_size), max_len, seed)


def _train_batch(arch, data, model, rows, max_len, seed):
    if arch == "sasrec":
        return sasrec_train_batch(data.train, rows, max_len)
    return bert4rec_train_batch(data.train, rows, max_len, model.tokens, 0.3,
                                np.random.default_rng(seed))


def _one_step(model, batch, objective, compile, backend="aot_eager"):
    """Two steps of the same function (written-out AdamW), eager or compiled."""
    optimizer = make_optimizer(model, TrainConfig(lr=1e-2), fused=False)
    step = TrainStep(model, optimizer, loss="full", objective=objective, compile=compile)
    if compile:  # the graph-break check without inductor's C++ build: AOT autograd, eager ops
        step.function = compile_step(step.run, backend=backend)
    out = [step(batch) for _ in range(2)]
    return out, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("case", list(CASES))
def test_whole_step_compiles_fullgraph_and_matches_eager(case):
    arch, objective, bottleneck = CASES[case]
    model, batch = _setup(arch, objective, bottleneck)
    twin = copy.deepcopy(model)
    eager_out, eager_params = _one_step(model, batch, objective, compile=False)
    compiled_out, compiled_params = _one_step(twin, batch, objective, compile=True)
    for a, b in zip(eager_out, compiled_out):
        for key in ("train_loss", "cd_mass", "lambda", "cosine", "skipped"):
            assert torch.allclose(a[key], b[key], atol=1e-5), key
    if objective != "base":
        assert eager_out[1]["lambda"].item() != 0.0
    for a, b in zip(eager_params, compiled_params):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.skipif(not triton_available(torch.device("cpu")), reason="needs TRITON_INTERPRET=1")
def test_step_with_the_fused_kernels_compiles_fullgraph():
    """The fused op is a registered custom op: Dynamo traces the whole step through it. (The
    interpreter's kernels cannot be traced further by AOT autograd; on CUDA Inductor sees
    them: backend "eager" here, the graph capture alone.)"""
    model, batch = _setup("bert4rec", "autocdsr", 0, backend="triton", batch_size=2, max_len=8)
    twin = copy.deepcopy(model)
    eager_out, eager_params = _one_step(model, batch, "autocdsr", compile=False)
    compiled_out, compiled_params = _one_step(twin, batch, "autocdsr", compile=True,
                                              backend="eager")
    assert torch.allclose(eager_out[1]["lambda"], compiled_out[1]["lambda"], atol=1e-5)
    for a, b in zip(eager_params, compiled_params):
        assert torch.allclose(a, b, atol=1e-5)


def test_eager_step_skips_a_non_finite_step_exactly():
    model, batch = _setup("sasrec", "autocdsr", 0)
    step = TrainStep(model, make_optimizer(model, TrainConfig()), objective="autocdsr")
    step(batch)
    before = copy.deepcopy((model.state_dict(), step.optimizer.state_dict()))
    batch["target_weight"] = batch["target_weight"] * float("nan")
    out = step(batch)
    assert out["skipped"].item() == 1.0 and step.skipped.item() == 1
    assert torch.isnan(out["train_loss"]) and set(out) >= {"cd_mass", "lambda", "cosine"}
    after = (model.state_dict(), step.optimizer.state_dict())
    for key, value in before[0].items():
        assert torch.equal(value, after[0][key])
    for p, state in before[1]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, after[1]["state"][p][key]), key


@pytest.mark.parametrize("arch", ["sasrec", "bert4rec"])
@pytest.mark.parametrize("objective, solve", [("base", False), ("autocdsr", False),
                                              ("autocdsr", True)])
def test_table_gradient_from_its_two_reads_equals_autograds_dense_one(arch, objective, solve):
    """The item table's gradient assembled from the head's rows and the lookup (index_add;
    g_cd at the [B, L, H] lookup) equals autograd's dense table gradient, for the base step,
    a step reusing lambda and a solver step (then lambda must agree too); with an item bias,
    and for BERT4Rec, whose head reads all rows but the mask token's."""
    model, batch = _setup(arch, objective, 0)
    model.item_bias = torch.nn.Parameter(torch.randn(model.num_items + 1) * 0.1)
    step = TrainStep(model, make_optimizer(model, TrainConfig(), fused=False),
                     objective=objective)
    assert not step.table_in_gram
    lam = torch.tensor(0.3)
    sparse, _, _, out_sparse = step.gradients(batch, lam, solve)
    step.table_in_gram = True  # autograd's dense table gradient (same Gram set otherwise)
    dense, _, _, out_dense = step.gradients(batch, lam, solve)
    if solve:
        assert out_sparse["lam"].item() != 0.0
        assert torch.allclose(out_sparse["lam"], out_dense["lam"], atol=1e-6)
    assert sparse[step.table_index].abs().sum() > 0
    for a, b in zip(sparse, dense):
        assert torch.allclose(a, b, atol=1e-6)


def _gpu_case(case):
    arch, objective, bottleneck = CASES[case]
    model, batch = _setup(arch, objective, bottleneck, backend="triton", batch_size=8,
                          max_len=16)
    return model.cuda(), {k: v.cuda() for k, v in batch.items()}, objective


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_whole_step_runs_without_host_sync_on_gpu(case):
    """The complete step (fused eager AdamW) under set_sync_debug_mode("error")."""
    model, batch, objective = _gpu_case(case)
    step = TrainStep(model, make_optimizer(model, TrainConfig()), objective=objective,
                     amp_dtype=torch.bfloat16)
    out = run_without_host_sync(step, batch)
    assert torch.isfinite(out["train_loss"])


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["sasrec/autocdsr", "bert4rec/autocdsr_plus"])
def test_inductor_compiled_step_matches_eager_on_gpu(case):
    """train.compile=true on CUDA: Inductor compiles the whole step, fused kernels included."""
    model, batch, objective = _gpu_case(case)
    twin = copy.deepcopy(model)
    outs = []
    for m, compile in ((model, False), (twin, True)):
        step = TrainStep(m, make_optimizer(m, TrainConfig(), fused=False), objective=objective,
                         compile=compile)
        outs.append([step(batch) for _ in range(3)])
    for a, b in zip(*outs):
        assert torch.allclose(a["lambda"], b["lambda"], atol=1e-4)
        assert torch.allclose(a["train_loss"], b["train_loss"], atol=1e-4)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-4)


def test_graph_captured_step_is_refused_without_cuda():
    model, _ = _setup("sasrec", "autocdsr", 0)
    with pytest.raises(ValueError, match="CUDA"):
        TrainStep(model, make_optimizer(model, TrainConfig(), fused=False),
                  objective="autocdsr", cuda_graph=True)


def _batches(case, count, batch_size=8, max_len=16):
    """`count` different GPU batches of one shape and one vocabulary (the users and the
    masking change; the data and the model's token ids are those of _gpu_case)."""
    arch, objective, bottleneck = CASES[case]
    data = build_leave_one_out(generate(40, min_len=10, max_len=20, seed=0), "s")
    model, _ = _setup(arch, objective, bottleneck, batch_size=batch_size, max_len=max_len)
    out = []
    for i in range(count):
        rows = (np.arange(batch_size) + i * batch_size) % len(data.train)
        batch = _train_batch(arch, data, model, rows, max_len, seed=i)
        out.append({k: v.cuda() for k, v in batch.items()})
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_graph_replay_equals_eager_on_gpu(case):
    """train.cuda_graph=true: ten steps with every=2 (both branches warm up, get captured and
    replay with new batches) give the eager step's lambdas, losses and weights."""
    model, _, objective = _gpu_case(case)
    twin = copy.deepcopy(model)
    batches = _batches(case, 10)
    runs = []
    for m, graph in ((model, False), (twin, True)):
        step = TrainStep(m, make_optimizer(m, TrainConfig(), fused=False), objective=objective,
                         every=2, cuda_graph=graph)
        runs.append([{k: v.clone() for k, v in step(b).items()} for b in batches])
        if graph:
            assert step.function.captured == (1 if objective == "base" else 2)
    for a, b in zip(*runs):
        for key in ("train_loss", "cd_mass", "lambda"):
            assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-5), key
    if objective != "base":
        assert runs[1][-1]["lambda"].item() != 0.0
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["sasrec/autocdsr", "bert4rec/autocdsr_plus"])
def test_graph_replay_runs_without_host_sync_on_gpu(case):
    """Replays (the batch copied into the static buffers, bf16 autocast, dropout) never
    synchronise with the host."""
    model, _, objective = _gpu_case(case)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    batches = _batches(case, 3)
    step = TrainStep(model, make_optimizer(model, TrainConfig(), fused=False),
                     objective=objective, amp_dtype=torch.bfloat16, cuda_graph=True)
    for batch in batches:  # warm-up and capture
        step(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [{k: v.clone() for k, v in step(b).items()} for b in batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step.function.captured == 1
    assert all(torch.isfinite(o["train_loss"]) for o in outs)
    assert outs[0]["train_loss"].item() != outs[1]["train_loss"].item()  # the new batch was used


def test_compiler_settings_hold_only_while_the_compiled_step_runs():
    import torch._inductor.config as inductor_config
    seen = {}

    def probe(x):
        seen["trace"] = torch._dynamo.config.trace_autograd_ops
        return x * 2

    before = (torch._dynamo.config.trace_autograd_ops, inductor_config.fallback_random)
    assert compile_step(probe, backend="eager")(torch.ones(2)).sum().item() == 4.0
    assert seen["trace"] is True  # set while tracing
    assert (torch._dynamo.config.trace_autograd_ops, inductor_config.fallback_random) == before
