"""Token importance factors G (VLMQ paper, Sec. 4, Eq. 3-5) and the ablation sources.

Gradient source (the paper's method). For one decoder layer with full-precision input X and
quantized-path input X̂ (earlier layers quantized), the attention block Attn(·) = · + MHSA(·)
(Eq. 1) is run on both, and one backward pass of

    L_block = || Attn(X) − Attn(X̂) ||²                                      (Eq. 5)

gives the raw gradient P = ∂L/∂z at the output z of each of q/k/v/o on the X̂ path. Per
projection and token n (Eq. 4):

    g_n = (1/C_o) Σ_c |P_{c,n}|           (norm="l1", the paper's default)
    g_n = sqrt((1/C_o) Σ_c P_{c,n}²)      (norm="l2", the paper's Table 12 † option)

The per-token gradients are reduced to g at once; no full gradient matrix outlives the call.

Zero-loss rule. When L_block is identically zero — the first layer, where nothing is quantized
yet and X̂ = X — the gradient carries no information. Rule: the X̂ path is then run with the
block's *own* q/k/v/o weights RTN-quantized at the target bits and group size (``fallback``),
so G measures which tokens the block's own quantization error hurts most. If that loss is
zero too (e.g. a block whose weights are exactly representable), g is uniform (all ones) and the
result says so (``rule="uniform"``). G is never NaN and never all zero for a real token.

Ablations of the gradient source (paper Tables 7 and 8), on the same code path:

* ``granularity="layer"`` (Table 7, L_Layer): each projection p gets the gradient of its *own*
  layer-wise distillation loss L_p = ||z_p(X) − z_p(X̂)||² at its output, P_p = ∂L_p/∂z_p
  (= 2Δz_p: no cross-layer dependency, which is the paper's point); the zero-loss rule applies.
* ``granularity="block"``: Eq. 5 above (the default).
* ``granularity="network"`` (Table 7, L_Network = CE): the loss is the SFT cross-entropy of the
  model's next-token predictions on the ground-truth answer tokens, with X̂ run through this
  layer's attention block (probed), its MLP, every later decoder layer (full precision: they
  are not quantized yet when this layer is), the final norm and lm_head; one backward gives P
  at this layer's q/k/v/o (``network_loss`` holds everything after the attention block). CE is
  not zero at the first layer, so the zero-loss rule is not needed; a batch without answer
  tokens has no target and gets ``rule="uniform"``.
* ``breakpoint="o_proj_in"`` (Table 8): the block loss is measured at the input of o_proj (the
  attention context before the output projection) instead of the block output:
  L = ||ctx(X) − ctx(X̂)||². o_proj lies after the breakpoint and gets no gradient; its g is
  uniform (all ones on real tokens), which makes its H̃ the plain H — the paper's Table 8 row
  "o_proj_in, {q,k,v}_proj" enhances only q/k/v.

Rules are named ``gradient`` / ``rtn_fallback`` plus ``:<granularity>`` and ``:<breakpoint>``
when these are not the defaults (e.g. ``gradient:network``, ``rtn_fallback:o_proj_in``).

Attention-score sources (paper Table 6), from the layer's own attention on X̂: the q/k outputs
of the block's projections are captured in one forward, the rotary embedding and mask of the
model are applied, and softmax(QKᵀ·scale + mask) is computed eagerly (:func:`attention_probs`).

* ``fastv`` (FastV, Chen et al. 2024): g_j = (1/H) Σ_h Σ_i A_h[i, j] over the real query
  positions i — the attention token j receives, averaged over heads and queries and scaled by the
  number of real tokens N so that g has mean 1 over a sample's real tokens. FastV prunes the
  image tokens with the lowest such score at one layer K; here the score itself is G, in every
  layer, for every token (text and vision).
* ``pact`` (PACT, Dhouib et al. 2025), an approximation of its two steps per sample and layer:
  (1) EUTI importance of each vision token, s_j = mean_h softmax_j(q̄_h·k_{h,j}·scale) · ||X̂_j||₂
  with q̄ the mean pre-rotary query over the sample's vision tokens and pre-rotary keys (PACT's
  defaults); a_j = s_j / mean(s); the ``pact_keep`` fraction with the highest a is kept, the rest
  pruned; (2) redundancy: the kept tokens are clustered with DBDPC (distance-bounded density
  peaks: tokens in decreasing density order, each one farther than ``pact_cutoff`` from every
  existing centre becomes a centre, the others join their nearest centre) on the cosine distance
  of the post-rotary keys; pruned tokens within ``pact_coef``·cutoff of a centre are retrieved
  into its cluster, the others are dropped. PACT merges a cluster into one token; the equivalent
  weighting here is g_j = a_j / sqrt(m_c) for the m_c members of cluster c (G enters H̃ squared,
  so a cluster counts like one token of the members' mean importance), g = 0 for dropped tokens
  and g = 1 for text tokens (PACT never reduces them). Approximations: keys and queries are
  those of the vision tokens only (PACT: all non-text tokens), the importance is computed at
  every layer instead of one reduction layer, and DBDPC is its sequential form.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from vlmq.quant import fake_quant_rtn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
GRANULARITIES = ("layer", "block", "network")   # paper Table 7 (block = Eq. 5, the default)
BREAKPOINTS = ("attn_out", "o_proj_in")          # paper Table 8 (attn_out = Eq. 5, the default)
ATTENTION_SOURCES = ("fastv", "pact")            # paper Table 6
ANSWER = 3  # segment code of answer tokens (vlmq.models.labels.SEGMENT_NAMES)


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} must be one of {allowed}")


def gradient_rule(base: str, granularity: str = "block", breakpoint: str = "attn_out") -> str:
    """Rule name of a gradient result: ``base`` plus the non-default granularity / breakpoint."""
    return base + ("" if granularity == "block" else f":{granularity}") + \
        ("" if breakpoint == "attn_out" else f":{breakpoint}")


@dataclass
class BlockImportance:
    """g and |Δz| per projection, each [B, T] (float32); ``loss`` = L_block; ``rule`` is
    "gradient", "rtn_fallback" (zero-loss rule) or "uniform"."""

    g: dict[str, torch.Tensor]
    err_norm: dict[str, torch.Tensor]
    loss: float
    rule: str
    extras: dict = field(default_factory=dict)


def reduce_gradient(P: torch.Tensor, norm: str = "l1") -> torch.Tensor:
    """Eq. 4: one importance value per token from the raw gradient P [..., T, C_o]."""
    if norm == "l1":
        return P.abs().mean(dim=-1)
    if norm == "l2":
        return P.pow(2).mean(dim=-1).sqrt()
    raise ValueError(f"norm={norm!r} must be 'l1' or 'l2'")


@contextmanager
def _capture_outputs(modules: dict[str, nn.Module], leaves: dict[str, torch.Tensor] | None,
                     outputs: dict[str, torch.Tensor], probed: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Record each module's output; with ``leaves`` given, add a zero probe δ that requires grad
    (z + δ), so ∂L/∂z = ∂L/∂δ can be read off δ while the graph through z stays intact (q/k/v
    reach the loss through o_proj). ``probed`` receives z + δ itself (with its graph)."""

    def make_hook(name):
        def hook(_mod, _inp, out):
            outputs[name] = out.detach()
            if leaves is None:
                return None
            probe = torch.zeros_like(out, requires_grad=True)
            leaves[name] = probe
            out = out + probe
            if probed is not None:
                probed[name] = out
            return out
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _capture_input(module: nn.Module | None, store: dict[str, torch.Tensor]) -> Iterator[None]:
    """Record the (first positional) input of ``module`` under ``store["x"]``, graph intact."""
    if module is None:
        yield
        return

    def pre_hook(_mod, args):
        store["x"] = args[0]

    h = module.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        h.remove()


