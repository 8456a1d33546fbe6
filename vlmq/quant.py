"""Uniform affine weight quantizer (VLMQ paper, Appendix B.2, Eq. 11-14).

    Quant:   W_int = clamp(round(W / s) + z, 0, 2^B - 1)        (Eq. 11)
    Dequant: W_hat = s * (W_int - z)                              (Eq. 12)
    s = (max W - min W) / (2^B - 1)                               (Eq. 13)
    z = -round(min W / s)                                         (Eq. 14)

``round`` is round-to-nearest (the paper's bracket; ties to even, as ``torch.round``). The range
[min W, max W] is widened to contain 0, as the GPTQ reference quantizer does, so that the zero
point is a valid unsigned integer in [0, 2^B - 1] (the GPTQ checkpoint layout stores it so); for
a group of weights that straddles 0 — practically every group of a trained layer — this is the
paper's formula unchanged. A constant group (max == min) gets s = 1 instead of a division by 0.

Symmetric option: s = 2 max|W| / (2^B - 1), z = 2^(B-1) (the GPTQ convention).

Parameters are per output channel and per group of ``group_size`` consecutive input columns
(``group_size = -1``: one group spanning the whole row). A group size that does not divide the
row leaves a partial last group.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; choose one of {SUPPORTED_BITS}")
    return bits


def check_group_size(group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size != -1 and group_size < 1):
        raise ValueError(f"group_size={group_size!r} must be -1 (per output channel) or a positive integer")
    return group_size


def n_groups(in_features: int, group_size: int) -> int:
    """Number of groups along the input dimension (the last one may be partial)."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def affine_params(w: torch.Tensor, bits: int, sym: bool = False,
                  ratio: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (Eq. 13-14) of each row of ``w`` [rows, k].

    ``ratio`` (a float or one per row, in (0, 1]) shrinks the range [min W, max W] before Eq. 13-14
    (clipping: weights outside the shrunk range are clamped by Eq. 11); 1.0 is the plain quantizer,
    bit for bit. Returns ``scale`` (same float dtype as ``w``) and ``zero`` (integer values, same
    dtype) [rows].
    """
    maxq = 2**bits - 1
    wmin = w.amin(dim=1).clamp(max=0)
    wmax = w.amax(dim=1).clamp(min=0)
    if not (isinstance(ratio, float) and ratio == 1.0):
        wmin = wmin * ratio
        wmax = wmax * ratio
    if sym:
        amax = torch.maximum(wmin.abs(), wmax)
        scale = 2 * amax / maxq
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        scale = (wmax - wmin) / maxq
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = -torch.round(wmin / scale)
    return scale, zero


def quantize_int(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Eq. 11 with the quantization parameters broadcast against ``w``; integer values as floats."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Eq. 12."""
    return scale * (q - zero)


def group_index(in_features: int, group_size: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """``g_idx`` [in]: the group of each input column (in the layer's own column order).

    With act_order the columns are quantized in the order ``perm`` and groups are formed over
    consecutive columns of that order (dynamic groups), so column ``perm[j]`` is in group
    ``j // group_size``.
    """
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    order_groups = torch.arange(in_features) // group_size
    if perm is None:
        return order_groups.to(torch.int32)
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[perm] = order_groups.to(torch.int32)
    return g_idx


def dequantize(int_weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """Dequantized weight [out, in] from integer weights [out, in], per-group ``scales`` and
    ``zeros`` [out, n_groups] and ``g_idx`` [in]. Computed in the dtype of ``scales``."""
    g = g_idx.long()
    return dequantize_int(int_weight.to(scales.dtype), scales[:, g], zeros.to(scales.dtype)[:, g])


def rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool = False):
    """Round-to-nearest of a whole weight [out, in]: ``(int_weight, scales, zeros, g_idx)``.

    Computed in float32 (float64 if the weight is float64)."""
    check_bits(bits)
    check_group_size(group_size)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype)
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    ng = n_groups(in_f, group_size)
    scales = torch.empty(out_f, ng, dtype=dtype)
    zeros = torch.empty(out_f, ng, dtype=dtype)
    q = torch.empty_like(w)
    for gi in range(ng):
        cols = slice(gi * gs, min((gi + 1) * gs, in_f))
        s, z = affine_params(w[:, cols], bits, sym)
        scales[:, gi], zeros[:, gi] = s, z
        q[:, cols] = quantize_int(w[:, cols], s[:, None], z[:, None], bits)
    return q.to(torch.int32), scales, zeros.to(torch.int32), group_index(in_f, group_size)


def fake_quant_rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool = False) -> torch.Tensor:
    """RTN-quantize-dequantize ``weight`` [out, in]; returns a tensor of the weight's dtype."""
    q, scales, zeros, g_idx = rtn(weight, bits, group_size, sym)
    return dequantize(q, scales, zeros, g_idx).to(weight.dtype)
