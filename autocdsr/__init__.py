"""AutoCDSR: cross-domain sequential recommendation with Pareto-balanced self-attention."""
__version__ = "0.1.0"
