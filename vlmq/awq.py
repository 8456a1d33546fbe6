"""AWQ and MBQ: activation-aware per-input-channel scale search, pure torch.

AWQ (Lin et al., 2023). For a group of linears that read the same input X (q/k/v; o; gate/up;
down), each input channel c is scaled by

    s_c(α) = x̄_c^α / sqrt(max_c x̄_c^α · min_c x̄_c^α),     x̄_c = mean_n |X_{n,c}|

(the normalisation only keeps s around 1: the min/max quantizer is scale-equivariant) and the
weights are quantized as Q(W diag(s)) diag(s)⁻¹ with round-to-nearest. α is picked from an evenly
spaced grid on [0, 1] (α = 0 is plain RTN) to minimise the output reconstruction loss of the group

    L(α) = Σ_linears ‖W X − Q(W diag(s)) diag(s)⁻¹ X‖²  =  Σ_linears tr(E H Eᵀ),
    E = W − Q(W diag(s)) diag(s)⁻¹,  H = Σ_n x_n x_nᵀ,

evaluated from the Gram matrix H of the calibration inputs (exact, no token matrix kept). The
chosen s is then folded into the op before the group (``diag(s)⁻¹`` into the RMSNorm weight or
into the rows of the preceding linear) so that the full-precision function is unchanged, and the
scaled weights W diag(s) are quantized with RTN.

MBQ (Li et al., CVPR 2025): the same search with a modality-balanced objective, the loss summed
separately over text and vision tokens and weighted by each modality's sensitivity (the mean
|gradient| of the loss w.r.t. that modality's tokens; here the per-token importance g of
:func:`vlmq.importance.gradient_importance`, averaged per modality):

    L(α) = Σ_linears Σ_{m ∈ {text, vision}} γ_{linear, m} tr(E H_m Eᵀ),   H_m = Σ_{n ∈ m} x_n x_nᵀ.

The layer-level loop (which inputs, which op each scale folds into) lives in
:mod:`vlmq.quantize` and :mod:`vlmq.models.adapter`; this module holds only the math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from vlmq.quant import check_bits, check_group_size, fake_quant_rtn

TEXT, VISION = 0, 1  # modality codes (vlmq.models.labels.MODALITY_NAMES = ("text", "vision"))
MODALITY_KEYS = ("text", "vision")
REL_EPS = 1e-5  # channels with mean |x| below REL_EPS · max are treated as REL_EPS · max (dead inputs)


def alpha_grid(n_grid: int) -> tuple[float, ...]:
    """``n_grid`` evenly spaced α in [0, 1], both ends included."""
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 2:
        raise ValueError(f"n_grid={n_grid!r} must be an integer >= 2")
    return tuple(i / (n_grid - 1) for i in range(n_grid))


def awq_scales(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s(α) = x̄^α, normalised by sqrt(max · min) (module docstring)."""
    if abs_mean.dim() != 1 or abs_mean.numel() == 0:
        raise ValueError(f"abs_mean must be a non-empty 1-D tensor [in], got shape {list(abs_mean.shape)}")
    if not torch.isfinite(abs_mean).all() or (abs_mean < 0).any():
        raise ValueError("abs_mean must be finite and >= 0")
    top = abs_mean.max()
    x = abs_mean.clamp(min=float(top) * REL_EPS) if top > 0 else torch.ones_like(abs_mean)
    s = x.pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@dataclass(frozen=True)
class ScaleStats:
    """Finalized input statistics of one input-sharing group: ``abs_mean`` [in] (mean |x| over all
    tokens), ``grams`` key -> Σ x xᵀ [in, in] (key ``"all"``, or ``"text"``/``"vision"`` by
    modality), ``counts`` key -> tokens. float64."""

    abs_mean: torch.Tensor
    grams: dict[str, torch.Tensor]
    counts: dict[str, int]


