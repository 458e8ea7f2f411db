"""Content-addressed folders that are built once and reused.

A folder is complete when it exists under its final name: it is built under a
temporary name and renamed at the end, so an interrupted build leaves nothing
that a later run would mistake for a result.

Each entry is built by one process at a time: the builder holds an flock on a sibling
lock file (`.<name>.lock`), and every other process (lane, sweep point, run) that asks
for the same entry waits for it, then reuses what it built instead of building it a
second time side by side. The OS drops the lock when its holder dies, even by
`kill -9`: the next process finds no entry (the half-built temporary folder was never
renamed; this machine's leftovers are removed), takes the lock and builds it. flock is per machine; on a shared file system
each machine may build an entry once, and the rename still keeps one complete copy.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (checkpoint manifests, published warm-starts)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def key_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def lock_path(path: Path) -> Path:
    """The lock file of a cache entry: next to it, hidden, kept (an empty file)."""
    return path.with_name(f".{path.name}.lock")


def cached_dir(path: Path, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Return (path, reused). `build(tmp)` fills a fresh temporary folder; it runs in at
    most one process at a time per entry, and not at all when the entry exists."""
    path = Path(path)
    if path.is_dir():
        return path, True
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(path), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process building %s", path)
            t0 = time.time()
            fcntl.flock(lock, fcntl.LOCK_EX)
            logger.info("done waiting (%.0f s) for %s", time.time() - t0, path)
        if path.is_dir():  # built while this process waited
            return path, True
        return _build(path, build), False


def _build(path: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary folder, then rename it to `path` (the caller holds the entry's lock)."""
    host = socket.gethostname()
    for stale in path.parent.glob(f".{path.name}.tmp-{host}-*"):  # a builder on this machine that was killed
        shutil.rmtree(stale, ignore_errors=True)                   # (none is running: we hold the lock)
    tmp = path.with_name(f".{path.name}.tmp-{host}-{os.getpid()}")
    tmp.mkdir()
    try:
        build(tmp)
        os.rename(tmp, path)
    except OSError:
        if not path.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another machine (sharing the folder) finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
