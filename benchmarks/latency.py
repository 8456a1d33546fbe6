"""Latency of quantized linears and of the end-to-end model, FP vs W4/W3/W2, per backend, cold and warm.

    python -m benchmarks.latency            # knobs: params.yaml `latency:`; writes reports/latency.json
    python -m benchmarks.latency --sweep    # the long batch sweep (latency.sweep): report + plot

* Single linears at the paper's Table 11 shapes (``latency.shapes``, ``(in, out)``): dense FP
  (``F.linear`` in each of ``latency.dense_dtypes``) and GPTQ-packed W``bits`` g``group_size``
  through every backend of :mod:`vlmq.qlinear` that applies (``auto`` = what a loaded model runs:
  the fused kernel below ``prefill_from`` rows, the tiled prefill path from it on), at every row
  count of ``latency.batches`` (1 = decode, more = prefill). Median, p10, p90 of the timed calls.
* ``cache: cold``: every timed call reads a weight copy that is not in cache, as a model does
  that streams each layer's weights from DRAM: the call rotates over copies that together hold at
  least ``cold_llc_factor`` × the last-level cache (capped at ``cold_ram_fraction`` of the available
  RAM; the row records how many copies and bytes it rotated). ``cache: warm``: one copy, timed
  again and again (what a weight that fits in cache gets). Dense and quantized alike.
* Beside each, the memory-traffic floor: bytes the call must read (weights + scales/zeros) / this
  machine's measured memory bandwidth (a ``sum`` over a buffer far larger than the cache).
* End to end (``end_to_end``): the model at ``model.path`` answers a rendered image question at
  batch 1: time to first token (the prefill) and decode tokens/s (the next ``decode_tokens``
  tokens), both stamped within one ``generate`` by a streamer, FP (each dense dtype) and RTN-packed
  at each bit width through ``auto``, cold (caches evicted before every run), the variants in turns.
  Size on disk and resident tensor bytes.

All variants of one (shape, rows, cache) cell are timed in rounds, one call of each per round, so a
drift of the machine moves them alike and their ratios compare like with like; the machine block
records the CPU, its last-level cache and instruction-set flags.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_COPIES = 2048
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


def _stats(ts: list[float]) -> dict:
    ts = sorted(ts)
    q = lambda p: ts[min(len(ts) - 1, int(round(p * (len(ts) - 1))))]  # noqa: E731
    return {"median_ms": statistics.median(ts), "p10_ms": q(0.10), "p90_ms": q(0.90), "runs": len(ts)}


def paired_ratio(base: list[float], other: list[float]) -> dict:
    """``base`` / ``other`` round by round, for two variants timed in the same interleaved rounds:
    the median and p10/p90 of the per-round ratios (> 1 = ``other`` is faster). Pairing each call
    with its round's call of ``base`` cancels a drift of the machine that a ratio of two medians
    keeps. A variant timed once (slower than ``slow_factor``, or unequal rounds) pairs its median
    with ``base``'s."""
    if len(base) != len(other) or len(base) < 2:
        r = statistics.median(base) / max(statistics.median(other), 1e-12)
        return {"median": r, "p10": r, "p90": r}
    s = _stats([b / max(o, 1e-12) for b, o in zip(base, other)])
    return {"median": s["median_ms"], "p10": s["p10_ms"], "p90": s["p90_ms"]}


def _paired_fields(key: str, base: list[float], other: list[float]) -> dict:
    """:func:`paired_ratio` as report fields: ``key`` (the median), ``key_p10``, ``key_p90``."""
    pr = paired_ratio(base, other)
    return {key: pr["median"], f"{key}_p10": pr["p10"], f"{key}_p90": pr["p90"]}


