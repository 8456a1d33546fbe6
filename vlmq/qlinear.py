"""A linear layer that computes from GPTQ-packed weights, with interchangeable kernel backends.

``QuantLinear`` holds the GPTQ tensors of one linear (``qweight``/``qzeros``/``scales``/``g_idx``,
see :mod:`vlmq.pack`) and computes ``y = x Wᵀ + b`` with ``W[o, i] = (q[o, i] − z[o, g_idx[i]]) ·
s[o, g_idx[i]]`` through one of these backends:

* ``reference`` — unpack and dequantize on every call, then a dense matmul in float32. Slow; the
  definition the other backends are checked against.
* ``dequant`` — dequantize once at load time and keep the dense weight (in ``compute_dtype``):
  the fake-quantized model, no memory saving; a fallback that works for every bit width.
* ``cpu_fused`` — 2/3/4/8 bits: the package's own compiled kernel (:mod:`vlmq.kernels`, built on
  first use) that decodes the packed words in registers inside the matmul, float32 activations;
  reads bits/32 of a float32 matmul's weight bytes. Needs contiguous groups whose size is a
  multiple of 32 (act_order is handled by the same load-time permutation as ``aten_int4``).
* ``aten_int4`` — 4-bit only: PyTorch's CPU int4 weight-packed matmul
  (``aten._weight_int4pack_mm_for_cpu``, bf16 activations). GPTQ's integer zero point ``z`` maps
  to the kernel's float offset ``(8 − z)·s`` exactly, because ``(q − z)·s = (q − 8)·s + (8 − z)·s``.
  With ``act_order`` (a non-monotone ``g_idx``) the input columns are permuted once at load so
  that every group is contiguous, and ``x`` is gathered by the same permutation at run time.

:func:`available_backends` says which backends apply to a bit width on this machine, fastest
first; ``backend="auto"`` picks the first.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmq.pack import unpack_linear

BACKENDS = ("auto", "reference", "dequant", "aten_int4", "cpu_fused")


def _has_cpu_fused() -> bool:
    from vlmq.kernels import gptq_cpu

    return gptq_cpu() is not None


def _has_aten_int4() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def available_backends(bits: int, device: str = "cpu") -> list[str]:
    """Backends that can run ``bits``-bit weights on ``device``, fastest first."""
    out = []
    if device == "cpu":  # order from reports/latency.json on the development machine (README)
        if bits == 4 and _has_aten_int4():
            out.append("aten_int4")
        if _has_cpu_fused():
            out.append("cpu_fused")
    return out + ["dequant", "reference"]


class QuantLinear(nn.Module):
    """Linear layer over GPTQ tensors; see the module docstring for the backends."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 checkpoint_format: str = "gptq"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.checkpoint_format = bits, group_size, checkpoint_format
        n_groups = 1 if group_size == -1 else -(-in_features // group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.backend = "reference"
        self.compute_dtype = torch.float32
        self._prepared: dict[str, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, backend={self.backend}")

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(int_weight [out, in], scales [out, G] float32, zeros [out, G], g_idx [in])``."""
        t = {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}
        return unpack_linear(t, self.bits, self.in_features, self.out_features, self.checkpoint_format)

    def dequantized(self) -> torch.Tensor:
        """The dense weight ``[out, in]`` in float32."""
        q, s, z, g = self.unpacked()
        gi = g.long()
        return (q.float() - z.float()[:, gi]) * s[:, gi]

    @torch.no_grad()
    def prepare(self, backend: str = "auto", compute_dtype: torch.dtype | None = None) -> "QuantLinear":
        """Convert the stored tensors to ``backend``'s layout (once, after loading)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
        ok = available_backends(self.bits, self.qweight.device.type)
        if backend == "auto":
            backend = ok[0]
        elif backend not in ok:
            raise ValueError(f"backend {backend!r} cannot run {self.bits}-bit weights on "
                             f"{self.qweight.device.type}; available: {ok}")
        self._prepared = {}
        if backend == "dequant":
            self.compute_dtype = compute_dtype or torch.float32
            self._prepared["weight"] = self.dequantized().to(self.compute_dtype)
        elif backend == "cpu_fused":
            self.compute_dtype = torch.float32
            self._prepared.update(_cpu_fused_prepare(*self.unpacked(), self.group_size, self.bits, self.qweight))
            self._group = self.in_features if self.group_size == -1 else self.group_size
        elif backend == "aten_int4":
            self.compute_dtype = torch.bfloat16
            self._prepared.update(_aten_int4_prepare(*self.unpacked(), self.group_size))
            self._group = self.in_features if self.group_size == -1 else self.group_size
        self.backend = backend
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.backend == "reference":
            y = F.linear(x.float(), self.dequantized(), None if self.bias is None else self.bias.float())
            return y.to(x.dtype)
        if self.backend == "dequant":
            y = F.linear(x.to(self.compute_dtype), self._prepared["weight"],
                         None if self.bias is None else self.bias.to(self.compute_dtype))
            return y.to(x.dtype)
        p = self._prepared
        x2 = x.reshape(-1, shape[-1])
        if "perm" in p:
            x2 = x2.index_select(1, p["perm"])
        if self.backend == "cpu_fused":
            from vlmq.kernels import gptq_cpu

            y = gptq_cpu().gptq_gemm(x2.float().contiguous(), p["qweight"], p["scales"], p["zs"], self.bits, self._group)
            y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), p["packed"],
                                                       self._group, p["scales_and_zeros"])
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def _contiguous_groups(q: torch.Tensor, g_idx: torch.Tensor, n_groups: int, group: int, backend: str):
    """``(q with columns permuted so groups are contiguous, perm or None)``; checks the layout."""
    in_f = q.shape[1]
    gi = g_idx.long()
    perm = None
    if not bool((gi[1:] >= gi[:-1]).all()):  # act_order: make every group contiguous
        perm = torch.sort(gi, stable=True).indices
        q, gi = q[:, perm], gi[perm]
    expected = torch.arange(in_f) // group
    if in_f % group or not torch.equal(gi, expected.clamp(max=n_groups - 1)):
        raise ValueError(f"{backend} needs equal contiguous groups of {group} columns (in_features={in_f}, "
                         f"{n_groups} groups); use the 'dequant' backend")
    return q, perm


