"""The ablation importance sources (paper Tables 6-8) against independent references, float64.

* FastV / PACT attention scores vs a brute-force softmax(QKᵀ/√d + mask) with hand-written rotary
  embedding and loops (and, on a tiny Qwen2-VL, vs the model's own eager attention weights);
* gradient granularity ``layer`` / ``network`` and breakpoint ``o_proj_in`` vs an autograd /
  torch.func gradient of the loss written out by hand;
* one end-to-end quantize run per source on a tiny Qwen2-VL: finite, non-negative g, 0 on
  padding, the importance Parquet with the documented schema and the source in ``rule``.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from vlmq.importance import (AttentionGeometry, attention_importance, attention_probs, dbdpc, fastv_importance,
                             gradient_importance, pact_importance, reduce_gradient, sft_targets)

F64 = torch.float64
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


# ----------------------------------------------------------------------------- a block with RoPE + GQA
class RopeBlock(nn.Module):
    """RMSNorm → q/k/v (grouped-query) → rotary → masked softmax attention → o, plus the residual."""

    def __init__(self, d=32, heads=4, kv_heads=2, gen=None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.scaling = self.head_dim ** -0.5
        self.norm_w = nn.Parameter(1 + 0.1 * torch.randn(d, generator=gen, dtype=F64))
        out = {"q_proj": heads * self.head_dim, "k_proj": kv_heads * self.head_dim, "v_proj": kv_heads * self.head_dim,
               "o_proj": d}
        for n in PROJ:
            lin = nn.Linear(d if n != "o_proj" else heads * self.head_dim, out[n], bias=(n != "o_proj"), dtype=F64)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen, dtype=F64) / math.sqrt(d))
                if lin.bias is not None:
                    lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=gen, dtype=F64))
            setattr(self, n, lin)
        self.cos = self.sin = self.mask = None  # set per batch

    def forward(self, h):
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_w
        B, T, _ = x.shape
        split = lambda t, n: t.view(B, T, n, self.head_dim).transpose(1, 2)
        q, k, v = split(self.q_proj(x), self.heads), split(self.k_proj(x), self.kv_heads), split(self.v_proj(x), self.kv_heads)
        rot = lambda t: torch.cat((-t[..., self.head_dim // 2:], t[..., :self.head_dim // 2]), -1)
        q = q * self.cos[:, None] + rot(q) * self.sin[:, None]
        k = k * self.cos[:, None] + rot(k) * self.sin[:, None]
        r = self.heads // self.kv_heads
        k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=self.scaling)
        return h + self.o_proj(a.transpose(1, 2).reshape(B, T, -1))


class TinyMLP(nn.Module):
    def __init__(self, d=32, gen=None):
        super().__init__()
        self.norm_w = nn.Parameter(1 + 0.1 * torch.randn(d, generator=gen, dtype=F64))
        self.up = nn.Linear(d, 2 * d, dtype=F64)
        self.down = nn.Linear(2 * d, d, dtype=F64)
        with torch.no_grad():
            self.up.weight.copy_(torch.randn(2 * d, d, generator=gen, dtype=F64) / math.sqrt(d))
            self.down.weight.copy_(torch.randn(d, 2 * d, generator=gen, dtype=F64) / math.sqrt(2 * d))

    def forward(self, h):
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_w
        return h + self.down(torch.nn.functional.silu(self.up(x)))


def setup_batch(seed, B=2, T=7, d=32, heads=4, kv_heads=2, pad=2, noise=0.05):
    gen = torch.Generator().manual_seed(seed)
    blk = RopeBlock(d, heads, kv_heads, gen).requires_grad_(False)
    theta = torch.randn(B, T, blk.head_dim // 2, generator=gen, dtype=F64)
    blk.cos, blk.sin = torch.cat([theta.cos()] * 2, -1), torch.cat([theta.sin()] * 2, -1)
    tm = torch.ones(B, T, dtype=torch.bool)
    tm[1, T - pad:] = False  # padded tail of the second sample
    blk.mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & tm[:, None, None, :]
    x_fp = torch.randn(B, T, d, generator=gen, dtype=F64)
    x_hat = x_fp + noise * torch.randn(x_fp.shape, generator=gen, dtype=F64)
    return blk, theta, tm, x_fp, x_hat, gen


def mods_of(blk):
    return {n: getattr(blk, n) for n in PROJ}


# ----------------------------------------------------------------------------- independent references
def ref_rotate(x, theta):
    """Rotary embedding as explicit rotations of the channel pairs (m, m + d/2) by theta[..., m]."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def ref_norm(blk, h):
    return h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-6) * blk.norm_w.detach()