def _masked_sq(diff: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None:
        diff = diff * mask
    return diff.pow(2).sum()


@contextmanager
def rtn_weights(modules: dict[str, nn.Module], bits: int, group_size: int, sym: bool = False) -> Iterator[None]:
    """Temporarily replace the modules' weights by their RTN fake-quantized versions."""
    saved = {n: m.weight.data.clone() for n, m in modules.items()}
    try:
        for m in modules.values():
            m.weight.data = fake_quant_rtn(m.weight.data, bits, group_size, sym)
        yield
    finally:
        for n, m in modules.items():
            m.weight.data = saved[n]


def gradient_importance(block_fn: Callable[[torch.Tensor], torch.Tensor], modules: dict[str, nn.Module],
                        x_fp: torch.Tensor, x_hat: torch.Tensor, *, token_mask: torch.Tensor | None = None,
                        norm: str = "l1", fallback: tuple[int, int, bool] | None = None,
                        granularity: str = "block", breakpoint: str = "attn_out",
                        network_loss: Callable[[torch.Tensor], torch.Tensor] | None = None) -> BlockImportance:
    """Importance of each token for each projection in ``modules`` (Eq. 3-5).

    ``block_fn(h) -> Attn(h)`` runs the attention block ([B, T, D] → [B, T, D]) with the model's
    own attention, position embeddings and mask; ``modules`` maps names (q_proj, …, o_proj) to the
    linear modules inside it; ``token_mask`` [B, T] (1 = real token) excludes padding from L;
    ``fallback = (bits, group_size, sym)`` enables the zero-loss rule (module docstring).
    ``granularity`` (layer | block | network) and ``breakpoint`` (attn_out | o_proj_in) choose the
    loss (module docstring); ``network_loss(Attn(X̂)) -> scalar`` is the rest of the network and
    its CE, required for ``granularity="network"``.
    """
    _check_choice("granularity", granularity, GRANULARITIES)
    _check_choice("breakpoint", breakpoint, BREAKPOINTS)
    if breakpoint != "attn_out" and granularity != "block":
        raise ValueError(f"breakpoint={breakpoint!r} applies to granularity 'block' only (got {granularity!r})")
    if breakpoint == "o_proj_in" and "o_proj" not in modules:
        raise ValueError("breakpoint='o_proj_in' needs the o_proj module in modules")
    if granularity == "network" and network_loss is None:
        raise ValueError("granularity='network' needs network_loss (the layers after this block and the CE)")
    bp_module = modules["o_proj"] if breakpoint == "o_proj_in" else None
    with torch.no_grad():
        z_fp: dict[str, torch.Tensor] = {}
        ctx_fp: dict[str, torch.Tensor] = {}
        with _capture_outputs(modules, None, z_fp), _capture_input(bp_module, ctx_fp):
            target = block_fn(x_fp)
        if bp_module is not None:
            target = ctx_fp["x"]
    mask = None if token_mask is None else token_mask.to(target.dtype)[..., None]

    def run(rule: str) -> BlockImportance | None:
        leaves: dict[str, torch.Tensor] = {}
        z_hat: dict[str, torch.Tensor] = {}
        probed: dict[str, torch.Tensor] = {}
        ctx_hat: dict[str, torch.Tensor] = {}
        with torch.enable_grad(), _capture_outputs(modules, leaves, z_hat, probed), _capture_input(bp_module, ctx_hat):
            out = block_fn(x_hat)
            if not leaves:
                return None
            names = list(leaves)
            if granularity == "layer":  # each projection's own loss, its own gradient
                losses = {n: _masked_sq(probed[n] - z_fp[n], mask) for n in names}
                loss = sum(losses.values())
                if loss.item() == 0.0:
                    return None
                grads = [torch.autograd.grad(losses[n], [leaves[n]], retain_graph=True)[0] for n in names]
            else:
                if granularity == "network":
                    loss = network_loss(out)
                else:
                    loss = _masked_sq((ctx_hat["x"] if bp_module is not None else out) - target, mask)
                if loss.item() == 0.0 or not loss.requires_grad:
                    return None
                grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{granularity} loss is {loss.item()} (non-finite activations)")
        # a projection after the breakpoint gets no gradient: uniform g (its H~ is the plain H)
        g = {n: torch.ones(x_hat.shape[:-1], device=x_hat.device) if P is None else reduce_gradient(P.float(), norm)
             for n, P in zip(names, grads)}
        err = {n: (z_hat[n].detach() - z_fp[n]).float().norm(dim=-1) for n in names}
        return BlockImportance(g=g, err_norm=err, loss=loss.item(), rule=rule)

    res = run(gradient_rule("gradient", granularity, breakpoint))
    if res is None and fallback is not None and granularity != "network":
        bits, group_size, sym = fallback
        with rtn_weights(modules, bits, group_size, sym):
            res = run(gradient_rule("rtn_fallback", granularity, breakpoint))
    if res is None:
        shape = x_hat.shape[:-1]
        ones = {n: torch.ones(shape) for n in modules}
        zeros = {n: torch.zeros(shape) for n in modules}
        res = BlockImportance(g=ones, err_norm=zeros, loss=0.0, rule="uniform")
    if token_mask is not None:
        keep = token_mask.to(torch.float32)
        res.g = {n: v * keep.to(v.device) for n, v in res.g.items()}
    return res


# ----------------------------------------------------------------------------- other sources
def regularise(g: list[torch.Tensor], masks: list[torch.Tensor], power: float = 1.0,
               floor: float = 0.0) -> list[torch.Tensor]:
    """Regularised importance of one projection in one layer (beyond the paper): the weight each
    token gets in H̃ is w = g'², with

        g'² = (1 − β) · g^{2p} / mean(g^{2p}) + β        (the mean over the real tokens of all batches)

    so ``power`` p = 1, ``floor`` β = 0 is the paper's G² up to a constant factor (which leaves the
    solve unchanged), p = 0.5 gives H̃ = X G Xᵀ, and β = 1 the plain Hessian. ``g``, ``masks``:
    per batch [B, T]; padding stays 0. Returns g' per batch."""
    if not power >= 0 or not 0.0 <= floor <= 1.0:
        raise ValueError(f"regularise: power={power!r} must be >= 0 and floor={floor!r} in [0, 1]")
    w = [gb.double().clamp_min(0) ** (2 * power) * m for gb, m in zip(g, masks)]
    n = sum(float(m.sum()) for m in masks)
    mean = sum(float(wb.sum()) for wb in w) / max(n, 1.0)
    out = []
    for wb, gb, m in zip(w, g, masks):
        scaled = wb / mean if mean > 0 else torch.ones_like(wb)
        out.append((((1.0 - floor) * scaled + floor) * m).sqrt().to(gb.dtype))
    return out


def effective_sample_size(w: torch.Tensor) -> float:
    """Kish's effective number of tokens of non-negative weights w (here w = g², the weight of a
    token in H̃): (Σw)² / Σw². Equal weights give the token count; one dominant token gives ~1."""
    w = w.double().flatten()
    s2 = float((w * w).sum())
    return float(w.sum()) ** 2 / s2 if s2 > 0 else 0.0


def random_low_importance(modality_vision: torch.Tensor, li_ratio: float, down_weight: float,
                          generator: torch.Generator) -> torch.Tensor:
    """VLMQ-naive (paper Tables 1 and 5): a random ``li_ratio`` fraction of the vision tokens gets
    importance ``down_weight``, every other token 1. ``modality_vision`` is a bool mask [..., T]."""
    if not 0.0 <= li_ratio <= 1.0:
        raise ValueError(f"li_ratio={li_ratio!r} must be in [0, 1]")
    if down_weight < 0:
        raise ValueError(f"down_weight={down_weight!r} must be >= 0")
    g = torch.ones(modality_vision.shape)
    idx = modality_vision.reshape(-1).nonzero().squeeze(1)
    k = int(round(li_ratio * idx.numel()))
    if k:
        pick = idx[torch.randperm(idx.numel(), generator=generator)[:k]]
        g.view(-1)[pick] = down_weight
    return g


# ----------------------------------------------------------------------------- attention-score sources
@dataclass(frozen=True)
class AttentionGeometry:
    """Head layout of an attention module: ``num_heads`` query heads, ``num_kv_heads`` key/value
    heads (grouped-query attention: kv head j serves query heads j·r … (j+1)·r − 1), ``scaling``
    the factor of QKᵀ."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float

    def __post_init__(self):
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @classmethod
    def of(cls, attn: nn.Module) -> "AttentionGeometry":
        """From a transformers attention module (``head_dim``, ``scaling``, ``q_proj``/``k_proj``)."""
        head_dim = int(attn.head_dim)
        return cls(num_heads=attn.q_proj.out_features // head_dim, num_kv_heads=attn.k_proj.out_features // head_dim,
                   head_dim=head_dim, scaling=float(getattr(attn, "scaling", head_dim ** -0.5)))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _heads(z: torch.Tensor, n: int, head_dim: int) -> torch.Tensor:
    """[B, T, n·head_dim] projection output → [B, n, T, head_dim]."""
    B, T, C = z.shape
    if C != n * head_dim:
        raise ValueError(f"projection output has {C} channels, expected {n} heads x {head_dim}")
    return z.reshape(B, T, n, head_dim).transpose(1, 2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of [B, heads, T, head_dim] with the model's cos/sin [B, T, head_dim]
    (Qwen2-VL's M-RoPE arrives already recomposed into this form)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def _batch_slice(t: torch.Tensor | None, b: int) -> torch.Tensor | None:
    if t is None:
        return None
    return t[b:b + 1] if t.shape[0] > 1 else t


def attention_probs(q: torch.Tensor, k: torch.Tensor, geometry: AttentionGeometry, *, cos: torch.Tensor,
                    sin: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q Kᵀ · scaling + mask) [B, H, T, T] from the q/k projection outputs (pre-rotary,
    q [B, T, H·d], k [B, T, KV·d]), with the model's rotary embedding and mask.

    ``attention_mask``: bool [B, 1, T, T] (True = attend; sdpa), additive float (eager), or None
    (causal, padding keys of ``token_mask`` excluded). Rows of padded queries are 0. Computed in
    float32 (float64 for float64 inputs)."""
    dt = _compute_dtype(q)
    H, KV, d = geometry.num_heads, geometry.num_kv_heads, geometry.head_dim
    cos, sin = cos.to(dt), sin.to(dt)
    qh = apply_rotary(_heads(q.to(dt), H, d), cos, sin)
    kh = apply_rotary(_heads(k.to(dt), KV, d), cos, sin).repeat_interleave(H // KV, dim=1)
    scores = qh @ kh.transpose(-1, -2) * geometry.scaling
    T = scores.shape[-1]
    if attention_mask is None:
        allowed = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()[None, None]
        if token_mask is not None:
            allowed = allowed & token_mask.to(device=scores.device, dtype=torch.bool)[:, None, None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask.to(scores.device), float("-inf"))
    else:
        scores = scores + attention_mask.to(device=scores.device, dtype=dt)
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # fully masked rows -> 0
    if token_mask is not None:
        probs = probs * token_mask.to(device=probs.device, dtype=dt)[:, None, :, None]
    return probs


def fastv_importance(q: torch.Tensor, k: torch.Tensor, geometry: AttentionGeometry, *, cos: torch.Tensor,
                     sin: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """FastV-style importance [B, T]: g_j = (1/H) Σ_h Σ_i A_h[i, j] over real queries i (the
    attention token j receives, mean over heads, times the number of real tokens: mean 1 over a
    sample's real tokens). One sample at a time (memory H·T²); 0 on padding."""
    B, T, _ = q.shape
    tm = torch.ones(B, T, dtype=torch.bool, device=q.device) if token_mask is None else token_mask.bool()
    out = torch.zeros(B, T, dtype=_compute_dtype(q), device=q.device)
    for b in range(B):
        p = attention_probs(q[b:b + 1], k[b:b + 1], geometry, cos=_batch_slice(cos, b), sin=_batch_slice(sin, b),
                            attention_mask=_batch_slice(attention_mask, b), token_mask=tm[b:b + 1])
        out[b] = p[0].mean(dim=0).sum(dim=0)
    return out * tm.to(out.dtype)


def _cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = torch.nn.functional.normalize(a, dim=-1)
    b = torch.nn.functional.normalize(b, dim=-1)
    return (1.0 - a @ b.T).clamp_min(0.0)


def dbdpc(features: torch.Tensor, cutoff: float, dc: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance-bounded density-peak clustering (PACT's DBDPC, sequential form) on the cosine
    distance of ``features`` [N, C]: density ρ_i = Σ_j exp(−(d_ij/dc)²); in decreasing ρ a point
    farther than ``cutoff`` from every existing centre becomes a centre; every point then joins
    its nearest centre (within ``cutoff`` by construction). Returns (centres [K] as indices into
    ``features``, label [N] = index into centres)."""
    if cutoff < 0:
        raise ValueError(f"cutoff={cutoff!r} must be >= 0")
    import numpy as np

    N = features.shape[0]
    if N == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    D = _cosine_distance(features, features)
    D.fill_diagonal_(0.0)
    rho = torch.exp(-(D / dc) ** 2).sum(dim=1)
    order = torch.argsort(rho, descending=True, stable=True).tolist()
    within = (D <= cutoff).cpu().numpy()
    covered = np.zeros(N, dtype=bool)
    centres: list[int] = []
    for i in order:
        if not covered[i]:
            centres.append(i)
            covered |= within[i]
    centres_t = torch.tensor(centres, dtype=torch.long, device=features.device)
    return centres_t, D[:, centres_t].argmin(dim=1)


def pact_importance(q: torch.Tensor, k: torch.Tensor, x: torch.Tensor, geometry: AttentionGeometry, *,
                    cos: torch.Tensor, sin: torch.Tensor, vision: torch.Tensor,
                    token_mask: torch.Tensor | None = None, keep: float = 0.55, cutoff: float = 0.21,
                    coef: float = 1.5) -> tuple[torch.Tensor, dict]:
    """PACT-style importance [B, T] (module docstring): EUTI score of the vision tokens, pruning
    of all but the ``keep`` fraction, DBDPC clustering of the kept tokens (cosine distance of the
    post-rotary keys, ``cutoff``), retrieval of pruned tokens within ``coef``·cutoff of a centre;
    g = a / sqrt(cluster size) for clustered vision tokens, 0 for dropped ones, 1 for text, 0 on
    padding. ``q``/``k`` are the projection outputs (pre-rotary), ``x`` the layer input X̂,
    ``vision`` a bool [B, T] mask. Also returns counts (vision, kept, clusters, dropped)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep!r} must be in (0, 1]")
    if not 0.0 <= cutoff <= 2.0:
        raise ValueError(f"cutoff={cutoff!r} must be a cosine distance in [0, 2]")
    if coef < 0:
        raise ValueError(f"coef={coef!r} must be >= 0")
    B, T, _ = q.shape
    dt = _compute_dtype(q)
    H, KV, d = geometry.num_heads, geometry.num_kv_heads, geometry.head_dim
    tm = torch.ones(B, T, dtype=torch.bool, device=q.device) if token_mask is None else token_mask.bool()
    g = tm.to(dt).clone()
    stats = {"vision": 0, "kept": 0, "clusters": 0, "dropped": 0}
    for b in range(B):
        vis = (vision[b].bool() & tm[b]).nonzero().squeeze(1)
        n = vis.numel()
        if n == 0:
            continue
        qv = _heads(q[b:b + 1].to(dt), H, d)[0][:, vis]                           # [H, n, d]
        kb = _heads(k[b:b + 1].to(dt), KV, d)                                      # [1, KV, T, d]
        kv = kb[0][:, vis].repeat_interleave(H // KV, dim=0)                       # [H, n, d]
        qbar = qv.mean(dim=1, keepdim=True)                                        # global query
        s = torch.softmax(qbar @ kv.transpose(-1, -2) * geometry.scaling, dim=-1).mean(dim=0)[0]
        s = s * x[b, vis].to(dt).norm(dim=-1)
        a = s / s.mean() if s.mean() > 0 else torch.ones_like(s)
        n_keep = max(1, int(n * keep))
        order = torch.argsort(a, descending=True, stable=True)
        kept, pruned = order[:n_keep], order[n_keep:]
        k_rot = apply_rotary(kb, _batch_slice(cos, b).to(dt), _batch_slice(sin, b).to(dt))[0][:, vis]
        feats = k_rot.transpose(0, 1).reshape(n, KV * d)                           # post-rotary keys
        centres, label = dbdpc(feats[kept], cutoff)
        cluster = torch.full((n,), -1, dtype=torch.long, device=q.device)
        cluster[kept] = label
        if pruned.numel():
            dist, near = _cosine_distance(feats[pruned], feats[kept][centres]).min(dim=1)
            cluster[pruned] = torch.where(dist <= coef * cutoff, near, torch.full_like(near, -1))
        member = cluster >= 0
        size = torch.bincount(cluster[member], minlength=centres.numel()).to(dt)
        w = torch.zeros(n, dtype=dt, device=q.device)
        w[member] = a[member] / size[cluster[member]].sqrt()
        g[b, vis] = w
        stats["vision"] += n
        stats["kept"] += n_keep
        stats["clusters"] += int(centres.numel())
        stats["dropped"] += int((~member).sum())
    return g, stats


def attention_importance(block_fn: Callable[[torch.Tensor], torch.Tensor], modules: dict[str, nn.Module],
                         x_fp: torch.Tensor, x_hat: torch.Tensor, *, style: str, geometry: AttentionGeometry,
                         position_embeddings: tuple[torch.Tensor, torch.Tensor],
                         attention_mask: torch.Tensor | None = None, token_mask: torch.Tensor | None = None,
                         vision: torch.Tensor | None = None, pact_keep: float = 0.55, pact_cutoff: float = 0.21,
                         pact_coef: float = 1.5) -> BlockImportance:
    """Attention-score importance (``style`` fastv | pact, paper Table 6) from the block's own
    attention on X̂: one forward captures the q_proj/k_proj outputs, the same g goes to every
    projection in ``modules``; ``err_norm`` is |Δz| as for the gradient source (one FP forward)."""
    _check_choice("style", style, ATTENTION_SOURCES)
    missing = {"q_proj", "k_proj"} - set(modules)
    if missing:
        raise ValueError(f"modules must contain q_proj and k_proj (missing {sorted(missing)})")
    if style == "pact" and vision is None:
        raise ValueError("style='pact' needs the vision-token mask (vision)")
    with torch.no_grad():
        z_fp: dict[str, torch.Tensor] = {}
        z_hat: dict[str, torch.Tensor] = {}
        with _capture_outputs(modules, None, z_fp):
            block_fn(x_fp)
        with _capture_outputs(modules, None, z_hat):
            block_fn(x_hat)
        cos, sin = position_embeddings
        if style == "fastv":
            g = fastv_importance(z_hat["q_proj"], z_hat["k_proj"], geometry, cos=cos, sin=sin,
                                 attention_mask=attention_mask, token_mask=token_mask)
            extras: dict = {}
        else:
            g, extras = pact_importance(z_hat["q_proj"], z_hat["k_proj"], x_hat, geometry, cos=cos, sin=sin,
                                        vision=vision, token_mask=token_mask, keep=pact_keep, cutoff=pact_cutoff,
                                        coef=pact_coef)
    if not torch.isfinite(g).all():
        raise FloatingPointError(f"{style} importance is not finite (non-finite activations)")
    g = g.float()
    err = {n: (z_hat[n] - z_fp[n]).float().norm(dim=-1) for n in modules}
    return BlockImportance(g={n: g.clone() for n in modules}, err_norm=err, loss=float("nan"), rule=style,
                           extras=extras)


def sft_targets(input_ids: torch.Tensor, token_mask: torch.Tensor, segment: torch.Tensor,
                answer: int = ANSWER) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets of the SFT loss (granularity="network"): position t predicts token t+1
    where t+1 is a real answer token. Returns (bool [B, T] positions, int64 [B, T] labels)."""
    if input_ids.shape != token_mask.shape or input_ids.shape != segment.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)}, token_mask {tuple(token_mask.shape)} and "
                         f"segment {tuple(segment.shape)} must have the same shape [B, T]")
    pos = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    pos[:, :-1] = (segment[:, 1:] == answer) & token_mask[:, 1:].bool() & token_mask[:, :-1].bool()
    labels = torch.zeros_like(input_ids, dtype=torch.long)
    labels[:, :-1] = input_ids[:, 1:].long()
    return pos, labels
