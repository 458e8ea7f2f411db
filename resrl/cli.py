"""`resrl` command line.

    resrl train [--config FILE] [key=value ...]
    resrl sweep --config FILE [key=value ...]
    resrl compare SWEEP_ID [--config FILE]

Configs are checked (unknown keys, bad values, model folders) before anything heavy
starts. Orchestration (Prefect) and tracking (MLflow) are imported only here, so the
`resrl` library itself stays importable without them.
"""
from __future__ import annotations

import argparse
import os
import sys

QUIET_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",   # vLLM engine core in this process (in-memory weight sync)
    "VLLM_LOGGING_LEVEL": "ERROR",         # its CPU warnings repeat at every weight sync
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",                  # nothing is downloaded unless the user opts in
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def set_environment_defaults() -> None:
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resrl", description="ResRL experiment workflow (Prefect + MLflow).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one policy (data -> rollouts -> updates -> evaluation)")
    t.add_argument("--config", help="YAML file merged onto conf/default.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. algorithm.name=grpo trainer.steps=10")
    s = sub.add_parser("sweep", help="run a grid of training runs as one Prefect sweep flow")
    s.add_argument("--config", required=True, help="sweep YAML (see conf/sweep/)")
    s.add_argument("overrides", nargs="*", help="key=value overrides applied to every grid point")
    e = sub.add_parser("export-verl", help="write the prepared train/test data as verl RLVR parquet files")
    e.add_argument("out_dir")
    e.add_argument("--config", help="YAML file merged onto conf/default.yaml")
    e.add_argument("overrides", nargs="*")
    c = sub.add_parser("compare", help="rebuild a sweep's comparison report from MLflow")
    c.add_argument("sweep_id")
    c.add_argument("--config", help="a config naming the tracking store (run.tracking_uri / run.output_dir)")
    c.add_argument("overrides", nargs="*")
    return p


def _train(args) -> int:
    from resrl.config import load_config, run_dir, to_dict

    cfg = load_config(args.config, args.overrides)
    from flows.train import train_flow
    from tasks.tracking import run_url_hint, tracking_uri

    rdir = run_dir(cfg)
    print(f"resrl: run folder {rdir}  |  MLflow store {tracking_uri(cfg)}", flush=True)
    result = train_flow(config=to_dict(cfg))
    print()
    if result.get("already_finished"):
        print("This run already finished earlier (same config); nothing was re-run. "
              "Start a new one with run.name=... or change the config.")
    else:
        ev = result["final_eval"]
        if ev:
            k = int(ev["eval/k"])
            print(f"final eval: avg@{k} {ev[f'eval/avg_at_{k}']:.3f} | pass@1 {ev['eval/pass_at_1']:.3f} | "
                  f"pass@{k} {ev[f'eval/pass_at_{k}']:.3f}")
        t = result["timings"]
        print("time: " + " | ".join(f"{name} {sec:.1f}s" for name, sec in t.items())
              + f" | peak RSS {result['peak_rss_gb']:.2f} GB")
    print(f"run folder:    {result['run_dir']}")
    print(f"MLflow run:    {result['mlflow_run_id']}  (store: {result['tracking_uri']})")
    print(f"see it with:   {run_url_hint(cfg)}")
    return 0


def _export_verl(args) -> int:
    from pathlib import Path

    from resrl.config import load_config
    from resrl.data import export_verl, load_summary
    from resrl.prepare import prepare_base_and_data

    cfg = load_config(args.config, args.overrides)
    got = prepare_base_and_data(cfg)
    for line in load_summary(got["dataset_dir"]).lines():
        print(f"data: {line}")
    for split, path in export_verl(got["dataset_dir"], Path(args.out_dir)).items():
        print(f"wrote {split}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    set_environment_defaults()
    args = _parser().parse_args(argv)
    from resrl.config import ConfigError
    from resrl.data import DataError

    try:
        if args.command == "train":
            return _train(args)
        if args.command == "export-verl":
            return _export_verl(args)
        if args.command == "sweep":
            from flows.sweep import run_sweep_cli

            return run_sweep_cli(args)
        if args.command == "compare":
            from flows.sweep import compare_cli

            return compare_cli(args)
    except (ConfigError, DataError) as exc:
        print(f"resrl: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