def ref_proj(blk, name, x):
    lin = getattr(blk, name)
    out = x @ lin.weight.detach().T
    return out if lin.bias is None else out + lin.bias.detach()


def ref_probs_loops(zq, zk, theta, tm, heads, kv_heads, head_dim, scale):
    """softmax over the allowed keys (j <= i, real j), one query row at a time; 0 for padded rows."""
    B, T, _ = zq.shape
    r = heads // kv_heads
    P = torch.zeros(B, heads, T, T, dtype=F64)
    for b in range(B):
        for h in range(heads):
            kh = h // r
            for i in range(T):
                if not tm[b, i]:
                    continue
                qi = ref_rotate(zq[b, i, h * head_dim:(h + 1) * head_dim], theta[b, i])
                js = [j for j in range(i + 1) if tm[b, j]]
                s = torch.stack([qi @ ref_rotate(zk[b, j, kh * head_dim:(kh + 1) * head_dim], theta[b, j]) * scale
                                 for j in js])
                e = torch.exp(s - s.max())
                P[b, h, i, js] = e / e.sum()
    return P


def ref_attend(zq, zk, zv, theta, tm, heads, kv_heads, head_dim):
    """Attention context (input of o_proj), vectorised but written independently of the block."""
    B, T, _ = zq.shape
    r = heads // kv_heads
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None] & tm[:, None, :]
    out = []
    for h in range(heads):
        kh = h // r
        q = ref_rotate(zq[..., h * head_dim:(h + 1) * head_dim], theta)
        k = ref_rotate(zk[..., kh * head_dim:(kh + 1) * head_dim], theta)
        s = (q @ k.transpose(1, 2)) / math.sqrt(head_dim)
        s = s.masked_fill(~allowed, float("-inf"))
        out.append(torch.softmax(s, -1) @ zv[..., kh * head_dim:(kh + 1) * head_dim])
    return torch.cat(out, -1)


# ----------------------------------------------------------------------------- attention scores
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_attention_probs_and_fastv_match_bruteforce(mask_kind):
    for seed in range(2):
        blk, theta, tm, x_fp, x_hat, gen = setup_batch(seed)
        xn = ref_norm(blk, x_hat)
        zq, zk = ref_proj(blk, "q_proj", xn), ref_proj(blk, "k_proj", xn)
        geom = AttentionGeometry.of(blk)
        assert (geom.num_heads, geom.num_kv_heads, geom.head_dim) == (4, 2, 8)
        mask = {"bool": blk.mask, "none": None,
                "additive": torch.zeros(blk.mask.shape, dtype=F64).masked_fill(~blk.mask, torch.finfo(F64).min)}[mask_kind]
        P = attention_probs(zq, zk, geom, cos=blk.cos, sin=blk.sin, attention_mask=mask, token_mask=tm)
        ref = ref_probs_loops(zq, zk, theta, tm, 4, 2, 8, blk.scaling)
        assert torch.allclose(P, ref, rtol=1e-10, atol=1e-12)
        # FastV: attention received, mean over heads, summed over the real queries
        g = fastv_importance(zq, zk, geom, cos=blk.cos, sin=blk.sin, attention_mask=mask, token_mask=tm)
        g_ref = torch.zeros(tm.shape, dtype=F64)
        for b in range(tm.shape[0]):
            for j in range(tm.shape[1]):
                if tm[b, j]:
                    g_ref[b, j] = sum(ref[b, h, i, j] for h in range(4) for i in range(tm.shape[1]) if tm[b, i]) / 4
        assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-12)
        assert (g[~tm] == 0).all() and (g[tm] > 0).all()
        for b in range(tm.shape[0]):  # mean 1 over a sample's real tokens
            assert g[b, tm[b]].mean().item() == pytest.approx(1.0, rel=1e-12)


