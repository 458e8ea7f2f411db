"""Does RL learn on the embedded testbed? The main job, per algorithm and seed, measured.

    python benchmarks/learning.py [--algorithms grpo resrl] [--seeds 0 1 2]
                                  [--plot docs/learning_curve.png] [key=value ...]

Runs `resrl train` as a user would (the default config, one key changed:
`algorithm.name`, and `seed`), in a fresh cache, so the first run of each seed builds
the embedded model, data and warm-start, and its wall time is the main job's on a new
machine (set-up of .venv excluded). Then reads held-out pass@1 per evaluation step
from each MLflow run and prints, per algorithm, the gain over the warm-start (final
step minus step 0) as the mean over seeds with a two-sided 95 % Student-t interval,
and plots the learning curves (mean and interval band per algorithm).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_one(algorithm: str, seed: int, base: Path, overrides: list[str]) -> dict:
    from mlflow.tracking import MlflowClient

    from resrl.config import load_config, run_dir
    from resrl.metrics import pass_key
    from tasks.tracking import tracking_uri

    args = [f"algorithm.name={algorithm}", f"seed={seed}", f"run.cache_dir={base}/cache",
            f"run.output_dir={base}/outputs", *overrides]
    cfg = load_config(None, args)  # before the run: its folder is named by the code it starts with
    rdir = run_dir(cfg)
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "resrl.cli", "train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"resrl train {' '.join(args)} failed ({proc.returncode})")
    state = json.loads((rdir / "state.json").read_text())
    client = MlflowClient(tracking_uri(cfg.run))
    curve = {m.step: m.value for m in client.get_metric_history(state["mlflow_run_id"], pass_key(1))}
    k = cfg.eval.k
    final = client.get_run(state["mlflow_run_id"]).data.metrics
    return {"algorithm": algorithm, "seed": seed, "wall_s": wall, "curve": dict(sorted(curve.items())),
            f"pass_at_{k}": final[pass_key(k)], "k": k,
            "warmstart": "built" if "warm-start trained now" in proc.stdout + proc.stderr else "cached"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithms", nargs="+", default=["grpo", "resrl"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--plot", default=str(ROOT / "docs" / "learning_curve.png"))
    ap.add_argument("--json", help="also write every run's figures here")
    ap.add_argument("--from-json", help="report and plot the runs a --json file holds, without training")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = ap.parse_args()
    from resrl.report import mean_ci95

    runs = []
    if args.from_json:  # re-report earlier runs (e.g. a new plot) without training again
        runs = json.loads(Path(args.from_json).read_text())
        runs = [dict(r, curve={int(k): v for k, v in r["curve"].items()}) for r in runs]
        args.algorithms = list(dict.fromkeys(r["algorithm"] for r in runs))
        args.seeds = sorted({r["seed"] for r in runs})
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for seed in args.seeds:
                for algorithm in args.algorithms:
                    r = run_one(algorithm, seed, Path(tmp), args.overrides)
                    c = r["curve"]
                    print(f"{algorithm:12s} seed {seed}: {r['wall_s']:6.1f} s (warm-start {r['warmstart']}) | "
                          "pass@1 " + " ".join(f"{s}:{v:.3f}" for s, v in c.items()), flush=True)
                    runs.append(r)
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(runs, indent=1))

    print("\nheld-out pass@1, mean over seeds ± 95 % t-interval")
    print(f"{'algorithm':12s} {'seeds':>5s} {'start':>15s} {'final':>15s} {'gain':>15s} {'pass@k final':>15s} "
          f"{'max wall s':>10s}")
    curves = {}
    for algorithm in args.algorithms:
        rs = [r for r in runs if r["algorithm"] == algorithm]
        start = [r["curve"][min(r["curve"])] for r in rs]
        end = [r["curve"][max(r["curve"])] for r in rs]
        gain = [e - s for s, e in zip(start, end)]
        fmt = [mean_ci95(v) for v in (start, end, gain, [r[f"pass_at_{r['k']}"] for r in rs])]
        print(f"{algorithm:12s} {len(rs):5d} " + " ".join(f"{m:7.3f} ± {h:5.3f}" for m, h, _ in fmt)
              + f" {max(r['wall_s'] for r in rs):10.1f}")
        lo = fmt[2][0] - fmt[2][1]
        print(f"{'':12s} gain interval: [{lo:.3f}, {fmt[2][0] + fmt[2][1]:.3f}]"
              f"{'  (above zero)' if lo > 0 else '  (includes zero)'}")
        steps = sorted(set.intersection(*(set(r["curve"]) for r in rs)))
        curves[algorithm] = (steps, [[r["curve"][t] for t in steps] for r in rs])
    plot(curves, Path(args.plot), n_seeds=len(args.seeds))
    print(f"\nlearning curves: {args.plot}")


def plot(curves: dict, path: Path, n_seeds: int) -> None:
    """Left: held-out pass@1 per seed (thin) and their mean (thick). Right: the gain over each
    seed's own start, mean and 95 % t-band (the seeds' warm-starts differ more than RL's effect)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from resrl.report import mean_ci95

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (algorithm, (steps, per_seed)) in enumerate(curves.items()):
        color = f"C{i}"
        for ys in per_seed:
            ax.plot(steps, ys, color=color, alpha=0.35, lw=1)
        ax.plot(steps, [sum(v) / len(v) for v in zip(*per_seed)], color=color, marker="o", lw=2, label=algorithm)
        stats = [mean_ci95([ys[j] - ys[0] for ys in per_seed]) for j in range(len(steps))]
        mean = [m for m, _, _ in stats]
        half = [0.0 if h != h else h for _, h, _ in stats]  # nan (one seed) -> no band
        bx.plot(steps, mean, color=color, marker="o", label=algorithm)
        bx.fill_between(steps, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                        color=color, alpha=0.2)
    ax.set_ylabel("held-out pass@1")
    ax.set_title(f"per seed (thin) and mean of {n_seeds} seeds", fontsize=10)
    bx.axhline(0, color="k", lw=0.5)
    bx.set_ylabel("gain over the warm-start")
    bx.set_title(f"gain: mean of {n_seeds} seeds, 95 % t-interval", fontsize=10)
    for a in (ax, bx):
        a.set_xlabel("RL step")
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle("Embedded testbed, the main job (`resrl train`, default config)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
