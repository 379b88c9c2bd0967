"""Tile sizes and launch settings of the attention kernels: one table, keyed by kernel,
precision, tile width along D and sequence-length bucket.

The defaults are a rule chosen for short sequences (L 50..800) and D 16..128 so that no
variant spills registers on sm_80 / sm_90. Measured choices (bench/tune_tiles.py on a GPU)
go into TUNED and take precedence over the rule for their bucket. kernels.compile_check
enumerates config() over every kernel, precision, D and bucket, so every configuration
dispatch can select is compiled and inspected in CI.

A configuration: BLOCK_M (query rows per tile), BLOCK_N (keys per tile), BLOCK_D (D padded
to a power of two >= 16), num_warps, num_stages, and INTERIOR: whether tiles that lie wholly
inside the valid prefix (and, when causal, wholly below the diagonal) run a variant without
position tests or load masks.
"""
import contextlib

import torch
import triton

from .triton_kernels import TILED_KERNELS

KERNELS = tuple(TILED_KERNELS)
# A length falls into the first bucket whose bound it does not exceed.
LENGTH_BUCKETS = (64, 256, 1024, 2**31)
# (kernel, precision "fp32" | "half", BLOCK_D, length bucket bound) -> settings that replace
# the rule's. Empty until measured: entries come from bench/tune_tiles.py on a GPU.
TUNED = {}


def length_bucket(length):
    """The length bucket (upper bound) a sequence length falls in."""
    return next(bound for bound in LENGTH_BUCKETS if length <= bound)


def block_d(head_dim):
    """The tile width along D: head_dim padded to a power of two, at least 16."""
    return max(16, triton.next_power_of_2(head_dim))


def precision(dtype):
    """The precision key of a dtype in the tile tables."""
    return "fp32" if dtype == torch.float32 else "half"


def rule(kernel, block_d, fp32):
    """The untuned default for one kernel."""
    # fp32 runs exact (IEEE) dots on the FMA units, whose operands live in registers: smaller
    # tiles, shrinking further as D grows.
    if kernel == "forward":  # one [M, N] score tile live, acc [M, D]
        if fp32:
            block_m, block_n = (32, 32) if block_d <= 32 else (16, 16)
        else:
            block_m, block_n = 64, 64 if block_d <= 64 else 32
    elif kernel == "dkdv":  # dk, dv [N, D] accumulators plus s, p, dp, ds [M, N] live
        if fp32:
            block_m, block_n = 16, 16
        else:
            block_m, block_n = 32, 64 if block_d <= 32 else 32
    else:  # "dq": dq [M, D] plus s, p, dp, ds [M, N] live
        if fp32:
            block_m, block_n = (32, 16) if block_d <= 32 else (16, 16)
        else:
            block_m, block_n = 64, 32
    # fp32 tiles are tiny and register-bound: no software pipelining for them.
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4,
            "num_stages": 1 if fp32 else 2, "INTERIOR": True}


def config(kernel, head_dim, dtype, length):
    """The settings of `kernel` ("forward", "dkdv", "dq") for one call."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    width = block_d(head_dim)
    key = (kernel, precision(dtype), width, length_bucket(length))
    settings = dict(rule(kernel, width, dtype == torch.float32))
    settings.update(TUNED.get(key, {}))
    return dict(settings, BLOCK_D=width)


@contextlib.contextmanager
def trying(entries):
    """Use `entries` ({key: settings}, keys as in TUNED) for the calls inside the block (the
    tuning sweep); TUNED is restored afterwards."""
    saved = dict(TUNED)
    TUNED.update(entries)
    try:
        yield
    finally:
        TUNED.clear()
        TUNED.update(saved)
