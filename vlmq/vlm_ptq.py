"""VLM-PTQ (Deng & Huang, CVPR 2026): the two additions to a weight-compensation solver, pure torch.

1. Corrected quantization target. Under the asymmetric (GPTAQ) objective the value a column should
   be rounded from is not the current weight but the weight shifted by the residual term,
   ``w_q + r X̃ᵀ H⁻¹ e_q`` (the output residual times the column of the inverse Hessian). In this
   project's solver that shift is the column of the target ``W* = W + W D H_λ⁻¹`` of the ``exact``
   GPTAQ update with α = 1 (docs/solver.md), so the corrected target is what that update rounds
   (``solve(..., target="corrected")``, the default; with the default ``reference`` update the
   column is rounded at its current value, which lacks its own share); ``target="uncorrected"``
   rounds each column where the symmetric objective would put it (the residual shift removed: the
   GPTQ values), the ablation. Derivation and what it means: docs/vlm_ptq.md.

2. Modality-aware quantization parameters. Each input channel c gets an importance from the
   energy of its activations per modality, averaged over the two modalities with fixed weights
   instead of over tokens (so that the many, redundant vision tokens do not dominate):

       a_c = (E_text[g² x_c²] + β · E_vision[g² x_c²]) / (1 + β)        (β = ``vision_weight``)

   (g ≡ 1 for plain VLM-PTQ; VLMQ's token importance for ``vlmq+vlm_ptq``). When the solver forms
   the parameters of a group (per output row), it searches a clipping ratio γ on a small grid and
   keeps the one with the least importance-weighted error ``Σ_c a_c (w_c − Q_γ(w_c))²``
   (:func:`search_group_params`); γ = 1 (the plain min/max quantizer) is always on the grid.

No Prefect/DVC here; the solver (:mod:`vlmq.solver`) calls :func:`search_group_params`.
"""

from __future__ import annotations

import math

import torch

from vlmq.quant import affine_params, check_bits, dequantize_int, quantize_int

TEXT, VISION = 0, 1  # modality codes (vlmq.models.labels.MODALITY_NAMES = ("text", "vision"))
TARGETS = ("corrected", "uncorrected")


def clip_ratios(grid: int, max_shrink: float) -> tuple[float, ...]:
    """The clipping grid: ``grid`` ratios from 1 down to ``1 − max_shrink`` (evenly spaced, both
    ends included; ``grid = 1`` is the plain quantizer only)."""
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid={grid!r} must be a positive integer")
    if isinstance(max_shrink, bool) or not isinstance(max_shrink, (int, float)) or not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"max_shrink={max_shrink!r} must be in [0, 1)")
    if grid == 1:
        return (1.0,)
    return tuple(1.0 - max_shrink * i / (grid - 1) for i in range(grid))


def check_ratios(ratios, name: str = "clip_ratios") -> tuple[float, ...]:
    try:
        out = tuple(float(r) for r in ratios)
    except TypeError:
        raise ValueError(f"{name}={ratios!r} must be a sequence of floats in (0, 1]") from None
    if not out or any(not math.isfinite(r) or not 0.0 < r <= 1.0 for r in out):
        raise ValueError(f"{name}={ratios!r} must be a non-empty sequence of floats in (0, 1]")
    return out


