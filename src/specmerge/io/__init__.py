"""Checkpoint I/O: the only code that touches files."""

from specmerge.io.checkpoint import Checkpoint, TensorInfo, check_compatible
from specmerge.io.writer import OutTensor, ShardedWriter, atomic_output_dir, parse_size

__all__ = ["Checkpoint", "OutTensor", "ShardedWriter", "TensorInfo", "atomic_output_dir",
           "check_compatible", "parse_size"]
