"""Warm-starts the project publishes: the default config's starting policy, built once.

The embedded default trains its starting policy (resrl/warmstart.py) before any RL: ~3-4 min on
2 CPU cores, most of a newcomer's first run. The project ships that result for the default
config, the very folder `prepare` would build (same cache key), under
`resrl/published/warmstart-<key>/`, with `published.json`: each file's sha256, how it was built
(commit, torch, CPU) and its final loss. `prepare` copies it into the cache instead of training,
after checking every file against its sha256; a copy that fails the check is skipped with a
warning and the warm-start is trained here. `run.published_warmstart=false` always trains it.

It also makes the study's base model the same on every machine: a float32 run of 1000 steps may
round differently on another CPU.

Re-publish after a change that moves the default's warm-start key (its config sections, the
synthetic task's VERSION, the embedded model) with `python -m resrl.publish_warmstart`:
tests/test_published.py fails until then.
"""
from __future__ import annotations

import json
import logging
import platform
import shutil
from pathlib import Path

from resrl.cache import file_sha256

logger = logging.getLogger(__name__)

ROOT = Path(__file__).parent / "published"
MANIFEST = "published.json"
RECORD = "warmstart.json"  # what warm_start writes beside its weights: final loss, steps, seconds


def folder(key: str, root: Path | None = None) -> Path:
    """Where warm-start `key` is published (under `root`, default ROOT)."""
    return Path(ROOT if root is None else root) / f"warmstart-{key}"


def verified(key: str, root: Path | None = None) -> Path | None:
    """The published folder of warm-start `key` when there is one and every file listed in its
    manifest has its recorded sha256 (and no file is missing); None otherwise (a warning says why)."""
    d = folder(key, root)
    if not (d / MANIFEST).is_file():
        return None
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        files = manifest["files"]
        bad = [name for name, digest in files.items() if not (d / name).is_file() or file_sha256(d / name) != digest]
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("published warm-start %s: unreadable manifest (%s); training it here instead", d, e)
        return None
    if manifest.get("key") != key or bad or not files:
        logger.warning("published warm-start %s fails its check (%s); training it here instead", d,
                       f"files {bad} differ from their sha256" if bad else "its manifest names another key or no file")
        return None
    return d


def copy_into(key: str, out_dir: Path, root: Path | None = None) -> dict[str, float] | None:
    """Copy the verified published warm-start `key` into `out_dir` (a cache entry being built);
    returns its metrics (the final loss), or None when there is no verified copy."""
    d = verified(key, root)
    if d is None:
        return None
    manifest = json.loads((d / MANIFEST).read_text())
    for name in manifest["files"]:
        shutil.copy2(d / name, Path(out_dir) / name)
    return dict(manifest.get("metrics", {}))


def publish(key: str, built_dir: Path, *, config: dict, commit: str, root: Path | None = None) -> Path:
    """Write the built warm-start folder `built_dir` (cache entry `key`) as the published copy."""
    import torch

    d = folder(key, root)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    files = {}
    for f in sorted(Path(built_dir).iterdir()):
        if f.is_file():
            shutil.copy2(f, d / f.name)
            files[f.name] = file_sha256(d / f.name)
    record = json.loads((d / RECORD).read_text()) if (d / RECORD).is_file() else {}
    manifest = {
        "key": key,
        "files": files,
        "metrics": {"warmstart/final_loss": record["final_loss"]} if "final_loss" in record else {},
        "built": {"commit": commit, "torch": torch.__version__, "machine": platform.machine(),
                  "cpu": _cpu_name(), "seconds": record.get("seconds")},
        "config": config,  # what it was built from (the whole config but `run`), for a reader
    }
    (d / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return d


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()

