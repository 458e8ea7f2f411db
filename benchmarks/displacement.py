"""The positive control: does NSR displace the positives on the testbed, and does ResRL less?

    python benchmarks/displacement.py [--algorithms nsr resrl grpo] [--seeds 0 1 2 3 4]
                                      [--steps 10] [key=value ...]

From one base model and warm-start (`base_seed`, fixed), each algorithm runs `--steps` RL
steps for every RL `seed`, in process (TrainingSession: vLLM + DeepSpeed, no Prefect or
MLflow), with the displacement diagnostics every step (resrl/displacement.py):

- `disp/seq_logp_change`: per positive response, the change of its sequence log-prob across
  the step's update (mean over positives);
- `disp/frac_pos_down`: the share of positives whose log-prob fell;
- `disp/shared_logp_change`: the change over a positive's tokens that a negative of its group
  shares;
- `disp/neg_interference(_cos)`: the first-order push the negative part of the loss alone
  gives the positives' mean sequence log-prob, per unit step along its gradient (and cosine);
- ResRL's weights of the negatives' tokens by class (`resrl/weight_shared`, `_first_divergent`,
  `_after`), computed for every algorithm.

Per run, the mean over steps; per algorithm, the mean over RL seeds with a two-sided 95 %
Student-t interval. The control passes when NSR's `seq_logp_change` interval lies below 0.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEYS = ["disp/seq_logp_change", "disp/frac_pos_down", "disp/shared_logp_change", "lld",
        "disp/neg_interference", "disp/neg_interference_cos",
        "resrl/weight_shared", "resrl/weight_first_divergent", "resrl/weight_after", "pass_rate"]


def t_half_width(values: list[float]) -> float:
    from scipy import stats

    n = len(values)
    return float(stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)) if n > 1 else float("nan")


def run(cfg, prepared: dict, steps: int) -> dict[str, float]:
    from resrl.session import TrainingSession

    s = TrainingSession(cfg, prepared, prepared["policy_dir"], None)
    per_step: dict[str, list[float]] = {}
    try:
        for step in range(1, steps + 1):
            batch, roll = s.rollout(step)
            metrics = {**roll, **s.update(step, batch)}
            for key in KEYS:
                v = metrics.get(f"train/{key}")
                if v is not None and v == v:
                    per_step.setdefault(key, []).append(v)
    finally:
        s.close()
    return {k: sum(v) / len(v) for k, v in per_step.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithms", nargs="+", default=["nsr", "resrl", "grpo"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from resrl.config import load_config
    from resrl.environment import set_process_defaults
    from resrl.prepare import prepare

    set_process_defaults()
    base = load_config(None, ["algorithm.diagnostics_every=1", *args.overrides])
    prepared = prepare(base, progress=False)
    print(f"base_seed {base.base_seed}, warm-start {prepared['policy_dir']}, {args.steps} steps x "
          f"{base.rollout.prompts_per_step} prompts x {base.rollout.n} samples, lr {base.trainer.lr}")
    results: dict[str, list[dict]] = {}
    for algorithm in args.algorithms:
        for seed in args.seeds:
            cfg = load_config(None, ["algorithm.diagnostics_every=1", *args.overrides,
                                     f"algorithm.name={algorithm}", f"seed={seed}"])
            t0 = time.time()
            got = run(cfg, prepared, args.steps)
            results.setdefault(algorithm, []).append(got)
            print(f"{algorithm} seed {seed} ({time.time() - t0:.0f} s): "
                  + ", ".join(f"{k.split('/')[-1]} {v:+.4f}" for k, v in got.items()), flush=True)
    print("\nmean over RL seeds +- 95 % t half-width (per run: mean over steps)")
    print("| algorithm | " + " | ".join(KEYS) + " |")
    print("|---" * (len(KEYS) + 1) + "|")
    for algorithm, runs in results.items():
        cells = []
        for key in KEYS:
            vals = [r[key] for r in runs if key in r]
            cells.append(f"{statistics.mean(vals):+.4f} ± {t_half_width(vals):.4f}" if vals else "-")
        print(f"| {algorithm} | " + " | ".join(cells) + " |")
    nsr = [r["disp/seq_logp_change"] for r in results.get("nsr", []) if "disp/seq_logp_change" in r]
    if len(nsr) > 1:
        hi = statistics.mean(nsr) + t_half_width(nsr)
        print(f"\npositive control (NSR displaces the positives, interval below 0): "
              f"{'PASS' if hi < 0 else 'FAIL'} (upper end {hi:+.4f})")


if __name__ == "__main__":
    main()
