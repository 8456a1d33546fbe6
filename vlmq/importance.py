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
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from vlmq.quant import fake_quant_rtn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


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
                     outputs: dict[str, torch.Tensor]) -> Iterator[None]:
    """Record each module's output; with ``leaves`` given, add a zero probe δ that requires grad
    (z + δ), so ∂L/∂z = ∂L/∂δ can be read off δ while the graph through z stays intact (q/k/v
    reach the loss through o_proj)."""

    def make_hook(name):
        def hook(_mod, _inp, out):
            outputs[name] = out.detach()
            if leaves is None:
                return None
            probe = torch.zeros_like(out, requires_grad=True)
            leaves[name] = probe
            return out + probe
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
                        norm: str = "l1", fallback: tuple[int, int, bool] | None = None) -> BlockImportance:
    """Importance of each token for each projection in ``modules`` (Eq. 3-5).

    ``block_fn(h) -> Attn(h)`` runs the attention block ([B, T, D] → [B, T, D]) with the model's
    own attention, position embeddings and mask; ``modules`` maps names (q_proj, …, o_proj) to the
    linear modules inside it; ``token_mask`` [B, T] (1 = real token) excludes padding from L;
    ``fallback = (bits, group_size, sym)`` enables the zero-loss rule (module docstring).
    """
    with torch.no_grad():
        z_fp: dict[str, torch.Tensor] = {}
        with _capture_outputs(modules, None, z_fp):
            target = block_fn(x_fp)
    mask = None if token_mask is None else token_mask.to(target.dtype)[..., None]

    def run(rule: str) -> BlockImportance | None:
        leaves: dict[str, torch.Tensor] = {}
        z_hat: dict[str, torch.Tensor] = {}
        with torch.enable_grad(), _capture_outputs(modules, leaves, z_hat):
            diff = block_fn(x_hat) - target
            if mask is not None:
                diff = diff * mask
            loss = diff.pow(2).sum()
            if loss.item() == 0.0 or not leaves:
                return None
            names = list(leaves)
            grads = torch.autograd.grad(loss, [leaves[n] for n in names])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"block loss is {loss.item()} (non-finite activations)")
        g = {n: reduce_gradient(P.float(), norm) for n, P in zip(names, grads)}
        err = {n: (z_hat[n].detach() - z_fp[n]).float().norm(dim=-1) for n in names}
        return BlockImportance(g=g, err_norm=err, loss=loss.item(), rule=rule)

    res = run("gradient")
    if res is None and fallback is not None:
        bits, group_size, sym = fallback
        with rtn_weights(modules, bits, group_size, sym):
            res = run("rtn_fallback")
    if res is None:
        shape = x_hat.shape[:-1]
        ones = {n: torch.ones(shape) for n in modules}
        zeros = {n: torch.zeros(shape) for n in modules}
        res = BlockImportance(g=ones, err_norm=zeros, loss=0.0, rule="uniform")
    if token_mask is not None:
        keep = token_mask.to(torch.float32)
        res.g = {n: v * keep for n, v in res.g.items()}
    return res


# ----------------------------------------------------------------------------- other sources
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
