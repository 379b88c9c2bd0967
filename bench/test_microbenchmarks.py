"""The microbenchmarks as a pytest-benchmark suite, providers side by side per group:

    python -m pytest bench --benchmark-only --benchmark-json=bench/results/DIR/micro.json
    python -m pytest bench --benchmark-only --benchmark-compare   # against a saved run

The default test run (testpaths = tests) does not collect this folder. Sizes follow the
device: CPU-sized without CUDA, the headline shapes with it.
"""
import pytest
import torch

from bench import bench_attention, bench_solver, bench_train

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
SHAPES = bench_attention.HEADLINE_SHAPES[:2] if CUDA else [(16, 2, 50, 32), (4, 2, 200, 32)]
DTYPE = torch.bfloat16 if CUDA else torch.float32
PROVIDERS = ["triton", "sdpa_mass", "reference", "sdpa_plain"] if CUDA else \
    ["sdpa_mass", "reference", "sdpa_plain"]
STEP_SIZE = bench_train.FULL if CUDA else dict(bench_train.QUICK, batch=32, length=50)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _bench(benchmark, fn):
    fn()  # compile / warm up outside the measurement
    _sync()
    benchmark.pedantic(lambda: (fn(), _sync()), rounds=10 if CUDA else 5, warmup_rounds=1)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["causal", "bidir"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_fwd_bwd(benchmark, shape, mode, provider):
    benchmark.group = f"attention fwd+bwd {shape} {mode}"
    fn = bench_attention.providers(DEVICE, [provider])[provider]
    _bench(benchmark, bench_attention.make_call(fn, shape, DTYPE, mode, DEVICE, backward=True))


@pytest.mark.parametrize("solver", ["device", "reference_host"])
def test_gram_and_solver(benchmark, solver):
    benchmark.group = "Gram matrix + Pareto solver"
    _bench(benchmark, bench_solver.solver_calls(DEVICE)[solver])


@pytest.mark.parametrize("objective", ["base", "autocdsr", "autocdsr_plus"])
@pytest.mark.parametrize("arch", ["sasrec", "bert4rec"])
def test_training_step(benchmark, arch, objective):
    if objective == "autocdsr_plus" and arch == "sasrec":
        pytest.skip("AutoCDSR+ needs the bidirectional backbone")
    benchmark.group = f"training step {arch}"
    _bench(benchmark, bench_train.case_step(arch, objective, STEP_SIZE, DEVICE,
                                            "triton" if CUDA else "sdpa"))
