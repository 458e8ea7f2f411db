"""What the embedded testbed offers RL at step 0, measured on held-out prompts.

    python benchmarks/testbed.py [--k 64] [--prompts 200] [--no-skill] [key=value ...]

For the config (conf/default.yaml plus overrides) it builds or reuses the base model, the
data and the warm-start, samples k answers per held-out prompt with vLLM and prints:

- pass@1 and Pass@k (unbiased), also on the hard subset of the orders task;
- distinct correct answers per prompt (mean over prompts with at least one);
- the token entropy of the policy where correct and incorrect answers share tokens
  (an incorrect answer's tokens inside its longest common prefix with a correct answer of
  the same prompt) against its other tokens: a negative gradient on a token of
  probability p moves it by about (1 - p), so shared tokens of real entropy are where a
  negative sample can displace a positive one. Inside a common prefix the two answers'
  hidden states are identical (a causal model sees the same tokens);
- the skill check (unless --no-skill): the same warm-start with no flawed demonstrations,
  greedy accuracy on the held-out prompts.

The issue's targets for a testbed where ResRL's mechanism can act: pass@1 <= 0.5,
Pass@64 <= 0.9, several distinct correct answers, shared tokens of real entropy, and
greedy skill >= 0.95.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def token_entropies(policy_dir: str, prompt_ids: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
    """Entropy (nats) of the policy's next-token distribution at each response token, at temperature 1."""
    import torch
    from transformers import AutoModelForCausalLM

    from resrl.batch import pack

    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(responses), 256):
            p, r = prompt_ids[i:i + 256], responses[i:i + 256]
            packed = pack(p, r, 0)
            P, T = packed["prompt_width"], packed["response_mask"].shape[1]
            logits = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                           position_ids=packed["position_ids"], use_cache=False).logits[:, P - 1:P + T - 1]
            lp = logits.float().log_softmax(-1)
            ent = -(lp.exp() * lp).sum(-1)
            out += [ent[j, :len(r[j])].tolist() for j in range(len(r))]
    return out


def positive_span(policy_dir: str, rows, outs, correct, layer: int, max_prompts: int = 50) -> tuple[float, float]:
    """Per prompt, the states (layer `layer`, layer-normalized, centred, as ResRL takes them) that
    produce its correct answers' tokens: how many directions hold 90 % and 99 % of their energy
    (mean over prompts with a correct answer). ResRL's rank is chosen against this span."""
    import torch
    from transformers import AutoModelForCausalLM

    from resrl.batch import pack

    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    d90, d99 = [], []
    with torch.no_grad():
        for row, o, c in list(zip(rows, outs, correct))[:max_prompts]:
            pos = [ids for (ids, _, _), ok in zip(o, c) if ok and ids]
            if len(pos) < 2:
                continue
            packed = pack([row["prompt_token_ids"]] * len(pos), pos, 0)
            P, T = packed["prompt_width"], packed["response_mask"].shape[1]
            hs = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                       position_ids=packed["position_ids"], output_hidden_states=True,
                       use_cache=False).hidden_states[layer][:, P - 1:P + T - 1]
            x = hs[packed["response_mask"]]
            x = torch.nn.functional.layer_norm(x, x.shape[-1:])
            x = (x - x.mean(0)).double()
            energy = torch.linalg.svdvals(x) ** 2
            frac = energy.cumsum(0) / energy.sum()
            d90.append(int((frac < 0.90).sum()) + 1)
            d99.append(int((frac < 0.99).sum()) + 1)
    return sum(d90) / max(len(d90), 1), sum(d99) / max(len(d99), 1)


