"""GPTQ checkpoint layout: bit-packing of integer weights and zero points into int32 words.

The layout other GPTQ tools read (AutoGPTQ / GPTQModel / transformers / vLLM), for a linear with
``in`` inputs, ``out`` outputs and ``n_groups`` groups:

* ``qweight`` int32 ``[in * bits / 32, out]``: the integer weights packed along the input
  dimension;
* ``qzeros``  int32 ``[n_groups, out * bits / 32]``: the zero points packed along the output
  dimension;
* ``scales``  float16 ``[n_groups, out]``; ``g_idx`` int32 ``[in]``.

Packing rule, for every bit width (2, 3, 4, 8): the values along the packed dimension form one
little-endian bit stream, value ``k`` occupying bits ``[bits·k, bits·k + bits)``; word ``j`` holds
bits ``[32·j, 32·j + 32)``. For 2/4/8 bits that is the familiar "``32 / bits`` values per word,
value ``k % (32/bits)`` shifted by ``bits · (k % (32/bits))``"; for 3 bits it is the cross-word
packing of 32 values into 3 words (values 10 and 21 straddle two words).

Zero points: checkpoint format ``gptq`` (v1) stores ``zero − 1`` (the historical convention that
transformers, GPTQModel and vLLM expect for ``checkpoint_format: gptq``); ``gptq_v2`` stores the zero
point itself. A zero point of 0 cannot be written in v1 (it would wrap); :func:`pack_linear` then
needs ``gptq_v2``.
"""

from __future__ import annotations

import torch

PACK_BITS = (2, 3, 4, 8)


def _check(bits: int, length: int, what: str) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"bits={bits!r} cannot be packed; choose one of {PACK_BITS}")
    if (length * bits) % 32:
        raise ValueError(f"{what}: {length} values of {bits} bits do not fill whole 32-bit words "
                         f"(need a multiple of {32 // __import__('math').gcd(32, bits)})")


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``values`` [n, m] (integers in [0, 2^bits)) along dim 0 into int32 [n·bits/32, m]."""
    n, m = values.shape
    _check(bits, n, "pack")
    v = values.to(torch.int64)
    if (v < 0).any() or (v >= 2**bits).any():
        raise ValueError(f"pack: values outside [0, {2**bits - 1}]")
    n_words = n * bits // 32
    words = torch.zeros(n_words + 1, m, dtype=torch.int64)  # one spare word for the straddle
    offset = torch.arange(n, dtype=torch.int64) * bits
    word, shift = offset // 32, offset % 32
    for k in range(n):  # n adds of [m] vectors; packing is not on a hot path
        words[word[k]] |= (v[k] << shift[k]) & 0xFFFFFFFF
        spill = int(shift[k]) + bits - 32
        if spill > 0:
            words[word[k] + 1] |= v[k] >> (bits - spill)
    words = words[:n_words]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 [n·bits/32, m] → int32 [n, m]."""
    _check(bits, n, "unpack")
    if words.shape[0] != n * bits // 32:
        raise ValueError(f"unpack: {words.shape[0]} words cannot hold {n} values of {bits} bits")
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros(1, w.shape[1], dtype=torch.int64)])
    offset = torch.arange(n, dtype=torch.int64) * bits
    word, shift = offset // 32, offset % 32
    lo = w[word] >> shift[:, None]
    hi = w[word + 1] << (32 - shift)[:, None]
    return ((lo | hi) & (2**bits - 1)).to(torch.int32)


def pack_linear(int_weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                bits: int, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one linear from the solver's output (``int_weight`` [out, in],
    ``scales``/``zeros`` [out, n_groups], ``g_idx`` [in])."""
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format={checkpoint_format!r} must be 'gptq' or 'gptq_v2'")
    z = zeros.to(torch.int64).T.contiguous()  # [n_groups, out]
    if checkpoint_format == "gptq":
        if (z == 0).any():
            raise ValueError("a zero point of 0 cannot be stored in checkpoint_format 'gptq' (v1); use 'gptq_v2'")
        z = z - 1
    return {
        "qweight": pack_rows(int_weight.T.contiguous(), bits),
        "qzeros": pack_rows(z.T.contiguous(), bits).T.contiguous(),
        "scales": scales.T.contiguous().to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }


def unpack_linear(t: dict[str, torch.Tensor], bits: int, in_features: int, out_features: int,
                  checkpoint_format: str = "gptq") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(int_weight [out, in], scales [out, n_groups] float32, zeros [out, n_groups], g_idx)``."""
    int_weight = unpack_rows(t["qweight"], bits, in_features).T.contiguous()
    z = unpack_rows(t["qzeros"].T.contiguous(), bits, out_features)  # [out, n_groups]
    if checkpoint_format == "gptq":
        z = z + 1
    return int_weight, t["scales"].T.float().contiguous(), z.contiguous(), t["g_idx"].to(torch.int32)
