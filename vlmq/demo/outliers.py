"""Outlier weight columns for the demo model: the heavy tails of real LLM weights, planted exactly.

The weights of real LLM decoders are heavy-tailed: a few input channels carry weight columns far
larger than the rest (max |w| / std of 10-100 in LLaMA / Qwen decoders, "super weights", Yu et al.
2024), paired with small activations on those channels. They are what makes round-to-nearest
weight quantization costly on real models: a large weight sets its group's min/max range, so every
other weight of the group is rounded on a grid that is several times too coarse — the failure that
AWQ-style channel scaling and Hessian-aware solvers (GPTQ, GPTAQ, VLMQ) exist to handle.

A 4.6 M-parameter model trained for an hour on a CPU does not grow them (its decoder weights stay
near-Gaussian, max |w| / std ~ 7, and RTN at 3 bits then costs it almost nothing). This module
gives the demo model that structure as an exact reparametrisation: for each input-sharing group of
a decoder layer (q/k/v, o, gate/up, down) the weight columns of ``channels`` input channels are
multiplied by ``scale`` and the op before the group (RMSNorm gain, or the rows of v_proj / up_proj)
divides those channels by it:

    y = W x = (W diag(s)) (diag(s)⁻¹ x),   s_c = scale on the chosen channels, 1 elsewhere

so the full-precision function is unchanged (to float rounding) while quantization sees what it
sees on a real model. The q/k/v and gate/up inputs (the residual stream after RMSNorm) use the
same channels in every layer, as real outlier dimensions do; o and down (inputs produced inside the
layer) draw their own per layer. Pure torch; the folding is the adapter's
(:meth:`vlmq.models.adapter.ModelAdapter.fold_input_scales`, the op AWQ uses to fold its scales).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Input-sharing groups (``ModelAdapter.scale_fold_ops`` keys) by site name.
SITES: dict[str, tuple[str, ...]] = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
RESIDUAL_SITES = ("qkv", "gate_up")  # inputs read off the residual stream: same channels in every layer


def choose_channels(n: int, k: int, generator: torch.Generator) -> list[int]:
    """``k`` distinct channels of ``n``, drawn from ``generator`` (sorted)."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot choose {k} outlier channels out of {n}")
    return sorted(torch.randperm(n, generator=generator)[:k].tolist())


@torch.no_grad()
def plant_outlier_channels(model: nn.Module, channels: int, scale: float,
                           sites: Sequence[str] = tuple(SITES), seed: int = 0) -> dict:
    """Give ``channels`` input channels of every site of every decoder layer ``scale``-times larger
    weight columns and a ``1/scale``-times smaller input (exact reparametrisation, in place).

    Returns the record ``{"channels", "scale", "sites", "seed", "layers": [{site: [channel, ...]}]}``.
    ``channels == 0`` or ``scale == 1`` changes nothing.
    """
    from vlmq.models.adapter import get_adapter

    unknown = [s for s in sites if s not in SITES]
    if unknown:
        raise ValueError(f"unknown outlier site(s) {unknown}; expected a subset of {list(SITES)}")
    if scale <= 0:
        raise ValueError(f"outlier scale must be > 0, got {scale}")
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    gen = torch.Generator().manual_seed(seed)
    record: dict = {"channels": channels, "scale": scale, "sites": list(sites), "seed": seed, "layers": []}
    if channels == 0 or scale == 1.0:
        return record
    shared: dict[str, list[int]] = {}
    for layer in layers:
        chosen: dict[str, list[int]] = {}
        for site in sites:
            subset = SITES[site]
            in_f = adapter.get_linear(layer, subset[0]).in_features
            if site in RESIDUAL_SITES:
                idx = shared.setdefault("residual", choose_channels(in_f, channels, gen))
            else:
                idx = choose_channels(in_f, channels, gen)
            s = torch.ones(in_f, dtype=torch.float64)
            s[idx] = scale  # fold_input_scales: columns *= s, the op before /= s
            adapter.fold_input_scales(layer, subset, s)
            chosen[site] = idx
        record["layers"].append(chosen)
    return record
