"""Where a command's time goes: named phases, nested, summed per name.

`recording()` starts a record for one command (`train` opens one); `phase(name)` (a context manager) and
`timed(name)` (a decorator) add to it, and do nothing when no record is open (tests, library use). Nested
phases are named by their path, e.g. ``fit/validation``; a phase entered several times (every epoch's
validation) sums. The record goes to summary.json as ``timing`` and feeds bench/overhead.py.
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Phases:
    """Seconds per phase path, in the order the phases were first entered."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.stack: list[str] = []
        self.started = time.perf_counter()

    def add(self, path: str, seconds: float) -> None:
        self.seconds[path] = self.seconds.get(path, 0.0) + seconds

    def to_dict(self) -> dict[str, float]:
        """``{"total": s, phase path: s, ...}``, rounded to 0.01 s."""
        return {"total": round(time.perf_counter() - self.started, 2),
                **{path: round(s, 2) for path, s in self.seconds.items()}}


_current: ContextVar[Phases | None] = ContextVar("finetune_phases", default=None)


@contextmanager
def recording() -> Iterator[Phases]:
    """Open a record for this command; phases entered inside it (at any depth of calls) land in it."""
    record = Phases()
    token = _current.set(record)
    try:
        yield record
    finally:
        _current.reset(token)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as `name`, nested under the phases already open."""
    record = _current.get()
    if record is None:
        yield
        return
    record.stack.append(name)
    path = "/".join(record.stack)
    start = time.perf_counter()
    try:
        yield
    finally:
        record.add(path, time.perf_counter() - start)
        record.stack.pop()


def timed(name: str) -> Callable[[F], F]:
    """Decorator: every call of the function is the phase `name`."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with phase(name):
                return fn(*args, **kwargs)
        return inner  # type: ignore[return-value]
    return wrap


class Span:
    """A phase opened and closed by two calls (Lightning hooks): `start()` ... `stop()`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._open: Any = None

    def start(self) -> None:
        self._open = phase(self.name)
        self._open.__enter__()

    def stop(self) -> None:
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self._open = None