def sample(cfg, prepared: dict, k: int, prompts: int, temperature: float):
    from resrl.data import load_prepared
    from resrl.rewards import compute_score, is_correct
    from resrl.rollout import RolloutEngine

    test = load_prepared(Path(prepared["dataset_dir"]))["test"]
    rows = [test[i] for i in range(min(prompts, len(test)))]
    engine = RolloutEngine.for_run(prepared["policy_dir"], cfg, max(len(r["prompt_token_ids"]) for r in rows))
    outs = engine.generate([r["prompt_token_ids"] for r in rows], n=k, temperature=temperature, top_p=1.0,
                           top_k=-1, max_tokens=cfg.eval.max_tokens, seed=12345)
    engine.close()
    correct = [[is_correct(compute_score(r["data_source"], t, r["answer"])) for _, t, _ in o]
               for r, o in zip(rows, outs)]
    return rows, outs, correct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--no-skill", action="store_true", help="skip the no-flaw warm-start's greedy check")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from resrl.config import load_config
    from resrl.displacement import common_prefix
    from resrl.environment import set_process_defaults
    from resrl.metrics import pass_at_k
    from resrl.prepare import prepare
    from resrl.synthetic import is_hard

    set_process_defaults()
    cfg = load_config(None, args.overrides)
    prepared = prepare(cfg, progress=False)
    rows, outs, correct = sample(cfg, prepared, args.k, args.prompts, temperature=1.0)
    k = args.k
    p1 = sum(sum(c) / k for c in correct) / len(correct)
    pk = sum(pass_at_k(k, sum(c), k) for c in correct) / len(correct)
    print(f"config: {' '.join(args.overrides) or '(default)'}")
    print(f"held-out prompts {len(rows)}, k {k}: pass@1 {p1:.3f}  Pass@{k} {pk:.3f}")
    s = cfg.data.synthetic
    if cfg.data.source == "synthetic" and s.task == "orders" and s.hard_last_operand is not None:
        nums = [[int(x) for x in r["question"].rstrip("=?").split("+")] for r in rows]
        for name, sel in (("hard", True), ("other", False)):
            idx = [i for i, n in enumerate(nums) if is_hard(n, s) == sel]
            if idx:
                print(f"  {name:5s} ({len(idx)} prompts): pass@1 {sum(sum(correct[i]) / k for i in idx) / len(idx):.3f}"
                      f"  Pass@{k} {sum(pass_at_k(k, sum(correct[i]), k) for i in idx) / len(idx):.3f}")
    distinct = [len({tuple(ids) for (ids, _, _), ok in zip(o, c) if ok}) for o, c in zip(outs, correct)]
    solved = [d for d in distinct if d]
    print(f"distinct correct answers per solved prompt: mean {sum(solved) / max(len(solved), 1):.2f} "
          f"(prompts solved {len(solved)}/{len(rows)}); distinct answers per prompt "
          f"{sum(len({tuple(ids) for ids, _, _ in o}) for o in outs) / len(outs):.2f}")
    # entropy where negatives share tokens with a positive of the same prompt
    p_ids, r_ids, shared_len = [], [], []
    for row, o, c in zip(rows, outs, correct):
        pos = [ids for (ids, _, _), ok in zip(o, c) if ok]
        if not pos:
            continue
        for (ids, _, _), ok in zip(o, c):
            if not ok and ids:
                p_ids.append(row["prompt_token_ids"])
                r_ids.append(ids)
                shared_len.append(max(common_prefix(ids, q) for q in pos))
    if r_ids:
        ent = token_entropies(prepared["policy_dir"], p_ids, r_ids)
        shared = [e for es, n in zip(ent, shared_len) for e in es[:n]]
        first = [es[n] for es, n in zip(ent, shared_len) if n < len(es)]
        after = [e for es, n in zip(ent, shared_len) for e in es[n + 1:]]
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        print(f"incorrect answers in prompts with a correct one: {len(r_ids)}; tokens shared with a correct answer "
              f"per incorrect answer {mean(shared_len):.1f} of {mean([len(r) for r in r_ids]):.1f}")
        print(f"token entropy (nats): shared tokens mean {mean(shared):.3f} (tokens > 0.1 nats: "
              f"{sum(e > 0.1 for e in shared)} = {sum(e > 0.1 for e in shared) / max(len(shared), 1):.1%}, "
              f"sum per answer {sum(shared) / len(r_ids):.3f}); first divergent token {mean(first):.3f}; "
              f"after it {mean(after):.3f}")
    d90, d99 = positive_span(prepared["policy_dir"], rows, outs, correct, cfg.algorithm.hidden_layer)
    print(f"positives' state span per prompt (layer {cfg.algorithm.hidden_layer}, H {cfg.model.tiny.hidden_size}): "
          f"{d90:.1f} directions hold 90 % of the energy, {d99:.1f} hold 99 %")
    if not args.no_skill:
        skill_cfg = load_config(None, [*args.overrides, "data.synthetic.flawed_fraction=0.0",
                                       "data.synthetic.hard_last_operand=null"])
        skill = prepare(skill_cfg, progress=False)
        _, _, ok = sample(skill_cfg, skill, 1, args.prompts, temperature=0.0)
        print(f"skill check (no flawed demonstrations, greedy): accuracy {sum(c[0] for c in ok) / len(ok):.3f}")


if __name__ == "__main__":
    main()
