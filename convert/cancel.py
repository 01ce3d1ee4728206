"""Cooperative cancellation of a conversion: a signal handler records the request, the converter stops.

Raising from a signal handler is not a reliable way to stop: Python runs the handler between two
bytecodes of whatever the main thread is doing, and when that is a gc callback (jax registers one),
a `__del__` or a weakref callback, the exception is printed as "Exception ignored in ..." and
dropped, so the run goes on and exits 0. Instead the handler sets a `Cancellation`, and the
converter calls `check()` between tensors, between copied files and right before the final
rename; `check()` raises `Cancelled`, which unwinds through the converter's cleanup like any error.
A second signal raises at once (for a run stuck in one long call), but only inside `interruptible()`
(the writing phase, whose cleanup removes everything); elsewhere (the final rename, the cleanup
itself) it is only recorded.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Cancelled(BaseException):
    """The run was asked to stop by signal `signum`. A BaseException, like KeyboardInterrupt, so that
    `except Exception` on the way up does not swallow it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"cancelled by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process stopped by a signal: 128 + signum (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum


class Cancellation:
    """A cancellation request shared by a signal handler (`on_signal`) and the loops that honour it (`check`)."""

    def __init__(self) -> None:
        self._signum: int | None = None
        self._interruptible_depth = 0

    @property
    def signum(self) -> int | None:
        """The first signal received, or None while the run may go on."""
        return self._signum

    def cancel(self, signum: int) -> None:
        """Record a request to stop (the first signal wins)."""
        if self._signum is None:
            self._signum = signum

    def check(self) -> None:
        """Raise `Cancelled` if a stop was requested; call it between units of work."""
        if self._signum is not None:
            raise Cancelled(self._signum)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A section that a repeated signal may stop at once (its caller cleans up after any exception)."""
        self._interruptible_depth += 1
        try:
            yield
        finally:
            self._interruptible_depth -= 1

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        """A `signal.signal` handler: the first signal only records; a repeated one also raises at once."""
        repeated = self._signum is not None
        self.cancel(signum)
        if repeated and self._interruptible_depth:
            raise Cancelled(self._signum)


@contextmanager
def handling_signals(cancel: Cancellation, signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[Cancellation]:
    """Route `signums` to `cancel.on_signal` for the duration of the block, then restore the previous handlers."""
    previous = {s: signal.signal(s, cancel.on_signal) for s in signums}
    try:
        yield cancel
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
