"""Time our GPTQ solve (``vlmq.solver.solve``) against a reference GPTQ from a maintained library.

Both solvers get the same weight W [out, in] and the same Hessian H = XᵀX / N of the same random
correlated calibration activations X [N, in]; H is built once per shape, outside the timed region,
and only the solve given H is timed (median of ``--reps`` interleaved repetitions, one thread).

Reference, in order of preference:
  1. llm-compressor: ``llmcompressor.modifiers.gptq.gptq_quantize.quantize_weight``, called as
     ``GPTQModifier.compress_module_list`` calls it: stacked float32 weight [1, out, in], the
     float32 Hessian [1, in, in] in llm-compressor's own normalisation (2·XᵀX / N), scale and
     zero point from the ``memoryless_minmax`` weight observer (computed before the timed call,
     as llm-compressor does in ``on_sequential_epoch_end``), blocksize and percdamp as given.
  2. a plain unblocked column-by-column GPTQ written below (no lazy batch updates), used only when
     llm-compressor cannot be imported; the JSON says why.

Quality: rel_err = ||(W − Ŵ) X||_F / ||W X||_F, computed exactly through H:
||E X||_F² = N · tr(E H Eᵀ).

Run (from the repository root):
    .venv-bench/bin/python benchmarks/solver.py                       # full: 4096x4096, 3584x18944
    .venv-bench/bin/python benchmarks/solver.py --quick               # smoke test, small shapes
    .venv-bench/bin/python benchmarks/solver.py --shapes 4096x4096 --reps 5 --out /tmp/s.json
Shapes are OUTxIN.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata as md
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vlmq.hessian import HessianStats  # noqa: E402
from vlmq.quant import dequantize, rtn  # noqa: E402
from vlmq.solver import solve  # noqa: E402

FULL_SHAPES = [(4096, 4096), (3584, 18944)]
QUICK_SHAPES = [(256, 512), (512, 1024)]


# --------------------------------------------------------------------------------------------
# inputs


def make_weight(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * 0.02


def build_hessian(in_f: int, n_tokens: int, seed: int, chunk: int = 8192, block: int = 2048):
    """H = XᵀX / N of random correlated activations X = [Z F] @ [[diag(d)], [B]] with a few outlier
    channels, as :class:`vlmq.hessian.HessianStats`.

    Z [N, in] and F [N, r] are i.i.d. normal: d (log-normal per-channel scale) gives channels
    different magnitudes, the r shared latent factors mixed in by B [r, in] correlate all channels,
    and ``n_out`` channels are multiplied by 10-30. Tokens are generated in chunks (never the whole
    X in memory). Same numerics as HessianAccumulator (float32 products, float64 sums), but only
    the lower block triangle of each chunk's XᵀX is multiplied (≈ half the flops; this set-up is
    untimed but dominates the wall time of the large shape).
    """
    g = torch.Generator().manual_seed(seed)
    r = max(1, min(64, in_f // 4))
    d = torch.exp(0.5 * torch.randn(in_f, generator=g))
    B = torch.randn(r, in_f, generator=g) * (2.0 / math.sqrt(r))
    n_out = max(2, in_f // 1024)
    out_idx = torch.randperm(in_f, generator=g)[:n_out]
    out_mult = 10.0 + 20.0 * torch.rand(n_out, generator=g)
    H = torch.zeros(in_f, in_f, dtype=torch.float64)
    edges = list(range(0, in_f, block)) + [in_f]
    for a in range(0, n_tokens, chunk):
        n = min(chunk, n_tokens - a)
        X = torch.randn(n, in_f, generator=g) * d
        X.addmm_(torch.randn(n, r, generator=g), B)
        X[:, out_idx] *= out_mult
        for bi in range(len(edges) - 1):
            i0, i1 = edges[bi], edges[bi + 1]
            Xi_t = X[:, i0:i1].T
            for bj in range(bi + 1):
                j0, j1 = edges[bj], edges[bj + 1]
                H[i0:i1, j0:j1] += Xi_t @ X[:, j0:j1]
        del X
    for bi in range(len(edges) - 1):  # mirror the lower block triangle
        i0, i1 = edges[bi], edges[bi + 1]
        H[edges[0]:i0, i0:i1] = H[i0:i1, edges[0]:i0].T
    H /= n_tokens
    return HessianStats(H=H, D=None, n_tokens=n_tokens)


def rel_err(E: torch.Tensor, H32: torch.Tensor, den: float) -> float:
    """||E X||_F / ||W X||_F through H (den = tr(W H Wᵀ))."""
    num = float(((E @ H32) * E).sum(dtype=torch.float64))
    return math.sqrt(max(num, 0.0) / den)


# --------------------------------------------------------------------------------------------
# reference solvers


class LLMCompressorRef:
    def __init__(self, bits, group_size, sym, act_order, damp, block_size):
        from compressed_tensors.quantization import QuantizationArgs
        from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
        from llmcompressor.observers import Observer

        self._qw = quantize_weight
        self._Observer = Observer
        # GPTQModifier's default actorder resolves to "static" (= "weight"): the only act-order
        # flavour llm-compressor 0.14 supports ("group"/dynamic has been removed).
        self.args = QuantizationArgs(
            num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group_size,
            dynamic=False, actorder="static" if act_order else None, observer="memoryless_minmax")
        self.damp, self.block_size = damp, block_size
        self.name = f"llmcompressor {md.version('llmcompressor')} (compressed-tensors {md.version('compressed-tensors')})"
        self.act_order_desc = (
            "static (= 'weight', llm-compressor's GPTQModifier default): columns processed in "
            "descending diag(H) order, but groups stay over the ORIGINAL column order and their "
            "scale/zero come from a memoryless min-max observer on the unmodified weight, before "
            "the solve ('group'/dynamic act_order is removed in this version)"
            if act_order else "off")

    def qparams(self, W: torch.Tensor):
        obs = self._Observer.load_from_registry(
            "memoryless_minmax", base_name="weight", args=self.args.model_copy(deep=True))
        with torch.no_grad():
            p = obs(W).get_qparams()
        return p["scale"], p["zero_point"]

    def prepare(self, W: torch.Tensor, H64: torch.Tensor):
        """Untimed: disposable stacked inputs as llm-compressor's prepare_batch builds them."""
        scale, zp = self.qparams(W)
        return dict(weights=W.to(torch.float32).clone().unsqueeze(0),
                    hessians=(2.0 * H64).to(torch.float32).unsqueeze(0),  # 2·XᵀX/N, fp32
                    scale=scale.unsqueeze(0), zero_point=zp.unsqueeze(0))

    def run(self, inputs) -> torch.Tensor:
        with torch.no_grad():
            q, _losses, fallback = self._qw(
                weights=inputs["weights"], hessians=inputs["hessians"], scale=inputs["scale"],
                zero_point=inputs["zero_point"], global_scale=None, quant_args=self.args,
                blocksize=self.block_size, percdamp=self.damp)
        if bool(fallback.any()):
            raise RuntimeError("llm-compressor fell back to RTN (Hessian not positive definite)")
        return q[0]


