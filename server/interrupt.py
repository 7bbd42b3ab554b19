"""Ctrl-C and SIGTERM during a run: stop cleanly, say so, and let `--resume` continue.

    with interruptible() as stop:       # stop: a StopRequest the coordinator checks while it waits
        simulate(..., stop=stop)
    sys.exit(stop.exit_code)             # 130 after SIGINT, 143 after SIGTERM

The first signal only sets the request: the coordinator stops waiting for the current round (its
replies are abandoned: nothing of it is aggregated), records `status: interrupted` with the round
reached and the command to resume, and returns, so Flower and Ray shut down as after a normal run.
A second signal raises KeyboardInterrupt at once (what is on disk stays intact: every file is
written atomically).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number, as shells report


class Interrupted(Exception):
    """The run was asked to stop (Ctrl-C or SIGTERM)."""


class StopRequest:
    """Set by a signal handler (or a caller); the coordinator raises Interrupted once it sees it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal: signal.Signals | None = None
        self._install = lambda: None

    def rearm(self) -> None:
        """Install the handlers again: Ray's `ray.init` replaces SIGTERM's with one that kills Ray and
        exits at once, so `fedward simulate` calls this once Ray is up."""
        if threading.current_thread() is threading.main_thread():
            self._install()

    def request(self, sig: signal.Signals | None = None) -> None:
        self.signal = self.signal or sig
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    @property
    def name(self) -> str:
        return self.signal.name if self.signal else "a stop request"

    @property
    def exit_code(self) -> int:
        return SIGNAL_EXIT.get(self.signal, 1) if self.requested else 0

    def check(self) -> None:
        if self.requested:
            raise Interrupted(self.name)


@contextlib.contextmanager
def interruptible() -> Iterator[StopRequest]:
    """Turn SIGINT and SIGTERM into a StopRequest while the block runs (main thread only)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, _frame) -> None:
        if stop.requested:  # the second signal: give up now, unwinding (Ray is shut down on the way out)
            raise KeyboardInterrupt
        stop.request(signal.Signals(signum))

    previous = {sig: signal.signal(sig, handler) for sig in SIGNAL_EXIT}
    stop._install = lambda: [signal.signal(sig, handler) for sig in SIGNAL_EXIT]
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
