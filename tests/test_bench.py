"""The benchmarks run (tiny sizes) so they do not rot; ratios and tables are well formed."""
import math

import torch

from bench import bench_attention, bench_solver, bench_train


def test_attention_suite_on_cpu():
    rows = bench_attention.run_suite(torch.device("cpu"), [(2, 1, 20, 16)], ["fp32"],
                                     ["causal", "bottleneck"],
                                     ["triton", "sdpa_mass", "reference", "sdpa_plain"],
                                     log=lambda _: None)
    assert {r["provider"] for r in rows} >= {"sdpa_mass", "reference", "sdpa_plain"}
    assert all(not math.isnan(r["ms_median"]) and r["error"] is None for r in rows)
    fused = [r for r in rows if r["provider"] == "triton"]
    if fused:  # under TRITON_INTERPRET=1 the fused kernels are measured too
        assert all(r["ratio_to_triton"] == 1.0 for r in fused)
    table = bench_attention.markdown(rows, "test")
    assert table.count("\n") == len(rows) + 3


def test_train_benchmark_on_cpu():
    size = dict(bench_train.QUICK, batch=4, length=12, items=50, steps=2)
    rows = bench_train.run(torch.device("cpu"), size, ["sdpa"], log=lambda _: None)
    assert {r["objective"] for r in rows} == {"base", "autocdsr", "paper_autocdsr", "autocdsr_plus"}
    assert all(r["ms_median"] > 0 for r in rows)
    assert all(r["ratio_to_base"] == 1.0 for r in rows if r["objective"] == "base")


def test_solver_benchmark_on_cpu():
    rows = bench_solver.run(torch.device("cpu"), reps=3)
    assert {r["solver"] for r in rows} == {"device", "reference_host"}
    assert all(r["us_median"] > 0 for r in rows)
