"""Data: RecBole atomic readers, splits, the synthetic default, batching."""
