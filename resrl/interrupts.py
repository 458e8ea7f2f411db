"""Ctrl-C that is never lost.

Python's own SIGINT handler raises KeyboardInterrupt wherever the main thread happens
to be. Inside a weakref callback or a `__del__` (garbage collection, which torch and
vLLM trigger constantly) the exception is printed as "Exception ignored in ..." and
dropped, and the run simply goes on (seen on the CPU: 2 of 13 Ctrl-Cs sent during a
tiny run's first minute were lost in a `WeakValueDictionary` callback). The handler here also records the
request, and long loops call `check()` at safe points (between steps), which raises
it again.

Inside a Prefect flow run, Prefect's engine replaces the SIGTERM handler with its own, which
raises `TerminationSignal` and records nothing: swallowed by a destructor, such a stop was lost
(seen: 3 of 3 SIGTERMs sent just after a run's final evaluation, which then ended FINISHED with
exit code 0). Two nets catch it: `recording(handler)` wraps a handler so the signal is recorded
before it runs (flows/train.py wraps Prefect's), and `install()` also sets an unraisable-exception
hook that records a KeyboardInterrupt or TerminationSignal that a destructor swallowed, whoever
raised it.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading

_requested: int | None = None  # the number of the signal that asked to stop, until reset()


def signal_name(number: int) -> str:
    """SIGINT, SIGTERM, ... (the number itself for one Python does not know)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _record(signum, frame) -> None:
    global _requested
    if _requested is None:
        _requested = signum


def recording(handler):
    """`handler`, wrapped so that the signal is recorded before it runs (for a handler installed by
    other code, e.g. Prefect's SIGTERM handler inside a flow run)."""
    if getattr(handler, "_resrl_recording", False):
        return handler

    def wrapper(signum, frame):
        _record(signum, frame)
        return handler(signum, frame)

    wrapper._resrl_recording = True
    wrapper.__wrapped__ = handler
    return wrapper


def _is_stop(exc_type) -> bool:
    """KeyboardInterrupt, or Prefect's TerminationSignal (by name: this module imports no Prefect)."""
    return exc_type is not None and (issubclass(exc_type, KeyboardInterrupt) or any(
        cls.__name__ == "TerminationSignal" for cls in exc_type.__mro__))


def _unraisable_hook(unraisable) -> None:
    """Record a stop that a destructor or weakref callback swallowed, then report it as before."""
    global _requested
    if _is_stop(unraisable.exc_type) and _requested is None:
        _requested = getattr(unraisable.exc_value, "signal", None) or signal.SIGINT
    _previous_unraisable_hook(unraisable)


_previous_unraisable_hook = sys.unraisablehook


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
    install_hook()


def install_hook() -> None:
    """Record stops that destructors swallow (`sys.unraisablehook`), whichever handler raised them."""
    global _previous_unraisable_hook
    if sys.unraisablehook is not _unraisable_hook:
        _previous_unraisable_hook = sys.unraisablehook
        sys.unraisablehook = _unraisable_hook


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
    return _requested is not None


def requested_signal() -> str | None:
    """The name of the signal that asked to stop (SIGINT, SIGTERM), or None."""
    return None if _requested is None else signal_name(_requested)


def check() -> None:
    """Raise KeyboardInterrupt if a stop signal came, even if its first raise was swallowed."""
    if _requested is not None:
        raise KeyboardInterrupt(f"{signal_name(_requested)} (raised again)")


def reset() -> None:
    global _requested
    _requested = None


def die_with_parent(parent: int) -> None:
    """Have Linux send this process SIGTERM when `parent` (the process that started it) ends,
    even by kill -9, so a worker process never trains on alone (elsewhere a no-op). If the
    parent is already gone, stop now, as if that SIGTERM had come."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)
