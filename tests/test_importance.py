"""Importance factors (Eq. 4-5) against an independent functional autograd computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlmq.importance import gradient_importance, random_low_importance, reduce_gradient


class TinyAttention(nn.Module):
    """RMSNorm → q/k/v → causal multi-head softmax attention → o, plus the residual (Eq. 1)."""

    def __init__(self, d=32, heads=4, gen=None):
        super().__init__()
        self.heads = heads
        self.norm_w = nn.Parameter(1 + 0.1 * torch.randn(d, generator=gen, dtype=torch.float64))
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = nn.Linear(d, d, bias=(n != "o_proj"), dtype=torch.float64)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d))
                if lin.bias is not None:
                    lin.bias.copy_(0.1 * torch.randn(d, generator=gen, dtype=torch.float64))
            setattr(self, n, lin)

    def forward(self, h):
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_w
        B, T, D = x.shape
        split = lambda t: t.view(B, T, self.heads, D // self.heads).transpose(1, 2)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return h + self.o_proj(a.transpose(1, 2).reshape(B, T, D))


def functional_importance(blk: TinyAttention, x_fp, x_hat, mask):
    """Independent route: the block written out by hand, the projection outputs as explicit
    leaves, L = ||Attn(X) - Attn(X_hat)||^2 over real tokens, one autograd.grad, Eq. 4."""
    W = {n: getattr(blk, n).weight.detach() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    b = {n: getattr(blk, n).bias for n in ("q_proj", "k_proj", "v_proj")}
    nw = blk.norm_w.detach()
    H = blk.heads

    def norm(h):
        return h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-6) * nw

    def attend(zq, zk, zv):
        B, T, D = zq.shape
        dh = D // H
        out = torch.zeros_like(zq)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        for hd in range(H):
            sl = slice(hd * dh, (hd + 1) * dh)
            s = zq[..., sl] @ zk[..., sl].transpose(1, 2) / math.sqrt(dh)
            s = s.masked_fill(~causal, float("-inf"))
            out[..., sl] = torch.softmax(s, -1) @ zv[..., sl]
        return out

    with torch.no_grad():
        xn = norm(x_fp)
        target = x_fp + attend(xn @ W["q_proj"].T + b["q_proj"], xn @ W["k_proj"].T + b["k_proj"],
                               xn @ W["v_proj"].T + b["v_proj"]) @ W["o_proj"].T
        xh = norm(x_hat)
        zq0, zk0, zv0 = (xh @ W[n].T + b[n] for n in ("q_proj", "k_proj", "v_proj"))
    zq, zk, zv = (t.clone().requires_grad_(True) for t in (zq0, zk0, zv0))
    a = attend(zq, zk, zv)
    zo = (a.detach() @ W["o_proj"].T).requires_grad_(True)
    # o_proj output leaf: L depends on it directly; q/k/v leaves: through attention and o_proj
    L_o = ((x_hat + zo - target) * mask[..., None]).pow(2).sum()
    L_qkv = ((x_hat + a @ W["o_proj"].T - target) * mask[..., None]).pow(2).sum()
    (P_o,) = torch.autograd.grad(L_o, [zo])
    P_q, P_k, P_v = torch.autograd.grad(L_qkv, [zq, zk, zv])
    return {"q_proj": P_q, "k_proj": P_k, "v_proj": P_v, "o_proj": P_o}, L_o.item()


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_gradient_importance_matches_independent_autograd(norm):
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        blk = TinyAttention(gen=gen)
        x_fp = torch.randn(2, 7, 32, generator=gen, dtype=torch.float64)
        x_hat = x_fp + 0.05 * torch.randn(x_fp.shape, generator=gen, dtype=torch.float64)
        mask = torch.ones(2, 7, dtype=torch.float64)
        mask[1, 5:] = 0  # padded tail of the second sample
        mods = {n: getattr(blk, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        res = gradient_importance(blk, mods, x_fp, x_hat, token_mask=mask, norm=norm)
        P, L = functional_importance(blk, x_fp, x_hat, mask)
        assert res.rule == "gradient"
        assert abs(res.loss - L) <= 1e-9 * L
        for n in mods:
            ref = reduce_gradient(P[n], norm) * mask
            assert torch.allclose(res.g[n].double(), ref, rtol=1e-6, atol=1e-10), n
        # no parameter of the block was left with a gradient or changed
        assert all(p.grad is None for p in blk.parameters())


def test_reduce_gradient_definitions():
    P = torch.tensor([[[1.0, -3.0], [0.0, 4.0]]])
    assert reduce_gradient(P, "l1").tolist() == [[2.0, 2.0]]
    assert torch.allclose(reduce_gradient(P, "l2"), torch.tensor([[math.sqrt(5.0), math.sqrt(8.0)]]))
    with pytest.raises(ValueError, match="norm='l3'"):
        reduce_gradient(P, "l3")


def test_zero_loss_rule_uses_rtn_perturbation_then_uniform():
    gen = torch.Generator().manual_seed(4)
    blk = TinyAttention(gen=gen)
    x = torch.randn(1, 6, 32, generator=gen, dtype=torch.float64)
    mods = {n: getattr(blk, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    before = {n: m.weight.detach().clone() for n, m in mods.items()}
    res = gradient_importance(blk, mods, x, x.clone(), fallback=(3, 16, False))
    assert res.rule == "rtn_fallback" and res.loss > 0
    for n, m in mods.items():
        assert torch.equal(m.weight, before[n])  # weights restored
        assert torch.isfinite(res.g[n]).all() and (res.g[n] > 0).all()
    # without the fallback the rule is explicit uniform importance, never NaN or zeros
    res = gradient_importance(blk, mods, x, x.clone())
    assert res.rule == "uniform" and all(torch.equal(v, torch.ones(1, 6)) for v in res.g.values())


def test_random_low_importance_counts():
    vis = torch.zeros(2, 50, dtype=torch.bool)
    vis[:, 10:40] = True
    g = random_low_importance(vis, 0.5, 0.1, torch.Generator().manual_seed(0))
    assert (g[~vis] == 1).all()
    assert int((g[vis] == 0.1).sum()) == 30 and int((g[vis] == 1).sum()) == 30
    with pytest.raises(ValueError, match="li_ratio"):
        random_low_importance(vis, 1.5, 0.1, torch.Generator())
