"""The fused kernels as torch.library ops with their autograd, in two layouts from one factory:
plain (q, k, v as [B, H, L, D] tensors) and packed (the QKV projection's output as it is,
[B, L, 3, H, D], whose gradient the backward kernels write straight into one buffer of that
layout, so autograd neither stacks three gradients nor copies them back).

Registered with triton_op + wrap_triton, so torch.compile traces through them without a graph
break and, on CUDA, Inductor sees the Triton kernels. The fake implementations give output
shapes without running anything (they also let Dynamo trace the ops under TRITON_INTERPRET=1,
where the kernels are not compiled objects).
"""
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.library import triton_op

from .launch import prepare, triton_backward, triton_forward

Tensor = torch.Tensor


def unpack_qkv(qkv):
    """[B, L, 3, H, D] -> q, k, v as [B, H, L, D] views (no copy). unbind, not three
    index views: its backward stacks the three gradients into one new tensor, where each
    index view's backward would zero-fill a whole [B, L, 3, H, D] tensor of its own."""
    return tuple(t.transpose(1, 2) for t in qkv.unbind(2))


def _new_qkv_gradients(q, k, v):
    grads = tuple(torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    return grads, grads  # contiguous, whatever the inputs' layout (autograd accepts that)


def _new_packed_gradient(qkv):
    d_qkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    return d_qkv, unpack_qkv(d_qkv)


@dataclass(frozen=True)
class Layout:
    """How an op's leading tensor arguments carry q, k, v and take their gradient back."""
    name: str                  # the ops are autocdsr::cross_domain_attention{name}_{forward,backward}
    tensors: tuple             # names of the leading tensor arguments
    unpack: Callable           # leading tensors -> (q, k, v), each [B, H, L, D]
    gradients: Callable        # leading tensors -> (what backward returns, its dq, dk, dv views)


PLAIN = Layout("", ("q", "k", "v"), lambda q, k, v: (q, k, v), _new_qkv_gradients)
PACKED = Layout("_packed", ("qkv",), unpack_qkv, _new_packed_gradient)

_ROW_ARGS = (("domains", Tensor), ("seq_lens", Tensor))
_SCALARS = (("causal", bool), ("num_bottleneck", int), ("scale", float))
_SAVED = (("out", Tensor), ("lse", Tensor), ("mass", Tensor), ("d_out", Tensor),
          ("d_mass", Tensor))


def _with_signature(fn, layout, args, result):
    """fn(*args) with the typed signature triton_op infers the op's schema from."""
    params = [(name, Tensor) for name in layout.tensors] + list(args)
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind)
         for name, kind in params], return_annotation=result)
    return fn


def register(layout):
    """The forward op of `layout`, with its backward op registered as its autograd:
    forward(*tensors, domains, seq_lens, causal, num_bottleneck, scale) -> (out, lse, mass)."""
    arity = len(layout.tensors)
    grads_type = tuple[Tensor, Tensor, Tensor] if arity == 3 else Tensor

    def forward(*args):
        """(out, lse, mass) of q, k, v = layout.unpack(tensors)."""
        return triton_forward(*layout.unpack(*args[:arity]), *args[arity:])

    def forward_fake(*args):
        q = layout.unpack(*args[:arity])[0]
        rows = q.new_empty(q.shape[:3], dtype=torch.float32)
        return torch.empty(q.shape, dtype=q.dtype, device=q.device), rows, torch.empty_like(rows)

    def backward(*args):
        """The gradient of the leading tensors, in their layout."""
        result, grads = layout.gradients(*args[:arity])
        triton_backward(*layout.unpack(*args[:arity]), *args[arity:], grads=grads)
        return result

    def backward_fake(*args):
        return layout.gradients(*args[:arity])[0]

    prefix = f"autocdsr::cross_domain_attention{layout.name}"
    forward_op = triton_op(f"{prefix}_forward", _with_signature(
        forward, layout, _ROW_ARGS + _SCALARS, tuple[Tensor, Tensor, Tensor]), mutates_args={})
    forward_op.register_fake(forward_fake)
    backward_op = triton_op(f"{prefix}_backward", _with_signature(
        backward, layout, _ROW_ARGS + _SAVED + _SCALARS + (("has_dout", bool),), grads_type),
        mutates_args={})
    backward_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:arity + 2], *output)
        ctx.causal, ctx.num_bottleneck, ctx.scale = inputs[arity + 2:]
        ctx.mark_non_differentiable(output[1])  # lse
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None

    def autograd_backward(ctx, d_out, _d_lse, d_mass):
        saved = ctx.saved_tensors
        out, lse, mass = saved[arity + 2:]
        # A loss of the mass alone (the L_cd pass) has no dO: the kernels' dO-free variant
        # skips the dO . V^T and P^T dO matmuls; out stands in for the pointer it never reads.
        has_dout = d_out is not None
        d_mass = torch.zeros_like(mass) if d_mass is None else d_mass
        grads = backward_op(*saved[:arity + 2], out, lse, mass, d_out if has_dout else out,
                            d_mass, ctx.causal, ctx.num_bottleneck, ctx.scale, has_dout)
        grads = grads if arity > 1 else (grads,)
        return (*grads, None, None, None, None, None)

    forward_op.register_autograd(autograd_backward, setup_context=setup_context)
    return forward_op


_plain_op = register(PLAIN)
_packed_op = register(PACKED)


def _row_inputs(domains, seq_lens, batch, length, device):
    domains = domains.to(torch.int32).contiguous()
    if seq_lens is None:  # one code path: "no seq_lens" is "every row is L long"
        seq_lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    return domains, seq_lens.to(torch.int32).contiguous()


def fused_attention(q, k, v, domains, *, causal=False, num_bottleneck=0, seq_lens=None,
                    scale=None):
    """cross_domain_attention's triton backend: (out, mass) from the fused kernels."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = prepare(q), prepare(k), prepare(v)
    domains, seq_lens = _row_inputs(domains, seq_lens, q.shape[0], q.shape[2], q.device)
    out, _, mass = _plain_op(q, k, v, domains, seq_lens, causal, num_bottleneck, scale)
    return out, mass


def fused_attention_packed(qkv, domains, *, causal=False, num_bottleneck=0, seq_lens=None,
                           scale=None):
    """fused_attention of unpack_qkv(qkv), qkv [B, L, 3, H, D]; its gradient comes back in
    qkv's layout, written once by the kernels."""
    scale = 1.0 / math.sqrt(qkv.shape[-1]) if scale is None else float(scale)
    qkv = qkv.contiguous()
    domains, seq_lens = _row_inputs(domains, seq_lens, qkv.shape[0], qkv.shape[1], qkv.device)
    out, _, mass = _packed_op(qkv, domains, seq_lens, causal, num_bottleneck, scale)
    return out, mass
