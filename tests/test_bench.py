"""The benchmarks run (tiny sizes) so they do not rot; ratios and tables are well formed."""
import math

import pytest

import torch

import kernels
from bench import bench_attention, bench_solver, bench_train, mass_only_backward_cpu


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
    assert {r["objective"] for r in rows} == {"base", "autocdsr", "autocdsr_last", "paper_autocdsr",
                                              "autocdsr_plus", "autocdsr_plus_last"}
    assert all(r["ms_median"] > 0 for r in rows)
    assert all(r["ratio_to_base"] == 1.0 for r in rows if r["objective"] == "base")


def test_solver_benchmark_on_cpu():
    rows = bench_solver.run(torch.device("cpu"), reps=3)
    assert {r["solver"] for r in rows} == {"device", "reference_host"}
    assert all(r["us_median"] > 0 for r in rows)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_providers_compute_the_reference_attention_and_mass():
    """The FlexAttention mask closures (uncompiled, on the CPU) give the reference output and
    mass in every mode, with the masks built once or per call."""
    flex = bench_attention.flex_preparers(compile=False)
    if not flex:
        pytest.skip("this torch has no FlexAttention")
    for mode, (causal, nb) in bench_attention.MODES.items():
        q, k, v, domains, seq_lens = bench_attention.make_case((2, 2, 32, 16), torch.float32,
                                                               torch.device("cpu"))
        kw = dict(causal=causal, num_bottleneck=nb, seq_lens=seq_lens)
        want_out, want_mass = kernels.reference_attention(q, k, v, domains, **kw)
        valid = domains >= 0  # padded query rows are undefined in FlexAttention's output
        for name in ("flex", "flex_per_batch"):
            out, mass = flex[name](q, k, v, domains, **kw)()
            assert torch.allclose(out.transpose(1, 2)[valid], want_out.transpose(1, 2)[valid],
                                  atol=1e-5), (name, mode)
            assert torch.allclose(mass.transpose(1, 2)[valid], want_mass.transpose(1, 2)[valid],
                                  atol=1e-5), (name, mode)


def test_train_benchmark_times_the_lambda_reuse_steps():
    size = dict(bench_train.QUICK, batch=4, length=12, items=50, steps=2)
    rows = bench_train.run(torch.device("cpu"), size, ["sdpa"], log=lambda _: None,
                           cases=[("bert4rec", "base")] + bench_train.REUSE_CASES)
    assert [r["objective"] for r in rows] == ["base", "autocdsr_reuse", "autocdsr_plus_reuse"]
    assert all(r["ratio_to_base"] > 0 for r in rows)


def test_train_benchmark_rows_name_their_gram_set():
    size = dict(bench_train.QUICK, batch=4, length=12, items=50, steps=1)
    cases = [("bert4rec", "base"), ("bert4rec", "autocdsr"), ("bert4rec", "autocdsr_last"),
             ("bert4rec", "autocdsr_plus_last")]
    rows = bench_train.run(torch.device("cpu"), size, ["sdpa"], log=lambda _: None, cases=cases)
    assert [r["shared"] for r in rows] == ["-", "reached", "last_layer", "last_layer"]
    assert "| last_layer |" in bench_train.markdown(rows, "cpu", size, "full")


@pytest.mark.skipif(not kernels.triton_available(torch.device("cpu")), reason="needs TRITON_INTERPRET=1")
def test_tile_sweep_checks_each_candidate_against_the_rule():
    """The sweep runs every candidate (here under the interpreter, fp32, one short shape),
    compares its outputs with the rule's, and proposes only candidates faster in every row."""
    from bench import tune_tiles
    candidates = {"forward": [{}, {"INTERIOR": False}, {"BLOCK_M": 16, "BLOCK_N": 16}],
                  "dq": [{}, {"BLOCK_M": 16}], "dkdv": [{}, {"BLOCK_N": 32}]}
    rows = tune_tiles.sweep(torch.device("cpu"), torch.float32, [16], [40], ["causal", "bidir"],
                            tokens=80, heads=1, candidates=candidates, log=lambda _: None)
    assert len(rows) == 2 * 7
    assert all(r["error"] is None and r["ms"] > 0 for r in rows), [r["error"] for r in rows]
    assert all(r["ratio_to_rule"] == 1.0 for r in rows if r["candidate"] == {})
    assert not kernels.attention.tiles.TUNED  # every trial restored the table
    # proposals: only a candidate below the rule in every row of its bucket
    fake = [dict(r, ratio_to_rule=0.5 if r["candidate"] == {"BLOCK_M": 16} else 1.0) for r in rows]
    proposed = tune_tiles.proposals(fake)
    assert list(proposed) == [("dq", 16, 64)] and proposed[("dq", 16, 64)][0] == {"BLOCK_M": 16}
    mixed = [dict(r, ratio_to_rule=0.5 if r["candidate"] == {"BLOCK_M": 16} and r["mode"] == "causal"
                  else 1.0) for r in rows]
    assert tune_tiles.proposals(mixed) == {}


