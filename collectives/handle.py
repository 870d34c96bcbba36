"""A uniform handle for an operation in flight, whatever transport issued it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")


class Handle(Generic[T]):
    """``wait()`` blocks until the operation is done, adds the time blocked to the transport's accounting,
    runs the completion step (copy staged buffers back, unpack received chunks) once, and returns the result.
    """

    def __init__(self, block: Callable[[], None], finish: Callable[[], T], on_wait: Callable[[float], None]):
        self._block = block
        self._finish = finish
        self._on_wait = on_wait
        self._done = False
        self._result: T | None = None

    def wait(self) -> T:
        if not self._done:
            start = time.perf_counter()
            self._block()
            self._on_wait(time.perf_counter() - start)
            self._result = self._finish()
            self._done = True
            self._block = self._finish = None
        return self._result

    def then(self, step: Callable[[T], U]) -> Handle[U]:
        """A handle whose ``wait()`` waits for this one and returns ``step(result)``."""
        return Handle(self.wait, lambda: step(self._result), lambda seconds: None)
