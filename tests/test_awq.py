"""AWQ / MBQ scale search against an independent float64 brute force, and exact folding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmq.awq import (ScaleStatsAccumulator, alpha_grid, awq_scales, fold_into_linear, fold_into_norm,
                      modality_sensitivity, search_scales)


# ----------------------------------------------------------------------------- references
def literal_fake_quant(W, bits, group_size):
    """RTN of W [out, in], per row and group, written out in Python floats (range contains 0)."""
    maxq = 2**bits - 1
    out = []
    for row in W.tolist():
        q_row = []
        for a in range(0, len(row), group_size):
            grp = row[a:a + group_size]
            lo, hi = min(min(grp), 0.0), max(max(grp), 0.0)
            s = (hi - lo) / maxq or 1.0
            z = -float(round(lo / s))
            q_row += [s * (min(max(round(v / s) + z, 0), maxq) - z) for v in grp]
        out.append(q_row)
    return torch.tensor(out, dtype=torch.float64)


def brute_alpha(Ws, Xs, weights, bits, group_size, n_grid):
    """argmin over the grid of Σ_linears Σ_parts c · ||X W^T − X (Q(W s)/s)^T||² on the token
    matrices themselves (no Gram matrix), s from mean|x| over all tokens, independent loop."""
    X_all = torch.cat(list(Xs.values()))
    xbar = X_all.abs().mean(0)
    best, best_a = None, None
    for i in range(n_grid):
        a = i / (n_grid - 1)
        s = xbar.clamp(min=float(xbar.max()) * 1e-5) ** a
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for name, W in Ws.items():
            Wq = literal_fake_quant(W * s, bits, group_size) / s
            for part, X in Xs.items():
                c = 1.0 if weights is None else weights[name][part]
                loss += c * float((X @ W.T - X @ Wq.T).pow(2).sum())
        if best is None or loss < best:
            best, best_a = loss, a
    return best_a


def planted(gen, n_text=24, n_vision=400, n=16, out=12):
    """Text and vision tokens with salient channels in different places; the weight has large
    entries on the text-salient channels."""
    X_t = 0.3 * torch.randn(n_text, n, generator=gen, dtype=torch.float64)
    X_t[:, :3] *= 12.0
    X_v = 0.3 * torch.randn(n_vision, n, generator=gen, dtype=torch.float64)
    X_v[:, 8:11] *= 10.0
    W = torch.randn(out, n, generator=gen, dtype=torch.float64)
    W[:, 12:] *= 4.0
    return W, X_t, X_v


def stats_of(Xs, by_modality):
    acc = ScaleStatsAccumulator(next(iter(Xs.values())).shape[1], by_modality=by_modality)
    for code, X in ((0, Xs["text"]), (1, Xs["vision"])):
        for a in range(0, X.shape[0], 50):  # streamed in chunks
            acc.add(X[a:a + 50], torch.full((X[a:a + 50].shape[0],), code))
    return acc.finalize()


# ----------------------------------------------------------------------------- tests
def test_awq_search_picks_the_brute_force_alpha():
    gen = torch.Generator().manual_seed(0)
    W, X_t, X_v = planted(gen)
    W2 = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    Xs = {"text": X_t, "vision": X_v}
    st = stats_of(Xs, by_modality=False)
    res = search_scales({"a": W, "b": W2}, st, bits=3, group_size=8, n_grid=20)
    ref = brute_alpha({"a": W, "b": W2}, {"all": torch.cat([X_t, X_v])}, None, 3, 8, 20)
    assert res.alpha == ref and 0.0 < res.alpha  # the search beats plain RTN here
    assert res.alphas == alpha_grid(20) and res.loss == min(res.losses) and res.loss < res.losses[0]


def test_mbq_with_text_dominated_sensitivity_differs_from_awq_and_is_the_brute_force_optimum():
    gen = torch.Generator().manual_seed(1)
    W, X_t, X_v = planted(gen)
    Xs = {"text": X_t, "vision": X_v}
    awq = search_scales({"a": W}, stats_of(Xs, False), bits=3, group_size=8, n_grid=20)
    sens = {"a": {"text": 5.0, "vision": 0.05}}  # text tokens dominate the weighting
    mbq = search_scales({"a": W}, stats_of(Xs, True), bits=3, group_size=8, n_grid=20, loss_weights=sens)
    assert mbq.alpha == brute_alpha({"a": W}, Xs, sens, 3, 8, 20)
    assert awq.alpha == brute_alpha({"a": W}, {"all": torch.cat([X_t, X_v])}, None, 3, 8, 20)
    assert mbq.alpha != awq.alpha
    # equal sensitivities are AWQ's objective
    same = search_scales({"a": W}, stats_of(Xs, True), bits=3, group_size=8, n_grid=20,
                         loss_weights={"a": {"text": 1.0, "vision": 1.0}})
    assert same.alpha == awq.alpha
    assert same.losses == pytest.approx(awq.losses, rel=1e-9)


def test_scales_normalisation_and_dead_channels():
    xbar = torch.tensor([0.0, 1.0, 4.0, 16.0], dtype=torch.float64)
    assert torch.equal(awq_scales(xbar, 0.0), torch.ones(4, dtype=torch.float64))
    s = awq_scales(xbar, 0.5)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert float(s.max() * s.min()) == pytest.approx(1.0)
    assert float(s[3] / s[2]) == pytest.approx(2.0)


def test_folding_keeps_the_function():
    torch.manual_seed(0)
    norm_w = torch.rand(16) + 0.5
    lin = nn.Linear(16, 8, bias=False).double()
    prev = nn.Linear(6, 16, bias=True).double()
    x = torch.randn(10, 6, dtype=torch.float64)

    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(norm_w.double().clone())

        def forward(self, h):
            return self.weight * h / h.pow(2).mean(-1, keepdim=True).sqrt()

    norm = Norm()
    s = torch.rand(16, dtype=torch.float64) * 3 + 0.2
    before = lin(norm(prev(x)))
    fold_into_norm(norm, [lin], s)
    assert torch.allclose(lin(norm(prev(x))), before, rtol=1e-12, atol=1e-12)
    down = nn.Linear(16, 4, bias=False).double()
    before = down(prev(x))
    fold_into_linear(prev, [down], s)
    assert torch.allclose(down(prev(x)), before, rtol=1e-12, atol=1e-12)


def test_modality_sensitivity_means_over_real_tokens():
    g = [torch.tensor([[1.0, 2.0, 3.0, 9.0]]), torch.tensor([[4.0, 5.0, 0.0, 0.0]])]
    mod = [torch.tensor([[0, 1, 1, 0]]), torch.tensor([[1, 0, 0, 0]])]
    mask = [torch.tensor([[1, 1, 1, 0]]), torch.tensor([[1, 1, 0, 0]])]
    out = modality_sensitivity(g, mod, mask)
    assert out == {"text": pytest.approx(3.0), "vision": pytest.approx(3.0)}  # (1+5)/2, (2+3+4)/3


def test_bad_inputs_name_the_argument():
    st = stats_of({"text": torch.randn(5, 4, dtype=torch.float64), "vision": torch.randn(5, 4, dtype=torch.float64)}, True)
    W = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="n_grid=1"):
        search_scales({"a": W}, st, bits=3, group_size=4, n_grid=1)
    with pytest.raises(ValueError, match="weights\\['a'\\]"):
        search_scales({"a": torch.randn(3, 5)}, st, bits=3, group_size=4)
    with pytest.raises(ValueError, match="loss_weights"):
        search_scales({"a": W}, st, bits=3, group_size=4, loss_weights={"b": {"text": 1.0}})
    with pytest.raises(ValueError, match="unknown statistics key 'all'"):
        search_scales({"a": W}, st, bits=3, group_size=4, loss_weights={"a": {"all": 1.0}})
    with pytest.raises(ValueError, match="bits=5"):
        search_scales({"a": W}, st, bits=5, group_size=4)
    with pytest.raises(ValueError, match="modality is required"):
        ScaleStatsAccumulator(4, by_modality=True).add(torch.randn(3, 4))
    with pytest.raises(ValueError, match="no calibration tokens"):
        ScaleStatsAccumulator(4).finalize()