def test_attention_importance_on_block_uses_xhat_and_reports_err():
    blk, theta, tm, x_fp, x_hat, _ = setup_batch(3)
    res = attention_importance(blk, mods_of(blk), x_fp, x_hat, style="fastv", geometry=AttentionGeometry.of(blk),
                               position_embeddings=(blk.cos, blk.sin), attention_mask=blk.mask, token_mask=tm)
    xn = ref_norm(blk, x_hat)
    ref = ref_probs_loops(ref_proj(blk, "q_proj", xn), ref_proj(blk, "k_proj", xn), theta, tm, 4, 2, 8, blk.scaling)
    g_ref = ref.mean(1).sum(1)  # [B, T]: mean over heads, sum over queries (padded rows are 0)
    assert res.rule == "fastv" and math.isnan(res.loss)
    for n in PROJ:
        assert torch.allclose(res.g[n].double(), g_ref * tm, rtol=1e-6)
    dz = ref_proj(blk, "v_proj", xn) - ref_proj(blk, "v_proj", ref_norm(blk, x_fp))
    assert torch.allclose(res.err_norm["v_proj"].double(), dz.norm(dim=-1), rtol=1e-6)
    with pytest.raises(ValueError, match="style='magic'"):
        attention_importance(blk, mods_of(blk), x_fp, x_hat, style="magic", geometry=AttentionGeometry.of(blk),
                             position_embeddings=(blk.cos, blk.sin))


