"""Every kernel variant dispatch can select compiles ahead of time for sm_80 and sm_90 (no GPU
needed), fits the shared memory and does not spill registers."""
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from kernels import attention


def test_dispatch_only_selects_compiled_tile_widths():
    """Any head dim in 16..128 maps onto one of the four compiled BLOCK_D values."""
    for head_dim in range(16, 129):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for kernel in ("forward", "dkdv", "dq"):
                assert attention.block_config(kernel, head_dim, dtype)["BLOCK_D"] in (16, 32, 64, 128)


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
        expected.add((arch, f"preprocess/{dtype}/d{d}"))
        for kernel, mode in itertools.product(("forward", "dkdv", "dq"),
                                              ("bidir", "bidir+ib", "causal", "causal+ib")):
            expected.add((arch, f"{kernel}/{dtype}/d{d}/{mode}"))
    assert names == expected


def test_fits_shared_memory_and_does_not_spill(compiled):
    rows, proc = compiled
    bad = [r for r in rows if r["shared_bytes"] > r["shared_limit"] or r["spill_bytes"] > 0]
    assert not bad, bad
    assert proc.returncode == 0, proc.stdout
