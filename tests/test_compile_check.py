"""Every kernel variant dispatch can select compiles ahead of time for sm_80 and sm_90 (no GPU
needed), fits the shared memory and does not spill registers."""
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import tune_tiles
from kernels import compile_check
from kernels.attention import tiles


def test_dispatch_only_selects_compiled_tile_widths():
    """Any head dim in 16..128 maps onto one of the four compiled BLOCK_D values."""
    for head_dim in range(16, 129):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for kernel in tiles.KERNELS:
                for length in (1, 50, 800, 5000):
                    cfg = tiles.config(kernel, head_dim, dtype, length)
                    assert cfg["BLOCK_D"] in (16, 32, 64, 128)


def test_a_tuned_length_bucket_is_compiled_too():
    """A measured entry for one length bucket adds that bucket's variants to the compile check
    (beside the rule's), and dispatch uses it for lengths in that bucket only."""
    key = ("forward", "half", 32, 1024)
    with tiles.trying({key: {"BLOCK_M": 128, "num_warps": 8}}):
        names = [v[0] for v in compile_check.variants()]
        assert tiles.config("forward", 32, torch.bfloat16, 800)["BLOCK_M"] == 128
        assert tiles.config("forward", 32, torch.bfloat16, 200)["BLOCK_M"] == 64
        assert tiles.config("forward", 32, torch.float32, 800)["BLOCK_M"] == 32
    assert "forward/bf16/d32/bidir/L<=1024" in names and "forward/bf16/d32/bidir" in names
    assert "forward/bf16/d16/bidir/L<=1024" not in names and "dq/bf16/d32/bidir/L<=1024" not in names
    assert not tiles.TUNED  # restored
    assert tiles.config("forward", 32, torch.bfloat16, 800)["BLOCK_M"] == 64


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--arch", "80", "90",
                           "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=1500)
    assert out.exists(), proc.stderr[-3000:]
    return json.loads(out.read_text()), proc


def test_every_variant_is_compiled(compiled):
    rows, _ = compiled
    names = {(r["arch"], r["variant"]) for r in rows}
    expected = set()
    for arch, dtype, d in itertools.product((80, 90), ("fp32", "fp16", "bf16"), (16, 32, 64, 128)):
        expected |= {(arch, f"preprocess/{dtype}/d{d}"), (arch, f"preprocess/{dtype}/d{d}/no-dout")}
        for kernel, mode in itertools.product(("forward", "dkdv", "dq"),
                                              ("bidir", "bidir+ib", "causal", "causal+ib")):
            expected.add((arch, f"{kernel}/{dtype}/d{d}/{mode}"))
            if kernel != "forward":  # the backward's variant for a loss of the mass alone
                expected.add((arch, f"{kernel}/{dtype}/d{d}/{mode}/no-dout"))
    assert names == expected and len(names) == 2 * 264


def test_fits_shared_memory_and_does_not_spill(compiled):
    rows, proc = compiled
    bad = [r for r in rows if r["shared_bytes"] > r["shared_limit"] or r["spill_bytes"] > 0]
    assert not bad, bad
    assert proc.returncode == 0, proc.stdout


def test_batch_offsets_are_computed_in_int64():
    """b * stride_b passes 2^31 elements for large tensors: every kernel extends its batch
    strides to int64 before the multiply (checked in the Triton IR of an sm_90 build)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import triton, re\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from kernels import compile_check as cc\n"
        "seen = set()\n"
        "for name, kernel, tensors, constexprs, warps, stages in cc.variants():\n"
        "    label = name.split('/')[0]\n"
        "    if label in seen or '/bf16/d32/' not in name + '/':\n"
        "        continue\n"
        "    seen.add(label)\n"
        "    src = ASTSource(fn=kernel, signature=cc._signature(kernel, tensors, constexprs),\n"
        "                    constexprs=constexprs, attrs=cc._divisibility(kernel, tensors))\n"
        "    ir = triton.compile(src, target=GPUTarget('cuda', 90, 32),\n"
        "                        options={'num_warps': warps, 'num_stages': stages}).asm['ttir']\n"
        "    strides = [a for a in kernel.arg_names if a.startswith('stride_') and a.endswith('b')]\n"
        "    wide = [a for a in strides if re.search(r'arith.extsi %' + a + r' : i32 to i64', ir)]\n"
        "    print(label, len(strides), len(wide))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert {r[0] for r in rows} == {"preprocess", "forward", "dkdv", "dq"}
    for label, strides, wide in rows:
        assert int(strides) > 0 and wide == strides, label


def test_tile_sweep_candidates_compile_without_spilling():
    """Every candidate the GPU tile sweep would time compiles for sm_90 and does not spill
    (so the sweep never times a configuration that is slow for a reason it cannot show)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.tune_tiles", "--aot", "90", "--dtype",
                           "bf16", "--head-dims", "32", "--modes", "bidir"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == sum(len(options) for options in tune_tiles.CANDIDATES.values())
    assert all(r["registers"] > 0 and r["spill_bytes"] == 0 for r in rows), rows
