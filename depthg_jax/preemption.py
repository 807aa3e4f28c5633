"""SIGTERM as a flag the training loop checks between steps (save, then exit cleanly)."""

from __future__ import annotations

import signal
import threading


class Preemption:
    """Context manager: while active, SIGTERM sets `requested` instead of killing the process."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
