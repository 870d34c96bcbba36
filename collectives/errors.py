"""User-facing errors. Every room raises its own subclass of :class:`HecateError`; the CLI prints the
message without a traceback (``--debug`` shows it). They live here, in the lowest room, so that every
room can raise them without importing upward."""


class HecateError(Exception):
    """Base of every error a user can cause and fix (bad config, layout, data, checkpoint)."""


class ConfigError(HecateError):
    """A config field holds a value that is not allowed. The message names the field and what is allowed."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"config field '{field}': {message}")


class CollectiveError(HecateError):
    """A collective was called with inconsistent arguments (placements, shapes, ranks)."""


class LayoutError(HecateError):
    """A parallel layout does not fit the world size or the model."""


class DataError(HecateError):
    """The corpus or prepared data is missing, empty, unreadable or too short for the config."""


class CheckpointError(HecateError):
    """A checkpoint is missing, incomplete or belongs to another model."""


class TrainingError(HecateError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""


class TransportUnavailable(CollectiveError):
    """A transport cannot run here (its library, a GPU or NCCL is missing); the message names what."""


class WorkerFailure(HecateError):
    """A worker process raised, died or timed out. The message names the rank(s) and carries the traceback,
    exit code or stacks, so that the job goes down with the reason rather than hanging."""

    def __init__(self, message: str, ranks: tuple[int, ...]):
        self.ranks = ranks
        super().__init__(message)
