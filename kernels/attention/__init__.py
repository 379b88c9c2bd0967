"""Cross-domain attention: masked attention plus each query's attention mass on keys of other
domains, as one op with three implementations and one entry point.

  dispatch.py        cross_domain_attention(_packed): input checks, then the backend
  triton_kernels.py  the fused Triton kernels (forward; backward preprocess, dK/dV, dQ) and
                     their registry by name
  launch.py          the kernels' host side: tile flags per call and the launches
  op.py              the torch.library ops (plain and packed layouts, one factory) + autograd
  tiles.py           tile sizes and launch settings per kernel, precision, D and length
  sdpa.py            PyTorch SDPA with indicator columns (the CPU / non-Triton backend)
  reference.py       the naive implementation with P materialised: the tests' oracle
  masks.py           which (query, key) pairs may attend and which of them cross domains
  validation.py      the input checks
"""
from .dispatch import BACKENDS, cross_domain_attention, cross_domain_attention_packed
from .launch import kernel_flags, triton_available, triton_backward, triton_forward
from .masks import WILDCARD_DOMAIN, padding_mask
from .op import fused_attention, fused_attention_packed, unpack_qkv
from .reference import reference_attention, reference_probabilities
from .sdpa import sdpa_attention
from .triton_kernels import PREPROCESS_KERNEL, TILED_KERNELS

__all__ = ["BACKENDS", "PREPROCESS_KERNEL", "TILED_KERNELS", "WILDCARD_DOMAIN",
           "cross_domain_attention", "cross_domain_attention_packed", "fused_attention",
           "fused_attention_packed", "kernel_flags", "padding_mask", "reference_attention",
           "reference_probabilities", "sdpa_attention", "triton_available", "triton_backward",
           "triton_forward", "unpack_qkv"]
