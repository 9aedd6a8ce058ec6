"""interference methods (being written)."""
