"""`residual_token_weights` against a slow per-group numpy version, and its properties."""
import numpy as np
import pytest
import torch

from resrl.algorithms import residual_token_weights


def slow_reference(hs, mask, pos, gid, rank, q_low, q_high, min_weight, max_pos_tokens=10**9):
    """Group by group, token by token, in float64 numpy; written from the definition."""
    hs, mask, pos, gid = (np.asarray(x) for x in (hs, mask, pos, gid))
    B, T, H = hs.shape
    out = np.ones((B, T))

    def ln(v):
        v = v.astype(np.float64)
        m = v.mean()
        var = ((v - m) ** 2).mean()
        return (v - m) / np.sqrt(var + 1e-5)

    for g in np.unique(gid):
        rows = [b for b in range(B) if gid[b] == g and mask[b].any()]
        prow = [b for b in rows if pos[b]]
        nrow = [b for b in rows if not pos[b]]
        if not prow or not nrow:
            continue
        total = sum(int(mask[b].sum()) for b in prow)
        P = []
        for b in prow:
            toks = [t for t in range(T) if mask[b, t]]
            if total > max_pos_tokens:  # keep max(1, floor(len * cap / total)), evenly spaced: ceil(i L / c) - 1
                L, c = len(toks), max(1, (len(toks) * max_pos_tokens) // total)
                toks = [toks[-(-i * L // c) - 1] for i in range(1, c + 1)]
            P += [ln(hs[b, t]) for t in toks]
        P = np.array(P)
        mu = P.mean(0)
        Pc = P - mu
        _, S, Vt = np.linalg.svd(Pc, full_matrices=False)
        spanned = int((S ** 2 > 1e-9 * S[0] ** 2).sum()) if S[0] > 0 else 0  # directions P really spans
        k = min(rank, len(P) - 1, H, spanned)
        V = Vt[:k].T
        d = {}
        for b in nrow:
            for t in range(T):
                if mask[b, t]:
                    z = ln(hs[b, t]) - mu
                    r = z - V @ (V.T @ z)
                    d[(b, t)] = (r @ r) / H
        vals = np.array(list(d.values()))
        lo, hi = np.quantile(vals, q_low), np.quantile(vals, q_high)
        for key, v in d.items():
            if np.isclose(hi, lo, rtol=1e-6, atol=1e-12):
                out[key] = (1 + min_weight) / 2
            else:
                out[key] = min_weight + (1 - min_weight) * np.clip((v - lo) / (hi - lo), 0, 1)
    return out


def make_batch(seed=0, groups=4, n=6, T=12, H=32, signal_rank=3):
    """Groups whose positive states lie near a low-rank subspace, plus noise; ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    B = groups * n
    basis = torch.randn(groups, H, signal_rank, generator=g)
    coeffs = torch.randn(B, T, signal_rank, generator=g) * 3
    gid = torch.arange(groups).repeat_interleave(n)
    hs = torch.einsum("bhr,btr->bth", basis[gid], coeffs) + 0.3 * torch.randn(B, T, H, generator=g)
    hs += torch.randn(B, T, H, generator=g) * (torch.rand(B, 1, 1, generator=g) < 0.5)  # off-subspace rows
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    pos = torch.rand(B, generator=g) < 0.5
    pos[0::n] = True
    pos[1::n] = False
    return hs, mask, pos, gid


KW = dict(rank=4, q_low=0.2, q_high=0.8, min_weight=0.1)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_matches_slow_reference(svd):
    hs, mask, pos, gid = make_batch()
    ref = slow_reference(hs.numpy(), mask.numpy(), pos.numpy(), gid.numpy(), **KW)
    w = residual_token_weights(hs, mask, pos, gid, svd=svd, **KW).numpy()
    tol = 1e-4 if svd == "exact" else 0.02
    assert np.abs(w - ref).max() < tol


def test_exact_matches_float64_with_gram_route():
    # more positive tokens than H: the exact route goes through the H x H Gram matrix
    hs, mask, pos, gid = make_batch(seed=3, groups=2, n=8, T=16, H=8)
    ref = slow_reference(hs.numpy(), mask.numpy(), pos.numpy(), gid.numpy(), **KW)
    w = residual_token_weights(hs, mask, pos, gid, svd="exact", **KW).numpy()
    assert np.abs(w - ref).max() < 1e-4


def test_subsampling_matches_reference_and_caps_tokens():
    hs, mask, pos, gid = make_batch(seed=5, groups=3, n=8, T=20, H=16)
    kw = dict(KW, max_pos_tokens=17)
    ref = slow_reference(hs.numpy(), mask.numpy(), pos.numpy(), gid.numpy(), **kw)
    w = residual_token_weights(hs, mask, pos, gid, svd="exact", **kw).numpy()
    assert np.abs(w - ref).max() < 1e-4
    full = residual_token_weights(hs, mask, pos, gid, svd="exact", **KW).numpy()
    assert np.abs(w - full).max() > 1e-3  # the cap really changed the basis


def test_more_positive_responses_than_the_token_cap_stay_finite():
    hs = torch.randn(5, 1, 16, generator=torch.Generator().manual_seed(9))  # one token per response
    mask = torch.ones(5, 1, dtype=torch.bool)
    pos = torch.tensor([True, True, True, False, False])
    gid = torch.zeros(5, dtype=torch.long)
    w = residual_token_weights(hs, mask, pos, gid, rank=2, q_low=0.2, q_high=0.8, min_weight=0.1, max_pos_tokens=2)
    ref = slow_reference(hs.numpy(), mask.numpy(), pos.numpy(), gid.numpy(), 2, 0.2, 0.8, 0.1, max_pos_tokens=2)
    assert torch.isfinite(w).all()
    assert np.abs(w.numpy() - ref).max() < 0.02


def test_weights_bounds_and_ones_where_not_weighted():
    hs, mask, pos, gid = make_batch(seed=1)
    w = residual_token_weights(hs, mask, pos, gid, **KW)
    neg_tok = mask & ~pos[:, None]
    assert torch.all(w[~neg_tok] == 1.0)
    assert torch.all((w[neg_tok] >= 0.1 - 1e-7) & (w[neg_tok] <= 1.0 + 1e-7))
    # both ends of the range are reached in every group (quantile clamping)
    assert np.isclose(float(w[neg_tok].min()), 0.1) and np.isclose(float(w[neg_tok].max()), 1.0)


def test_single_sign_groups_get_exactly_one():
    hs, mask, pos, gid = make_batch(seed=2)
    pos = pos.clone()
    pos[gid == 0] = True      # group 0: only positives
    pos[gid == 1] = False     # group 1: only negatives
    w = residual_token_weights(hs, mask, pos, gid, **KW)
    assert torch.all(w[(gid == 0) | (gid == 1)] == 1.0)
    assert torch.any(w[gid == 2] != 1.0)


def test_permutation_permutes_weights():
    hs, mask, pos, gid = make_batch(seed=4)
    perm = torch.randperm(len(gid), generator=torch.Generator().manual_seed(0))
    for svd in ("exact", "randomized"):
        w = residual_token_weights(hs, mask, pos, gid, svd=svd, **KW)
        wp = residual_token_weights(hs[perm], mask[perm], pos[perm], gid[perm], svd=svd, **KW)
        torch.testing.assert_close(wp, w[perm], atol=1e-5, rtol=0)


def test_group_ids_are_labels_only():
    hs, mask, pos, gid = make_batch(seed=4)
    w = residual_token_weights(hs, mask, pos, gid, **KW)
    w2 = residual_token_weights(hs, mask, pos, gid * 1000 + 7, **KW)
    torch.testing.assert_close(w, w2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_rows", [6, 12])  # one group, two groups at a time
def test_whole_group_chunks_give_the_same_weights(chunk_rows):
    hs, mask, pos, gid = make_batch(seed=6)
    w = residual_token_weights(hs, mask, pos, gid, **KW)
    parts = [residual_token_weights(hs[i:i + chunk_rows], mask[i:i + chunk_rows], pos[i:i + chunk_rows],
                                    gid[i:i + chunk_rows], **KW) for i in range(0, len(gid), chunk_rows)]
    torch.testing.assert_close(torch.cat(parts), w, atol=1e-5, rtol=0)


def test_token_inside_positive_subspace_gets_min_weight():
    g = torch.Generator().manual_seed(0)
    H, T = 16, 6
    basis = torch.linalg.qr(torch.randn(H, 2, generator=g)).Q
    pos_states = (torch.randn(3, T, 2, generator=g) * 4) @ basis.T          # rank-2 positives
    neg_in = (torch.randn(1, T, 2, generator=g) * 4) @ basis.T              # inside their span
    neg_out = pos_states[:2] + 3 * torch.randn(2, T, H, generator=g)        # far outside it
    hs = torch.cat([pos_states, neg_in, neg_out])
    # Layer norm maps span(basis) into the plane P(span(basis)) orthogonal to the ones
    # vector; the positives' centred, normalized states span that plane, and so does the
    # in-span negative's normalized state minus their mean: its residual is zero.
    mask = torch.ones(6, T, dtype=torch.bool)
    pos = torch.tensor([True, True, True, False, False, False])
    gid = torch.zeros(6, dtype=torch.long)
    w = residual_token_weights(hs, mask, pos, gid, rank=8, q_low=0.2, q_high=0.8, min_weight=0.1, svd="exact")
    # rank 8 > intrinsic dim, so the basis spans the LN'd positive states; the in-span tokens
    # have the smallest residuals of the group and sit at the floor.
    assert torch.allclose(w[3], torch.full((T,), 0.1), atol=1e-6)
    assert w[4:].mean() > 0.5


def test_constant_weight_when_quantiles_coincide():
    hs, mask, pos, gid = make_batch(seed=7, groups=1, n=3)
    mask = mask.clone()
    pos = torch.tensor([True, True, False])
    mask[2] = False
    mask[2, 0] = True          # a single negative token: lo == hi
    w = residual_token_weights(hs, mask, pos, gid, **KW)
    assert float(w[2, 0]) == pytest.approx(0.55)


def test_stats_are_consistent_with_weights():
    hs, mask, pos, gid = make_batch(seed=8)
    w, stats = residual_token_weights(hs, mask, pos, gid, return_stats=True, **KW)
    d = stats.as_dict()
    neg = w[mask & ~pos[:, None]]
    assert d["resrl/neg_tokens"] == neg.numel()
    assert d["resrl/weight_mean"] == pytest.approx(float(neg.mean()), rel=1e-5)
    assert d["resrl/weight_min"] == pytest.approx(float(neg.min()))
    assert 0 <= d["resrl/alignment"] <= 1 and 0 < d["resrl/explained_variance"] <= 1


def test_randomized_needs_oversampling():
    # A clear, decaying spectrum (sigma_i = 10 / i): a sketch exactly k wide (the
    # authors' setting) misses part of the top-k subspace even with 4 power
    # iterations; the default's 5 extra directions match the exact weights.
    g = torch.Generator().manual_seed(11)
    H, T, n = 64, 64, 8
    scales = 10.0 / torch.arange(1, H + 1).float()
    U = torch.linalg.qr(torch.randn(H, H, generator=g)).Q
    hs = (torch.randn(n, T, H, generator=g) * scales) @ U.T
    mask = torch.ones(n, T, dtype=torch.bool)
    pos = torch.tensor([True] * 4 + [False] * 4)
    gid = torch.zeros(n, dtype=torch.long)
    kw = dict(rank=8, q_low=0.2, q_high=0.8, min_weight=0.1)
    exact = residual_token_weights(hs, mask, pos, gid, svd="exact", **kw)
    default = residual_token_weights(hs, mask, pos, gid, svd="randomized", **kw)
    narrow = residual_token_weights(hs, mask, pos, gid, svd="randomized", oversample=0, power_iters=4, **kw)
    assert (default - exact).abs().max() < 0.02
    assert (narrow - exact).abs().max() > 0.05


def test_bad_inputs_raise():
    hs, mask, pos, gid = make_batch()
    with pytest.raises(ValueError, match="rank"):
        residual_token_weights(hs, mask, pos, gid, rank=0)
    with pytest.raises(ValueError, match="q_low"):
        residual_token_weights(hs, mask, pos, gid, q_low=0.9, q_high=0.5)
    with pytest.raises(ValueError, match="response_mask"):
        residual_token_weights(hs, mask[:, :3], pos, gid)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_directions_the_positives_do_not_span_are_not_used(svd):
    """A group whose positives span fewer directions than the rank asks for (their first tokens share
    one state, as every response's first token is read from the same prompt state): the weights
    are those of the spanned basis, and rounding-level changes of the states do not move them
    (a noise direction in the basis would point wherever the rounding sends it)."""
    g = torch.Generator().manual_seed(7)
    H, T = 32, 3
    hs = torch.randn(6, T, H, generator=g)
    hs[:, 0] = hs[0, 0]                      # every response's first state: the prompt's last
    mask = torch.ones(6, T, dtype=torch.bool)
    mask[:3, 2] = False                      # positives: 2 tokens each, 3 distinct states + 1 shared
    pos = torch.tensor([True, True, True, False, False, False])
    gid = torch.zeros(6, dtype=torch.long)
    rank = 6                                 # > the 3 directions 4 distinct centred states span (M - 1 = 5)
    want = slow_reference(hs.numpy(), mask.numpy(), pos.numpy(), gid.numpy(), rank, 0.2, 0.8, 0.1)
    w, stats = residual_token_weights(hs, mask, pos, gid, rank=rank, svd=svd, return_stats=True)
    np.testing.assert_allclose(w.numpy(), want, atol=1e-4)
    assert stats.rank_sum == 3
    noisy = hs * (1 + 1e-6 * torch.randn(hs.shape, generator=g))
    torch.testing.assert_close(residual_token_weights(noisy, mask, pos, gid, rank=rank, svd=svd), w, atol=1e-3, rtol=0)
