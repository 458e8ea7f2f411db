"""What each pass of the update costs: the separate scoring pass, the displacement diagnostics.

    python benchmarks/update_passes.py [--repeats 3]

`PolicyTrainer.train_step` (ResRL, the default config's batch shape: 32 groups x 8 samples x
~26 tokens, the embedded 2 x 256 model) in four settings, same batch and starting weights,
alternating round by round so each sees the same machine load; median seconds per step:

- default: 2 mini-batches, displacement diagnostics this step (`algorithm.diagnostics_every=1`);
- 2 mini-batches, a step without the diagnostics;
- 1 mini-batch with the separate no-grad scoring pass (`trainer.single_pass=false`);
- 1 mini-batch, single pass: the loss's forward gives the old log-probs and hidden states.

It prints the ratios the defaults were chosen by (README "Passes of an update").
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from resrl.environment import set_process_defaults  # noqa: E402

set_process_defaults()
from benchmarks.resrl_overhead import make_batch  # noqa: E402

SETTINGS = {
    "2 mini-batches, diagnostics": ["trainer.mini_batches=2", "algorithm.diagnostics_every=1"],
    "2 mini-batches, no diagnostics": ["trainer.mini_batches=2", "algorithm.diagnostics_every=100000"],
    "1 mini-batch, separate scoring pass": ["trainer.mini_batches=1", "algorithm.diagnostics_every=100000",
                                            "trainer.single_pass=false"],
    "1 mini-batch, single pass": ["trainer.mini_batches=1", "algorithm.diagnostics_every=100000"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    from resrl.config import load_config
    from resrl.embedded import save_embedded_base
    from resrl.trainer import PolicyTrainer

    cfg = load_config()
    r = cfg.rollout
    batch = make_batch(r.prompts_per_step, r.n, 12, 26, 250)
    print(f"torch threads {torch.get_num_threads()}; batch {r.prompts_per_step} groups x {r.n} x ~26 tokens; ResRL")
    with tempfile.TemporaryDirectory() as tmp:
        model = save_embedded_base(Path(tmp) / "m", cfg.model.tiny, seed=0)
        trainers = {name: PolicyTrainer(str(model), load_config(None, ["trainer.device=cpu", *o]),
                                        rollout_batch_size=len(batch)) for name, o in SETTINGS.items()}
        times = {name: [] for name in SETTINGS}
        for rnd in range(args.repeats + 1):  # round 0 warms up
            for name, tr in trainers.items():
                t = time.perf_counter()
                tr.train_step(batch, step=rnd + 1)
                if rnd:
                    times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    for name, v in med.items():
        print(f"  {name:<38} {v:6.2f} s per step (median of {args.repeats})")
    names = list(SETTINGS)
    print(f"diagnostics cost, 2 mini-batches: {med[names[0]] / med[names[1]]:.2f}x a step without them")
    print(f"single pass / separate scoring pass, 1 mini-batch: {med[names[3]] / med[names[2]]:.2f}x")


if __name__ == "__main__":
    main()
