"""GPU kernels for cross-domain attention and the Pareto solver, with PyTorch references."""
from .attention import fused_attention, fused_attention_packed, triton_available
from .dispatch import cross_domain_attention, cross_domain_attention_packed
from .masks import WILDCARD_DOMAIN
from .reference import reference_attention
from .sdpa import sdpa_attention

__all__ = ["WILDCARD_DOMAIN", "cross_domain_attention", "cross_domain_attention_packed",
           "fused_attention", "fused_attention_packed",
           "reference_attention", "sdpa_attention", "triton_available"]
