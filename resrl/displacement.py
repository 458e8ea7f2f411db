"""Likelihood displacement, measured where it happens: per response and per token class.

A group's correct (positive) and incorrect (negative) responses often share tokens: the
same opening, the same choice of method. A negative gradient on those shared tokens lowers
the positives that use them too: the displacement NSR causes and ResRL's weighting is
built to avoid. Three views of it, all from one RL step:

- **across the update** (`update_displacement`): per positive response, the change of its
  sequence log-prob (sum over its tokens) from before to after the step's optimizer steps;
  the share of positives whose log-prob fell; and the same change restricted to the
  positive's tokens that a negative of its group shares (its common prefix with one). For
  algorithms that also push positives up this is the net change;
- **the interference itself** (computed by the trainer, `interference`): the first-order
  change of the positives' mean sequence log-prob caused by the negative-sample part of
  the loss alone, per unit step along that part's gradient; and its cosine;
- **ResRL's weights by token class** (`weights_by_class`): an incorrect response's tokens
  inside its common prefix with a correct one (SHARED), the first token after it
  (FIRST_DIVERGENT) and the rest (AFTER).
"""
from __future__ import annotations

import torch

NONE, SHARED, FIRST_DIVERGENT, AFTER = -1, 0, 1, 2
CLASS_NAMES = {SHARED: "shared", FIRST_DIVERGENT: "first_divergent", AFTER: "after"}


def common_prefix(a: list[int], b: list[int]) -> int:
    """Number of leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def token_classes(response_ids: list[list[int]], correct: torch.Tensor, group_ids: torch.Tensor,
                  width: int) -> torch.Tensor:
    """(B, width) class of each response token against the group's responses of the other sign.

    For a response, L = its longest common prefix with any response of its group that has the
    other correctness; tokens 0..L-1 are SHARED, token L is FIRST_DIVERGENT, later ones AFTER.
    NONE for padding and for responses whose group has no response of the other sign."""
    out = torch.full((len(response_ids), width), NONE, dtype=torch.long)
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids.tolist()):
        groups.setdefault(g, []).append(i)
    for rows in groups.values():
        for i in rows:
            others = [j for j in rows if bool(correct[j]) != bool(correct[i])]
            n = len(response_ids[i])
            if not others or n == 0:
                continue
            shared = max(common_prefix(response_ids[i], response_ids[j]) for j in others)
            out[i, :min(shared, n)] = SHARED
            if shared < n:
                out[i, shared] = FIRST_DIVERGENT
                out[i, shared + 1:n] = AFTER
    return out


def update_displacement(old_logp: torch.Tensor, new_logp: torch.Tensor, mask: torch.Tensor,
                        classes: torch.Tensor, positive: torch.Tensor) -> dict[str, float]:
    """Per-positive-response change of log pi across the update. All (B, T) but `positive` (B,).

    `disp/seq_logp_change`: mean over positives of sum_t (new - old); `disp/frac_pos_down`:
    share of positives whose sum fell; `disp/shared_logp_change`: mean over positives that share
    tokens with a negative of their group, of the change summed over those tokens;
    `lld`: the per-token mean change over all positive tokens (the earlier, diluted figure)."""
    pos = positive.bool()
    if not bool(pos.any()):
        return {}
    change = (new_logp - old_logp) * mask
    seq = change[pos].sum(1)
    shared_mask = (classes == SHARED) & mask.bool()
    has_shared = shared_mask[pos].any(1)
    shared = (change * shared_mask)[pos].sum(1)[has_shared]
    out = {"disp/seq_logp_change": float(seq.mean()), "disp/frac_pos_down": float((seq < 0).float().mean()),
           "lld": float(change[pos].sum() / mask[pos].sum().clamp_min(1))}
    if len(shared):
        out["disp/shared_logp_change"] = float(shared.mean())
    return out


def weights_by_class(weights: torch.Tensor, classes: torch.Tensor, mask: torch.Tensor,
                     negative: torch.Tensor) -> dict[str, float]:
    """Mean token weight of the negatives' tokens of each class (`resrl/weight_<class>`)."""
    out = {}
    neg = negative.bool()[:, None] & mask.bool()
    for cls, name in CLASS_NAMES.items():
        sel = neg & (classes == cls)
        if bool(sel.any()):
            out[f"resrl/weight_{name}"] = float(weights[sel].mean())
    return out


def flat_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def interference(neg_grad: list[torch.Tensor], pos_logp_grad: list[torch.Tensor]) -> dict[str, float]:
    """First-order effect of a step along the negative part's descent direction (-neg_grad) on the
    positives' mean sequence log-prob (whose gradient is pos_logp_grad): per unit step length
    (`disp/neg_interference`, < 0 means the negatives' gradient pushes the positives down) and as
    a cosine (`disp/neg_interference_cos`)."""
    gn = flat_dot(neg_grad, neg_grad) ** 0.5
    gp = flat_dot(pos_logp_grad, pos_logp_grad) ** 0.5
    if gn == 0 or gp == 0:
        return {}
    d = -flat_dot(neg_grad, pos_logp_grad)
    return {"disp/neg_interference": d / gn, "disp/neg_interference_cos": d / (gn * gp)}
