"""Ctrl-C that stops at a step boundary, where the state is consistent and can be saved."""

from __future__ import annotations

import signal
import sys
import threading


class StopRequested(KeyboardInterrupt):
    """Ctrl-C seen and honoured at a step boundary."""


class GracefulStop:
    """The first SIGINT asks the loop to stop at the next step boundary (which saves a
    checkpoint); a second one interrupts at once, without saving."""

    def __init__(self):
        self.requested, self._prev = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step (again to quit without saving)", file=sys.stderr)

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
        return False
