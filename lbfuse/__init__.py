"""lbfuse: a read-only filesystem view of restore points (pure model + mfusepy adapter)."""
