"""A linear layer that computes from GPTQ-packed weights, with interchangeable kernel backends.

``QuantLinear`` holds the GPTQ tensors of one linear (``qweight``/``qzeros``/``scales``/``g_idx``,
see :mod:`vlmq.pack`) and computes ``y = x Wᵀ + b`` with ``W[o, i] = (q[o, i] − z[o, g_idx[i]]) ·
s[o, g_idx[i]]`` through one of these backends:

* ``reference`` — unpack and dequantize on every call, then a dense matmul in float32. Slow; the
  definition the other backends are checked against.
* ``dequant`` — dequantize once at load time and keep the dense weight (in ``compute_dtype``):
  the fake-quantized model, no memory saving; a fallback that works for every bit width.
* ``cpu_fused`` — 2/3/4/8 bits: the package's own compiled kernel (:mod:`vlmq.kernels`, built on
  first use) that decodes the packed words in registers inside the matmul, float32 activations and
  accumulation; reads bits/32 of a float32 matmul's weight bytes (+ 3 bytes per group and output
  for the fp16 scale and uint8 zero point). At load time the GPTQ words are cut into blocks of 64
  output columns, each block contiguous over all inputs (the on-disk layout is unchanged). One
  build holds AVX-512, AVX2 and portable copies; the best the CPU runs is used
  (:func:`vlmq.kernels.kernel_isa`; ``prepare(..., isa=...)`` forces one). Needs contiguous groups
  whose size is a multiple of 32 (act_order is handled by the same load-time permutation as
  ``aten_int4``).
* ``cpu_tiled`` — the prefill path, same layout and bit widths as ``cpu_fused``: each thread
  dequantizes tiles of the packed words (128 output columns × 1024 inputs, float32, in its cache)
  and multiplies them with torch's GEMM (MKL/oneDNN); from ``TILE_SPLIT_FROM`` rows all threads
  share 512-column tiles and split the rows. The decode is paid once per weight, not once per
  weight and group of 4 rows, so at many rows (prefill) it runs at the GEMM's speed. Float32 on
  purpose: plain bfloat16 tiles move the demo model's logits by 8.6e-3 relative from rounding the
  weights alone, 1.4e-2 with the activations (``benchmarks/prefill_precision.py``), above the 1e-3
  the kernels are held to (``cpu_tiled_bf16`` below rounds no weight).
* ``cpu_tiled_bf16`` — the prefill path for bfloat16 activations (a model run in bf16) on machines
  whose bf16 GEMM is fast (AMX): each dequantized weight is held *exactly* as two bf16 numbers,
  ``W = W_hi + W_lo`` (2–4 bits: ``(q − z)·s`` has at most 4 + 11 significant bits; 8 bits: to
  ~2⁻¹⁷), and one bf16 GEMM over ``[x | x]`` and ``[W_hi; W_lo]`` (2K inputs, float32 accumulation)
  gives the reference's float32 product of the bf16 ``x`` up to summation order, rounded once to bf16
  as the reference's output is. Twice the GEMM work of a dense bf16 layer, in the unit that makes
  dense bf16 fast. Float32 ``x`` is rounded to bf16 first (then it is not the reference's result).
* ``aten_int4`` — 4-bit only: PyTorch's CPU int4 weight-packed matmul
  (``aten._weight_int4pack_mm_for_cpu``, bf16 activations). GPTQ's integer zero point ``z`` maps
  to the kernel's float offset ``(8 − z)·s`` exactly, because ``(q − z)·s = (q − 8)·s + (8 − z)·s``.
  With ``act_order`` (a non-monotone ``g_idx``) the input columns are permuted once at load so
  that every group is contiguous, and ``x`` is gathered by the same permutation at run time.

:func:`available_backends` says which backends apply to a bit width on this machine, in the order
``backend="auto"`` tries them; it takes the first that accepts the layer. With the compiled kernel
that is ``cpu_fused`` *per call by the number of rows*: below ``prefill_from`` rows (decode) the
fused kernel, from it on (prefill) ``cpu_tiled`` (crossover measured, README "Kernels"), or
``cpu_tiled_bf16`` for bf16 activations where :func:`bf16_gemm_fast` (AMX; else bf16 GEMMs are
slower than float32 ones: 6–8× at (3584, 3584), M = 1024, on an AVX2 machine).
``aten_int4`` (bfloat16 activations: ~1e-2 from the reference) is never chosen by ``auto``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmq.pack import unpack_linear

BACKENDS = ("auto", "reference", "dequant", "aten_int4", "cpu_fused", "cpu_tiled", "cpu_tiled_bf16")
KERNEL_BACKENDS = ("cpu_fused", "cpu_tiled", "cpu_tiled_bf16")  # one layout: switching among them is free
BF16_BACKENDS = ("aten_int4", "cpu_tiled_bf16")  # compute with bf16 activations: ~1e-2 from the reference on float32 x
KERNEL_BLOCK = 64  # output columns per block of the cpu_fused layout (NB in gptq_cpu.cpp)
PREFILL_FROM = 16  # backend="auto": rows per call from which cpu_tiled runs (params `latency.prefill_from`)
TILE_COLS, TILE_K = 2, 1024  # cpu_tiled: kernel blocks (of 64 columns) and inputs per dequantized tile
TILE_SPLIT_FROM = 768  # cpu_tiled: from this many rows, 512-column tiles shared by all threads (rows split; README)
TILE_COLS_BF16, TILE_K_BF16 = 1, 256  # cpu_tiled_bf16: blocks per [2K, 64] bf16 tile; inputs per dequantized chunk
# (cpu_tiled_bf16 from TILE_SPLIT_FROM rows: 512-column tiles filled by all threads, one threaded GEMM each)


def bf16_gemm_fast() -> bool:
    """Whether bf16 GEMMs are fast here: the CPU has AMX tiles (torch's oneDNN then uses them)."""
    f = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(f and f())


def _has_cpu_fused() -> bool:
    from vlmq.kernels import gptq_cpu

    return gptq_cpu() is not None


def _has_aten_int4() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def available_backends(bits: int, device: str = "cpu") -> list[str]:
    """Backends that can run ``bits``-bit weights on ``device``, in ``auto``'s order.

    ``cpu_fused`` (with ``cpu_tiled`` for prefill) first: float32 and faster than ``aten_int4`` at
    batch 1 with AVX2 and AVX-512 alike (README); ``aten_int4`` (4 bits) is listed for an explicit
    choice and skipped by ``auto``.
    """
    out = []
    if device == "cpu":
        if _has_cpu_fused():
            out += list(KERNEL_BACKENDS)
        if bits == 4 and _has_aten_int4():
            out.append("aten_int4")
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
        self._prefill_from: int | None = None  # set by prepare("auto") on the kernel: see path()
        self._bf16_prefill = False  # auto: bf16 activations from prefill_from rows run cpu_tiled_bf16
        self._kernel = None  # the compiled extension, for cpu_fused / cpu_tiled
        self.compute_dtype = torch.float32
        self._prepared: dict[str, torch.Tensor] = {}

    def extra_repr(self) -> str:
        backend = self.backend if self._prefill_from is None else (
            f"auto (cpu_fused below {self._prefill_from} rows, cpu_tiled from {self._prefill_from}"
            + (", cpu_tiled_bf16 for bf16 activations)" if self._bf16_prefill else ")"))
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, backend={backend}")

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
    def prepare(self, backend: str = "auto", compute_dtype: torch.dtype | None = None,
                isa: str | None = None, prefill_from: int = PREFILL_FROM,
                bf16_prefill: bool | None = None) -> "QuantLinear":
        """Convert the stored tensors to ``backend``'s layout (once, after loading).

        ``auto`` tries :func:`available_backends` in order and takes the first one that accepts this
        layer (e.g. ``cpu_fused`` and ``aten_int4`` need equal groups of a multiple of 32 columns).
        ``isa`` (``cpu_fused``/``cpu_tiled``): force the kernel's instruction set (``avx512``,
        ``avx2``, ``generic``; default: the best this CPU runs, :func:`vlmq.kernels.kernel_isa`).
        ``prefill_from`` (``auto`` only): calls with at least this many rows run ``cpu_tiled``, fewer
        ``cpu_fused``; ``bf16_prefill`` (``auto`` only; default :func:`bf16_gemm_fast`): those calls
        run ``cpu_tiled_bf16`` when the activations are bf16.
        """
        if prefill_from < 1:
            raise ValueError(f"prefill_from={prefill_from}: must be >= 1")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
        ok = available_backends(self.bits, self.qweight.device.type)
        if backend == "auto":
            cands = [c for c in ok if c not in ("aten_int4", "cpu_tiled", "cpu_tiled_bf16")]
            for cand in cands:
                try:
                    self.prepare(cand, compute_dtype, isa)
                except ValueError:
                    if cand == cands[-1]:
                        raise
                    continue
                self._prefill_from = prefill_from if cand == "cpu_fused" else None
                self._bf16_prefill = cand == "cpu_fused" and (bf16_gemm_fast() if bf16_prefill is None else bf16_prefill)
                return self
        elif backend not in ok:
            raise ValueError(f"backend {backend!r} cannot run {self.bits}-bit weights on "
                             f"{self.qweight.device.type}; available: {ok}")
        kernel = backend in KERNEL_BACKENDS
        if isa is not None and kernel:
            from vlmq.kernels import kernel_isas

            if isa not in kernel_isas():
                raise ValueError(f"isa={isa!r} is not available here; available: {kernel_isas()}")
        prepared: dict[str, torch.Tensor] = {}  # built first: a layout error leaves the layer as it was
        group = self.in_features if self.group_size == -1 else self.group_size
        if backend == "dequant":
            dtype = compute_dtype or torch.float32
            prepared["weight"] = self.dequantized().to(dtype)
        elif kernel:
            from vlmq.kernels import kernel_isa

            dtype = torch.float32
            if self.backend in KERNEL_BACKENDS:  # same layout: switching is free
                prepared = self._prepared
            else:
                prepared.update(_cpu_fused_prepare(*self.unpacked(), self.group_size, self.bits, self.qweight))
            self._isa = isa or kernel_isa()
        elif backend == "aten_int4":
            dtype = torch.bfloat16
            prepared.update(_aten_int4_prepare(*self.unpacked(), self.group_size))
        else:
            dtype = self.compute_dtype
        self._prepared, self._group, self.compute_dtype = prepared, group, dtype
        self.backend, self._prefill_from, self._bf16_prefill = backend, None, False
        if kernel:
            from vlmq.kernels import gptq_cpu

            self._kernel = gptq_cpu()
        else:
            self._kernel = None
        return self

    def path(self, rows: int, dtype: torch.dtype = torch.float32) -> str:
        """The backend a call with ``rows`` rows of ``dtype`` runs (``auto`` on the kernel: by
        ``prefill_from``, and bf16 activations by ``bf16_prefill``)."""
        if self._prefill_from is not None and rows >= self._prefill_from:
            return "cpu_tiled_bf16" if self._bf16_prefill and dtype == torch.bfloat16 else "cpu_tiled"
        return self.backend

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
        if self._kernel is not None:  # the kernel layout (a decode step: keep the Python path short)
            path = self.path(x2.shape[0], x2.dtype)
            if path == "cpu_tiled_bf16":  # the bias inside the GEMM: added before its one rounding
                y = self._kernel.gptq_gemm_tiled_bf16(
                    x2.to(torch.bfloat16).contiguous(), p["qweight"], p["scales"], p["zeros"], self.bits, self._group,
                    self.out_features, self._isa, TILE_COLS_BF16, TILE_K_BF16,
                    None if self.bias is None else self.bias.float().contiguous(), TILE_SPLIT_FROM)
                y = y.reshape(*shape[:-1], self.out_features)
                return y if y.dtype == x.dtype else y.to(x.dtype)
            args = (x2.float().contiguous(), p["qweight"], p["scales"], p["zeros"], self.bits, self._group,
                    self.out_features, self._isa)
            if path == "cpu_tiled":
                y = self._kernel.gptq_gemm_tiled(*args, TILE_COLS, TILE_K, TILE_SPLIT_FROM)
            else:
                y = self._kernel.gptq_gemm(*args)
            y = y.reshape(*shape[:-1], self.out_features)
            if self.bias is not None:  # in float32, before the one rounding to x's dtype (as the reference)
                y = y + self.bias.float()
            return y if y.dtype == x.dtype else y.to(x.dtype)
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


def _blocked(t: torch.Tensor, n_pad: int) -> torch.Tensor:
    """``[rows, N]`` → ``[ceil(N/64), rows, 64]``: the kernel's column blocks, zero-padded."""
    rows, n = t.shape
    padded = torch.zeros(rows, n_pad, dtype=t.dtype)
    padded[:, :n] = t
    return padded.view(rows, n_pad // KERNEL_BLOCK, KERNEL_BLOCK).permute(1, 0, 2).contiguous()


def _cpu_fused_prepare(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, g_idx: torch.Tensor,
                       group_size: int, bits: int, qweight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The kernel layout (``vlmq/kernels/gptq_cpu.cpp``): the GPTQ words, fp16 scales and uint8 zero
    points cut into blocks of 64 output columns, each block contiguous over all of K."""
    from vlmq.pack import pack_rows

    out_f, in_f = q.shape
    group = in_f if group_size == -1 else group_size
    if group % 32:
        raise ValueError(f"cpu_fused needs a group size that is a multiple of 32 (got {group}); use 'dequant'")
    q, perm = _contiguous_groups(q, g_idx, s.shape[1], group, "cpu_fused")
    if int(z.min()) < 0 or int(z.max()) > 255:
        raise ValueError("cpu_fused keeps zero points as uint8 (0..255); use 'dequant'")
    # the stored words serve as they are unless act_order needs the columns permuted
    words = qweight.contiguous() if perm is None else pack_rows(q.T.contiguous(), bits)
    n_pad = -(-out_f // KERNEL_BLOCK) * KERNEL_BLOCK
    out = {"qweight": _blocked(words, n_pad), "scales": _blocked(s.T.half(), n_pad),
           "zeros": _blocked(z.T.to(torch.uint8), n_pad)}
    if perm is not None:
        out["perm"] = perm
    return out


def _aten_int4_prepare(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, g_idx: torch.Tensor,
                       group_size: int) -> dict[str, torch.Tensor]:
    out_f, in_f = q.shape
    n_groups = s.shape[1]
    group = in_f if group_size == -1 else group_size
    if group not in (32, 64, 128, 256):  # what the aten kernel accepts (it fails at run time otherwise)
        raise ValueError(f"aten_int4 needs a group size of 32, 64, 128 or 256 (got {group}); use 'cpu_fused' or 'dequant'")
    if out_f % 16:  # the aten packing fails otherwise ("expect N to be dividable by 16")
        raise ValueError(f"aten_int4 needs out_features divisible by 16 (got {out_f}); use 'cpu_fused' or 'dequant'")
    prepared: dict[str, torch.Tensor] = {}
    q, perm = _contiguous_groups(q, g_idx, n_groups, group, "aten_int4")
    if perm is not None:
        prepared["perm"] = perm
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    offset = (8.0 - z.float()) * s  # (q - z) s = (q - 8) s + (8 - z) s
    sz = torch.stack([s.T, offset.T], dim=-1).to(torch.bfloat16).contiguous()  # [G, out, 2]
    prepared.update(packed=packed, scales_and_zeros=sz)
    return prepared