def _time(fn, runs: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return _stats(ts)


def memory_bandwidth_gbs(n_bytes: int = 1 << 30, runs: int = 5) -> float:
    """Read bandwidth: float32 ``sum`` over an ``n_bytes`` buffer (far larger than any cache)."""
    x = torch.ones(n_bytes // 4)
    r = _time(lambda: x.sum(), runs, 1)
    return n_bytes / (r["median_ms"] * 1e-3) / 1e9


def _size(text: str) -> int:
    m = re.match(r"\s*([\d.]+)\s*([KMG]?)(i?B)?", text)
    if not m:
        raise ValueError(text)
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])


def llc_bytes() -> int:
    """The last-level cache, all instances together (``lscpu``; else sysfs, one instance; else 64 MiB)."""
    try:
        out = subprocess.run(["lscpu", "-B", "-C=NAME,ALL-SIZE"], capture_output=True, text=True, timeout=10).stdout
        sizes = {ln.split()[0]: int(ln.split()[1]) for ln in out.splitlines()[1:] if len(ln.split()) == 2}
        for name in ("L4", "L3", "L2"):
            if name in sizes:
                return sizes[name]
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    best = (0, 0)
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            best = max(best, (int((d / "level").read_text()), _size((d / "size").read_text())))
        except (OSError, ValueError):
            continue
    return best[1] or 64 << 20


