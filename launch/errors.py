"""Errors of the launch room."""

from hecate.collectives.errors import HecateError


class WorkerFailure(HecateError):
    """A worker process raised, died or timed out. The message names the rank(s) and carries the traceback,
    exit code or stacks, so that the job goes down with the reason rather than hanging."""

    def __init__(self, message: str, ranks: tuple[int, ...]):
        self.ranks = ranks
        super().__init__(message)
