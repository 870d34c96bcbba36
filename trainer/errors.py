"""Errors of the trainer room (user-facing: the CLI prints them as one line)."""

from hecate.collectives.errors import HecateError


class DataError(HecateError):
    """The corpus or prepared data is missing, empty, unreadable or too short for the config."""


class TrainingError(HecateError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""
