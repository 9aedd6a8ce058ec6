"""calibration methods (being written)."""
