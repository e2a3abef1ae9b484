"""A function run in a thread of its own beside the caller's work (a freeze's reads from
/proc while injected calls run), its result or its exception handed back once asked."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class InThread(Generic[T]):
    """`function(*args)` run in a thread of its own; result() waits for it (or raises)."""

    def __init__(self, function: Callable[..., T], *args: object, name: str) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = function(*args)
            except BaseException as exc:  # handed to result(), in the caller's thread
                self._error = exc

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value
