"""Streaming second-order statistics of a linear layer's inputs.

For a layer ``y = W x`` with quantized-path inputs X̂ and full-precision inputs X (rows are tokens,
``[tokens, in]``) and per-token importance ``g`` (the diagonal of the paper's G), the solver needs

    H = X̂ᵀ G² X̂ / N          (H̃ of VLMQ Eq. 19; plain H when g ≡ 1)
    D = (X − X̂)ᵀ G² X̂ / N    (the residual cross term: r̃ X̃ᵀ = W · D for r = W(X − X̂))

accumulated over mini-batches of tokens so that no activation matrix needs to be held whole.
Each mini-batch product is computed in the input precision promoted to float32 (fast GEMM) and
added into float64 sums (the sums of many positive terms are where float32 loses digits);
:meth:`HessianAccumulator.finalize` returns float64 matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HessianStats:
    """Finalized statistics: ``H`` [in, in], ``D`` [in, in] or None (no FP stream), ``n_tokens``."""

    H: torch.Tensor
    D: torch.Tensor | None
    n_tokens: int

    @property
    def in_features(self) -> int:
        return self.H.shape[0]

    def to(self, dtype: torch.dtype) -> "HessianStats":
        """The same statistics in ``dtype`` (a new object; the solver casts to its own precision
        anyway, so casting first frees the float64 matrices before the solve's copies)."""
        return HessianStats(H=self.H.to(dtype), D=None if self.D is None else self.D.to(dtype),
                            n_tokens=self.n_tokens)


def _check_finite(t: torch.Tensor, what: str, name: str) -> None:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"{name}: {what} contains {bad} NaN/Inf value(s)")


class HessianAccumulator:
    """Accumulates ``H`` (and ``D`` when ``residual=True``) over mini-batches of tokens.

    ``add(x_hat, x=None, g=None)``: ``x_hat`` [tokens, in] (inputs the quantized layer sees),
    ``x`` [tokens, in] (full-precision inputs; required when ``residual``), ``g`` [tokens]
    (token importance, ≥ 0; None = all ones). Leading batch dimensions are flattened.
    ``name`` is used in error messages (e.g. ``"layers.3.self_attn.q_proj"``).
    """

    def __init__(self, in_features: int, *, residual: bool = False, name: str = "layer",
                 device: torch.device | str | None = None):
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"{name}: in_features must be a positive integer, got {in_features!r}")
        self.in_features = in_features
        self.residual = residual
        self.name = name
        self._H = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self._D = torch.zeros_like(self._H) if residual else None
        self.n_tokens = 0

    def _as_tokens(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{self.name}: {what} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2 or t.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: {what} must have shape [..., {self.in_features}], got {list(t.shape)}")
        return t.reshape(-1, self.in_features)

    @torch.no_grad()
    def add(self, x_hat: torch.Tensor, x: torch.Tensor | None = None, g: torch.Tensor | None = None) -> None:
        if self._H is None:
            raise RuntimeError(f"{self.name}: add() after finalize()")
        x_hat = self._as_tokens(x_hat, "inputs")
        n = x_hat.shape[0]
        if self.residual:
            if x is None:
                raise ValueError(f"{self.name}: fp_inputs are required for the residual (GPTAQ) statistics")
            x = self._as_tokens(x, "fp_inputs")
            if x.shape[0] != n:
                raise ValueError(f"{self.name}: fp_inputs has {x.shape[0]} tokens but inputs has {n}")
        if g is not None:
            if not isinstance(g, torch.Tensor):
                raise TypeError(f"{self.name}: token_weights must be a torch.Tensor")
            g = g.reshape(-1)
            if g.shape[0] != n:
                raise ValueError(f"{self.name}: token_weights has {g.shape[0]} entries but inputs has {n} tokens")
            _check_finite(g, "token_weights", self.name)
            if (g < 0).any():
                raise ValueError(f"{self.name}: token_weights must be >= 0")
        _check_finite(x_hat, "inputs", self.name)
        if x is not None:
            _check_finite(x, "fp_inputs", self.name)
        if n == 0:
            return
        work = torch.float64 if x_hat.dtype == torch.float64 else torch.float32
        xh = x_hat.to(device=self._H.device, dtype=work)
        # Importance enters as X̃ = X G (Eq. 19): each token row is scaled by its g.
        xh_w = xh if g is None else xh * g.to(device=xh.device, dtype=work)[:, None]
        self._H += (xh_w.T @ xh_w).to(torch.float64)
        if self.residual:
            dx = x.to(device=xh.device, dtype=work) - xh
            dx_w = dx if g is None else dx * g.to(device=xh.device, dtype=work)[:, None]
            self._D += (dx_w.T @ xh_w).to(torch.float64)
        self.n_tokens += n

    def finalize(self) -> HessianStats:
        """The statistics, divided by the token count in place: the accumulator hands its buffers
        over (an [in, in] float64 matrix is 2.9 GB at Qwen2-VL-7B's down_proj) and cannot be used
        again."""
        if self._H is None:
            raise RuntimeError(f"{self.name}: finalize() was already called")
        if self.n_tokens == 0:
            raise ValueError(f"{self.name}: no calibration tokens were accumulated")
        H = self._H.div_(self.n_tokens)
        D = None if self._D is None else self._D.div_(self.n_tokens)
        self._H = self._D = None
        return HessianStats(H=H, D=D, n_tokens=self.n_tokens)