def ref_pact(zq, zk, x, theta, vision, tm, heads, kv_heads, d, scale, keep, cutoff, coef):
    """PACT's EUTI + prune + DBDPC + retrieval, written with Python loops over tokens."""
    B, T, _ = zq.shape
    r = heads // kv_heads
    g = tm.to(F64).clone()
    for b in range(B):
        vis = [t for t in range(T) if vision[b, t] and tm[b, t]]
        n = len(vis)
        if not n:
            continue
        s = [0.0] * n
        for h in range(heads):
            qbar = sum(zq[b, t, h * d:(h + 1) * d] for t in vis) / n
            logits = torch.stack([qbar @ zk[b, t, (h // r) * d:(h // r + 1) * d] * scale for t in vis])
            p = torch.softmax(logits, 0)
            for j in range(n):
                s[j] += p[j].item() / heads
        s = [s[j] * x[b, vis[j]].norm().item() for j in range(n)]
        a = [v / (sum(s) / n) for v in s]
        n_keep = max(1, int(n * keep))
        order = sorted(range(n), key=lambda j: -a[j])
        kept, pruned = order[:n_keep], order[n_keep:]
        feats = [torch.cat([ref_rotate(zk[b, t, kh * d:(kh + 1) * d], theta[b, t]) for kh in range(kv_heads)])
                 for t in vis]

        def dist(i, j):
            u, v = feats[i], feats[j]
            return max(0.0, 1.0 - (u @ v).item() / (u.norm().item() * v.norm().item())) if i != j else 0.0

        rho = {i: sum(math.exp(-(dist(i, j) / 2.0) ** 2) for j in kept) for i in kept}
        centres: list[int] = []
        for i in sorted(kept, key=lambda i: -rho[i]):
            if all(dist(i, c) > cutoff for c in centres):
                centres.append(i)
        cluster = {i: min(centres, key=lambda c: dist(i, c)) for i in kept}
        for i in pruned:
            c = min(centres, key=lambda c: dist(i, c))
            if dist(i, c) <= coef * cutoff:
                cluster[i] = c
        size = Counter(cluster.values())
        for j in range(n):
            g[b, vis[j]] = a[j] / math.sqrt(size[cluster[j]]) if j in cluster else 0.0
    return g, centres


def test_pact_matches_loop_reference():
    gen = torch.Generator().manual_seed(7)
    B, T, H, KV, d = 2, 14, 4, 2, 8
    geom = AttentionGeometry(num_heads=H, num_kv_heads=KV, head_dim=d, scaling=d ** -0.5)
    tm = torch.ones(B, T, dtype=torch.bool)
    tm[1, -4:] = False  # sample 1: its last vision token and the text after it are padding
    vision = torch.zeros(B, T, dtype=torch.bool)
    vision[:, 2:11] = True
    # keys: three prototypes (clusters) + one unique key; small rotations keep clusters intact
    protos = torch.randn(4, KV * d, generator=gen, dtype=F64)
    assign = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 3])
    zk = torch.randn(B, T, KV * d, generator=gen, dtype=F64)
    zk[:, 2:11] = protos[assign] + 0.03 * torch.randn(B, 9, KV * d, generator=gen, dtype=F64)
    zq = torch.randn(B, T, H * d, generator=gen, dtype=F64)
    x = torch.randn(B, T, 16, generator=gen, dtype=F64)
    x[:, 10] *= 1e-3  # the unique-key token has the lowest EUTI score -> pruned, then dropped
    theta = 0.02 * torch.randn(B, T, d // 2, generator=gen, dtype=F64)
    cos, sin = torch.cat([theta.cos()] * 2, -1), torch.cat([theta.sin()] * 2, -1)
    kw = dict(keep=0.6, cutoff=0.1, coef=1.5)
    g, stats = pact_importance(zq, zk, x, geom, cos=cos, sin=sin, vision=vision, token_mask=tm, **kw)
    ref, _ = ref_pact(zq, zk, x, theta, vision, tm, H, KV, d, geom.scaling, **kw)
    assert torch.allclose(g, ref, rtol=1e-9, atol=1e-12)
    assert (g[~tm] == 0).all() and (g[tm & ~vision] == 1).all()
    assert (g[0, 10] == 0) and stats["dropped"] >= 1 and stats["clusters"] < stats["kept"]
    assert stats["vision"] == 9 + 8 and torch.isfinite(g).all() and (g >= 0).all()
    # keep everything, cutoff 0: every vision token its own cluster, g = normalised EUTI score
    g1, st1 = pact_importance(zq, zk, x, geom, cos=cos, sin=sin, vision=vision, token_mask=tm, keep=1.0,
                              cutoff=0.0, coef=0.0)
    ref1, _ = ref_pact(zq, zk, x, theta, vision, tm, H, KV, d, geom.scaling, keep=1.0, cutoff=0.0, coef=0.0)
    assert torch.allclose(g1, ref1, rtol=1e-9) and st1["dropped"] == 0 and st1["clusters"] == st1["vision"]
    with pytest.raises(ValueError, match="keep=0"):
        pact_importance(zq, zk, x, geom, cos=cos, sin=sin, vision=vision, keep=0)


def test_dbdpc_invariants():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(40, 6, generator=gen, dtype=F64)
    cutoff = 0.4
    centres, label = dbdpc(X, cutoff)
    Xn = torch.nn.functional.normalize(X, dim=-1)
    D = (1 - Xn @ Xn.T).clamp_min(0)
    C = D[centres][:, centres]
    assert (C[~torch.eye(len(centres), dtype=torch.bool)] > cutoff).all()        # centres are far apart
    assert (D[torch.arange(40), centres[label]] <= cutoff + 1e-12).all()          # members within cutoff
    assert (label[centres] == torch.arange(len(centres))).all()                   # a centre labels itself
    with pytest.raises(ValueError, match="cutoff"):
        dbdpc(X, -1.0)


# ----------------------------------------------------------------------------- gradient granularity / breakpoint
def test_layer_granularity_matches_autograd_of_each_projection_loss():
    for seed in range(2):
        blk, theta, tm, x_fp, x_hat, _ = setup_batch(10 + seed)
        res = gradient_importance(blk, mods_of(blk), x_fp, x_hat, token_mask=tm, granularity="layer")
        m = tm.to(F64)[..., None]

        def zs(x):
            xn = ref_norm(blk, x)
            z = {n: ref_proj(blk, n, xn) for n in ("q_proj", "k_proj", "v_proj")}
            ctx = ref_attend(z["q_proj"], z["k_proj"], z["v_proj"], theta, tm, 4, 2, 8)
            z["o_proj"] = ref_proj(blk, "o_proj", ctx)
            return z

        z_fp, z_hat = zs(x_fp), zs(x_hat)
        total = 0.0
        for n in PROJ:
            leaf = z_hat[n].clone().requires_grad_(True)
            L = ((leaf - z_fp[n]) * m).pow(2).sum()
            (P,) = torch.autograd.grad(L, [leaf])
            total += L.item()
            assert torch.allclose(res.g[n].double(), reduce_gradient(P, "l1") * tm, rtol=1e-6, atol=1e-12), n
        assert res.rule == "gradient:layer" and res.loss == pytest.approx(total, rel=1e-9)
    # zero loss (X_hat == X): the zero-loss rule, named for the granularity
    res = gradient_importance(blk, mods_of(blk), x_fp, x_fp.clone(), token_mask=tm, granularity="layer",
                              fallback=(3, 8, False))
    assert res.rule == "rtn_fallback:layer" and res.loss > 0 and all((v[tm] > 0).all() for v in res.g.values())


def test_o_proj_in_breakpoint_matches_autograd():
    for seed in range(2):
        blk, theta, tm, x_fp, x_hat, _ = setup_batch(20 + seed)
        res = gradient_importance(blk, mods_of(blk), x_fp, x_hat, token_mask=tm, breakpoint="o_proj_in", norm="l2")
        m = tm.to(F64)[..., None]
        with torch.no_grad():
            xn = ref_norm(blk, x_fp)
            ctx_fp = ref_attend(*(ref_proj(blk, n, xn) for n in ("q_proj", "k_proj", "v_proj")), theta, tm, 4, 2, 8)
            xh = ref_norm(blk, x_hat)
            leaves = [ref_proj(blk, n, xh).requires_grad_(True) for n in ("q_proj", "k_proj", "v_proj")]
        ctx = ref_attend(*leaves, theta, tm, 4, 2, 8)
        L = ((ctx - ctx_fp) * m).pow(2).sum()
        grads = torch.autograd.grad(L, leaves)
        assert res.rule == "gradient:o_proj_in" and res.loss == pytest.approx(L.item(), rel=1e-9)
        for n, P in zip(("q_proj", "k_proj", "v_proj"), grads):
            assert torch.allclose(res.g[n].double(), reduce_gradient(P, "l2") * tm, rtol=1e-6, atol=1e-12), n
        assert torch.equal(res.g["o_proj"], tm.float())  # after the breakpoint: uniform (plain H)
        assert (res.err_norm["o_proj"][tm] > 0).all()
    res = gradient_importance(blk, mods_of(blk), x_fp, x_fp.clone(), token_mask=tm, breakpoint="o_proj_in",
                              fallback=(3, 8, False))
    assert res.rule == "rtn_fallback:o_proj_in" and res.loss > 0


def test_network_granularity_matches_torch_func_of_the_composite():
    blk, theta, tm, x_fp, x_hat, gen = setup_batch(30)
    B, T, d = x_hat.shape
    mlp1, mlp2 = TinyMLP(d, gen).requires_grad_(False), TinyMLP(d, gen).requires_grad_(False)
    blk2 = RopeBlock(d, 4, 2, gen).requires_grad_(False)
    blk2.cos, blk2.sin, blk2.mask = blk.cos, blk.sin, blk.mask
    head = nn.Linear(d, 11, bias=False, dtype=F64).requires_grad_(False)
    final_w = 1 + 0.1 * torch.randn(d, generator=gen, dtype=F64)
    input_ids = torch.randint(0, 11, (B, T), generator=gen)
    segment = torch.full((B, T), 2)
    segment[:, 3:] = 3  # answer tokens
    pos, labels = sft_targets(input_ids, tm, segment)
    # position t predicts the real answer token t + 1 (answers at 3..6; sample 1 is padded after 4)
    assert pos.nonzero().tolist() == [[0, 2], [0, 3], [0, 4], [0, 5], [1, 2], [1, 3]]
    assert torch.equal(labels[pos], torch.cat([input_ids[0, 3:7], input_ids[1, 3:5]]))

    def rest(h):  # this layer's MLP, one more decoder layer, final norm, lm_head, SFT CE
        h = mlp2(blk2(mlp1(h)))
        h = h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-6) * final_w
        return torch.nn.functional.cross_entropy(head(h[pos]), labels[pos], reduction="sum")

    res = gradient_importance(blk, mods_of(blk), x_fp, x_hat, token_mask=tm, granularity="network",
                              network_loss=rest, fallback=(3, 8, False))

    def composite(deltas):  # the whole network from X_hat, the probes added to the projection outputs
        xn = ref_norm(blk, x_hat)
        zq, zk, zv = (ref_proj(blk, n, xn) + deltas[n] for n in ("q_proj", "k_proj", "v_proj"))
        zo = ref_proj(blk, "o_proj", ref_attend(zq, zk, zv, theta, tm, 4, 2, 8)) + deltas["o_proj"]
        return rest(x_hat + zo)

    zeros = {"q_proj": torch.zeros(B, T, 32, dtype=F64), "k_proj": torch.zeros(B, T, 16, dtype=F64),
             "v_proj": torch.zeros(B, T, 16, dtype=F64), "o_proj": torch.zeros(B, T, 32, dtype=F64)}
    P = torch.func.grad(composite)(zeros)
    assert res.rule == "gradient:network" and res.loss == pytest.approx(composite(zeros).item(), rel=1e-9)
    for n in PROJ:
        assert torch.allclose(res.g[n].double(), reduce_gradient(P[n], "l1") * tm, rtol=1e-6, atol=1e-14), n
    # the first layer (X_hat == X) needs no zero-loss rule: CE is not zero
    res0 = gradient_importance(blk, mods_of(blk), x_fp, x_fp.clone(), token_mask=tm, granularity="network",
                               network_loss=rest, fallback=(3, 8, False))
    assert res0.rule == "gradient:network" and res0.loss > 0
    # no answer token in the batch: no target, uniform g
    none = gradient_importance(blk, mods_of(blk), x_fp, x_hat, token_mask=tm, granularity="network",
                               network_loss=lambda h: h.new_zeros(()))
    assert none.rule == "uniform" and torch.equal(none.g["q_proj"], tm.float())


def test_bad_arguments_name_the_argument():
    blk, theta, tm, x_fp, x_hat, _ = setup_batch(0)
    with pytest.raises(ValueError, match="granularity='net'"):
        gradient_importance(blk, mods_of(blk), x_fp, x_hat, granularity="net")
    with pytest.raises(ValueError, match="breakpoint='o_proj_out'"):
        gradient_importance(blk, mods_of(blk), x_fp, x_hat, breakpoint="o_proj_out")
    with pytest.raises(ValueError, match="breakpoint='o_proj_in' applies to granularity 'block'"):
        gradient_importance(blk, mods_of(blk), x_fp, x_hat, breakpoint="o_proj_in", granularity="layer")
    with pytest.raises(ValueError, match="network_loss"):
        gradient_importance(blk, mods_of(blk), x_fp, x_hat, granularity="network")
    from vlmq.quantize import LayerQuantConfig

    with pytest.raises(ValueError, match="granularity='net'"):
        LayerQuantConfig(granularity="net")
    with pytest.raises(ValueError, match="importance='attention'"):
        LayerQuantConfig(importance="attention")
    with pytest.raises(ValueError, match="pact_keep"):
        LayerQuantConfig(importance="pact", pact_keep=0.0)
    with pytest.raises(ValueError, match="breakpoint='o_proj_in' applies"):
        LayerQuantConfig(granularity="network", breakpoint="o_proj_in")
    from stages.params import ParamsError, parse_params

    for bad, key, allowed in [({"granularity": "net"}, "importance.granularity", "'layer', 'block' or 'network'"),
                              ({"breakpoint": "x"}, "importance.breakpoint", "'attn_out' or 'o_proj_in'"),
                              ({"source": "magic"}, "importance.source", "'fastv' or 'pact'"),
                              ({"pact_keep": 1.5}, "importance.pact_keep", "less than or equal to 1"),
                              ({"pact_cutoff": -0.1}, "importance.pact_cutoff", "greater than or equal to 0"),
                              ({"pact_coef": -1}, "importance.pact_coef", "greater than or equal to 0"),
                              ({"granularity": "layer", "breakpoint": "o_proj_in"}, "importance.breakpoint",
                               "granularity 'block' only")]:
        with pytest.raises(ParamsError) as err:
            parse_params({"importance": bad})
        assert key in str(err.value) and allowed in str(err.value), str(err.value)
    ok = parse_params({"importance": {"source": "pact", "pact_keep": 0.5}}).importance
    assert ok.source == "pact" and ok.granularity == "block" and ok.breakpoint == "attn_out"


# ----------------------------------------------------------------------------- end to end on a tiny Qwen2-VL
SCHEMA = {"layer": "int16", "module": "category", "sample_id": "int64", "token_index": "int32",
          "segment": "category", "modality": "category", "g": "float32", "err_norm": "float32", "rule": "str"}

SOURCES = {  # importance params -> expected rule per layer (layer 0: X_hat == X)
    "gradient": ({"source": "gradient"}, ("rtn_fallback", "gradient")),
    "layer": ({"granularity": "layer"}, ("rtn_fallback:layer", "gradient:layer")),
    "network": ({"granularity": "network"}, ("gradient:network", "gradient:network")),
    "o_proj_in": ({"breakpoint": "o_proj_in"}, ("rtn_fallback:o_proj_in", "gradient:o_proj_in")),
    "fastv": ({"source": "fastv"}, ("fastv", "fastv")),
    "pact": ({"source": "pact"}, ("pact", "pact")),
}


@pytest.fixture(scope="module")
def tiny_run(tiny_vlm, tmp_path_factory):
    """prepare_calib + cache_fp of the tiny model once, in a working directory of its own."""
    os.environ["VLMQ_NO_PREFECT"] = "1"
    from stages.cache_fp import cache_fp
    from stages.prepare_calib import prepare_calib

    root = tmp_path_factory.mktemp("sources")
    old = os.getcwd()
    os.chdir(root)
    try:
        p = write_params(root, tiny_vlm, {})
        prepare_calib(p)
        cache_fp(p)
        yield root
    finally:
        os.chdir(old)


def write_params(root: Path, tiny_vlm, importance: dict) -> Path:
    params = {"model": {"path": str(tiny_vlm["model"])},
              "calib": {"source": str(tiny_vlm["calib"]), "n_samples": 6, "batch_size": 4, "max_length": 64},
              "cache": {"dtype": "float32"}, "quant": {"method": "vlmq", "bits": 3, "group_size": 64},
              "importance": importance}
    p = root / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    return p


@pytest.mark.parametrize("name", list(SOURCES))
def test_every_source_end_to_end(tiny_run, tiny_vlm, monkeypatch, name):
    import vlmq.quantize as vq
    from stages.quantize import quantize

    importance, rules = SOURCES[name]
    seen = []
    real = vq.layer_importance

    def recording(*args, **kw):
        out = real(*args, **kw)
        seen.append((args[2], out))
        return out

    monkeypatch.setattr(vq, "layer_importance", recording)
    summary = quantize(write_params(tiny_run, tiny_vlm, importance))
    assert summary["importance"] == ("gradient" if name == "gradient" else
                                     importance.get("source", "gradient:" + name))
    assert len(seen) == 2
    padded = 0
    for l, (batches, outcome) in enumerate(seen):
        assert set(outcome.rules) == {rules[l]}
        for bi, b in enumerate(batches):
            real_tok = b.inputs.token_mask.cpu()
            padded += int((~real_tok).sum())
            for n in PROJ:
                g = outcome.g[n][bi]
                assert g.shape == real_tok.shape and torch.isfinite(g).all() and (g >= 0).all()
                assert (g[~real_tok] == 0).all(), (name, l, n)
                assert g[real_tok].sum() > 0
            if name == "o_proj_in":
                assert torch.equal(outcome.g["o_proj"][bi], real_tok.float())
            if name == "pact":  # text tokens keep g = 1
                text = real_tok & (b.modality.cpu() == 0)
                assert (outcome.g["q_proj"][bi][text] == 1).all()
        df = pd.read_parquet(tiny_run / f"data/importance/layer_{l:03d}.parquet")
        assert {c: "str" if str(t) in ("object", "string") else str(t) for c, t in df.dtypes.items()} == SCHEMA
        assert set(df["rule"]) == {rules[l]} and set(df["module"]) == set(PROJ)
        assert df["g"].notna().all() and (df["g"] >= 0).all() and set(df["modality"]) == {"text", "vision"}
        assert len(df) == 4 * sum(int(b.inputs.token_mask.sum()) for b in batches)
    assert padded > 0  # the calibration batches do contain padding


def test_attention_probs_match_the_models_eager_attention(tiny_run, tiny_vlm):
    """Our rotary + mask + GQA conventions reproduce Qwen2-VL's own eager attention weights."""
    from stages.cache_fp import load_context, load_layer
    from vlmq.models import load_model

    model, _, adapter = load_model(tiny_vlm["model"], dtype=torch.float32)
    layer = adapter.decoder_layers(model)[1]
    c, _ = load_context(tiny_run / "data/cache")[0]
    x = load_layer(tiny_run / "data/cache", 1)[0]
    attn = layer.self_attn
    captured = {}
    hooks = [getattr(attn, n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
             for n in ("q_proj", "k_proj")]
    additive = torch.where(c.attention_mask, 0.0, torch.finfo(torch.float32).min)
    old = attn.config._attn_implementation
    attn.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            _, weights = attn(hidden_states=layer.input_layernorm(x), attention_mask=additive,
                              position_embeddings=c.position_embeddings)
    finally:
        attn.config._attn_implementation = old
        for h in hooks:
            h.remove()
    P = attention_probs(captured["q_proj"], captured["k_proj"], AttentionGeometry.of(attn),
                        cos=c.position_embeddings[0], sin=c.position_embeddings[1], attention_mask=c.attention_mask,
                        token_mask=c.token_mask)
    real = c.token_mask[:, None, :, None].expand_as(P)
    assert torch.allclose(P[real], weights[real], atol=1e-5)


def test_file_source_replays_an_attention_source(tiny_run, tiny_vlm):
    """``source: file`` reads back the g of an earlier run, whatever its source."""
    import shutil

    from stages.quantize import quantize

    quantize(write_params(tiny_run, tiny_vlm, {"source": "pact"}))
    shutil.copytree(tiny_run / "data/importance", tiny_run / "imp_pact", dirs_exist_ok=True)
    quantize(write_params(tiny_run, tiny_vlm, {"source": "file", "file": str(tiny_run / "imp_pact")}))
    for l in range(2):
        a = pd.read_parquet(tiny_run / "imp_pact" / f"layer_{l:03d}.parquet")
        b = pd.read_parquet(tiny_run / f"data/importance/layer_{l:03d}.parquet")
        key = ["module", "sample_id", "token_index"]
        a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
        assert (b["rule"] == "file").all() and (a["rule"] == "pact").all()
        assert a["g"].tolist() == b["g"].tolist()
