"""Exceptions. Every message names the file and tensor at fault and what was expected."""

from __future__ import annotations


class SpecmergeError(Exception):
    """Base class: the CLI prints these as one clean line, without a traceback."""


class CheckpointError(SpecmergeError):
    """A checkpoint is missing, unreadable, truncated or not a checkpoint at all."""


class IncompatibleCheckpointError(SpecmergeError):
    """An expert does not match the base: a missing or extra tensor, a shape or dtype mismatch."""


class NonFiniteError(SpecmergeError):
    """A tensor holds NaN or Inf."""


class RecipeError(SpecmergeError):
    """The recipe is invalid: unknown key, bad value, unknown method or parameter."""


class OutputError(SpecmergeError):
    """The output location is unusable: exists, lies inside an input, or the disk is full."""


class MergeError(SpecmergeError):
    """A method failed on a given parameter."""


class Interrupted(SpecmergeError):
    """SIGTERM or SIGHUP arrived while an output was being written; it was removed."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}; the unfinished output "
                         f"was removed and the inputs are untouched")