class PlainGPTQRef:
    """Unblocked column-by-column GPTQ (no lazy batch updates): act_order with dynamic groups,
    group parameters from the updated weights at each group start, damp·mean(diag H)."""

    def __init__(self, bits, group_size, sym, act_order, damp, block_size, why):
        self.bits, self.gs, self.sym, self.act_order, self.damp = bits, group_size, sym, act_order, damp
        self.name = f"plain unblocked column-by-column GPTQ in benchmarks/solver.py ({why})"
        self.act_order_desc = "dynamic groups (as ours)" if act_order else "off"

    def prepare(self, W, H64):
        return dict(W=W.to(torch.float32).clone(), H=H64.to(torch.float32))

    def run(self, inputs):
        from vlmq.quant import affine_params
        W, H = inputs["W"], inputs["H"]
        in_f = W.shape[1]
        gs = in_f if self.gs == -1 else self.gs
        maxq = 2**self.bits - 1
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if self.act_order else torch.arange(in_f)
        W, H = W[:, perm], H[perm][:, perm]
        H = H + self.damp * torch.diagonal(H).mean() * torch.eye(in_f)
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        Q = torch.empty_like(W)
        for j in range(in_f):
            if j % gs == 0:
                s, z = affine_params(W[:, j:j + gs], self.bits, self.sym)
            w = W[:, j]
            dq = s * (torch.clamp(torch.round(w / s) + z, 0, maxq) - z)
            Q[:, j] = dq
            err = (w - dq) / U[j, j]
            W[:, j + 1:].addr_(err, U[j, j + 1:], alpha=-1.0)
        return Q[:, torch.argsort(perm)]


def make_reference(cfg):
    try:
        return LLMCompressorRef(**cfg), None
    except Exception as e:  # import or construction failure: fall back, and say why
        why = f"llm-compressor unavailable: {type(e).__name__}: {e}"
        return PlainGPTQRef(**cfg, why=why), why


