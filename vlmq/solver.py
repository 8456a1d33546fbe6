"""One layer-wise solver for RTN, GPTQ, GPTAQ and importance-weighted (VLMQ) quantization.

The methods differ only in their inputs, not in code:

=========  =============================================================================
RTN        no error compensation (:func:`vlmq.quant.rtn`)
GPTQ       H = X̂ᵀX̂ / N, target W                      (symmetric calibration)
GPTAQ      H = X̂ᵀX̂ / N, D = (X − X̂)ᵀX̂ / N           (asymmetric calibration, paper Eq. 7-8)
VLMQ       the same with every token row scaled by g: H̃ = X̂ᵀG²X̂ / N, D̃ = (X − X̂)ᵀG²X̂ / N
           (X̃ = X G, r̃ = r G, paper Eq. 15-19); g ≡ 1 is bit-for-bit plain GPTQ/GPTAQ.
=========  =============================================================================

Objective and derivation (docs/solver.md has the long form). With ``r = W X − W X̂`` the residual
of earlier layers' quantization, the (weighted, damped) asymmetric objective is

    f(Ŵ) = ||(Ŵ X̂ − W X) G||² + λ ||Ŵ − W||²,     λ = damp · mean(diag H)

whose normal equations give the unconstrained optimum W* = W + W D H_λ⁻¹ (H_λ = H + λI), and
f(Ŵ) = tr((Ŵ − W*) H_λ (Ŵ − W*)ᵀ) + const. So the asymmetric problem is exactly the symmetric
GPTQ problem with target W* instead of W: one column loop (optimal-brain-surgeon updates with the
upper Cholesky factor U of H_λ⁻¹, lazy block updates) serves all methods; GPTQ is D = 0 (W* = W).

GPTAQ has two residual updates (``gptaq_update``; docs/solver.md, "The two GPTAQ updates"):

* ``"reference"`` (default, ``gptaq_alpha = 0.25``): the GPTAQ authors' code, which the VLMQ paper
  builds on. The loop starts from W; after column i is rounded, every later column j also gets
  ``w_i · P[i, j]`` with ``P = α · triu(D Uᵀ, 1) U`` (strictly upper triangular). α = 0 is GPTQ.
* ``"exact"``: the loop on the target ``W* = W + α · W D H_λ⁻¹``; with α = 1 each column is
  rounded at its conditional optimum given the columns already fixed (the greedy step of the
  GPTAQ paper's closed form, Eq. 8), the update this solver used before.

VLM-PTQ (docs/vlm_ptq.md) adds two options to the same loop: ``target`` ("corrected", the default
and what the loop always did: each column is rounded at its current value, residual share included,
which for the exact update with α = 1 is its conditional optimum; "uncorrected": rounded without
the residual's share S, carried along, the ablation) and a per-group clipping search weighted by a
channel importance (``clip_ratios``, ``channel_importance``; :func:`vlmq.vlm_ptq.search_group_params`).

act_order permutes columns by descending diag(H) (stable sort) and forms groups over consecutive
columns of that order (dynamic groups, ``static_groups`` off), recording ``g_idx``. The blocked
loop keeps every group inside one lazy-update block, so group parameters are always computed from
fully updated weights and the blocked solve equals the unblocked column-by-column algorithm.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from vlmq.hessian import HessianAccumulator, HessianStats
from vlmq.quant import (
    affine_params,
    check_bits,
    check_group_size,
    dequantize,
    group_index,
    n_groups,
    rtn,
)
from vlmq.vlm_ptq import TARGETS, check_ratios, search_group_params

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq", "gptaq")
GPTAQ_UPDATES = ("reference", "exact")
MAX_DAMP_TRIES = 6  # damp, 10·damp, …, 10^5·damp


@dataclass
class QuantResult:
    """Output of the solver for one weight [out, in].

    ``int_weight`` [out, in] int32 in [0, 2^bits − 1] (uint8 in the layer loop's records, which
    also drop ``dequant`` once it is the layer's weight: :func:`vlmq.quantize.quantize_layer`); ``scales`` [out, n_groups] (float32, or
    float64 for a float64 solve); ``zeros`` [out, n_groups] int32; ``g_idx`` [in] int32 group of
    each input column; ``dequant`` [out, in] = scales[:, g_idx] * (int_weight − zeros[:, g_idx]).
    ``perm`` is the act_order column order (None without act_order); ``damp_used`` the relative
    damping that gave a positive-definite Hessian (None for RTN).
    """

    dequant: torch.Tensor | None
    int_weight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    method: str
    perm: torch.Tensor | None = None
    damp_used: float | None = None
    clip_ratio: torch.Tensor | None = None  # [out, n_groups] chosen clipping ratio (clip search only)


def _check_options(bits, group_size, method, damp, block_size):
    check_bits(bits)
    check_group_size(group_size)
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {', '.join(METHODS)}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp <= 0:
        raise ValueError(f"damp={damp!r} must be a positive finite number")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive integer")


def _check_gptaq(alpha, update):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"gptaq_alpha={alpha!r} must be a finite number >= 0")
    if update not in GPTAQ_UPDATES:
        raise ValueError(f"gptaq_update={update!r} must be one of {', '.join(GPTAQ_UPDATES)}")


def _check_weight(weight, name):
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"{name}: weight must be a non-empty 2-D tensor [out, in], got shape {list(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"{name}: weight must be floating point, got {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name}: weight contains NaN/Inf values")


def lower_triangular_inverse(L: torch.Tensor, leaf: int = 512) -> torch.Tensor:
    """Inverse of a lower-triangular matrix (a new tensor; :func:`invert_lower_` works in place)."""
    return invert_lower_(L.clone(), leaf)


def invert_lower_(L: torch.Tensor, leaf: int = 512, tri_leaf: int = 1024) -> torch.Tensor:
    """L ← L⁻¹ in place for a lower-triangular L, by 2×2 block recursion so that almost all the
    work is GEMM: inv([[A, 0], [C, D]]) = [[A⁻¹, 0], [−D⁻¹ C A⁻¹, D⁻¹]]. Above ``tri_leaf`` the
    two products skip the triangular factors' zero halves (:func:`mm_triangular`). Extra memory:
    about a quarter of L."""
    n = L.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        L.copy_(torch.linalg.solve_triangular(L, eye, upper=False))
        return L
    h = n // 2
    invert_lower_(L[:h, :h], leaf, tri_leaf)
    invert_lower_(L[h:, h:], leaf, tri_leaf)
    C = L[h:, :h]
    if h <= tri_leaf:
        T = (L[h:, h:] @ C).neg_()
        C.copy_(T @ L[:h, :h])
    else:
        T = mm_triangular(C.mT, L[h:, h:].mT, upper=True, leaf=tri_leaf).mT.neg_()  # −D⁻¹ C
        C.copy_(mm_triangular(T, L[:h, :h], upper=False, leaf=tri_leaf))  # (−D⁻¹ C) A⁻¹
    return L


def mm_triangular(X: torch.Tensor, T: torch.Tensor, upper: bool, leaf: int = 1024) -> torch.Tensor:
    """``X @ T`` for a triangular ``T`` (upper or lower) without multiplying its zero half: 2×2
    block recursion down to ``leaf`` columns, half the work of the full product. Up to ``leaf``
    it is the plain product (so small solves are computed exactly as the full GEMM)."""
    m = T.shape[0]
    if m <= leaf:
        return X @ T
    h = m // 2
    out = torch.empty(X.shape[0], m, dtype=torch.promote_types(X.dtype, T.dtype), device=X.device)
    if upper:  # T = [[A, B], [0, D]]: X T = [X₁A, X₁B + X₂D]
        out[:, :h] = mm_triangular(X[:, :h], T[:h, :h], True, leaf)
        out[:, h:] = mm_triangular(X[:, h:], T[h:, h:], True, leaf)
        out[:, h:].addmm_(X[:, :h], T[:h, h:])
    else:  # T = [[A, 0], [C, D]]: X T = [X₁A + X₂C, X₂D]
        out[:, :h] = mm_triangular(X[:, :h], T[:h, :h], False, leaf)
        out[:, :h].addmm_(X[:, h:], T[h:, :h])
        out[:, h:] = mm_triangular(X[:, h:], T[h:, h:], False, leaf)
    return out


def _reverse_(t: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """``t.flip(0, 1)`` in place for a dense matrix, row- or column-major (its flat buffer
    reversed), a chunk at a time, so no second [n, n] matrix is allocated."""
    flat = t.mT.view(-1) if t.mT.is_contiguous() else t.view(-1)
    m = flat.numel()
    for a in range(0, m // 2, chunk):
        b = min(a + chunk, m // 2)
        front = flat[a:b].clone()
        flat[a:b] = flat[m - b:m - a].flip(0)
        flat[m - b:m - a] = front.flip(0)
    return t


def _gather(M: torch.Tensor, order: torch.Tensor, dtype: torch.dtype, rows: int = 1024,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """``M[order][:, order]`` cast to ``dtype`` (into ``out`` if given), built a block of rows at a
    time: one new matrix and never a second full-size temporary."""
    n = order.shape[0]
    if out is None:
        out = torch.empty(n, n, dtype=dtype, device=M.device)
    for r0 in range(0, n, rows):
        out[r0:r0 + rows] = M.index_select(0, order[r0:r0 + rows]).index_select(1, order)
    return out


def _upper_cholesky_of_inverse(H: torch.Tensor, order: torch.Tensor, dead: torch.Tensor, damp: float, name: str):
    """Return (U, relative damping used), U the upper Cholesky factor of H_λ⁻¹ for the Hessian
    ``H[order][:, order]`` with the ``dead`` columns (in that order) given a unit diagonal.

    With J the reversal permutation and J H_λ J = L Lᵀ, H_λ⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J) and
    J L⁻¹ J is upper triangular with a positive diagonal: U = J L⁻¹ J. One Cholesky and one
    triangular inverse instead of GPTQ's Cholesky, inverse and second Cholesky. The permuted,
    reversed and damped copy is the only [n, n] matrix made here: the Cholesky factor, its inverse
    and the reversal are computed in it in place (``H`` is not modified).

    A Hessian that is not positive definite after damping is retried in float64, then with
    damping multiplied by 10 (logged), up to MAX_DAMP_TRIES times; never NaN weights."""
    rev, dead_rev = order.flip(0), dead.flip(0)
    diag = torch.diagonal(H)[order]
    diag[dead] = 1.0
    # mean of diag(H_order) summed as over the strided diagonal view of an [n, n] matrix (torch
    # sums strided and contiguous vectors in different orders): λ, and so every result, stays
    # bit-identical to the solver that permuted the whole matrix first
    strided = torch.empty(2 * diag.shape[0], dtype=diag.dtype, device=diag.device)[::2]
    mean_diag = strided.copy_(diag).mean()
    rel = damp
    for attempt in range(MAX_DAMP_TRIES):
        for dtype in dict.fromkeys((H.dtype, torch.float64)):
            # J H_order J in column-major layout (LAPACK's): factored, inverted and reversed in place
            Hd = _gather(H, rev, dtype, out=torch.empty(H.shape, dtype=dtype, device=H.device).mT)
            Hd.diagonal()[dead_rev] = 1.0
            Hd.diagonal().add_(rel * mean_diag.to(dtype))
            _, info = torch.linalg.cholesky_ex(Hd, out=(Hd, torch.empty((), dtype=torch.int32, device=H.device)))
            Hd.tril_()  # the factor only (its strict upper part must be zero for the inverse)
            if info.item() == 0:
                U = _reverse_(invert_lower_(Hd))  # column-major, as the factor was
                if all(torch.isfinite(U[r:r + 1024]).all() for r in range(0, U.shape[0], 1024)):
                    if attempt:
                        log.warning("%s: Hessian not positive definite at damp=%g; solved with damp=%g", name, damp, rel)
                    return U.to(H.dtype), rel
            del Hd
        rel *= 10.0
    raise FloatingPointError(
        f"{name}: Hessian is not positive definite even with damp={rel / 10:g} (inputs degenerate?)")


def _residual_propagator(D: torch.Tensor, U: torch.Tensor, alpha: float, rows: int = 1024) -> torch.Tensor:
    """GPTAQ reference code's P = α · triu(D Uᵀ, 1) · U ([in, in], strictly upper triangular).

    In the reference update, once column i is rounded every later column j also gets
    ``w_i · P[i, j]`` (w_i its value when it was rounded) on top of GPTQ's error step.

    Above ``2 · rows`` columns P is computed in ``D``'s storage (overwritten), a block of rows at a
    time, using that U is upper triangular: rows r ≥ r0 of P need only ``D[r, r0:]`` and
    ``U[r0:, r0:]``, and the products skip U's zero half (:func:`mm_triangular`): a sixth of the
    full products' work (at 7B's down_proj the two full 18944³ GEMMs were most of a layer's
    fixed solve time)."""
    n = D.shape[0]
    if n <= 2 * rows:
        T = (D @ U.T).triu_(1).mul_(alpha)
        return T @ U
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        Ub = U[r0:, r0:]
        T = mm_triangular(D[r0:r1, r0:], Ub.T, upper=False).triu_(1).mul_(alpha)
        D[r0:r1, r0:] = mm_triangular(T, Ub, upper=True)
        D[r0:r1, :r0] = 0.0
    return D


def _check_vlm_ptq(target, channel_importance, clip_ratios, method, in_f, name):
    if target not in TARGETS:
        raise ValueError(f"{name}: target={target!r} must be one of {', '.join(TARGETS)}")
    if clip_ratios is not None:
        if method == "rtn":
            raise ValueError(f"{name}: clip_ratios needs method 'gptq' or 'gptaq' (got method='rtn')")
        try:
            check_ratios(clip_ratios)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    if channel_importance is not None:
        if clip_ratios is None:
            raise ValueError(f"{name}: channel_importance is only used with clip_ratios (the clipping search)")
        if not isinstance(channel_importance, torch.Tensor) or channel_importance.shape != (in_f,):
            shape = list(channel_importance.shape) if isinstance(channel_importance, torch.Tensor) \
                else type(channel_importance).__name__
            raise ValueError(f"{name}: channel_importance must have shape [{in_f}] (one per input channel), got {shape}")
        if not torch.isfinite(channel_importance).all() or (channel_importance < 0).any():
            raise ValueError(f"{name}: channel_importance must be finite and >= 0")


def solve(weight: torch.Tensor, stats: HessianStats | None, *, bits: int = 4, group_size: int = 128,
          sym: bool = False, act_order: bool = True, damp: float = 0.01, method: str = "gptq",
          block_size: int = 128, name: str = "weight", target: str = "corrected",
          channel_importance: torch.Tensor | None = None, clip_ratios=None,
          gptaq_alpha: float = 0.25, gptaq_update: str = "reference") -> QuantResult:
    """Quantize ``weight`` [out, in] given accumulated statistics (see module docstring).

    ``method="gptaq"`` uses ``stats.D`` (the residual cross term); ``"gptq"`` ignores it;
    ``"rtn"`` ignores ``stats`` entirely. The solve runs in float32 (float64 when ``weight`` is
    float64, which is how the tests compare it with the float64 oracle).

    GPTAQ's residual update (``method="gptaq"`` only): ``gptaq_update="reference"`` (default) is
    the GPTAQ reference code's, the residual pushed onto later columns through
    ``P = α · triu(D Uᵀ, 1) U``; ``"exact"`` runs the loop on ``W* = W + α · W D H_λ⁻¹`` (α = 1:
    the derived greedy update). ``gptaq_alpha`` = α ≥ 0 (default 0.25, the reference code's);
    α = 0 is bit-for-bit GPTQ with either update.

    VLM-PTQ options (docs/vlm_ptq.md): ``target="corrected"`` (default) rounds every column at its
    current value, residual share included (with ``"exact"``, α = 1: its conditional optimum);
    ``"uncorrected"`` at the same value less the residual's share (identical for GPTQ, where there
    is none), with the error still compensated for the asymmetric objective; with either update
    that rounds GPTQ's values (docs/solver.md). ``clip_ratios`` (ratios in (0, 1]): each
    group's parameters come from the ratio with the least ``channel_importance``-weighted error
    (None = uniform importance) instead of the plain min/max range.
    """
    _check_options(bits, group_size, method, damp, block_size)
    _check_gptaq(gptaq_alpha, gptaq_update)
    _check_weight(weight, name)
    _check_vlm_ptq(target, channel_importance, clip_ratios, method, weight.shape[1], name)
    if method == "rtn":
        q, s, z, g_idx = rtn(weight, bits, group_size, sym)
        return QuantResult(dequant=dequantize(q, s, z, g_idx), int_weight=q, scales=s, zeros=z,
                           g_idx=g_idx, bits=bits, group_size=group_size, sym=sym, method=method)
    if stats is None:
        raise ValueError(f"{name}: method={method!r} needs Hessian statistics (stats is None)")
    out_f, in_f = weight.shape
    if stats.H is None:
        raise RuntimeError(f"{name}: these statistics were already handed to a solve")
    if stats.H.shape != (in_f, in_f):
        raise ValueError(f"{name}: Hessian is {list(stats.H.shape)} but weight has in_features={in_f}")
    if method == "gptaq" and stats.D is None:
        raise ValueError(f"{name}: method='gptaq' needs fp_inputs (statistics have no residual term D)")

    cdtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    dev = weight.device
    W = weight.detach().to(cdtype).clone()
    # [in, in] matrices are GBs at 7B/32B shapes: the statistics are read, never modified, and
    # dropped as soon as their permuted copies exist (freed then if ``stats.consumable``)
    H, D_stats = stats.release()
    H = H.to(device=dev, dtype=cdtype)
    if not (method == "gptaq" and gptaq_alpha != 0):
        D_stats = None
    diag = torch.diagonal(H).clone()
    dead = diag == 0
    diag[dead] = 1.0

    perm = torch.argsort(diag, descending=True, stable=True) if act_order else None
    order = perm if perm is not None else torch.arange(in_f, device=dev)
    if perm is not None:
        W = W[:, perm]
        dead = dead[perm]
    U, damp_used = _upper_cholesky_of_inverse(H, order, dead, damp, name)
    del H

    # Column-major work layout: row j of Wt is input column j (contiguous for the column loop).
    Wt = W.T.contiguous()
    del W
    St = None  # the residual's share of each column's current value, carried along ("uncorrected")
    P = None  # the reference update's residual propagator
    if D_stats is not None:
        D = _gather(D_stats.to(device=dev), order, cdtype)  # a copy of our own
        del D_stats
        if gptaq_update == "exact":
            if gptaq_alpha != 1:
                D = D * gptaq_alpha
            # W* = W + W D H_λ⁻¹  →  W*ᵀ = Wᵀ + H_λ⁻¹ Dᵀ Wᵀ, with H_λ⁻¹ = Uᵀ U
            shift = U.T @ (U @ (D.T @ Wt))
            Wt += shift
            if target == "uncorrected":
                St = shift
                St[dead] = 0.0
            del shift
        else:
            P = _residual_propagator(D, U, gptaq_alpha)
            if target == "uncorrected":
                St = torch.zeros_like(Wt)
        del D
    Wt[dead] = 0.0
    imp = None
    if clip_ratios is not None:
        ratios = check_ratios(clip_ratios)
        if channel_importance is not None:
            imp = channel_importance.detach().to(device=dev, dtype=cdtype)
            if perm is not None:
                imp = imp[perm]

    gs = in_f if group_size == -1 else group_size
    bs = gs * max(1, block_size // gs) if gs <= block_size else gs
    maxq = 2**bits - 1
    ng = n_groups(in_f, group_size)
    Qt = torch.empty_like(Wt)
    DQt = torch.empty_like(Wt)
    scales = torch.empty(ng, out_f, dtype=cdtype, device=dev)
    zeros = torch.empty(ng, out_f, dtype=cdtype, device=dev)
    chosen = torch.empty(ng, out_f, dtype=cdtype, device=dev) if clip_ratios is not None else None
    s = z = None
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        W1 = Wt[i1:i2]  # view: updated in place; row i is final once column i1 + i is rounded
        U1 = U[i1:i2, i1:i2]
        P1 = None if P is None else P[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        S1 = SErr1 = None
        if St is not None:
            S1 = St[i1:i2]
            SErr1 = torch.empty_like(S1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:
                # the values this group is rounded from: the conditional optimum (corrected target),
                # or the same without its residual shift (uncorrected)
                grp = (W1[i:i + gs] if S1 is None else W1[i:i + gs] - S1[i:i + gs]).T
                if clip_ratios is None:
                    s, z = affine_params(grp, bits, sym)
                else:
                    s, z, r = search_group_params(grp, None if imp is None else imp[col:col + gs], bits, sym, ratios)
                    chosen[col // gs] = r
                scales[col // gs], zeros[col // gs] = s, z
            w, q, dq, err = W1[i], Qt[col], DQt[col], Err1[i]
            # q = clamp(round(w / s) + z, 0, maxq); dq = s (q − z); err = (w − dq) / U_ii — in place
            torch.div(w if S1 is None else w - S1[i], s, out=q).round_().add_(z).clamp_(0, maxq)
            torch.sub(q, z, out=dq).mul_(s)
            torch.sub(w, dq, out=err).div_(U1[i, i])
            if S1 is not None:
                # the shift's conditional value given the fixed columns: the same OBS step with q = 0
                torch.div(S1[i], U1[i, i], out=SErr1[i])
            if i + 1 < i2 - i1:
                W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1.0)
                if S1 is not None:
                    S1[i + 1:].addr_(U1[i, i + 1:], SErr1[i], alpha=-1.0)
            if P is not None:
                # reference update: the later columns of the same block of `block_size` columns get
                # the residual term of this column's value before rounding ...
                hi = min((col // block_size + 1) * block_size, i2) - i1
                if i + 1 < hi:
                    W1[i + 1:hi].addr_(P1[i, i + 1:hi], w)
                    if S1 is not None:
                        S1[i + 1:hi].addr_(P1[i, i + 1:hi], w)
                # ... and at the end of that block every column after it gets the block's term of the
                # rounded values (the reference code's lazy update reads the block after rounding)
                if (col + 1) % block_size == 0 and col + 1 < in_f:
                    rs = col + 1 - block_size
                    Wt[col + 1:].addmm_(P[rs:col + 1, col + 1:].T, DQt[rs:col + 1])
                    if St is not None:
                        St[col + 1:].addmm_(P[rs:col + 1, col + 1:].T, DQt[rs:col + 1])
        if i2 < in_f:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1.0)
            if St is not None:
                St[i2:].addmm_(U[i1:i2, i2:].T, SErr1, alpha=-1.0)
            re = min(((i2 - 1) // block_size + 1) * block_size, in_f)
            if P is not None and re > i2:
                # a block of `block_size` columns that runs past this lazy block: its later columns
                # get the residual term of this lazy block's values before rounding
                rs = max(i1, re - block_size)
                Wt[i2:re].addmm_(P[rs:i2, i2:re].T, W1[rs - i1:])
                if St is not None:
                    St[i2:re].addmm_(P[rs:i2, i2:re].T, W1[rs - i1:])

    U = U1 = P = P1 = St = S1 = Wt = W1 = None  # free the [in, in] matrices (and views) before the outputs
    int_weight = Qt.T
    dequant = DQt.T
    if perm is not None:
        inv = torch.argsort(perm)
        int_weight = int_weight[:, inv]
        dequant = dequant[:, inv]
    return QuantResult(
        dequant=dequant.contiguous(),
        int_weight=int_weight.to(torch.int32).contiguous(),
        scales=scales.T.contiguous(),
        zeros=zeros.T.to(torch.int32).contiguous(),
        g_idx=group_index(in_f, group_size, perm.cpu() if perm is not None else None).to(dev),
        bits=bits, group_size=group_size, sym=sym, method=method,
        perm=perm, damp_used=damp_used,
        clip_ratio=None if chosen is None else chosen.T.contiguous(),
    )


def quantize_weight(weight: torch.Tensor, inputs: torch.Tensor | None, *, fp_inputs: torch.Tensor | None = None,
                    token_weights: torch.Tensor | None = None, bits: int = 4, group_size: int = 128,
                    sym: bool = False, act_order: bool = True, damp: float = 0.01, method: str = "gptq",
                    block_size: int = 128, chunk_tokens: int = 8192, name: str = "weight",
                    target: str = "corrected", channel_importance: torch.Tensor | None = None,
                    clip_ratios=None, gptaq_alpha: float = 0.25, gptaq_update: str = "reference") -> QuantResult:
    """Quantize ``weight`` [out, in] from calibration inputs.

    ``inputs`` [tokens, in]: inputs of the layer on the quantized path (X̂); ``fp_inputs``
    [tokens, in]: full-precision inputs X (required for ``method="gptaq"``); ``token_weights``
    [tokens]: importance g per token (VLMQ; None = uniform). Statistics are accumulated in chunks
    of ``chunk_tokens`` tokens (:class:`vlmq.hessian.HessianAccumulator`), then :func:`solve`
    (``target``, ``channel_importance``, ``clip_ratios``: the VLM-PTQ options of :func:`solve`;
    ``gptaq_alpha``, ``gptaq_update``: GPTAQ's residual update, see :func:`solve`).
    """
    _check_options(bits, group_size, method, damp, block_size)
    _check_gptaq(gptaq_alpha, gptaq_update)
    _check_weight(weight, name)
    _check_vlm_ptq(target, channel_importance, clip_ratios, method, weight.shape[1], name)
    if method == "rtn":
        return solve(weight, None, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                     damp=damp, method=method, block_size=block_size, name=name, target=target)
    if inputs is None:
        raise ValueError(f"{name}: inputs are required for method={method!r}")
    if method == "gptaq" and fp_inputs is None:
        raise ValueError(f"{name}: method='gptaq' needs fp_inputs (the full-precision inputs X)")
    in_f = weight.shape[1]
    acc = HessianAccumulator(in_f, residual=(method == "gptaq"), name=name, device=weight.device)
    x_hat = acc._as_tokens(inputs, "inputs")
    x = acc._as_tokens(fp_inputs, "fp_inputs") if fp_inputs is not None else None
    if x is not None and x.shape[0] != x_hat.shape[0]:
        raise ValueError(f"{name}: fp_inputs has {x.shape[0]} tokens but inputs has {x_hat.shape[0]}")
    g = None
    if token_weights is not None:
        if not isinstance(token_weights, torch.Tensor) or token_weights.dim() != 1 or token_weights.shape[0] != x_hat.shape[0]:
            shape = list(token_weights.shape) if isinstance(token_weights, torch.Tensor) else type(token_weights).__name__
            raise ValueError(f"{name}: token_weights must have shape [{x_hat.shape[0]}] (one per token), got {shape}")
        g = token_weights
    if x_hat.shape[0] == 0:
        raise ValueError(f"{name}: inputs has no tokens")
    for a in range(0, x_hat.shape[0], chunk_tokens):
        b = a + chunk_tokens
        acc.add(x_hat[a:b], None if x is None or method != "gptaq" else x[a:b], None if g is None else g[a:b])
    stats = acc.finalize(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    stats.consumable = True  # ours: the solve may free it as it goes
    return solve(weight, stats, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                 damp=damp, method=method, block_size=block_size, name=name, target=target,
                 channel_importance=channel_importance, clip_ratios=clip_ratios,
                 gptaq_alpha=gptaq_alpha, gptaq_update=gptaq_update)
