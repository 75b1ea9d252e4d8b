"""SIGINT (Ctrl-C) and SIGTERM (what clusters send before preemption) as a request to stop.

While training, either signal only sets a flag: the loop finishes its step, writes a checkpoint
and raises :class:`~diffdistill.engine.trainer.TrainingInterrupted`. The handler then steps aside,
so a second signal acts at once as it would have without us (KeyboardInterrupt, or termination).
"""

from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    signum: int | None = None  # the first stop signal received, if any


@contextlib.contextmanager
def stop_on_signals():
    """Yields a StopRequest that the signals fill in. Handlers can only be set from the main
    thread; elsewhere (a trainer run in a thread) the signals keep their usual meaning."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        request.signum = signum
        signal.signal(signum, previous[signum])

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


__all__ = ["STOP_SIGNALS", "StopRequest", "stop_on_signals"]