# --------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> dict:
    return {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mkl": torch.backends.mkl.is_available(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }


def code_version() -> dict:
    """Which version of our solver was timed: git HEAD, whether vlmq/solver.py differs from it,
    and the file's sha256 (read-only git queries)."""
    import hashlib
    import subprocess
    info = {"solver_sha256": hashlib.sha256((ROOT / "vlmq" / "solver.py").read_bytes()).hexdigest()[:16]}
    try:
        git = ["git", "-C", str(ROOT)]
        info["git_head"] = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True,
                                          text=True, check=True).stdout.strip()
        info["solver_modified_since_head"] = bool(subprocess.run(
            git + ["status", "--porcelain", "--", "vlmq/solver.py", "vlmq/hessian.py", "vlmq/quant.py"],
            capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def parse_shapes(text: str):
    shapes = []
    for item in text.split(","):
        o, i = item.lower().split("x")
        shapes.append((int(o), int(i)))
    return shapes


def timed(fn, *a):
    """(result, wall seconds, CPU seconds of this process: user + system, all threads)."""
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t0, time.process_time() - c0


def bench_shape(out_f, in_f, args, ref, log):
    cfg = dict(bits=args.bits, group_size=args.group_size, sym=False, act_order=args.act_order,
               damp=args.damp, block_size=args.block_size)
    n_tok = int(round(args.tokens_per_in * in_f))
    t0 = time.perf_counter()
    torch.set_num_threads(args.setup_threads)
    W = make_weight(out_f, in_f, args.seed + out_f)
    stats = build_hessian(in_f, n_tok, args.seed + in_f)
    torch.set_num_threads(args.threads)
    log(f"[{out_f}x{in_f}] H from {n_tok} tokens built in {time.perf_counter() - t0:.1f}s")

    ours_t, ref_t, obs_t, ours_c, ref_c = [], [], [], [], []
    ours_dq = ref_dq = None
    for rep in range(args.reps):
        for who in (("ours", "ref") if rep % 2 == 0 else ("ref", "ours")):
            if who == "ours":
                res, dt, ct = timed(lambda: solve(W, stats, method="gptq", **cfg))
                ours_t.append(dt)
                ours_c.append(ct)
                ours_dq = res.dequant
                del res
            else:
                inputs = ref.prepare(W, stats.H)  # untimed: clones, fp32 cast, observer qparams
                if isinstance(ref, LLMCompressorRef):
                    obs_t.append(timed(ref.qparams, W)[1])
                ref_dq, dt, ct = timed(ref.run, inputs)
                ref_t.append(dt)
                ref_c.append(ct)
                del inputs
            log(f"[{out_f}x{in_f}] rep {rep} {who:4s} wall {dt:8.3f}s  cpu {ct:8.3f}s")

    torch.set_num_threads(args.setup_threads)
    H32 = stats.H.to(torch.float32)
    del stats  # only H32 is needed for the errors (keeps the peak memory down)
    gc.collect()
    den = float(((W @ H32) * W).sum(dtype=torch.float64))
    q, s, z, g = rtn(W, args.bits, args.group_size, False)
    errs = {k: rel_err(W - v, H32, den) for k, v in
            (("ours", ours_dq), ("ref", ref_dq), ("rtn", dequantize(q, s, z, g)))}
    torch.set_num_threads(args.threads)
    ours_s, ref_s = statistics.median(ours_t), statistics.median(ref_t)
    row = {
        "shape": [out_f, in_f],
        "ours_s": round(ours_s, 4),
        "reference": ref.name,
        "reference_s": round(ref_s, 4),
        "ratio": round(ours_s / ref_s, 4),
        "ours_rel_err": round(errs["ours"], 6),
        "reference_rel_err": round(errs["ref"], 6),
        # extra context (not part of the core schema)
        "rtn_rel_err": round(errs["rtn"], 6),
        "ours_times_s": [round(t, 4) for t in ours_t],
        "reference_times_s": [round(t, 4) for t in ref_t],
        # CPU time (user + sys) of the process during each solve: less sensitive to other
        # processes competing for the two cores than wall time
        "ours_cpu_s": round(statistics.median(ours_c), 4),
        "reference_cpu_s": round(statistics.median(ref_c), 4),
        "cpu_ratio": round(statistics.median(ours_c) / statistics.median(ref_c), 4),
        "reference_observer_s": round(statistics.median(obs_t), 4) if obs_t else None,
        "tokens": n_tok,
        "act_order": {"ours": "dynamic groups (groups over consecutive columns of the act order, "
                              "g_idx; scale/zero from the updated weights at each group start)"
                      if args.act_order else "off", "reference": ref.act_order_desc},
    }
    del H32, W
    gc.collect()
    return row


def warm_up(ref, cfg):
    """One untimed small solve of each, so that lazy imports and first-call allocations are not
    charged to the first timed repetition."""
    W = make_weight(64, 256, 1)
    stats = build_hessian(256, 512, 1)
    solve(W, stats, method="gptq", **cfg)
    ref.run(ref.prepare(W, stats.H))


def profile_solvers(out_f, in_f, args, ref):
    """cProfile one solve of ours and one of the reference (one thread): where the time goes."""
    import cProfile
    import pstats
    torch.set_num_threads(args.setup_threads)
    W = make_weight(out_f, in_f, args.seed + out_f)
    stats = build_hessian(in_f, int(round(args.tokens_per_in * in_f)), args.seed + in_f)
    torch.set_num_threads(args.threads)
    cfg = dict(bits=args.bits, group_size=args.group_size, sym=False, act_order=args.act_order,
               damp=args.damp, block_size=args.block_size)
    for who in ("ours", "reference"):
        inputs = ref.prepare(W, stats.H) if who == "reference" else None
        gc.collect()
        pr = cProfile.Profile()
        t0, c0 = time.perf_counter(), os.times()
        pr.enable()
        if who == "ours":
            solve(W, stats, method="gptq", **cfg)
        else:
            ref.run(inputs)
        pr.disable()
        c1 = os.times()
        print(f"== {who} ({ref.name if who == 'reference' else 'vlmq.solver.solve'}), {out_f}x{in_f}: "
              f"wall {time.perf_counter() - t0:.2f}s, user {c1.user - c0.user:.2f}s, sys {c1.system - c0.system:.2f}s")
        pstats.Stats(pr).sort_stats("tottime").print_stats(14)
        del inputs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", type=parse_shapes, default=None, help="OUTxIN[,OUTxIN...] (default: 4096x4096,3584x18944)")
    p.add_argument("--quick", action="store_true", help=f"smoke test on {QUICK_SHAPES}")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "solver.json")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the timed solves")
    p.add_argument("--setup-threads", type=int, default=1, help="torch threads for building H / errors (untimed)")
    p.add_argument("--tokens-per-in", type=float, default=2.0, help="calibration tokens = this × in_features")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--no-act-order", dest="act_order", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="cProfile one solve of ours and of the reference per shape instead of the benchmark")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be >= 1")
    shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    torch.set_num_threads(args.threads)

    cfg = dict(bits=args.bits, group_size=args.group_size, sym=False, act_order=args.act_order,
               damp=args.damp, block_size=args.block_size)
    ref, why = make_reference(cfg)
    if args.profile:
        warm_up(ref, cfg)
        for o, i in shapes:
            profile_solvers(o, i, args, ref)
        return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    log(f"reference: {ref.name}")
    machine = machine_info(args.threads)
    ours_code = code_version()
    t_all = time.perf_counter()
    warm_up(ref, cfg)
    results = [bench_shape(o, i, args, ref, log) for o, i in shapes]
    machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {
        "machine": machine,
        "results": results,
        "settings": {"ours": {"function": "vlmq.solver.solve", **ours_code},
                     "bits": args.bits, "group_size": args.group_size, "sym": False,
                     "act_order": args.act_order, "damp": args.damp, "block_size": args.block_size,
                     "reps": args.reps, "statistic": "median", "order": "interleaved, alternating who goes first",
                     "tokens_per_in": args.tokens_per_in, "seed": args.seed,
                     "timed": "solve given the Hessian only (H built once per shape, untimed); reference "
                              "inputs (fp32 clones, observer scale/zero) prepared untimed",
                     "rel_err": "||(W-What)X||_F/||WX||_F via H = X^T X/N",
                     "reference_fallback_reason": why,
                     "total_wall_s": round(time.perf_counter() - t_all, 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    hdr = (f"{'shape [out,in]':>16} {'ours_s':>9} {'ref_s':>9} {'ratio':>7} {'ours_cpu':>9} {'ref_cpu':>9} "
           f"{'cpu_rat':>7} {'ours_err':>9} {'ref_err':>9} {'rtn_err':>9}")
    print(f"reference: {ref.name}; threads={args.threads}; reps={args.reps} (median)")
    print(hdr)
    for r in results:
        print(f"{str(r['shape']):>16} {r['ours_s']:9.3f} {r['reference_s']:9.3f} {r['ratio']:7.3f} "
              f"{r['ours_cpu_s']:9.3f} {r['reference_cpu_s']:9.3f} {r['cpu_ratio']:7.3f} "
              f"{r['ours_rel_err']:9.5f} {r['reference_rel_err']:9.5f} {r['rtn_rel_err']:9.5f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
