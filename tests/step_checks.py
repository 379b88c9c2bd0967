"""Checks several step tests share: a compiled step matches the eager one, and a step runs
without a host synchronisation on a GPU."""
import copy

import torch

from autocdsr.step import compile_step


def assert_compiled_step_matches_eager(model, batch, make_step, steps=2, atol=1e-5):
    """make_step(model, compile) -> TrainStep. The compiled twin is traced whole
    (fullgraph=True) by AOT autograd with eager ops: a graph break, where a host read would
    be, fails it; the graph-break check needs no Inductor C++ build."""
    twin = copy.deepcopy(model)
    eager, compiled = make_step(model, False), make_step(twin, True)
    compiled.function = compile_step(compiled.run, backend="aot_eager")
    for _ in range(steps):
        a, b = eager(batch), compiled(batch)
        assert torch.allclose(a["lambda"], b["lambda"], atol=atol)
    for x, y in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(x, y, atol=atol)


def run_without_host_sync(step, batch):
    """One warm-up call (kernels compiled, constants cached), then a call under CUDA's sync
    debug mode "error"; returns its output."""
    step(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
