"""Step 1 of the workflow: the dataset and the starting policy, built once and cached.

    base model   cache/models/tiny-<key>      (embedded) or model.path (yours)
    dataset      cache/data/<key>             tokenized with the base model's tokenizer
    warm-start   cache/warmstart/<key>        supervised warm-start of the base model
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from resrl.cache import cached_dir, key_of
from resrl.data import load_prepared, load_summary, prepare_dataset

log = logging.getLogger(__name__)


def _model_identity(path: Path) -> list:
    """Path plus size and mtime of its files: a changed model gets a new cache key."""
    return [str(path.resolve())] + sorted((f.name, f.stat().st_size, int(f.stat().st_mtime))
                                          for f in path.iterdir() if f.is_file())


def prepare(cfg, progress: bool = True) -> dict:
    """Build or reuse dataset and starting policy; returns plain paths and a summary."""
    from transformers import AutoTokenizer

    from resrl.embedded import save_embedded_base
    from resrl.warmstart import warm_start

    cache = Path(cfg.run.cache_dir)
    t0 = time.time()
    if cfg.model.path is None:
        base_key = key_of("tiny", dict(cfg.model.tiny), cfg.seed)
        base, _ = cached_dir(cache / "models" / f"tiny-{base_key}",
                             lambda d: save_embedded_base(d, cfg.model.tiny, cfg.seed))
    else:
        base = Path(cfg.model.path)
        base_key = key_of(_model_identity(base))
    tokenizer = AutoTokenizer.from_pretrained(str(base))

    data_cfg = {k: v for k, v in dict(cfg.data).items()}
    data_key = key_of(data_cfg, base_key, cfg.seed)
    dataset_dir, data_reused = cached_dir(cache / "data" / data_key,
                                          lambda d: prepare_dataset(cfg, tokenizer, d))
    summary = load_summary(dataset_dir)

    metrics = dict(summary.as_metrics())
    policy = base
    warm_reused = None
    if cfg.warmstart.enabled:
        ws_key = key_of(dict(cfg.warmstart), data_key, base_key, cfg.seed)

        def build(d):
            train = load_prepared(dataset_dir)["train"]
            metrics.update(warm_start(str(base), d, train, cfg, progress=progress))

        policy, warm_reused = cached_dir(cache / "warmstart" / ws_key, build)
    return {
        "dataset_dir": str(dataset_dir),
        "base_dir": str(base),
        "policy_dir": str(policy),
        "data_reused": data_reused,
        "warmstart_reused": warm_reused,
        "summary_lines": summary.lines(),
        "metrics": metrics,
        "seconds": time.time() - t0,
    }
