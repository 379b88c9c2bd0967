"""The token ids a model and its batches agree on, in one place.

Items: 0 is padding, 1..num_items are items, num_items + 1 is the BERT4Rec [MASK].
Domains: -1 is padding, 0..num_domains - 1 are the data's domains, num_domains is the
bottleneck (IB) tokens' domain. A [MASK] keeps the masked item's domain (and the [MASK]
appended at evaluation carries the target's), as the official AutoCDSR code does; with
data.mask_domain=hidden it gets kernels.WILDCARD_DOMAIN instead, a token of no domain that
every token may attend and that is never cross-domain. [MASK] is never a domain of its own.
"""
from dataclasses import dataclass

from kernels import WILDCARD_DOMAIN

from ..config import CHOICES

MASK_DOMAIN_MODES = CHOICES["data.mask_domain"]


@dataclass(frozen=True)
class TokenSpec:
    """Item and domain ids of padding, [MASK] and the bottleneck tokens for one dataset and mask
    mode."""
    num_items: int
    num_domains: int
    hide_mask_domain: bool = False
    padding_item: int = 0
    padding_domain: int = -1

    @classmethod
    def for_run(cls, num_items, num_domains, mask_domain="target"):
        """The spec of a run: mask_domain is data.mask_domain ("target" or "hidden")."""
        if mask_domain not in MASK_DOMAIN_MODES:
            raise ValueError(f"mask_domain must be one of {MASK_DOMAIN_MODES}, got {mask_domain!r}")
        return cls(num_items, num_domains, mask_domain == "hidden")

    @property
    def mask_item(self):
        return self.num_items + 1

    @property
    def mask_domain(self):
        """The domain id a [MASK] gets, or None where it keeps its item's (target's) domain."""
        return WILDCARD_DOMAIN if self.hide_mask_domain else None

    @property
    def bottleneck_domain(self):
        return self.num_domains

    def cd_queries(self, domains):
        """[B, L] bool: the positions whose attention mass enters L_cd (real tokens that have
        a domain: padding and hidden-domain [MASK]s left out)."""
        return (domains >= 0) & (domains != WILDCARD_DOMAIN)
