"""GPU kernels for cross-domain attention (kernels.attention) and the Pareto solver
(kernels.pareto), with PyTorch references."""
from .attention import (WILDCARD_DOMAIN, cross_domain_attention, cross_domain_attention_packed,
                        fused_attention, fused_attention_packed, reference_attention,
                        sdpa_attention, triton_available)

__all__ = ["WILDCARD_DOMAIN", "cross_domain_attention", "cross_domain_attention_packed",
           "fused_attention", "fused_attention_packed",
           "reference_attention", "sdpa_attention", "triton_available"]
