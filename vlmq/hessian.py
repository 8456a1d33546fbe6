"""Streaming second-order statistics of a linear layer's inputs.

For a layer ``y = W x`` with quantized-path inputs X̂ and full-precision inputs X (rows are tokens,
``[tokens, in]``) and per-token importance ``g`` (the diagonal of the paper's G), the solver needs

    H = X̂ᵀ G² X̂ / N          (H̃ of VLMQ Eq. 19; plain H when g ≡ 1)
    D = (X − X̂)ᵀ G² X̂ / N    (the residual cross term: r̃ X̃ᵀ = W · D for r = W(X − X̂))

accumulated over mini-batches of tokens so that no activation matrix needs to be held whole.
Each mini-batch product is computed in the input precision promoted to float32 (fast GEMM) and
added into float64 sums (the sums of many positive terms are where float32 loses digits).

At real sizes these matrices are GBs (in = 18944 at Qwen2-VL-7B's down_proj: 2.9 GB each in
float64), so above ``ROWS`` input features the sums are kept as blocks of ``ROWS`` rows: H only
on and above the diagonal (it is symmetric: about half the memory and half the GEMM work), D
whole. :meth:`HessianAccumulator.finalize` assembles them in the solve's precision a block at a
time, freeing each float64 block as it goes. Up to ``ROWS`` features there is one block, the full
product, so small layers are computed exactly as before blocking existed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROWS = 1024  # rows per block of the float64 sums above this many input features


@dataclass
class HessianStats:
    """Finalized statistics: ``H`` [in, in], ``D`` [in, in] or None (no FP stream), ``n_tokens``.

    ``consumable``: the solve that receives them may take the matrices away (:meth:`release`), so
    they are freed during it; the layer loop sets it for the last solve of each set of
    statistics. Statistics built by hand stay intact (False)."""

    H: torch.Tensor | None
    D: torch.Tensor | None
    n_tokens: int
    consumable: bool = False

    @property
    def in_features(self) -> int:
        return self.H.shape[0]

    def release(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(H, D)`` for a solve; a consumable object gives them away (H and D become None): a
        caller's reference alone would keep GBs alive through the solve at 7B/32B shapes."""
        if self.H is None:
            raise RuntimeError("these statistics were already handed to a solve")
        H, D = self.H, self.D
        if self.consumable:
            self.H = self.D = None
        return H, D


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
                 device: torch.device | str | None = None, rows: int = ROWS):
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"{name}: in_features must be a positive integer, got {in_features!r}")
        self.in_features = in_features
        self.residual = residual
        self.name = name
        n = in_features
        self._blocks = [(r0, min(r0 + rows, n)) for r0 in range(0, n, rows)]
        # H[r0:r1, r0:] (on and above the diagonal) and D[r0:r1, :] per block, float64
        self._H = [torch.zeros(r1 - r0, n - r0, dtype=torch.float64, device=device) for r0, r1 in self._blocks]
        self._D = [torch.zeros(r1 - r0, n, dtype=torch.float64, device=device)
                   for r0, r1 in self._blocks] if residual else None
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
        xh = x_hat.to(device=self._H[0].device, dtype=work)
        # Importance enters as X̃ = X G (Eq. 19): each token row is scaled by its g.
        xh_w = xh if g is None else xh * g.to(device=xh.device, dtype=work)[:, None]
        for (r0, r1), Hb in zip(self._blocks, self._H):
            Hb += xh_w[:, r0:r1].T @ xh_w[:, r0:]  # float32 product added into float64 (no float64 copy)
        if self.residual:
            dx = x.to(device=xh.device, dtype=work) - xh
            dx_w = dx if g is None else dx * g.to(device=xh.device, dtype=work)[:, None]
            for (r0, r1), Db in zip(self._blocks, self._D):
                Db += dx_w[:, r0:r1].T @ xh_w
        self.n_tokens += n

    def finalize(self, dtype: torch.dtype = torch.float64) -> HessianStats:
        """The statistics divided by the token count, in ``dtype`` (the solve's precision: float32
        for a float32 weight). The float64 sums are handed over (one block) or freed block by
        block as the result is assembled; the accumulator cannot be used again."""
        if self._H is None:
            raise RuntimeError(f"{self.name}: finalize() was already called")
        if self.n_tokens == 0:
            raise ValueError(f"{self.name}: no calibration tokens were accumulated")
        H = self._assemble(self._H, dtype, mirror=True)
        self._H = None
        D = None
        if self._D is not None:
            D = self._assemble(self._D, dtype, mirror=False)
            self._D = None
        return HessianStats(H=H, D=D, n_tokens=self.n_tokens)

    def _assemble(self, blocks: list[torch.Tensor], dtype: torch.dtype, mirror: bool) -> torch.Tensor:
        if len(blocks) == 1:  # the full matrix
            out = blocks.pop().div_(self.n_tokens)
            return out if out.dtype == dtype else out.to(dtype)
        n = self.in_features
        out = torch.empty(n, n, dtype=dtype, device=blocks[0].device)
        for r0, r1 in self._blocks:
            b = blocks.pop(0).div_(self.n_tokens)
            if mirror:  # H: the block's upper part and, by symmetry, the column block below it
                out[r0:r1, r0:] = b
                out[r1:, r0:r1] = b[:, r1 - r0:].T
            else:
                out[r0:r1] = b
            del b
        return out