def available_ram_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def machine_info() -> dict:
    cpu, flags = platform.processor() or "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    from vlmq.kernels import kernel_isa
    from vlmq.qlinear import bf16_gemm_fast

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "kernel_isa": kernel_isa(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": [f for f in FLAGS if f in flags], "llc_bytes": llc_bytes(), "bf16_gemm_fast": bf16_gemm_fast(),
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def random_quant_linear(in_f: int, out_f: int, bits: int, group_size: int, gen: torch.Generator):
    from vlmq.pack import pack_linear
    from vlmq.qlinear import QuantLinear

    n_groups = 1 if group_size == -1 else -(-in_f // group_size)
    q = torch.randint(0, 2**bits, (out_f, in_f), generator=gen, dtype=torch.int32)
    scales = torch.rand(out_f, n_groups, generator=gen) * 0.01 + 1e-3
    zeros = torch.randint(1, 2**bits, (out_f, n_groups), generator=gen, dtype=torch.int32)
    g_idx = torch.arange(in_f, dtype=torch.int32) // (in_f if group_size == -1 else group_size)
    ql = QuantLinear(in_f, out_f, bits, group_size, bias=False)
    ql.load_state_dict(pack_linear(q, scales, zeros, g_idx, bits), strict=False)
    return ql


def quant_bytes(in_f: int, out_f: int, bits: int, group_size: int) -> int:
    n_groups = 1 if group_size == -1 else -(-in_f // group_size)
    return int(in_f * out_f * bits // 8 + n_groups * out_f * (2 + bits / 8))


class Rotation:
    """Copies of one variant's weights, enough to be cold: ``n`` copies of ``nbytes`` each, such that
    between two uses of a copy the others stream ``(n - 1) * nbytes`` ≥ ``factor`` × LLC through the
    cache (capped by ``ram_cap`` bytes in all; ``cold`` says whether the cap left enough)."""

    def __init__(self, make_copy, nbytes: int, llc: int, factor: float, ram_cap: int, cold: bool):
        need = 1 + math.ceil(factor * llc / max(nbytes, 1)) if cold else 1
        # capped by RAM, and at MAX_COPIES (toy shapes: thousands of tiny copies only cost set-up time)
        n = max(1, min(need, ram_cap // max(nbytes, 1), MAX_COPIES)) if cold else 1
        self.copies = [make_copy(i) for i in range(n)]
        self.nbytes, self.cold = nbytes, cold and n >= need
        self.i = 0

    def next(self):
        c = self.copies[self.i % len(self.copies)]
        self.i += 1
        return c

    def info(self) -> dict:
        return {"copies": len(self.copies), "rotation_bytes": len(self.copies) * self.nbytes}


class _Variant:
    """One timed thing of a (shape, rows, cache) cell: ``setup()`` (untimed: e.g. switch the backend),
    then ``call(copy)`` on the next copy of its rotation; ``row`` holds the report fields."""

    def __init__(self, row: dict, call, rot: Rotation, setup=None):
        self.row, self.call, self.rot, self.setup = row, call, rot, setup or (lambda: None)

    def once(self, warm_first: bool) -> float:
        self.setup()
        c = self.rot.next()
        if warm_first:  # warm: the copy was just used, as in a loop over one cached weight
            self.call(c)
        t0 = time.perf_counter()
        self.call(c)
        return (time.perf_counter() - t0) * 1e3


def _measure_interleaved(variants: list[_Variant], cfg, warm: bool) -> list[dict]:
    """Times every variant of one cell in rounds, one call of each per round, so that a drift of the
    machine (another tenant, the clock) moves them all alike and their ratios stay fair. A first call
    of each sizes the work: up to ``runs`` rounds within ``seconds_per_row`` per variant; a variant
    slower than ``slow_factor`` x the fastest dense first call (twice in a row) keeps its faster
    sizing call. Warm: each timed call follows an untimed call on the same copy (the other
    variants' calls in between would evict it)."""
    first = [v.once(False) for v in variants]
    dense = [f for v, f in zip(variants, first) if v.row["backend"] == "dense"]
    limit = cfg.slow_factor * min(dense) if dense else math.inf
    # a slow sizing call is timed once more before the variant is left at one call: a hiccup of the
    # machine (seen: 45.6 ms for a 6.8 ms call) must not stand for the variant
    first = [f if f <= limit else min(f, v.once(False)) for v, f in zip(variants, first)]
    active = [i for i, f in enumerate(first) if f <= limit]
    for _ in range(max(0, cfg.warmup - 1)):
        for i in active:
            variants[i].once(warm)
    per_round = sum(first[i] for i in active) * (2 if warm else 1) / 1e3
    runs = max(3, min(cfg.runs, int(cfg.seconds_per_row * len(active) / max(per_round, 1e-6))))
    times = [[] if i in active else [f] for i, f in enumerate(first)]  # the slow ones keep their sizing call
    for _ in range(runs):
        for i in active:
            times[i].append(variants[i].once(warm))
    return [{**_stats(ts), **v.rot.info(), "times_ms": [round(t, 5) for t in ts]} for v, ts in zip(variants, times)]


def _vs_fastest_dense(rows: list[dict]) -> None:
    """Adds to each row of one cell its paired speed-up over the cell's fastest dense FP (lowest
    median): ``fastest_dense`` (its dtype), ``vs_fastest_dense`` and ``_p10``/``_p90``."""
    dense = [r for r in rows if r["backend"] == "dense"]
    if not dense:
        return
    best = min(dense, key=lambda r: r["median_ms"])
    for r in rows:
        r.update(fastest_dense=best["dtype_or_bits"], **_paired_fields("vs_fastest_dense", best["times_ms"], r["times_ms"]))


def _act_dtypes(backend: str, bf16_acts: bool, dense_dtypes) -> tuple[str, ...]:
    """The activation dtypes a quantized backend is timed with: cpu_tiled_bf16 bf16 only, ``auto``
    also bf16 where bf16 GEMMs are fast (what a bf16 model runs; compared with dense bf16), the
    others float32."""
    if backend == "cpu_tiled_bf16":
        return ("bfloat16",)
    if backend == "auto" and bf16_acts and "bfloat16" in dense_dtypes:
        return ("float32", "bfloat16")
    return ("float32",)


def _prepared_copy(ql):
    return {k: v.clone() for k, v in ql._prepared.items()}


def bench_linears(cfg, bw_gbs: float, batches=None, log=print) -> list[dict]:
    from vlmq.qlinear import available_backends, bf16_gemm_fast

    # bfloat16 activations (a model run in bf16): `auto` (cpu_tiled_bf16 from prefill_from rows) and
    # the forced cpu_tiled_bf16, where bf16 GEMMs are fast (AMX); elsewhere bf16 GEMMs are several
    # times slower than float32 ones and auto computes bf16 activations in float32 (same as float32 rows)
    bf16_acts = bf16_gemm_fast()
    if not bf16_acts and "cpu_tiled_bf16" in cfg.backends:
        log("  cpu_tiled_bf16 and auto with bf16 activations: not timed (no AMX: bf16 GEMMs are slow here)")
    llc = llc_bytes()
    ram_cap = int(cfg.cold_ram_fraction * available_ram_bytes())
    gen = torch.Generator().manual_seed(0)
    results = []
    for in_f, out_f in cfg.shapes:
        base = torch.randn(out_f, in_f, generator=gen)
        dense = {}  # (dtype, cache) -> rotation of weight copies
        for name in cfg.dense_dtypes:
            w = base.to(DTYPES[name])
            for cache in cfg.cache:
                dense[name, cache] = Rotation(lambda i, w=w: w if i == 0 else w.clone(), w.numel() * w.element_size(),
                                              llc, cfg.cold_llc_factor, ram_cap, cache == "cold")
        del base
        quant = {}  # (bits, layout, cache) -> (QuantLinear, rotation of prepared tensors)
        for bits in cfg.bits:
            ql = random_quant_linear(in_f, out_f, bits, cfg.group_size, gen)
            ok = available_backends(bits)
            for layout, members in (("kernel", {"auto", "cpu_fused", "cpu_tiled", "cpu_tiled_bf16"}),
                                    ("aten_int4", {"aten_int4"}),
                                    ("dequant", {"dequant"}), ("reference", {"reference"})):
                use = [b for b in cfg.backends if b in members and (b == "auto" or b in ok)
                       and (b != "cpu_tiled_bf16" or bf16_acts)]
                q2 = copy.deepcopy(ql)
                for b in list(use):  # a backend that cannot run this shape or group size is left out, said once
                    try:
                        q2.prepare(b, prefill_from=cfg.prefill_from)
                    except ValueError as exc:
                        log(f"  ({in_f},{out_f}) W{bits} g{cfg.group_size} {b}: not timed ({exc})")
                        use.remove(b)
                if not use:
                    continue
                q2.prepare(use[0], prefill_from=cfg.prefill_from)
                nbytes = sum(v.numel() * v.element_size() for v in q2._prepared.values()) or quant_bytes(
                    in_f, out_f, bits, cfg.group_size)
                for cache in cfg.cache:
                    quant[bits, layout, cache] = (q2, use, Rotation(
                        lambda i, q2=q2: q2._prepared if i == 0 else _prepared_copy(q2), nbytes, llc,
                        cfg.cold_llc_factor, ram_cap, cache == "cold"))
        for batch in batches or cfg.batches:
            x = torch.randn(batch, in_f, generator=gen)
            for cache in cfg.cache:
                cell = []
                for name in cfg.dense_dtypes:
                    rot = dense[name, cache]
                    cell.append(_Variant(
                        dict(dtype_or_bits=name, group_size=None, backend="dense", path="dense", act_dtype=name,
                             floor_ms=rot.nbytes / (bw_gbs * 1e9) * 1e3),
                        lambda w, xd=x.to(DTYPES[name]): F.linear(xd, w), rot))
                for (bits, layout, c), (ql, use, rot) in quant.items():
                    if c != cache:
                        continue
                    for backend, act in [(b, a) for b in use for a in _act_dtypes(b, bf16_acts, cfg.dense_dtypes)]:
                        def setup(ql=ql, backend=backend, layout=layout):
                            if layout == "kernel" or ql.backend != backend:  # free within the kernel layout
                                ql.prepare(backend, prefill_from=cfg.prefill_from)

                        def call(p, ql=ql, xq=x.to(DTYPES[act])):
                            ql._prepared = p
                            ql(xq)

                        setup()
                        cell.append(_Variant(
                            dict(dtype_or_bits=bits, group_size=cfg.group_size, backend=backend,
                                 path=ql.path(batch, DTYPES[act]) if backend == "auto" else backend, act_dtype=act,
                                 floor_ms=quant_bytes(in_f, out_f, bits, cfg.group_size) / (bw_gbs * 1e9) * 1e3),
                            call, rot, setup))
                rows = _measure_interleaved(cell, cfg, cache == "warm")
                for v, r in zip(cell, rows):
                    r.update(shape=[in_f, out_f], **v.row, batch=batch,
                             cache=cache if v.rot.cold or cache == "warm" else "cold_partial")
                _vs_fastest_dense(rows)
                for r in rows:
                    results.append(r)
                    what = (f"dense {r['dtype_or_bits']}" if r["backend"] == "dense"
                            else f"W{r['dtype_or_bits']} {r['backend']} ({r['path']}, x {r['act_dtype']})")
                    log(f"  ({in_f},{out_f}) M={batch} {cache} {what}: {r['median_ms']:.3f} ms "
                        f"(floor {r['floor_ms']:.3f}, {r['copies']} copies, {r['runs']} runs"
                        + (f"; {r['vs_fastest_dense']:.2f}x vs dense {r['fastest_dense']}, paired)"
                           if "fastest_dense" in r else ")"))
        del dense, quant
    return results


def _tensor_bytes(model) -> int:
    from vlmq.qlinear import QuantLinear

    n = sum(t.numel() * t.element_size() for t in model.parameters())
    n += sum(b.numel() * b.element_size() for b in model.buffers())
    n += sum(sum(v.numel() * v.element_size() for v in m._prepared.values())
             for m in model.modules() if isinstance(m, QuantLinear))
    return n


def demo_inputs(processor, n: int = 1, seed: int = 0) -> dict:
    """``n`` rendered image questions of the demo task (fresh scenes of their own split), batched by
    ``processor``: what the end-to-end benchmark and the kernel tests feed a model."""
    import io

    from PIL import Image

    from vlmq.demo.data import SceneSpec, make_eval_rows
    from vlmq.demo.tokenizer import user_prompt

    rows = make_eval_rows(1, seed, SceneSpec(), set(), split="latency")
    texts = [processor.apply_chat_template(user_prompt(q), add_generation_prompt=True, tokenize=False)
             for q in rows["question"][:n]]
    images = [Image.open(io.BytesIO(im["bytes"])).convert("RGB") for im in rows["image"][:n]]
    return dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))


def write_rtn_packed(model, processor, adapter, bits: int, group_size: int, out: Path) -> Path:
    """Every decoder linear of ``model`` RTN-quantized (W``bits`` g``group_size``) and packed to
    ``out`` (a GPTQ checkpoint, :func:`vlmq.checkpoint.write_packed`); returns ``out``."""
    from vlmq.checkpoint import write_packed
    from vlmq.quant import rtn

    solved = []
    for layer in adapter.decoder_layers(model):
        t = {}
        for name, lin in adapter.linears(layer).items():
            q, s, z, g = rtn(lin.weight.detach(), bits, group_size)
            t.update({f"{name}.int_weight": q, f"{name}.scales": s, f"{name}.zeros": z, f"{name}.g_idx": g})
        solved.append(t)
    write_packed(model, processor, adapter, solved, out, bits=bits, group_size=group_size, sym=False,
                 desc_act=False, method="rtn")
    return out


class _Evictor:
    """Reads a buffer of ``factor`` × LLC between runs: the next run starts with cold caches."""

    def __init__(self, llc: int, factor: float):
        self.buf = torch.ones(int(factor * llc) // 4 + 1)

    def __call__(self):
        float(self.buf.sum())


def bench_end_to_end(model_path: str, cfg, log=print) -> list[dict]:
    """Batch-1 image question: time to first token and decode tokens/s, FP vs RTN-packed W``bits``
    (``auto`` backend), cold."""
    from vlmq.checkpoint import load_packed
    from vlmq.models import load_model

    model, processor, adapter = load_model(model_path)
    tok = processor.tokenizer
    inputs = demo_inputs(processor, 1, seed=0)
    evict = _Evictor(llc_bytes(), cfg.cold_llc_factor)
    kw = dict(do_sample=False, pad_token_id=tok.pad_token_id)

    from transformers.generation.streamers import BaseStreamer

    class _Clock(BaseStreamer):
        """Stamps each ``put`` of ``generate``: the prompt first, then every new token."""

        def __init__(self):
            self.stamps = []

        def put(self, value):
            self.stamps.append(time.perf_counter())

        def end(self):
            pass

    def once(m) -> tuple[float, float]:
        """One cold run: (ms to the first token, ms for the ``decode_tokens`` after it), both from the
        same ``generate`` (a streamer stamps every token)."""
        evict()
        clock = _Clock()
        t0 = time.perf_counter()
        with torch.no_grad():
            m.generate(**inputs, max_new_tokens=1 + cfg.decode_tokens, min_new_tokens=1 + cfg.decode_tokens,
                       streamer=clock, **kw)
        t_end = time.perf_counter()
        first = clock.stamps[1]  # stamps[0]: the prompt, put before the prefill
        return (first - t0) * 1e3, (t_end - first) * 1e3

    # every variant loaded first, then timed in turns (run 1 of each, run 2 of each, ...): drift of a
    # shared machine spreads over all of them instead of favouring whichever ran in a quiet minute
    from vlmq.qlinear import bf16_gemm_fast

    variants = []  # (model, weights, backend, model dtype, disk_bytes)
    fp_disk = sum(p.stat().st_size for p in Path(model_path).glob("*.safetensors"))
    for name in cfg.dense_dtypes:
        variants.append((copy.deepcopy(model).to(DTYPES[name]).eval(), name, "dense", name, fp_disk))
    tmp = tempfile.TemporaryDirectory()  # kept until the timings are done (the packed models read from it)
    # the packed model in float32, and in bf16 where bf16 GEMMs are fast (AMX: cpu_tiled_bf16 prefill)
    q_dtypes = ["float32"] + (["bfloat16"] if bf16_gemm_fast() and "bfloat16" in cfg.dense_dtypes else [])
    for bits in cfg.bits:
        d = write_rtn_packed(model, processor, adapter, bits, cfg.group_size, Path(tmp.name) / f"w{bits}")
        for dt in q_dtypes:
            qm, _, _ = load_packed(d, backend="auto", dtype=DTYPES[dt], load_processor=False,
                                   prefill_from=cfg.prefill_from)
            variants.append((qm.eval(), bits, "auto", dt, (d / "model.safetensors").stat().st_size))
    ttft = [[] for _ in variants]
    dec = [[] for _ in variants]
    for m, *_ in variants:  # warm-up (kernel build, allocator, first-call paths)
        once(m)
    for _ in range(cfg.decode_runs):
        for i, (m, *_) in enumerate(variants):
            t1, tn = once(m)
            ttft[i].append(t1)
            dec[i].append(tn)
    # the paired ratios (per round, as the variants were timed in turns) vs the fastest FP dtype of each
    # (none where latency.dense_dtypes is empty)
    fp = [i for i, v in enumerate(variants) if v[2] == "dense"] or None
    fp_ttft = fp and min(fp, key=lambda i: statistics.median(ttft[i]))
    fp_dec = fp and min(fp, key=lambda i: statistics.median(dec[i]))
    out = []
    for (m, weights, backend, dtype, disk), t1, tn in zip(variants, ttft, dec):
        a = _stats(t1)
        decode_ms = max(_stats(tn)["median_ms"], 1e-9)
        r = {"model": str(model_path), "weights": weights, "backend": backend, "dtype": dtype, "batch": 1, "cache": "cold",
             "prompt_tokens": int(inputs["input_ids"].shape[1]),
             "ttft_ms": a["median_ms"], "ttft_p10_ms": a["p10_ms"], "ttft_p90_ms": a["p90_ms"],
             "decode_tokens": cfg.decode_tokens, "decode_ms": decode_ms,
             "decode_tokens_per_s": cfg.decode_tokens / (decode_ms * 1e-3), "runs": cfg.decode_runs,
             "disk_bytes": disk, "resident_bytes": _tensor_bytes(m),
             "ttft_times_ms": [round(t, 4) for t in t1], "decode_times_ms": [round(t, 4) for t in tn]}
        vs = ""
        if fp:
            r.update(fastest_fp_ttft=variants[fp_ttft][1], **_paired_fields("ttft_vs_fastest_fp", ttft[fp_ttft], t1),
                     fastest_fp_decode=variants[fp_dec][1], **_paired_fields("decode_vs_fastest_fp", dec[fp_dec], tn))
            vs = (f"; paired vs FP: TTFT {r['ttft_vs_fastest_fp']:.2f}x ({r['fastest_fp_ttft']}), "
                  f"decode {r['decode_vs_fastest_fp']:.2f}x ({r['fastest_fp_decode']})")
        log(f"  end to end {weights} {backend} ({dtype}): TTFT {r['ttft_ms']:.1f} ms ({r['prompt_tokens']} prompt tokens), "
            f"decode {r['decode_tokens_per_s']:.1f} tok/s, resident {r['resident_bytes'] / 1e6:.1f} MB{vs}")
        out.append(r)
    tmp.cleanup()
    return out


def plot_sweep(report: dict, path: str | Path) -> Path:
    """Latency against rows per call, one panel per shape: the fastest dense FP and each bit width's
    ``auto`` backend, cold (solid) and warm (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.common import atomic_path

    res = report["results"]
    shapes = sorted({tuple(r["shape"]) for r in res}, key=lambda s: s[0] * s[1])
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for cache, style in (("cold", "-"), ("warm", "--")):
            rows = [r for r in res if tuple(r["shape"]) == shape and r["cache"].startswith(cache)]
            ms = sorted({r["batch"] for r in rows})
            dense = [min(r["median_ms"] for r in rows if r["batch"] == m and r["backend"] == "dense") for m in ms]
            ax.plot(ms, dense, style, color="black", marker="o", ms=3, label=f"dense FP (fastest) {cache}")
            for bits, color in zip(sorted({r["dtype_or_bits"] for r in rows if r["backend"] == "auto"}),
                                   ("tab:blue", "tab:orange", "tab:green", "tab:red")):
                pts = {}  # rows -> the fastest activation dtype's time
                for r in rows:
                    if r["backend"] == "auto" and r["dtype_or_bits"] == bits:
                        pts[r["batch"]] = min(pts.get(r["batch"], math.inf), r["median_ms"])
                pts = sorted(pts.items())
                if pts:
                    ax.plot(*zip(*pts), style, color=color, marker="o", ms=3, label=f"W{bits}g128 auto {cache}")
        ax.set(xscale="log", yscale="log", xlabel="rows per call (M)", ylabel="ms per call", title=f"(in, out) = {shape}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=6)
    m = report["machine"]
    fig.suptitle(f"{m.get('cpu')} ({m.get('torch_threads')} threads, kernel {m.get('kernel_isa')}, "
                 f"LLC {m.get('llc_bytes', 0) / 2**20:.0f} MiB)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def speedup_table(report: dict) -> str:
    """Markdown: per shape, M and cache, the fastest dense FP and each bit width's ``auto`` speed-up
    over it (> 1 = the quantized linear is faster; float32 activations, or bf16 ones where those
    were timed and faster): the median of the per-round ratios [p10–p90], with the path ``auto`` ran."""
    res = report["results"]
    cache_of = lambda r: r["cache"].replace("cold_partial", "cold")  # noqa: E731
    bits = sorted({r["dtype_or_bits"] for r in res if r["backend"] == "auto"}, reverse=True)
    md = ("| shape (in, out) | M | cache | fastest dense | "
          + " | ".join(f"W{b} auto" for b in bits) + " |\n|---|---|---|---|" + "---|" * len(bits) + "\n")
    keys = sorted({(tuple(r["shape"]), r["batch"], cache_of(r)) for r in res},
                  key=lambda k: (k[0][0] * k[0][1], k[0], k[1], k[2]))
    for shape, m, cache in keys:
        rows = [r for r in res if (tuple(r["shape"]), r["batch"], cache_of(r)) == (shape, m, cache)]
        dense = [r for r in rows if r["backend"] == "dense"]
        if not dense:
            continue
        best = min(dense, key=lambda r: r["median_ms"])
        cells = []
        for b in bits:
            q = sorted((r for r in rows if r["backend"] == "auto" and r["dtype_or_bits"] == b),
                       key=lambda r: r["median_ms"])  # the faster activation dtype (float32, or bf16 where timed)
            if not q:
                cells.append("")
                continue
            sp = q[0].get("vs_fastest_dense", best["median_ms"] / q[0]["median_ms"])  # paired (older reports: medians)
            spread = (f" [{q[0]['vs_fastest_dense_p10']:.2f}–{q[0]['vs_fastest_dense_p90']:.2f}]"
                      if "vs_fastest_dense_p10" in q[0] else "")
            cells.append(f"{q[0]['median_ms']:.3g} ms, **{sp:.2f}×**{spread} ({q[0]['path'].replace('cpu_', '')})")
        md += (f"| ({shape[0]}, {shape[1]}) | {m} | {cache} | {best['dtype_or_bits']} {best['median_ms']:.3g} ms | "
               + " | ".join(cells) + " |\n")
    return md


def _commit() -> str | None:
    """The checkout's commit, ``+edits`` where the code or params.yaml differ from it (the reports
    this writes don't count); ``None`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        edited = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "vlmq", "stages", "benchmarks", "pipeline",
                                 "params.yaml"], capture_output=True, timeout=10).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+edits" if edited else "")) or None


def run_benchmark(params_path=None, model_path: str | None = None, out: str | None = None, log=print,
                  sweep: bool = False) -> dict:
    from stages.common import atomic_path, write_json
    from stages.params import load_params

    params = load_params(params_path)
    cfg = params.latency
    commit = _commit()  # at the start: the code that runs (edits during a long sweep don't count)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = machine_info()
    bw = memory_bandwidth_gbs()
    info["memory_bandwidth_gbs"] = round(bw, 2)
    log(f"machine: {info}")
    results = bench_linears(cfg.model_copy(update={"runs": cfg.sweep.runs, "seconds_per_row": cfg.sweep.seconds_per_row})
                            if sweep else cfg, bw, cfg.sweep.batches if sweep else None, log)
    report = {"machine": info, "params": cfg.model_dump(), "results": results, "commit": commit}
    if sweep:
        report["command"] = "python -m benchmarks.latency --sweep"
        path = write_json(out or cfg.sweep.out, report)
        plot_sweep(report, cfg.sweep.plot)
        with atomic_path(path.with_suffix(".md")) as tmp:
            tmp.write_text(f"# Latency sweep ({report['command']})\n\n{report['machine']}\n\n" + speedup_table(report))
        return report
    report["end_to_end"] = bench_end_to_end(model_path or params.model.path, cfg, log)
    write_json(out or cfg.out, report)
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None)
    ap.add_argument("--sweep", action="store_true", help="the batch sweep of latency.sweep (report + plot)")
    a = ap.parse_args(argv)
    run_benchmark(a.params, sweep=a.sweep)


if __name__ == "__main__":
    main()
