"""ResRL's token weights: how far a negative token's state lies outside the span of
the positive responses of its prompt group.

For each prompt group with at least one positive and one negative response:

1. P = the positive responses' valid token states (each response evenly subsampled
   to its share of `max_pos_tokens` when there are more), layer-normalized over H
   (no affine), centred on their mean mu.
2. V = the top-k right singular vectors of P, k = min(rank, M - 1, H), less the
   directions P does not span (singular value at rounding level, `SPAN_RTOL`).
3. For each negative token x: z = LN(x) - mu, r = z - V V^T z, d = ||r||^2 / H.
4. lo, hi = the q_low / q_high quantiles of d over the group's negative tokens;
   w = min_weight + (1 - min_weight) * clamp((d - lo) / (hi - lo), 0, 1), or
   (1 + min_weight) / 2 where hi ~ lo.

Every other position gets exactly 1.0. Groups are processed together as a padded
batch (one batched SVD instead of a loop), and the result depends only on each
group's own rows, never on batch order or on how a batch is split.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LN_EPS = 1e-5
# a basis direction counts when its squared singular value is above this share of the largest
# (float32 rounding leaves ~1e-12 in a direction the positives do not span)
SPAN_RTOL = 1e-9
SVD_METHODS = ("randomized", "exact")  # the randomized range finder, or a float64 SVD


@dataclass
class ResidualStats:
    """Diagnostics of ResRL weighting, kept as sums so chunks of groups merge exactly."""

    mixed_groups: int = 0
    neg_tokens: int = 0
    weight_sum: float = 0.0
    weight_sq_sum: float = 0.0
    weight_min: float = float("inf")
    alignment_sum: float = 0.0   # per negative token: fraction of its centred energy inside the subspace
    explained_sum: float = 0.0   # per group: fraction of the positive energy the rank-k basis holds
    rank_sum: float = 0.0

    @staticmethod
    def merge(parts: "list[ResidualStats]") -> "ResidualStats":
        out = ResidualStats()
        for p in parts:
            for name in ("mixed_groups", "neg_tokens", "weight_sum", "weight_sq_sum",
                         "alignment_sum", "explained_sum", "rank_sum"):
                setattr(out, name, getattr(out, name) + getattr(p, name))
            out.weight_min = min(out.weight_min, p.weight_min)
        return out

    def as_dict(self, prefix: str = "resrl/") -> dict[str, float]:
        """Means over negative tokens (weights, alignment) and over mixed groups (rank, EV)."""
        nan = float("nan")
        n, g = self.neg_tokens, self.mixed_groups
        mean = self.weight_sum / n if n else nan
        var = max(self.weight_sq_sum / n - mean * mean, 0.0) if n else nan
        values = {
            "mixed_groups": float(g),
            "neg_tokens": float(n),
            "weight_mean": mean,
            "weight_min": self.weight_min if n else nan,
            "weight_std": var ** 0.5 if n else nan,
            "alignment": self.alignment_sum / n if n else nan,
            "explained_variance": self.explained_sum / g if g else nan,
            "mean_rank": self.rank_sum / g if g else nan,
        }
        return {prefix + k: v for k, v in values.items()}


def residual_token_weights(
    hidden_states: torch.Tensor,
    response_mask: torch.Tensor,
    is_positive: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    rank: int = 64,
    q_low: float = 0.2,
    q_high: float = 0.8,
    min_weight: float = 0.1,
    max_pos_tokens: int = 4096,
    svd: str = "randomized",
    oversample: int = 5,
    power_iters: int = 4,
    seed: int = 0,
    return_stats: bool = False,
):
    """Per-token ResRL weights, shape (B, T), float32.

    hidden_states (B, T, H); response_mask (B, T) bool; is_positive (B,) bool;
    group_ids (B,) int. `svd="exact"` uses a float64 SVD; `"randomized"` a
    randomized range finder with `oversample` extra directions and `power_iters`
    power iterations (a single shared test matrix drawn from `seed`).
    With `return_stats=True` returns `(weights, ResidualStats)`.
    """
    _check_inputs(hidden_states, response_mask, is_positive, group_ids, rank, q_low, q_high,
                  min_weight, max_pos_tokens, svd)
    B, T, H = hidden_states.shape
    device = hidden_states.device
    mask = response_mask.bool()
    is_positive = is_positive.bool().to(device)
    weights = torch.ones(B, T, dtype=torch.float32, device=device)

    _, gidx = torch.unique(group_ids.to(device), return_inverse=True)
    has_tokens = mask.any(dim=1)
    n_groups = int(gidx.max()) + 1 if B else 0
    pos_rows = is_positive & has_tokens
    neg_rows = ~is_positive & has_tokens
    pos_count = torch.bincount(gidx[pos_rows], minlength=n_groups)
    neg_count = torch.bincount(gidx[neg_rows], minlength=n_groups)
    mixed = (pos_count > 0) & (neg_count > 0)
    if not bool(mixed.any()):
        return (weights, ResidualStats()) if return_stats else weights

    # Dense index 0..G-1 over the mixed groups only.
    slot = torch.full((n_groups,), -1, dtype=torch.long, device=device)
    slot[mixed] = torch.arange(int(mixed.sum()), device=device)
    G = int(mixed.sum())
    row_slot = slot[gidx]

    # ---- positive tokens: subsample, normalize, centre, pad to (G, M, H)
    pos_sel = _subsample_positive_tokens(mask & (pos_rows & (row_slot >= 0))[:, None],
                                         row_slot, G, max_pos_tokens)
    b_idx, t_idx = pos_sel.nonzero(as_tuple=True)
    work_dtype = torch.float64 if svd == "exact" else torch.float32
    P = _layer_norm(hidden_states[b_idx, t_idx]).to(work_dtype)
    p_slot = row_slot[b_idx]
    M = torch.bincount(p_slot, minlength=G)
    mu = torch.zeros(G, H, dtype=work_dtype, device=device).index_add_(0, p_slot, P) / M[:, None]
    P_pad, _ = _pad_by_group(P - mu[p_slot], p_slot, G)                # (G, Mmax, H)

    k_g = torch.clamp(torch.minimum(M - 1, torch.full_like(M, min(rank, H))), min=0)
    basis, sq_sing = _top_right_singular_vectors(P_pad, int(k_g.max()), svd, oversample, power_iters, seed)
    # A direction whose singular value is at rounding level (duplicate states - every response's first
    # token is read from the same prompt state - or M <= k) is not in the positives' span: where it
    # points is decided by float noise, and with it the negatives' residuals. It is dropped.
    keep = (torch.arange(basis.shape[-1], device=device)[None, :] < k_g[:, None]) \
        & (sq_sing > SPAN_RTOL * sq_sing[:, :1])                                   # (G, k)
    basis = basis * keep[:, None, :].to(basis.dtype)

    # ---- negative tokens: same normalization and centre, residual energy per token
    neg_sel = mask & (neg_rows & (row_slot >= 0))[:, None]
    nb, nt = neg_sel.nonzero(as_tuple=True)
    n_slot = row_slot[nb]
    Z = _layer_norm(hidden_states[nb, nt]).to(work_dtype) - mu[n_slot]
    Z_pad, n_pos = _pad_by_group(Z, n_slot, G)                         # (G, Nmax, H)
    valid = torch.zeros(Z_pad.shape[:2], dtype=torch.bool, device=device)
    valid[n_slot, n_pos] = True
    coef = torch.bmm(Z_pad, basis)                                        # (G, Nmax, k)
    resid = Z_pad - torch.bmm(coef, basis.transpose(1, 2))
    d = (resid.pow(2).sum(-1) / H).float()                                 # (G, Nmax)

    d_nan = d.masked_fill(~valid, float("nan"))
    lo = torch.nanquantile(d_nan, q_low, dim=1, keepdim=True)
    hi = torch.nanquantile(d_nan, q_high, dim=1, keepdim=True)
    flat = torch.isclose(hi, lo, rtol=1e-6, atol=1e-12)
    scaled = ((d - lo) / torch.where(flat, torch.ones_like(hi), hi - lo)).clamp(0.0, 1.0)
    w = torch.where(flat, torch.full_like(d, 0.5), scaled) * (1.0 - min_weight) + min_weight
    weights[nb, nt] = w[n_slot, n_pos]

    if not return_stats:
        return weights
    z_energy = Z_pad.pow(2).sum(-1)
    in_span = coef.pow(2).sum(-1)
    frac = (in_span / z_energy.clamp_min(1e-30))[n_slot, n_pos].float()
    total = P_pad.pow(2).sum(dim=(1, 2))
    ev = (sq_sing * keep).sum(-1) / total.clamp_min(1e-30)
    w_neg = weights[nb, nt].double()
    stats = ResidualStats(
        mixed_groups=G,
        neg_tokens=int(w_neg.numel()),
        weight_sum=float(w_neg.sum()),
        weight_sq_sum=float(w_neg.pow(2).sum()),
        weight_min=float(w_neg.min()),
        alignment_sum=float(frac.double().sum()),
        explained_sum=float(ev.double().sum()),
        rank_sum=float(keep.double().sum()),
    )
    return weights, stats


# ----------------------------------------------------------------------------- helpers

def _check_inputs(hs, mask, pos, gid, rank, q_low, q_high, min_weight, max_pos_tokens, svd):
    if hs.dim() != 3:
        raise ValueError(f"hidden_states must be (B, T, H), got shape {tuple(hs.shape)}")
    B, T, _ = hs.shape
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"response_mask must be (B, T) = {(B, T)}, got {tuple(mask.shape)}")
    if tuple(pos.shape) != (B,) or tuple(gid.shape) != (B,):
        raise ValueError(f"is_positive and group_ids must be (B,) = ({B},), "
                         f"got {tuple(pos.shape)} and {tuple(gid.shape)}")
    if gid.dtype.is_floating_point:
        raise ValueError("group_ids must be an integer tensor")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not 0.0 <= q_low < q_high <= 1.0:
        raise ValueError(f"need 0 <= q_low < q_high <= 1, got {q_low}, {q_high}")
    if not 0.0 <= min_weight <= 1.0:
        raise ValueError(f"min_weight must be in [0, 1], got {min_weight}")
    if max_pos_tokens < 2:
        raise ValueError(f"max_pos_tokens must be >= 2, got {max_pos_tokens}")
    if svd not in SVD_METHODS:
        raise ValueError(f"svd must be one of {', '.join(SVD_METHODS)}, got {svd!r}")


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return F.layer_norm(x, (x.shape[-1],), eps=LN_EPS)


def _subsample_positive_tokens(sel: torch.Tensor, row_slot: torch.Tensor, G: int, cap: int) -> torch.Tensor:
    """Keep, in each group over `cap` tokens, an evenly spaced share of every response.

    Response i of a group with M tokens keeps max(1, floor(len_i * cap / M)) of its
    tokens: the group keeps at most `cap`, plus one token for each response whose share
    would round to zero (so no group loses all its positives). Which tokens stay
    depends only on the response itself - not on where it sits in the batch.
    """
    lengths = sel.sum(dim=1)                                   # (B,)
    rows = lengths > 0
    M = torch.zeros(G, dtype=torch.long, device=sel.device).index_add_(0, row_slot[rows], lengths[rows])
    over = M > cap
    if not bool(over.any()):
        return sel
    m_row = M[row_slot.clamp_min(0)]
    share = ((lengths * cap) // m_row.clamp_min(1)).clamp_min(1)
    keep_n = torch.where(rows & over[row_slot.clamp_min(0)], share, lengths)
    j = torch.cumsum(sel.long(), dim=1) - 1                     # rank of each token in its response
    L = lengths.clamp_min(1)[:, None]
    c = keep_n[:, None]
    chosen = torch.div((j + 1) * c, L, rounding_mode="floor") > torch.div(j * c, L, rounding_mode="floor")
    return sel & chosen


def _slots_and_positions(slot: torch.Tensor, G: int):
    """For rows with group slot (N,): each row's position inside its group, and group sizes."""
    order = torch.argsort(slot, stable=True)
    counts = torch.bincount(slot, minlength=G)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(slot)
    pos[order] = torch.arange(len(slot), device=slot.device) - starts[slot[order]]
    return pos, counts


