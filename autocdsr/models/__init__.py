"""Transformer recommenders whose attention also returns the cross-domain mass."""
from .recommender import Recommender

__all__ = ["Recommender"]
