"""User-facing errors: :class:`HecateError`, the base of every error a user can cause and fix, which the CLI prints
as one line without a traceback (``--debug`` shows it); :class:`ConfigError`, which every room raises for its own
config fields; and this room's errors. The other rooms keep theirs beside them (``hecate.parallel.errors``,
``hecate.trainer.errors``, ``hecate.launch.errors``)."""


class HecateError(Exception):
    """Base of every error a user can cause and fix (bad config, layout, data, checkpoint)."""


class ConfigError(HecateError):
    """A config field holds a value that is not allowed. The message names the field and what is allowed."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"config field '{field}': {message}")


class CollectiveError(HecateError):
    """A collective was called with inconsistent arguments (placements, shapes, ranks)."""


class TransportUnavailable(CollectiveError):
    """A transport cannot run here (its library, a GPU or NCCL is missing); the message names what."""