def _pad_by_group(x: torch.Tensor, slot: torch.Tensor, G: int):
    """Rows of x (N, H) with group slot (N,) -> (G, max count, H) zero padded, and positions."""
    pos, counts = _slots_and_positions(slot, G)
    out = x.new_zeros(G, int(counts.max()), x.shape[-1])
    out[slot, pos] = x
    return out, pos


def _top_right_singular_vectors(A: torch.Tensor, k: int, method: str, oversample: int,
                                power_iters: int, seed: int):
    """Batched top-k right singular vectors of A (G, M, H): returns (G, H, k) and sigma^2 (G, k)."""
    G, Mmax, H = A.shape
    if k == 0:
        return A.new_zeros(G, H, 0), A.new_zeros(G, 0)
    width = k + oversample
    if method == "exact" or width >= min(Mmax, H):
        # Exact in float64; a small problem when the sketch would be as wide as A anyway.
        A64 = A.double()
        if Mmax > H:  # eigen-decomposition of the H x H Gram is cheaper than an SVD of a tall A
            evals, evecs = torch.linalg.eigh(A64.transpose(1, 2) @ A64)
            evals, evecs = evals.flip(-1), evecs.flip(-1)
            V, s2 = evecs[..., :k], evals[..., :k].clamp_min(0)
        else:
            _, S, Vh = torch.linalg.svd(A64, full_matrices=False)
            V, s2 = Vh[:, :k].transpose(1, 2), S[:, :k] ** 2
        return V.to(A.dtype), s2.to(A.dtype)
    # Randomized range finder (Halko, Martinsson & Tropp 2011, alg. 4.4), one test matrix
    # for every group so the result does not depend on which groups share a batch.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(H, width, generator=gen, dtype=A.dtype).to(A.device)
    Q = torch.linalg.qr(A @ omega).Q                                   # (G, M, w)
    for _ in range(power_iters):
        Q = torch.linalg.qr(A.transpose(1, 2) @ Q).Q                   # (G, H, w)
        Q = torch.linalg.qr(A @ Q).Q
    small = Q.transpose(1, 2) @ A                                      # (G, w, H)
    _, S, Vh = torch.linalg.svd(small, full_matrices=False)
    return Vh[:, :k].transpose(1, 2).contiguous(), S[:, :k] ** 2
