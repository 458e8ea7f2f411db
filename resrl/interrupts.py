"""Ctrl-C that is never lost.

Python's own SIGINT handler raises KeyboardInterrupt wherever the main thread happens
to be. Inside a weakref callback or a `__del__` (garbage collection, which torch and
vLLM trigger constantly) the exception is printed as "Exception ignored in ..." and
dropped, and the run simply goes on (seen on the CPU: 2 of 13 Ctrl-Cs sent during a
tiny run's first minute were lost in a `WeakValueDictionary` callback). The handler here also records the
request, and long loops call `check()` at safe points (between steps), which raises
it again.
"""
from __future__ import annotations

import contextlib
import signal
import threading

_requested = False


def signal_name(number: int) -> str:
    """SIGINT, SIGTERM, ... (the number itself for one Python does not know)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _record(signum, frame) -> None:
    global _requested
    _requested = True


def _handler(signum, frame) -> None:
    _record(signum, frame)
    raise KeyboardInterrupt(signal_name(signum))


def install() -> None:
    """Use the recording handler for SIGINT, and for SIGTERM too: `kill PID`, or torchrun
    stopping the other ranks when one fails, then ends the run as Ctrl-C does (the MLflow run
    marked KILLED, naming the signal, and resumable) instead of leaving it RUNNING.
    A no-op outside the main thread, where signals cannot be set."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)


@contextlib.contextmanager
def deferred():
    """Signals during the block are recorded, not raised: for the few calls that mark a stopping
    run in MLflow, which a second signal (torchrun's SIGTERM after a rank failed, a second
    Ctrl-C) would otherwise cut off, leaving the run RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, _record) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def requested() -> bool:
    return _requested


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed, even if its first raise was swallowed."""
    if _requested:
        raise KeyboardInterrupt("raised again")


def reset() -> None:
    global _requested
    _requested = False
