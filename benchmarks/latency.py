"""Latency of quantized linears and of the end-to-end decode, FP vs W4/W3/W2, per backend.

    python -m benchmarks.latency            # knobs: params.yaml `latency:`; writes reports/latency.json

* Single linears at the paper's Table 11 shapes (``latency.shapes``, ``(in, out)``): dense FP
  (``F.linear`` in each of ``latency.dense_dtypes``) and GPTQ-packed W``bits`` g``group_size``
  through every applicable backend of :mod:`vlmq.qlinear`, at every batch of ``latency.batches``
  (batch 1 = decode, batch N = prefill). Warm-up, then ``runs`` timed calls: median, p10, p90.
* Beside each, the memory-traffic floor: bytes the kernel must read (weights + scales/zeros) /
  this machine's measured memory bandwidth (a large ``sum`` over a buffer ≫ cache).
* End to end: greedy decode of ``decode_tokens`` tokens at batch 1 of the model at
  ``model.path`` (FP, and with every decoder linear RTN-packed at each bit width and run by the
  fastest backend), tokens/s; model size on disk (packed safetensors) and resident tensor bytes.

All variants run in one process, interleaved per shape, so their ratios compare like with like.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _time(fn, runs: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    q = lambda p: ts[min(len(ts) - 1, int(round(p * (len(ts) - 1))))]  # noqa: E731
    return {"median_ms": statistics.median(ts), "p10_ms": q(0.10), "p90_ms": q(0.90), "runs": runs}


def memory_bandwidth_gbs(n_bytes: int = 1 << 30, runs: int = 5) -> float:
    """Read bandwidth: float32 ``sum`` over an ``n_bytes`` buffer (far larger than any cache)."""
    x = torch.ones(n_bytes // 4)
    r = _time(lambda: x.sum(), runs, 1)
    return n_bytes / (r["median_ms"] * 1e-3) / 1e9


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from vlmq.kernels import kernel_isa

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "kernel_isa": kernel_isa(),
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _random_quant_linear(in_f: int, out_f: int, bits: int, group_size: int, gen: torch.Generator):
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
    return in_f * out_f * bits // 8 + n_groups * out_f * (2 + bits / 8)


def bench_linears(cfg, bw_gbs: float, log=print) -> list[dict]:
    from vlmq.qlinear import available_backends

    gen = torch.Generator().manual_seed(0)
    results = []
    for in_f, out_f in cfg.shapes:
        dense = {}
        for name in cfg.dense_dtypes:
            dense[name] = torch.randn(out_f, in_f, generator=gen).to(DTYPES[name])
        quant = {b: _random_quant_linear(in_f, out_f, b, cfg.group_size, gen) for b in cfg.bits}
        for batch in cfg.batches:
            x = torch.randn(batch, in_f, generator=gen)
            for name, w in dense.items():
                xd = x.to(w.dtype)
                r = _time(lambda: F.linear(xd, w), cfg.runs, cfg.warmup)
                r.update(shape=[in_f, out_f], dtype_or_bits=name, group_size=None, backend="dense", batch=batch,
                         floor_ms=w.numel() * w.element_size() / (bw_gbs * 1e9) * 1e3)
                results.append(r)
                log(f"  ({in_f},{out_f}) batch {batch} dense {name}: {r['median_ms']:.3f} ms (floor {r['floor_ms']:.3f})")
            for bits, ql in quant.items():
                for backend in cfg.backends:
                    if backend not in available_backends(bits):
                        continue
                    ql.prepare(backend)
                    r = _time(lambda: ql(x), cfg.runs, cfg.warmup)
                    r.update(shape=[in_f, out_f], dtype_or_bits=bits, group_size=cfg.group_size, backend=backend,
                             batch=batch, floor_ms=quant_bytes(in_f, out_f, bits, cfg.group_size) / (bw_gbs * 1e9) * 1e3)
                    results.append(r)
                    log(f"  ({in_f},{out_f}) batch {batch} W{bits} {backend}: {r['median_ms']:.3f} ms "
                        f"(floor {r['floor_ms']:.3f})")
                ql.prepare("reference")  # drop the prepared copies before the next bit width
        del dense, quant
    return results


def _tensor_bytes(model) -> int:
    from vlmq.qlinear import QuantLinear

    n = sum(t.numel() * t.element_size() for t in model.parameters())
    n += sum(b.numel() * b.element_size() for b in model.buffers())
    n += sum(sum(v.numel() * v.element_size() for v in m._prepared.values())
             for m in model.modules() if isinstance(m, QuantLinear))
    return n


def bench_decode(model_path: str, cfg, log=print) -> list[dict]:
    """Batch-1 greedy decode tokens/s: FP (each dense dtype) and RTN-packed at each bit width."""
    from vlmq.checkpoint import load_packed, write_packed
    from vlmq.models import load_model
    from vlmq.qlinear import available_backends
    from vlmq.quant import rtn

    model, processor, adapter = load_model(model_path)
    tok = processor.tokenizer
    ids = tok(["<|im_start|>user\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"],
              return_tensors="pt")["input_ids"]
    gen_kw = dict(max_new_tokens=cfg.decode_tokens, min_new_tokens=cfg.decode_tokens, do_sample=False,
                  pad_token_id=tok.pad_token_id)

    def run(m, label, dtype_or_bits, backend, disk_bytes):
        m.eval()
        with torch.no_grad():
            r = _time(lambda: m.generate(input_ids=ids, **gen_kw), cfg.decode_runs, 1)
        r.update(model=str(model_path), dtype_or_bits=dtype_or_bits, backend=backend, batch=1,
                 tokens=cfg.decode_tokens, tokens_per_s=cfg.decode_tokens / (r["median_ms"] * 1e-3),
                 disk_bytes=disk_bytes, resident_bytes=_tensor_bytes(m))
        log(f"  decode {label}: {r['tokens_per_s']:.1f} tok/s, resident {r['resident_bytes'] / 1e6:.1f} MB")
        return r

    out = []
    fp_disk = sum(p.stat().st_size for p in Path(model_path).glob("*.safetensors"))
    for name in cfg.dense_dtypes:
        m = model.to(DTYPES[name])
        out.append(run(m, name, name, "dense", fp_disk))
    model = model.float()
    with tempfile.TemporaryDirectory() as tmp:
        for bits in cfg.bits:
            solved = []
            for layer in adapter.decoder_layers(model):
                t = {}
                for name, lin in adapter.linears(layer).items():
                    q, s, z, g = rtn(lin.weight, bits, cfg.group_size)
                    t.update({f"{name}.int_weight": q, f"{name}.scales": s, f"{name}.zeros": z, f"{name}.g_idx": g})
                solved.append(t)
            d = Path(tmp) / f"w{bits}"
            write_packed(model, processor, adapter, solved, d, bits=bits, group_size=cfg.group_size, sym=False,
                         desc_act=False, method="rtn")
            disk = (d / "model.safetensors").stat().st_size
            for backend in cfg.backends:
                if backend not in available_backends(bits):
                    continue
                qm, _, _ = load_packed(d, backend=backend, load_processor=False)
                out.append(run(qm, f"W{bits} {backend}", bits, backend, disk))
                del qm
    return out


def run_benchmark(params_path=None, model_path: str | None = None, out: str | None = None, log=print) -> dict:
    from stages.common import write_json
    from stages.params import load_params

    params = load_params(params_path)
    cfg = params.latency
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = machine_info()
    bw = memory_bandwidth_gbs()
    info["memory_bandwidth_gbs"] = round(bw, 2)
    log(f"machine: {info}")
    results = bench_linears(cfg, bw, log)
    decode = bench_decode(model_path or params.model.path, cfg, log)
    report = {"machine": info, "params": cfg.model_dump(), "results": results, "decode": decode}
    write_json(out or cfg.out, report)
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None)
    a = ap.parse_args(argv)
    run_benchmark(a.params)


if __name__ == "__main__":
    main()
