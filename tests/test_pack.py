"""GPTQ bit-packing: round trips, the word layout against a literal bit-string reference."""

from __future__ import annotations

import pytest
import torch

from vlmq.pack import pack_linear, pack_rows, unpack_linear, unpack_rows
from vlmq.solver import quantize_weight


def literal_pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference: build the little-endian bit string as Python text, cut it into 32-bit words."""
    n, m = values.shape
    out = torch.zeros(n * bits // 32, m, dtype=torch.int64)
    for col in range(m):
        stream = "".join(format(int(v), f"0{bits}b")[::-1] for v in values[:, col])  # LSB first
        for j in range(len(stream) // 32):
            word = int(stream[32 * j:32 * j + 32][::-1], 2)
            out[j, col] = word - 2**32 if word >= 2**31 else word
    return out.to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_literal_bitstream_and_round_trips(bits):
    gen = torch.Generator().manual_seed(bits)
    n = 96 if bits == 3 else 64
    v = torch.randint(0, 2**bits, (n, 5), generator=gen)
    packed = pack_rows(v, bits)
    assert packed.dtype == torch.int32 and packed.shape == (n * bits // 32, 5)
    assert torch.equal(packed, literal_pack(v, bits))
    assert torch.equal(unpack_rows(packed, bits, n), v.to(torch.int32))


def test_four_bit_layout_is_the_familiar_one():
    v = torch.arange(8).reshape(8, 1)  # values 0..7 in one word: nibble k holds value k
    assert pack_rows(v, 4).item() == int("76543210", 16)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_solver_output_round_trips_bit_exactly(bits, act_order):
    gen = torch.Generator().manual_seed(100 + bits)
    W = torch.randn(64, 256, generator=gen)
    X = torch.randn(512, 256, generator=gen)
    r = quantize_weight(W, X, bits=bits, group_size=64, act_order=act_order)
    fmt = "gptq" if (r.zeros > 0).all() else "gptq_v2"
    t = pack_linear(r.int_weight, r.scales, r.zeros, r.g_idx, bits, fmt)
    q, s, z, g = unpack_linear(t, bits, 256, 64, fmt)
    assert torch.equal(q, r.int_weight) and torch.equal(z, r.zeros) and torch.equal(g, r.g_idx)
    assert torch.allclose(s, r.scales, rtol=1e-3)  # fp16 scales in the checkpoint


def test_zero_point_zero_needs_v2_and_bad_shapes_fail():
    q = torch.zeros(4, 32, dtype=torch.int32)
    s = torch.ones(4, 1)
    z = torch.zeros(4, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="gptq_v2"):
        pack_linear(q, s, z, torch.zeros(32, dtype=torch.int32), 4, "gptq")
    with pytest.raises(ValueError, match="bits=5"):
        pack_rows(torch.zeros(32, 1), 5)
    with pytest.raises(ValueError, match="whole 32-bit words"):
        pack_rows(torch.zeros(10, 1), 3)
