"""Step 1 of the workflow: the dataset and the starting policy, built once and cached.

    base model   cache/models/tiny-<key>      (embedded) or model.path (yours)
    dataset      cache/data/<key>             tokenized with the base model's tokenizer
    warm-start   cache/warmstart/<key>        supervised warm-start of the base model, or the project's
                                              published build of that entry (resrl/published.py)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from resrl import published
from resrl.cache import cached_dir, key_of
from resrl.data import DataError, load_prepared, load_summary, prepare_dataset


def shared_work(config: dict) -> str:
    """What `prepare` does for a plain config dict, as one string: two configs equal on it build and
    check the same things (the cache entries by their keys, where, and the data's rewards), so a
    sweep prepares it once for all of them."""
    from resrl.config import from_dict

    cfg = from_dict(config)
    return json.dumps([cache_keys(cfg), config["run"].get("cache_dir"), config.get("reward")], sort_keys=True,
                      default=str)


def files_identity(path: Path) -> list:
    """Path plus name, size and mtime (ns) of every file under it: edited inputs (a model
    folder, a data file or folder) get a new cache key. Empty for a path that does not
    exist here (e.g. a hub dataset name)."""
    path = Path(path)
    if not path.exists():
        return []
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return [str(path.resolve())] + [(str(f.relative_to(path)) if f != path else f.name, f.stat().st_size,
                                     f.stat().st_mtime_ns) for f in files]


def cache_keys(cfg) -> dict[str, str]:
    """The cache keys of the base model, the dataset and the warm-start of `cfg`, computed from
    the config (and the identity of its input files) alone: nothing is built."""
    if cfg.model.path is None:
        base_key = key_of("tiny", dict(cfg.model.tiny), cfg.base_seed)
    else:
        base_key = key_of(files_identity(Path(cfg.model.path)))
    # the input files' identity joins the key only when there are files: synthetic data keeps its old keys
    data_files = files_identity(cfg.data.path) if cfg.data.path is not None else []
    if cfg.data.source == "synthetic":  # the generator's version stands for its "files"
        from resrl.synthetic import VERSION

        data_files = [f"synthetic-v{VERSION}"]
    data_key = key_of(dict(cfg.data), base_key, cfg.base_seed, *([data_files] if data_files else []))
    warmstart_key = key_of(dict(cfg.warmstart), data_key, base_key, cfg.base_seed)
    return {"base": base_key, "data": data_key, "warmstart": warmstart_key}


def prepare_base_and_data(cfg) -> dict:
    """The base model folder and the tokenized dataset (cached); no training."""
    from transformers import AutoTokenizer

    from resrl.embedded import save_embedded_base

    cache = Path(cfg.run.cache_dir)
    keys = cache_keys(cfg)
    if cfg.model.path is None:
        base, _ = cached_dir(cache / "models" / f"tiny-{keys['base']}",
                             lambda d: save_embedded_base(d, cfg.model.tiny, cfg.base_seed))
    else:
        base = Path(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    dataset_dir, reused = cached_dir(cache / "data" / keys["data"], lambda d: prepare_dataset(cfg, tokenizer, d))
    return {"base_dir": base, "base_key": keys["base"], "dataset_dir": dataset_dir, "data_key": keys["data"],
            "data_reused": reused, "warmstart_key": keys["warmstart"]}


def check_room_for_prompts(cfg, dataset_dir: Path) -> None:
    """DataError unless the longest prepared prompt plus the response budget fits the model
    (validation checked the budget alone; the prompts are known only now, before any engine starts)."""
    from resrl.config import model_max_positions

    positions = model_max_positions(cfg.model)
    if positions is None:
        return
    data = load_prepared(dataset_dir)
    longest = max(max(len(p) for p in data[split]["prompt_token_ids"]) for split in data.keys())
    max_new = max(cfg.rollout.max_tokens, cfg.eval.max_tokens)
    if longest + max_new > positions:
        raise DataError(f"the longest prompt ({longest} tokens) plus rollout.max_tokens/eval.max_tokens ({max_new}) "
                        f"exceed the model's {positions} positions; set data.max_prompt_tokens to at most "
                        f"{positions - max_new} or lower the max_tokens")


def check_reward_sources(reward_cfg, dataset_dir: Path) -> None:
    """With the default reward.function (the `reward` section), every row's data_source needs a
    registered reward: said now, before the warm-start and the engines, not at the first rollout's scoring."""
    if reward_cfg.function is not None:
        return
    from resrl.rewards import check_sources

    data = load_prepared(dataset_dir)
    check_sources(source for split in data.keys() for source in data[split]["data_source"])


def prepare(cfg, progress: bool = True) -> dict:
    """Build or reuse dataset and starting policy; returns plain paths and a summary."""
    from resrl.warmstart import warm_start

    t0 = time.time()
    got = prepare_base_and_data(cfg)
    base, dataset_dir = got["base_dir"], got["dataset_dir"]
    summary = load_summary(dataset_dir)
    check_room_for_prompts(cfg, dataset_dir)
    check_reward_sources(cfg.reward, dataset_dir)
    metrics = dict(summary.as_metrics())
    policy = base
    warm_reused = warm_source = None
    if cfg.warmstart.enabled:
        warm_source = "cache"

        def build(d):
            nonlocal warm_source
            got_published = published.copy_into(got["warmstart_key"], d) if cfg.run.published_warmstart else None
            if got_published is not None:  # the project's own build of this very entry (resrl/published.py)
                warm_source = "published"
                metrics.update(got_published)
                return
            warm_source = "trained"
            train = load_prepared(dataset_dir)["train"]
            metrics.update(warm_start(str(base), d, train, cfg, progress=progress))

        policy, warm_reused = cached_dir(Path(cfg.run.cache_dir) / "warmstart" / got["warmstart_key"], build)
    return {
        "dataset_dir": str(dataset_dir),
        "base_dir": str(base),
        "policy_dir": str(policy),
        "data_reused": got["data_reused"],
        "warmstart_reused": warm_reused,
        "warmstart_source": warm_source,  # None (off) | cache | published (resrl/published.py) | trained
        "summary_lines": summary.lines(),
        "metrics": metrics,
        "seconds": time.time() - t0,
    }