def test_tile_sweep_reports_a_candidate_that_computes_something_else(monkeypatch):
    """A candidate whose outputs differ from the rule's is an error row, never a timing."""
    if not kernels.triton_available(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1")
    from bench import tune_tiles
    real = tune_tiles.triton_forward

    def wrong_when_tuned(*args):
        out, lse, mass = real(*args)
        return (out + 1.0, lse, mass) if kernels.attention.tiles.TUNED.get(("forward", "fp32", 16, 64)) \
            else (out, lse, mass)
    monkeypatch.setattr(tune_tiles, "triton_forward", wrong_when_tuned)
    rows = tune_tiles.sweep(torch.device("cpu"), torch.float32, [16], [40], ["bidir"], tokens=80,
                            heads=1, candidates={"forward": [{}, {"BLOCK_M": 16}]},
                            log=lambda _: None)
    assert rows[0]["error"] is None and "differs from the rule" in rows[1]["error"]


def test_mass_only_backward_equals_the_fused_backwards_dq_dk():
    """The mass-only backward (the CPU candidate the benchmark times) gives the fused CPU
    SDPA backward's dQ and dK for a gradient on the mass columns alone, whose dV reads
    nothing but the mass columns' indicator rows."""
    case = mass_only_backward_cpu.make_case(2, 2, 24, 8)
    fused = mass_only_backward_cpu.FLASH_BACKWARD(
        case["grad_out"], case["q"], case["k"], case["v_aug"], case["out"], case["lse"], 0.0,
        False, attn_mask=case["mask"], scale=case["scale"])
    mass_only = mass_only_backward_cpu.mass_only_backward(case, elements=24 * 24)  # 1-row chunks
    for a, b in zip(fused[:2], mass_only):
        assert a.abs().max() > 1e-3 and torch.allclose(a, b, atol=1e-5)
    # dV of a gradient that only the mass columns carry: zero in the value columns
    assert torch.all(fused[2][..., :8] == 0)


def test_objective_study_starts_from_a_recipe_and_rescores_over_negative_draws(tmp_path):
    """--config: the recipe's budget is kept (not the study's 30 epochs); --negative-draws:
    every best checkpoint is scored again over N draws and that table is reported."""
    import json
    import yaml
    from bench import compare_objectives
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "data": {"synthetic_users": 40}, "model": {"hidden": 16, "heads": 1, "layers": 1},
        "train": {"epochs": 2, "patience": 2, "device": "cpu"},
        "eval": {"protocol": "uni100_vocab"}}))
    out = tmp_path / "study"
    compare_objectives.main(["--out", str(out), "--config", str(recipe), "--seeds", "0",
                             "--variants", "sasrec/base", "sasrec/autocdsr", "--no-analysis",
                             "--negative-draws", "3"])
    run = out / "runs" / "sasrec_autocdsr" / "seed0"
    trained = json.loads((run / "metrics.json").read_text())
    assert len(trained["history"]) == 2 and trained.get("negative_draws", 1) == 1
    rescored = json.loads((out / "runs_draws3" / "sasrec_autocdsr" / "seed0" / "metrics.json").read_text())
    assert rescored["negative_draws"] == 3
    summary = (out / "summary.md").read_text()
    assert "over 3 negative draws" in summary and f"the recipe {recipe}" in summary
    assert (out / "sasrec_draws3" / "compare.md").exists()
