"""The default main job, measured: where the wall time goes, peak memory, and vLLM's
rollout throughput next to Hugging Face `generate`.

    python benchmarks/pipeline.py [--config FILE] [key=value ...]

Runs `resrl train` as a user would (a fresh cache and output folder, so the embedded
model, dataset and warm-start are built too), samples the memory of its whole process
tree every 0.2 s (PSS, so pages a child shares with its parent, e.g. right after a fork,
are not counted twice), then reads the per-part timings from the MLflow run. Finally it
compares vLLM with HF generate on the trained policy and the held-out prompts.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(PSS, RSS) summed over the process tree. The RSS sum counts shared pages once per
    process, so a forked child briefly doubles it; PSS splits them between the sharers."""
    pss = rss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            m = p.memory_full_info()
            pss, rss = pss + m.pss, rss + m.rss
        except psutil.Error:
            pass
    return pss, rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from mlflow.tracking import MlflowClient

    from resrl.config import load_config, run_dir
    from tasks.tracking import tracking_uri

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"run.cache_dir={tmp}/cache", f"run.output_dir={tmp}/outputs", *args.overrides]
        cfg = load_config(args.config, overrides)
        cmd = [sys.executable, "-m", "resrl.cli", "train", *(["--config", args.config] if args.config else []),
               *overrides]
        print("running:", " ".join(cmd[2:]), flush=True)
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peak = [0, 0]  # PSS, RSS
        done = threading.Event()

        def sample():
            ps = psutil.Process(proc.pid)
            while not done.is_set():
                peak[:] = [max(a, b) for a, b in zip(peak, tree_memory(ps))]
                time.sleep(0.2)
        threading.Thread(target=sample, daemon=True).start()
        out, _ = proc.communicate()
        done.set()
        wall = time.time() - t0
        if proc.returncode:
            print(out[-5000:])
            raise SystemExit(f"resrl train failed ({proc.returncode})")
        import json

        state = json.loads((run_dir(cfg) / "state.json").read_text())
        client = MlflowClient(tracking_uri=tracking_uri(cfg.run))
        m = client.get_run(state["mlflow_run_id"]).data.metrics
        parts = {name: m[f"time/total_{name}_s"] for name in ("prepare", "engine_start", "rollout", "update", "eval")}
        in_flow = m["time/flow_s"]
        print(f"\nmain job ({cfg.trainer.steps} RL steps x {cfg.rollout.prompts_per_step} prompts x {cfg.rollout.n} "
              f"samples, {cfg.algorithm.name}) on {psutil.cpu_count()} CPU cores: {wall:.1f} s end to end")
        for name, sec in parts.items():
            print(f"  {name:<13} {sec:7.1f} s  {100 * sec / wall:5.1f} %")
        orchestration = wall - sum(parts.values())
        print(f"  {'orchestration':<13} {orchestration:7.1f} s  {100 * orchestration / wall:5.1f} %   "
              f"(process start, imports, Prefect server and task runs, MLflow logging; "
              f"{in_flow - sum(parts.values()):.1f} s of it inside the flow)")
        print(f"peak memory: {peak[0] / 2**30:.2f} GiB PSS for the whole process tree (sum of RSS, "
              f"counting shared pages per process: {peak[1] / 2**30:.2f} GiB; main process peak RSS "
              f"{m['sys/peak_rss_gb']:.2f} GiB)")
        final = {k: v for k, v in m.items() if k.startswith("eval/pass_at_") or k.startswith("eval/avg_at_")}
        print("final eval:", ", ".join(f"{k[5:]} {v:.3f}" for k, v in sorted(final.items())))

        from generation import measure

        from resrl.checkpoint import checkpoint_dir, policy_dir
        from resrl.data import load_prepared

        policy = policy_dir(checkpoint_dir(run_dir(cfg), cfg.trainer.steps))
        prepared_dirs = sorted((Path(tmp) / "cache" / "data").iterdir())
        test = load_prepared(prepared_dirs[0])["test"]
        prompts = [test[i]["prompt_token_ids"] for i in range(min(64, len(test)))]
        print(f"\nrollout throughput on the trained policy, {len(prompts)} held-out prompts x 8 samples, "
              f"max {cfg.rollout.max_tokens} new tokens:")
        for fixed in (False, True):
            r = measure(str(policy), prompts, 8, cfg.rollout.max_tokens, fixed_length=fixed)
            label = "fixed length (EOS ignored)" if fixed else "rollout (stop at EOS)"
            print(f"  {label:<27} vLLM {r['vllm_tok_s']:7.0f} tok/s | HF generate {r['hf_tok_s']:7.0f} tok/s | "
                  f"vLLM/HF {r['ratio']:.2f}x")


if __name__ == "__main__":
    main()