class ScaleStatsAccumulator:
    """Streams ``add(x [tokens, in], modality [tokens] | None)`` into :class:`ScaleStats`
    (``by_modality=True`` keeps one Gram matrix per modality, for MBQ)."""

    def __init__(self, in_features: int, *, by_modality: bool = False, name: str = "layer",
                 device: torch.device | str | None = None):
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"{name}: in_features must be a positive integer, got {in_features!r}")
        self.in_features, self.by_modality, self.name = in_features, by_modality, name
        keys = MODALITY_KEYS if by_modality else ("all",)
        self._grams = {k: torch.zeros(in_features, in_features, dtype=torch.float64, device=device) for k in keys}
        self._counts = {k: 0 for k in keys}
        self._abs = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.n_tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, modality: torch.Tensor | None = None) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] != self.in_features:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.name}: inputs must have shape [..., {self.in_features}], got {shape}")
        x = x.reshape(-1, self.in_features)
        if not torch.isfinite(x).all():
            raise ValueError(f"{self.name}: inputs contain NaN/Inf values")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(device=self._abs.device, dtype=work)
        if self.by_modality:
            if modality is None:
                raise ValueError(f"{self.name}: modality is required for the per-modality (MBQ) statistics")
            m = modality.reshape(-1).to(x.device)
            if m.shape[0] != x.shape[0]:
                raise ValueError(f"{self.name}: modality has {m.shape[0]} entries but inputs has {x.shape[0]} tokens")
            if not bool(((m == TEXT) | (m == VISION)).all()):
                raise ValueError(f"{self.name}: modality must be 0 (text) or 1 (vision)")
            parts = {"text": x[m == TEXT], "vision": x[m == VISION]}
        else:
            parts = {"all": x}
        for k, xp in parts.items():
            if xp.shape[0]:
                self._grams[k] += (xp.T @ xp).to(torch.float64)
                self._counts[k] += xp.shape[0]
        self._abs += x.abs().sum(dim=0).to(torch.float64)
        self.n_tokens += x.shape[0]

    def finalize(self) -> ScaleStats:
        if self.n_tokens == 0:
            raise ValueError(f"{self.name}: no calibration tokens were accumulated")
        return ScaleStats(abs_mean=self._abs / self.n_tokens, grams=dict(self._grams), counts=dict(self._counts))


@dataclass
class ScaleSearchResult:
    """The chosen α and scales [in], and the loss of every grid point (``losses[i]`` at
    ``alphas[i]``; ``alphas[0] = 0`` is plain RTN)."""

    alpha: float
    scales: torch.Tensor
    alphas: tuple[float, ...]
    losses: list[float] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return self.losses[self.alphas.index(self.alpha)]


