"""Errors of the trainer room (user-facing: the CLI prints them as one line)."""

from hecate.collectives.errors import HecateError


class DataError(HecateError):
    """The corpus or prepared data is missing, empty, unreadable or too short for the config."""


class TrainingError(HecateError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""


class HfFormatError(HecateError):
    """A Hugging Face model folder cannot be converted: a missing file or shard, a tensor of the wrong shape, an
    architecture or config option this version does not map. The message names the file, tensor or field."""
