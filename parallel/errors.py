"""Errors of the parallel room (user-facing: the CLI prints them as one line)."""

from hecate.collectives.errors import HecateError


class LayoutError(HecateError):
    """A parallel layout does not fit the world size or the model."""


class CheckpointError(HecateError):
    """A checkpoint is missing, incomplete, corrupt or belongs to another model (or another layout's state)."""