def scaled_rtn(weight: torch.Tensor, s: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Q(W diag(s)) diag(s)⁻¹: the effective weight of AWQ at scales ``s``."""
    ws = weight * s[None, :]
    return fake_quant_rtn(ws, bits, group_size, sym) / s[None, :]


def search_scales(weights: dict[str, torch.Tensor], stats: ScaleStats, *, bits: int, group_size: int,
                  sym: bool = False, n_grid: int = 20,
                  loss_weights: dict[str, dict[str, float]] | None = None) -> ScaleSearchResult:
    """Grid search of α (module docstring) for the linears ``weights`` (name -> W [out, in]) that
    share the input described by ``stats``. ``loss_weights[name][key]`` weights each linear's loss
    on Gram matrix ``key`` (MBQ: modality sensitivities; None = 1 for every term, AWQ)."""
    check_bits(bits)
    check_group_size(group_size)
    if not weights:
        raise ValueError("weights: at least one linear is needed")
    alphas = alpha_grid(n_grid)
    in_f = stats.abs_mean.shape[0]
    for n, W in weights.items():
        if W.dim() != 2 or W.shape[1] != in_f:
            raise ValueError(f"weights[{n!r}]: shape {list(W.shape)} does not match the inputs' in_features={in_f}")
    if loss_weights is not None:
        for n in weights:
            if n not in loss_weights:
                raise ValueError(f"loss_weights: no entry for {n!r}")
            for k, c in loss_weights[n].items():
                if k not in stats.grams:
                    raise ValueError(f"loss_weights[{n!r}]: unknown statistics key {k!r} (have {sorted(stats.grams)})")
                if not math.isfinite(c) or c < 0:
                    raise ValueError(f"loss_weights[{n!r}][{k!r}]={c!r} must be finite and >= 0")
    first = next(iter(weights.values()))
    cdtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    dev = first.device
    grams = {k: G.to(device=dev, dtype=cdtype) for k, G in stats.grams.items()}
    abs_mean = stats.abs_mean.to(device=dev, dtype=cdtype)
    Ws = {n: W.detach().to(cdtype) for n, W in weights.items()}
    losses = []
    for a in alphas:
        s = awq_scales(abs_mean, a)
        total = 0.0
        for n, W in Ws.items():
            E = W - scaled_rtn(W, s, bits, group_size, sym)
            for k, G in grams.items():
                c = 1.0 if loss_weights is None else float(loss_weights[n].get(k, 0.0))
                if c:
                    total += c * float(((E @ G) * E).sum())
        losses.append(total)
    best = min(range(len(alphas)), key=lambda i: (losses[i], i))
    return ScaleSearchResult(alpha=alphas[best], scales=awq_scales(abs_mean, alphas[best]), alphas=alphas,
                             losses=losses)


def modality_sensitivity(g: list[torch.Tensor], modality: list[torch.Tensor],
                         token_mask: list[torch.Tensor]) -> dict[str, float]:
    """MBQ's per-modality sensitivity: the mean of g over the real tokens of each modality (0.0
    for a modality without tokens), from per-batch g, modality and token_mask [B, T]."""
    sums = {k: 0.0 for k in MODALITY_KEYS}
    counts = {k: 0 for k in MODALITY_KEYS}
    for gb, mb, keep in zip(g, modality, token_mask):
        gb = gb.detach().double().cpu()
        mb = mb.cpu()
        keep = keep.cpu().bool()
        for code, k in ((TEXT, "text"), (VISION, "vision")):
            sel = keep & (mb == code)
            sums[k] += float(gb[sel].sum())
            counts[k] += int(sel.sum())
    return {k: (sums[k] / counts[k] if counts[k] else 0.0) for k in MODALITY_KEYS}


# ----------------------------------------------------------------------------- folding
@torch.no_grad()
def fold_into_norm(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """y = norm(x) feeds ``linears``: norm.weight /= s, each linear's weight columns *= s."""
    w = norm.weight
    if w.shape != s.shape:
        raise ValueError(f"norm weight shape {list(w.shape)} != scales shape {list(s.shape)}")
    w.data.copy_((w.data.to(s.dtype) / s).to(w.dtype))
    for lin in linears:
        lin.weight.data.copy_((lin.weight.data.to(s.dtype) * s[None, :]).to(lin.weight.dtype))


@torch.no_grad()
def fold_into_linear(prev: nn.Linear, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """``prev``'s output channels feed ``linears``' input channels one to one (through an op that
    commutes with per-channel scaling: attention's weighted sum of values, the gated product):
    prev rows (and bias) /= s, each linear's weight columns *= s."""
    if prev.out_features != s.shape[0]:
        raise ValueError(f"preceding linear has {prev.out_features} outputs but scales have {s.shape[0]} entries")
    prev.weight.data.copy_((prev.weight.data.to(s.dtype) / s[:, None]).to(prev.weight.dtype))
    if prev.bias is not None:
        prev.bias.data.copy_((prev.bias.data.to(s.dtype) / s).to(prev.bias.dtype))
    for lin in linears:
        lin.weight.data.copy_((lin.weight.data.to(s.dtype) * s[None, :]).to(lin.weight.dtype))
