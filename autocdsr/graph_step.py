"""The training step captured as a CUDA graph and replayed (train.cuda_graph=true).

An AutoCDSR step launches several hundred small kernels; launched one by one from Python, the
GPU waits on the host between them. Captured once, the whole step (forward, both backward
passes, Gram matrix, solver, combine, clip, AdamW) is one graph launch. Capture is possible
because the step never reads a value back to the host (autocdsr.step).

One graph per (solve, batch shapes): a solver step and a lambda-reuse step take different
branches, and a graph holds one set of shapes (training batches have fixed shapes). Inputs
live in static buffers: each call copies the batch, the learning rate and lambda into them
(device-to-device, a few small copies) and replays. Outputs are the graph's static tensors,
overwritten by the next replay: a caller copies what it keeps.

Every batch is applied exactly once. The first `warmup` calls of a key run eagerly on a side
stream (real steps: they create the lazily built state, compile the Triton kernels and warm
cuBLAS, none of which may happen during capture); the next call records the step (capture runs
nothing) and replays it once. Dropout and negative sampling draw from CUDA's graph-safe
generator, so every replay draws fresh numbers.
"""
import torch


def _shapes(batch):
    return tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in batch.items()))


class CapturedStep:
    """Wraps function(batch, lr, lam, solve) -> dict of tensors (TrainStep.run)."""

    def __init__(self, function, warmup=2):
        self.function, self.warmup = function, warmup
        self.eager_calls = {}   # (solve, shapes) -> eager calls so far
        self.graphs = {}        # (solve, shapes) -> (CUDAGraph, static outputs)
        self.inputs = {}        # shapes -> static (batch, lr, lam): shared by both branches
        self.pool = None        # one memory pool for every graph: they never run concurrently
        self.side_stream = None

    @property
    def captured(self):
        return len(self.graphs)

    def __call__(self, batch, lr, lam, solve):
        shapes = _shapes(batch)
        key = (solve, shapes)
        if key not in self.graphs:
            if self.eager_calls.get(key, 0) < self.warmup:
                self.eager_calls[key] = self.eager_calls.get(key, 0) + 1
                return self._on_side_stream(batch, lr, lam, solve)
            self._capture(key, batch, lr, lam)
        self._fill(shapes, batch, lr, lam)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _fill(self, shapes, batch, lr, lam):
        static_batch, static_lr, static_lam = self.inputs[shapes]
        for name, value in batch.items():
            static_batch[name].copy_(value, non_blocking=True)
        static_lr.copy_(lr)
        static_lam.copy_(lam)

    def _on_side_stream(self, batch, lr, lam, solve):
        if self.side_stream is None:
            self.side_stream = torch.cuda.Stream()
        main = torch.cuda.current_stream()
        self.side_stream.wait_stream(main)
        with torch.cuda.stream(self.side_stream):
            out = self.function(batch, lr, lam, solve)
        main.wait_stream(self.side_stream)
        return out

    def _capture(self, key, batch, lr, lam):
        solve, shapes = key
        if shapes not in self.inputs:
            self.inputs[shapes] = ({k: v.clone() for k, v in batch.items()}, lr.clone(),
                                   lam.clone())
        static_batch, static_lr, static_lam = self.inputs[shapes]
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()  # once per key: the eager warm-up steps are done
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.function(static_batch, static_lr, static_lam, solve)
        except RuntimeError as err:
            raise RuntimeError(f"capturing the training step as a CUDA graph failed ({err}); "
                               "train with train.cuda_graph=false") from err
        self.graphs[key] = (graph, out)
