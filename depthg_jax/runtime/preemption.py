"""SIGTERM and SIGINT (Ctrl-C) as a flag the training loop checks between steps (save, exit 0).

While a `Preemption` is active, the first SIGTERM or SIGINT only sets `requested` (the loop then
saves a checkpoint and returns); a second SIGINT exits at once (KeyboardInterrupt), as a user
pressing Ctrl-C twice expects. Contexts nest: an outer one opened at start-up (data generation,
the KNN build) and the loop's own share one flag, so a signal sent before the first step is
seen by the loop.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_received: list[int] = []  # signals seen while any Preemption is active
_depth = 0
_previous: dict[int, object] = {}


def _handle(signum, frame):
    del frame
    _received.append(signum)
    if signum == signal.SIGINT and _received.count(signal.SIGINT) > 1:
        raise KeyboardInterrupt("second Ctrl-C: exiting at once")


class Preemption:
    """Context manager: while active, SIGTERM/SIGINT set `requested` instead of killing."""

    def __init__(self):
        self._installed = False

    @property
    def requested(self) -> bool:
        return bool(_received)

    @property
    def signal_name(self) -> str:
        return signal.Signals(_received[0]).name if _received else ""

    def __enter__(self):
        global _depth
        if threading.current_thread() is threading.main_thread():
            if _depth == 0:
                _received.clear()
                for sig in SIGNALS:
                    _previous[sig] = signal.signal(sig, _handle)
            _depth += 1
            self._installed = True
        return self

    def __exit__(self, *exc):
        global _depth
        if self._installed:
            _depth -= 1
            self._installed = False
            if _depth == 0:
                for sig, handler in _previous.items():
                    signal.signal(sig, handler)
                _previous.clear()
