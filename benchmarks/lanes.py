"""Several processes at once on one machine, with and without a share of the cores each
(resrl/cores.py): the situation of a sweep's lanes or of data-parallel CPU ranks.

    python benchmarks/lanes.py [--processes 2] [--steps 30]

Each process trains the embedded-size Qwen2 (2 x 256, the testbed's policy shape, random
weights) for --steps forward/backward/Adam steps on 64 x 64 random tokens - the kind of work a
lane's update and warm-start do. Runs: one process alone; then --processes at once with default
threads (each sizes its pool to all cores); then at once with a core share each. Prints the wall
time of each configuration. A proxy, not a sweep: no vLLM, no Prefect, no MLflow.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORK = """
import os, sys, time, torch
from resrl import cores
cores.apply_from_env()
from transformers import Qwen2Config, Qwen2ForCausalLM
torch.manual_seed(0)
cfg = Qwen2Config(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
model = Qwen2ForCausalLM(cfg)
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
ids = torch.randint(0, 64, (64, 64))
t = time.perf_counter()
for _ in range(int(sys.argv[1])):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad()
print(f"{time.perf_counter() - t:.2f} threads={torch.get_num_threads()} cores={sorted(os.sched_getaffinity(0))}")
"""


def run(k: int, steps: int, share: bool) -> tuple[float, list[str]]:
    from resrl import cores

    base = {key: v for key, v in os.environ.items() if key not in cores.THREAD_ENV}
    base["PYTHONPATH"] = str(ROOT)
    procs = []
    t = time.perf_counter()
    for i in range(k):
        env = dict(base)
        if share:
            env.update(cores.core_share(i, k, cores.available_cores()).env())
        procs.append(subprocess.Popen([sys.executable, "-c", WORK, str(steps)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, text=True))
    lines = [p.communicate()[0].strip() for p in procs]
    return time.perf_counter() - t, lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    print(f"load average before: {os.getloadavg()}")
    for label, k, share in (("1 process alone", 1, False), (f"{a.processes} at once, default threads", a.processes,
                                                             False), (f"{a.processes} at once, a core share each",
                                                                      a.processes, True)):
        wall, lines = run(k, a.steps, share)
        print(f"{label:<40} wall {wall:6.1f} s | per process: {' ; '.join(lines)}", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
