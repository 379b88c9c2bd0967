"""Transformer recommenders whose attention also returns the cross-domain mass."""
from .encoder import Intermediates
from .recommender import Recommender

__all__ = ["Intermediates", "Recommender"]
