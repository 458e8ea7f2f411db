"""Publish the default config's warm-start (resrl/published.py), or check the published one.

    python -m resrl.publish_warmstart [--config FILE] [key=value ...]          train and publish (~3 min)
    python -m resrl.publish_warmstart --check [--config FILE] [key=value ...]  train here, compare, publish nothing

Both train the warm-start afresh in a temporary cache, never from the published copy. `--check`
says whether this machine's result is bit-identical to the published one (exit status 1 if not).
"""
from __future__ import annotations

from pathlib import Path

from resrl.cache import file_sha256
from resrl.published import ROOT, publish, verified


def _fresh_build(cfg, cache_dir: Path) -> Path:
    """Train the warm-start of `cfg` (never the published copy) in the empty cache `cache_dir`."""
    from resrl.prepare import prepare

    cfg.run.cache_dir = str(cache_dir)
    cfg.run.published_warmstart = False
    got = prepare(cfg, progress=True)
    assert got["warmstart_source"] == "trained", got["warmstart_source"]
    return Path(got["policy_dir"])


def _compare(a: Path, b: Path) -> float:
    """The largest absolute difference between two safetensors weight files (inf: other names or shapes)."""
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    if x.keys() != y.keys() or any(x[k].shape != y[k].shape for k in x):
        return float("inf")
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import subprocess
    import tempfile

    from resrl.config import load_config, to_dict
    from resrl.environment import set_process_defaults
    from resrl.prepare import cache_keys

    set_process_defaults()  # as `resrl train` runs: offline hub, thread settings (the same files result)

    ap = argparse.ArgumentParser(prog="python -m resrl.publish_warmstart", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="YAML file merged onto conf/default.yaml (default: the default config)")
    ap.add_argument("--check", action="store_true", help="train afresh and compare with the published copy")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not cfg.warmstart.enabled:
        raise SystemExit("this config has warmstart.enabled=false: there is nothing to publish")
    key = cache_keys(cfg)["warmstart"]
    with tempfile.TemporaryDirectory(prefix="resrl-publish-") as tmp:
        built = _fresh_build(cfg, Path(tmp))
        assert built.name == key  # the cache entry's folder is named by its key
        weights = "model.safetensors"
        if args.check:
            d = verified(key)
            if d is None:
                print(f"no verified published warm-start {key} in {ROOT}")
                return 1
            diff = _compare(built / weights, d / weights)
            same = file_sha256(built / weights) == file_sha256(d / weights)
            print(f"warm-start {key}: trained here vs published: {'bit-identical' if same else 'different'}"
                  f" (max |difference| {diff:.3g})")
            return 0 if same else 1
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or "unknown"
        plain = to_dict(cfg)
        d = publish(key, built, config={k: v for k, v in plain.items() if k != "run"}, commit=commit)
    print(f"published warm-start {key} in {d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