def _cpu_fused_prepare(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, g_idx: torch.Tensor,
                       group_size: int, bits: int, qweight: torch.Tensor) -> dict[str, torch.Tensor]:
    from vlmq.pack import pack_rows

    in_f = q.shape[1]
    group = in_f if group_size == -1 else group_size
    if group % 32:
        raise ValueError(f"cpu_fused needs a group size that is a multiple of 32 (got {group}); use 'dequant'")
    q, perm = _contiguous_groups(q, g_idx, s.shape[1], group, "cpu_fused")
    # the stored words serve as they are unless act_order needs the columns permuted
    packed = qweight.contiguous() if perm is None else pack_rows(q.T.contiguous(), bits)
    out = {"qweight": packed, "scales": s.T.contiguous().float(),
           "zs": (z.float() * s).T.contiguous()}
    if perm is not None:
        out["perm"] = perm
    return out


def _aten_int4_prepare(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, g_idx: torch.Tensor,
                       group_size: int) -> dict[str, torch.Tensor]:
    out_f, in_f = q.shape
    n_groups = s.shape[1]
    group = in_f if group_size == -1 else group_size
    prepared: dict[str, torch.Tensor] = {}
    q, perm = _contiguous_groups(q, g_idx, n_groups, group, "aten_int4")
    if perm is not None:
        prepared["perm"] = perm
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    offset = (8.0 - z.float()) * s  # (q - z) s = (q - 8) s + (8 - z) s
    sz = torch.stack([s.T, offset.T], dim=-1).to(torch.bfloat16).contiguous()  # [G, out, 2]
    prepared.update(packed=packed, scales_and_zeros=sz)
    return prepared
