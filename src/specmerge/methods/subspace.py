"""subspace methods (being written)."""
