"""specmerge: data-free model merging with spectral methods, streaming over safetensors."""

__version__ = "0.1.0"
