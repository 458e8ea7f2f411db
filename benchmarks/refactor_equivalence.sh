#!/bin/bash
# A refactor changes nothing: the same seeds give bit-identical weights and metrics from one RL update
# of the real trainer (tests/dp_ranks.py update: 1 rank ResRL and GRPO, 2 ranks ResRL ZeRO-0, 2 ranks PSR
# ZeRO-3 with uneven shares) in two checkouts.   bash benchmarks/refactor_equivalence.sh OLD_CHECKOUT NEW_CHECKOUT
# (e.g. git worktree add /tmp/old HEAD~1). Uses the venv of this checkout; ~10 min on 2 cores.
set -e
OLD=$(realpath "$1"); NEW=$(realpath "$2")
PY=$(dirname "$(realpath "$0")")/../.venv/bin/python
W=$(mktemp -d)
export OMP_NUM_THREADS=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 DS_ACCELERATOR=cpu
M=$W/model
mkdir -p $W
[ -d $M ] || PYTHONPATH=$NEW $PY -c "
from omegaconf import OmegaConf
from resrl.embedded import save_embedded_base
tiny = OmegaConf.create(dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2, num_kv_heads=1, max_positions=128))
from pathlib import Path; save_embedded_base(Path('$M'), tiny, seed=0)"
run() { # checkout name nproc zero overrides...
  local tree=$1 name=$2 n=$3 z=$4; shift 4
  env -u PYTHONPATH $PY -m torch.distributed.run --nproc_per_node $n --master_addr 127.0.0.1 --master_port $((29500 + RANDOM % 1000)) \
     $tree/tests/dp_ranks.py update $M $W/$name $z "$@" > $W/$name.log 2>&1 || { echo "FAILED $name"; tail -20 $W/$name.log; exit 1; }
}
for tree in old new; do
  dir=$OLD; [ $tree = new ] && dir=$NEW
  run $dir $tree-resrl-1 1 0
  run $dir $tree-grpo-1 1 0 algorithm.name=grpo
  run $dir $tree-resrl-2 2 0
  run $dir $tree-psr-z3-2 2 3 rollout.prompts_per_step=5 algorithm.name=psr trainer.micro_batch_size=1
done
W=$W $PY - <<'PY'
import json, os, sys, torch
w, same = os.environ["W"], True
for case in ("resrl-1", "grpo-1", "resrl-2", "psr-z3-2"):
    a, b = (f"{w}/{t}-{case}" for t in ("old", "new"))
    wa, wb = torch.load(a + "/weights.pt"), torch.load(b + "/weights.pt")
    ma, mb = json.load(open(a + "/metrics.json")), json.load(open(b + "/metrics.json"))
    same_w = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    diff = {k: (ma.get(k), mb.get(k)) for k in set(ma) | set(mb)
            if not (ma.get(k) == mb.get(k) or (ma.get(k) != ma.get(k) and mb.get(k) != mb.get(k)))}
    same = same and same_w and not diff
    print(f"{case:10s} weights identical: {same_w}  metrics: {len(ma)} keys, differing: {diff or 'none'}")
sys.exit(0 if same else 1)
PY