def search_group_params(w: torch.Tensor, importance: torch.Tensor | None, bits: int, sym: bool,
                        ratios) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``w`` [rows, k]: the clipping ratio of ``ratios`` with the least
    importance-weighted quantization error ``Σ_c a_c (w_c − Q_γ(w_c))²`` (``importance`` = a [k],
    None = uniform). Returns ``(scale, zero, ratio)`` [rows]; ties go to the earlier ratio."""
    check_bits(bits)
    ratios = check_ratios(ratios)
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [rows, k], got shape {list(w.shape)}")
    if importance is not None and (importance.dim() != 1 or importance.shape[0] != w.shape[1]):
        raise ValueError(f"importance must have shape [{w.shape[1]}], got {list(importance.shape)}")
    a = None if importance is None else importance.to(device=w.device, dtype=w.dtype)
    best = best_s = best_z = best_r = None
    for gamma in ratios:
        s, z = affine_params(w, bits, sym, gamma)
        dq = dequantize_int(quantize_int(w, s[:, None], z[:, None], bits), s[:, None], z[:, None])
        e2 = (w - dq).pow(2)
        err = (e2 if a is None else e2 * a).sum(dim=1)
        if best is None:
            best, best_s, best_z = err, s, z
            best_r = torch.full_like(err, gamma)
            continue
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        best_r = torch.where(better, torch.full_like(err, gamma), best_r)
    return best_s, best_z, best_r


class ModalityChannelStats:
    """Streaming per-modality channel energy ``Σ_{n∈m} g_n² x_{n,c}²`` and token counts, for the
    modality-aware channel importance (module docstring). ``add(x [tokens, in], modality [tokens],
    g [tokens] | None)``; :meth:`importance` returns a [in] (float64)."""

    def __init__(self, in_features: int, *, name: str = "layer", device: torch.device | str | None = None):
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"{name}: in_features must be a positive integer, got {in_features!r}")
        self.in_features = in_features
        self.name = name
        self.energy = torch.zeros(2, in_features, dtype=torch.float64, device=device)
        self.count = [0, 0]

    @torch.no_grad()
    def add(self, x: torch.Tensor, modality: torch.Tensor, g: torch.Tensor | None = None) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] != self.in_features:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.name}: inputs must have shape [..., {self.in_features}], got {shape}")
        x = x.reshape(-1, self.in_features)
        m = modality.reshape(-1)
        if m.shape[0] != x.shape[0]:
            raise ValueError(f"{self.name}: modality has {m.shape[0]} entries but inputs has {x.shape[0]} tokens")
        if not bool(((m == TEXT) | (m == VISION)).all()):
            raise ValueError(f"{self.name}: modality must be 0 (text) or 1 (vision)")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        x2 = x.to(device=self.energy.device, dtype=work).pow(2)
        if g is not None:
            g = g.reshape(-1)
            if g.shape[0] != x.shape[0]:
                raise ValueError(f"{self.name}: token_weights has {g.shape[0]} entries but inputs has {x.shape[0]} tokens")
            x2 = x2 * g.to(device=x2.device, dtype=work).pow(2)[:, None]
        m = m.to(x2.device)
        for code in (TEXT, VISION):
            sel = m == code
            n = int(sel.sum())
            if n:
                self.energy[code] += x2[sel].sum(dim=0).to(torch.float64)
                self.count[code] += n

    def importance(self, vision_weight: float = 1.0) -> torch.Tensor:
        """a_c = (E_text + β E_vision) / (1 + β), E_m the mean over the modality's tokens; a
        modality without tokens drops out (the other one's mean alone)."""
        if isinstance(vision_weight, bool) or not isinstance(vision_weight, (int, float)) \
                or not math.isfinite(vision_weight) or vision_weight < 0:
            raise ValueError(f"vision_weight={vision_weight!r} must be a finite number >= 0")
        if self.count[TEXT] + self.count[VISION] == 0:
            raise ValueError(f"{self.name}: no calibration tokens were accumulated")
        weights = (1.0, float(vision_weight))
        num = torch.zeros(self.in_features, dtype=torch.float64, device=self.energy.device)
        den = 0.0
        for code in (TEXT, VISION):
            if self.count[code] and weights[code] > 0:
                num += weights[code] * self.energy[code] / self.count[code]
                den += weights[code]
        if den == 0.0:  # only vision tokens and vision_weight = 0: fall back to what there is
            code = VISION if self.count[VISION] else TEXT
            return self.energy[code] / self.count[code]
        return num / den


def modality_channel_importance(x: torch.Tensor, modality: torch.Tensor, g: torch.Tensor | None = None,
                                vision_weight: float = 1.0) -> torch.Tensor:
    """One-shot :class:`ModalityChannelStats`: a [in] from ``x`` [tokens, in] and ``modality``."""
    st = ModalityChannelStats(x.shape[-1], device=x.device)
    st.add(x, modality, g)
    return st.importance(vision_weight)
