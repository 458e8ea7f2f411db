"""What ResRL's token weighting costs: alone, and inside a full update step next to GRPO.

    python benchmarks/resrl_overhead.py [--quick]

1. `residual_token_weights` alone on (groups x n, T, H) hidden states: randomized
   (default) and exact, batched; and a per-group Python loop of the same exact
   computation, for comparison.
2. `PolicyTrainer.train_step` with algorithm.name=grpo and =resrl on the same batch
   and starting weights, alternating, median of the repeats: the ResRL / GRPO ratio,
   for the default config's batch shape and for a larger one.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from resrl.environment import set_process_defaults  # noqa: E402

set_process_defaults()
from resrl.algorithms import residual_token_weights  # noqa: E402
from resrl.batch import RolloutBatch  # noqa: E402


def synthetic_states(groups, n, T, H, seed=0, gap_at=None):
    """Per group, states on a random basis with a decaying spectrum (sigma_i ~ 1/i), plus noise;
    with `gap_at=k` the directions after the k-th are shrunk 10x (a clear spectral gap)."""
    g = torch.Generator().manual_seed(seed)
    r = min(H, 96)
    basis = torch.randn(groups, H, r, generator=g)
    gid = torch.arange(groups).repeat_interleave(n)
    scale = 4.0 / torch.arange(1, r + 1)
    if gap_at is not None:
        scale[gap_at:] *= 0.1
    coeff = torch.randn(groups * n, T, r, generator=g) * scale
    hs = torch.einsum("bhr,btr->bth", basis[gid], coeff)
    hs += 0.05 * torch.randn(groups * n, T, H, generator=g)
    lengths = torch.randint(T // 4, T + 1, (groups * n,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    pos = (torch.arange(groups * n) % n) < n // 2
    return hs, mask, pos, gid


def timed(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def weighting_alone(groups, n, T, H, rank):
    hs, mask, pos, gid = synthetic_states(groups, n, T, H)
    kw = dict(rank=rank, q_low=0.2, q_high=0.8, min_weight=0.1)
    rand = timed(lambda: residual_token_weights(hs, mask, pos, gid, svd="randomized", **kw))
    exact = timed(lambda: residual_token_weights(hs, mask, pos, gid, svd="exact", **kw))
    loop = timed(lambda: [residual_token_weights(hs[gid == g], mask[gid == g], pos[gid == g], gid[gid == g],
                                                 svd="exact", **kw) for g in range(groups)], repeats=1)
    errors = []
    for gap in (rank, None):
        h2, m2, p2, g2 = synthetic_states(groups, n, T, H, gap_at=gap)
        w_r = residual_token_weights(h2, m2, p2, g2, svd="randomized", **kw)
        w_e = residual_token_weights(h2, m2, p2, g2, svd="exact", **kw)
        errors.append(float((w_r - w_e).abs().max()))
    print(f"  weights alone, {groups} groups x {n} x {T} tokens, H={H}, rank={rank}: "
          f"randomized {rand * 1e3:.1f} ms | exact (batched) {exact * 1e3:.1f} ms | "
          f"exact, loop over groups {loop * 1e3:.1f} ms\n"
          f"    max |randomized - exact| weight: {errors[0]:.4f} with a spectral gap after the k-th direction, "
          f"{errors[1]:.4f} on a gapless sigma_i ~ 1/i spectrum")


def make_batch(groups, n, prompt_len, T, vocab, seed=0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    prompts, responses, scores, gids = [], [], [], []
    for grp in range(groups):
        p = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        for i in range(n):
            length = int(torch.randint(T // 2, T + 1, (1,), generator=g))
            prompts.append(p)
            responses.append(torch.randint(0, vocab, (length,), generator=g).tolist())
            scores.append(float(i < n // 4 + (grp % 3)))
            gids.append(grp)
    s = torch.tensor(scores)
    return RolloutBatch(prompts, responses, s.clone(), s, torch.tensor(gids))


def update_ratio(label, model_dir, batch, overrides, repeats):
    from resrl.config import load_config
    from resrl.trainer import PolicyTrainer

    trainers = {}
    for algo in ("grpo", "resrl"):  # plain GRPO: without the diagnostics that compute ResRL's weights too
        cfg = load_config(None, [f"algorithm.name={algo}", "trainer.device=cpu", *overrides,
                                 *(["algorithm.diagnostics=false"] if algo == "grpo" else [])])
        trainers[algo] = PolicyTrainer(str(model_dir), cfg, rollout_batch_size=len(batch))
    times = {"grpo": [], "resrl": []}
    for r in range(repeats + 1):  # the first round warms up
        for algo, tr in trainers.items():
            t = time.perf_counter()
            tr.train_step(batch, step=r + 1)
            if r:
                times[algo].append(time.perf_counter() - t)
    # the weighting's own share: the scoring pass with and without the token-weight function,
    # alternating so both see the same machine load
    spent = {"with": [], "without": []}
    for _ in range(max(2, repeats)):
        for name, tr in (("with", trainers["resrl"]), ("without", trainers["grpo"])):
            t = time.perf_counter()
            tr.score(batch)
            spent[name].append(time.perf_counter() - t)
    t_with, t_without = statistics.median(spent["with"]), statistics.median(spent["without"])
    g, s = statistics.median(times["grpo"]), statistics.median(times["resrl"])
    print(f"  update step, {label}: GRPO {g:.2f} s | ResRL {s:.2f} s | ratio {s / g:.3f} (median of {repeats}) "
          f"| scoring pass {t_with:.2f} s with the weighting, {t_without:.2f} s without "
          f"-> weighting adds {100 * (t_with - t_without) / g:.1f} % to a GRPO step")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}")
    print("1) ResRL weighting alone")
    weighting_alone(32, 8, 32, 128, rank=8)
    if not args.quick:
        weighting_alone(64, 8, 256, 512, rank=64)

    print("2) full update step, ResRL vs GRPO, same batch and weights")
    from omegaconf import OmegaConf

    from resrl.config import load_config
    from resrl.embedded import save_embedded_base

    cfg = load_config()
    with tempfile.TemporaryDirectory() as tmp:
        small = save_embedded_base(Path(tmp) / "default", cfg.model.tiny, seed=0)
        r = cfg.rollout
        batch = make_batch(r.prompts_per_step, r.n, 12, 26, 250)
        label = f"default shape ({r.prompts_per_step} groups x {r.n} x ~26 tokens, H={cfg.model.tiny.hidden_size})"
        update_ratio(label, small, batch, [], repeats=3)
        if not args.quick:
            big_cfg = OmegaConf.create(dict(hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=8,
                                            num_kv_heads=4, max_positions=512))
            big = save_embedded_base(Path(tmp) / "h512", big_cfg, seed=0)
            batch = make_batch(64, 8, 32, 256, 250)
            update_ratio("64 groups x 8 x 256 tokens, H=512 (2 layers)", big, batch,
                         ["rollout.prompts_per_step=64", "rollout.n=8", "trainer.micro_batch_size=32",
                          "algorithm.rank=64", "rollout.max_tokens=256", "trainer.mini_batches=1"], repeats=2)


if __name__ == "__main__":
    main()
