"""Content-addressed folders that are built once and reused.

A folder is complete when it exists under its final name: it is built under a
temporary name and renamed at the end, so an interrupted build leaves nothing
that a later run would mistake for a result, and two processes building the same
folder at once both end up using one of them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable


def key_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cached_dir(path: Path, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Return (path, reused). `build(tmp)` fills a fresh temporary folder."""
    if path.is_dir():
        return path, True
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        os.rename(tmp, path)
    except OSError:
        if not path.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        return path, True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path, False
