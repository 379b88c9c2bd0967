"""Ahead-of-time compile of every kernel variant dispatch can select (every kernel, precision,
head dim and length bucket of kernels.attention.tiles), for sm_80 / sm_90,
without a GPU: reports shared memory (from Triton's metadata) and registers / spilled bytes
(from the cubin Triton built, via cuobjdump -res-usage). Run as
`python -m kernels.compile_check --arch 80 90`.

Must run without TRITON_INTERPRET (the interpreter replaces the jitted kernels).
"""
import argparse
import concurrent.futures
import functools
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .attention import PREPROCESS_KERNEL, TILED_KERNELS, kernel_flags, tiles

# Opt-in shared memory per block (bytes) by compute capability.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _signature(kernel, pointer_types, constexprs):
    """Pointers get the given element types, other runtime args i32 (fp32 for the scales)."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = "*" + pointer_types[name]
        elif "scale" in name:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def pointer_types(dtype):
    """The kernels' pointer arguments -> element type, for inputs of `dtype`."""
    tensors = dict.fromkeys(("Q", "K", "V", "OUT", "DOUT", "DK", "DV", "DQ"), TRITON_DTYPE[dtype])
    tensors.update(dict.fromkeys(("LSE", "MASS", "DMASS", "DELTA"), "fp32"))
    tensors.update({"DOM": "i32", "SEQ_LENS": "i32"})
    return tensors


def _per_bucket(name, settings_of):
    """(name, settings) once per distinct configuration over the length buckets: the first
    bucket's under `name`, any other under name + "/L<=bound" (a TUNED entry)."""
    seen = []
    for bound in tiles.LENGTH_BUCKETS:
        settings = settings_of(bound)
        if settings in seen:
            continue
        seen.append(settings)
        yield (name if len(seen) == 1 else f"{name}/L<={bound}"), settings


def variants():
    """Yield (name, kernel, pointer types, constexprs, num_warps, num_stages)."""
    for dtype, head_dim in itertools.product(DTYPES, HEAD_DIMS):
        t = TRITON_DTYPE[dtype]
        tensors = pointer_types(dtype)
        for has_dout in (True, False):
            def preprocess(bound, head_dim=head_dim, dtype=dtype, has_dout=has_dout):
                cfg = tiles.config("dq", head_dim, dtype, bound)  # it runs on dq's rows, warps
                return {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_D": cfg["BLOCK_D"],
                        "EVEN_D": cfg["BLOCK_D"] == head_dim, "HAS_DOUT": has_dout,
                        "num_warps": cfg["num_warps"]}
            base = f"preprocess/{t}/d{head_dim}" + ("" if has_dout else "/no-dout")
            for name, constexprs in _per_bucket(base, preprocess):
                constexprs = dict(constexprs)
                warps = constexprs.pop("num_warps")
                yield name, PREPROCESS_KERNEL, tensors, constexprs, warps, 1
        for causal, bottleneck in itertools.product((False, True), (False, True)):
            mode = ("causal" if causal else "bidir") + ("+ib" if bottleneck else "")
            for label, kernel in TILED_KERNELS.items():
                # the backward kernels also come without dO (a loss of the mass alone)
                for has_dout in ((True,) if label == "forward" else (True, False)):
                    base = f"{label}/{t}/d{head_dim}/{mode}" + ("" if has_dout else "/no-dout")
                    flags_of = functools.partial(kernel_flags, label, head_dim, dtype,
                                                 causal, bottleneck, has_dout=has_dout)
                    for name, flags in _per_bucket(base, flags_of):
                        flags = dict(flags)
                        warps, stages = flags.pop("num_warps"), flags.pop("num_stages")
                        yield name, kernel, tensors, flags, warps, stages


def resource_usage(cubin):
    """Registers and local-memory bytes per thread of the cubin Triton itself built (with its
    own ptxas invocation), read with the bundled cuobjdump. Local memory here means register
    spills (the kernels declare no local arrays)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {proc.stderr[-2000:]}")
    usage = proc.stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spills = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    return registers, spills


def _divisibility(kernel, tensors):
    """What Triton's runtime specialisation sees for typical inputs: 16-byte aligned pointers,
    row/head/batch strides and head_dim multiples of 16 (D in 16, 32, 64, 128). The sequence
    length, head count and domain-row stride are left unhinted (odd L is common)."""
    hinted = {i for i, name in enumerate(kernel.arg_names)
              if name in tensors or name == "head_dim"
              or (name.startswith("stride_") and name != "stride_db")}
    return {(i,): [["tt.divisibility", 16]] for i in sorted(hinted)}


def compile_variant(kernel, tensors, constexprs, warps, stages, arch):
    """Compile one kernel variant ahead of time; its shared memory, registers and spills."""
    src = ASTSource(fn=kernel, signature=_signature(kernel, tensors, constexprs),
                    constexprs=constexprs, attrs=_divisibility(kernel, tensors))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    registers, spills = resource_usage(compiled.asm["cubin"])
    return {"shared_bytes": compiled.metadata.shared, "registers": registers,
            "spill_bytes": spills}


def _check_one(job):
    arch, index = job
    name, kernel, tensors, constexprs, warps, stages = list(variants())[index]
    row = {"arch": arch, "variant": name, "num_warps": warps, "num_stages": stages}
    row.update(compile_variant(kernel, tensors, constexprs, warps, stages, arch))
    row["shared_limit"] = SHARED_MEMORY_LIMIT[arch]
    row["ok"] = row["shared_bytes"] <= row["shared_limit"] and row["spill_bytes"] == 0
    return row


def check(arches, name_filter="", workers=None):
    """Compile the selected variants for each arch in a process pool; return one row each."""
    jobs = [(arch, i) for arch in arches for i, v in enumerate(variants()) if name_filter in v[0]]
    workers = workers or os.cpu_count() or 1
    rows = []
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        for row in pool.map(_check_one, jobs):
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main(argv=None):
    """Compile every variant for the given architectures and print / write the report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--filter", default="", help="only variants whose name contains this")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    rows = check(args.arch, args.filter)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows)} variants compiled, {len(bad)} over the shared-memory limit or spilling")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
