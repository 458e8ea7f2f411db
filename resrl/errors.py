"""The errors a user can cause and fix (a bad config value, unusable data, a busy run
folder, a failing reward function, an unreachable tracking server).

The CLI prints any UserError as one line, `resrl: error: ...`, without a traceback;
anything else is a bug and keeps its traceback. Each module that meets such a case
raises UserError or a subclass of it (ConfigError here; DataError, RunFolderBusy,
RewardError, TrackingUnreachable beside the code that detects them).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import tempfile
from pathlib import Path


class UserError(ValueError):
    """Something the user can fix; its message says what and where."""


class ConfigError(UserError):
    """A configuration key or value that cannot be used."""


class NotWritable(UserError):
    """A folder or file resrl must write to cannot be written (permissions, read-only, full)."""


# errno values that mean "this place cannot be written", whoever is to blame
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}


def not_writable(exc: OSError, what: str = "") -> NotWritable:
    path = exc.filename or what or "a file"
    return NotWritable(f"cannot write {path}"
                       + (f" ({what})" if what and exc.filename else "")
                       + f": {exc.strerror or exc}; make it writable (or free space), or point run.output_dir / "
                       "run.cache_dir elsewhere, then run the same command again")


@contextlib.contextmanager
def writing(what: str = ""):
    """An OSError that says the place cannot be written becomes one NotWritable line naming the path."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _NOT_WRITABLE:
            raise not_writable(exc, what) from None
        raise


def reports_unwritable(fn):
    """`writing()` around a function (the Prefect tasks: their own log would show the traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with writing():
            return fn(*args, **kwargs)
    return wrapper


def check_writable(path, key: str) -> None:
    """Create `path` if needed and write a probe file in it: NotWritable naming `key` and the path
    when it cannot be written (checked at start, before any heavy work)."""

    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".resrl-write-check-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise NotWritable(f"{key} {p} is not writable ({exc.strerror or exc}"
                          + (f": {exc.filename}" if exc.filename and str(exc.filename) != str(p) else "")
                          + f"); make it writable or set {key} to another folder") from None
