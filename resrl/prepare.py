"""Step 1 of the workflow: the dataset and the starting policy, built once and cached.

    base model   cache/models/tiny-<key>      (embedded) or model.path (yours)
    dataset      cache/data/<key>             tokenized with the base model's tokenizer
    warm-start   cache/warmstart/<key>        supervised warm-start of the base model
"""
from __future__ import annotations

import time
from pathlib import Path

from resrl.cache import cached_dir, key_of
from resrl.data import load_prepared, load_summary, prepare_dataset



def _model_identity(path: Path) -> list:
    """Path plus size and mtime of its files: a changed model gets a new cache key."""
    return [str(path.resolve())] + sorted((f.name, f.stat().st_size, int(f.stat().st_mtime))
                                          for f in path.iterdir() if f.is_file())


def prepare_base_and_data(cfg) -> dict:
    """The base model folder and the tokenized dataset (cached); no training."""
    from transformers import AutoTokenizer

    from resrl.embedded import save_embedded_base

    cache = Path(cfg.run.cache_dir)
    if cfg.model.path is None:
        base_key = key_of("tiny", dict(cfg.model.tiny), cfg.seed)
        base, _ = cached_dir(cache / "models" / f"tiny-{base_key}",
                             lambda d: save_embedded_base(d, cfg.model.tiny, cfg.seed))
    else:
        base = Path(cfg.model.path)
        base_key = key_of(_model_identity(base))
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    data_key = key_of(dict(cfg.data), base_key, cfg.seed)
    dataset_dir, reused = cached_dir(cache / "data" / data_key, lambda d: prepare_dataset(cfg, tokenizer, d))
    return {"base_dir": base, "base_key": base_key, "dataset_dir": dataset_dir, "data_key": data_key,
            "data_reused": reused}


def prepare(cfg, progress: bool = True) -> dict:
    """Build or reuse dataset and starting policy; returns plain paths and a summary."""
    from resrl.warmstart import warm_start

    t0 = time.time()
    got = prepare_base_and_data(cfg)
    base, dataset_dir = got["base_dir"], got["dataset_dir"]
    summary = load_summary(dataset_dir)
    metrics = dict(summary.as_metrics())
    policy = base
    warm_reused = None
    if cfg.warmstart.enabled:
        ws_key = key_of(dict(cfg.warmstart), got["data_key"], got["base_key"], cfg.seed)

        def build(d):
            train = load_prepared(dataset_dir)["train"]
            metrics.update(warm_start(str(base), d, train, cfg, progress=progress))

        policy, warm_reused = cached_dir(Path(cfg.run.cache_dir) / "warmstart" / ws_key, build)
    return {
        "dataset_dir": str(dataset_dir),
        "base_dir": str(base),
        "policy_dir": str(policy),
        "data_reused": got["data_reused"],
        "warmstart_reused": warm_reused,
        "summary_lines": summary.lines(),
        "metrics": metrics,
        "seconds": time.time() - t0,
    }
