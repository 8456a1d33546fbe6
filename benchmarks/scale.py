"""Scale rehearsal: one decoder layer of Qwen2-VL-2B / -7B / Qwen2.5-VL-32B shape on this CPU.

No real checkpoint is reachable, so the language backbone is built from the real transformers
class (``Qwen2VLForConditionalGeneration``) with the real layer shapes and random weights (the
vision tower is a small stand-in: it is not quantized and not the subject). Calibration
samples are 512 tokens each with the demo's mix: a short system prompt, 360 image tokens
between ``<|vision_start|>``/``<|vision_end|>`` (a 30 × 48 patch grid, merged 2 × 2), the
instruction and a 16-token answer; ``N`` tokens in all, in batches of 8 samples.

Every phase runs in a fresh process, so its peak RSS is its own ``ru_maxrss``:

* ``cache_fp`` — the model's own forward up to layer 0 and layer 0 itself over the N tokens;
  X written in float16 as the cache_fp stage does (disk bytes per layer measured);
* ``gptq`` / ``gptaq`` / ``vlmq`` — the quantize stage's work on that layer: the importance pass
  (VLMQ; ``layer_importance``) and every linear's solve (``quantize_layer``), W3 g128. X̂ is X
  plus 1 % Gaussian noise, standing in for the upstream quantization error (at layer 0 of a real
  run X̂ = X and VLMQ takes its first-layer rule instead).

Each quantize phase reports its time split into the importance pass and the statistics (the
sub-block forwards and the accumulation: linear in N) and the solves (independent of N). The
projection to a whole model at the paper's 512 samples × 512 tokens scales the first part from
the largest N measured and keeps the second: time on this CPU, RAM (the measured peak plus the
float32 streams X and X̂ of the extra tokens), and disk of the FP cache for ``cache.layers: all``
vs ``first``. Results: ``reports/bench/scale.json`` (``--append`` adds to the rows already
there) and a Markdown table on stdout (the README's "Scale rehearsal" tables).

    .venv/bin/python benchmarks/scale.py        # 7B shape, N = 32k, GPTAQ and VLMQ (28 min on 2 cores)
    .venv/bin/python benchmarks/scale.py --append --models 2b --tokens 8192 --methods gptq gptaq vlmq
    .venv/bin/python benchmarks/scale.py --append --models 32b --tokens 4096 --methods gptaq
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # the language backbones' config.json values
    "2b": {"name": "Qwen2-VL-2B", "hidden": 1536, "intermediate": 8960, "heads": 12, "kv_heads": 2, "layers": 28},
    "7b": {"name": "Qwen2-VL-7B", "hidden": 3584, "intermediate": 18944, "heads": 28, "kv_heads": 4, "layers": 28},
    "32b": {"name": "Qwen2.5-VL-32B", "hidden": 5120, "intermediate": 27648, "heads": 40, "kv_heads": 8,
            "layers": 64},
}
SEQ, IMAGE_TOKENS, ANSWER, SYSTEM, BATCH = 512, 360, 16, 14, 8
GRID = (1, 30, 48)  # temporal, height, width patches: 1440 patches -> 360 merged tokens
PAPER_TOKENS = 512 * 512
IDS = {"image": 1000, "video": 1001, "vision_start": 1002, "vision_end": 1003, "eos": 1004, "pad": 1005}


def build_model(key: str, seed: int = 0):
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    s = SHAPES[key]
    head_dim = s["hidden"] // s["heads"]
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # Qwen2-VL: [16, 24, 24] at 128
    text = dict(vocab_size=1024 + 64, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                num_hidden_layers=1, num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
                bos_token_id=IDS["pad"], eos_token_id=IDS["eos"], pad_token_id=IDS["pad"])
    vision = dict(depth=1, embed_dim=64, hidden_size=s["hidden"], num_heads=2, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IDS["image"],
                        video_token_id=IDS["video"], vision_start_token_id=IDS["vision_start"],
                        vision_end_token_id=IDS["vision_end"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(cfg).eval().requires_grad_(False)


def calib_batches(n_tokens: int, seed: int = 0):
    """Processor-shaped batches (input_ids, attention_mask, pixel_values, image_grid_thw) and the
    per-token modality (1 = vision)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n_samples = max(1, n_tokens // SEQ)
    n_patches = GRID[0] * GRID[1] * GRID[2]
    out = []
    for a in range(0, n_samples, BATCH):
        b = min(BATCH, n_samples - a)
        ids = torch.randint(0, 1000, (b, SEQ), generator=gen)
        ids[:, SYSTEM] = IDS["vision_start"]
        ids[:, SYSTEM + 1:SYSTEM + 1 + IMAGE_TOKENS] = IDS["image"]
        ids[:, SYSTEM + 1 + IMAGE_TOKENS] = IDS["vision_end"]
        modality = (ids == IDS["image"]).to(torch.int8)
        batch = {"input_ids": ids, "attention_mask": torch.ones(b, SEQ, dtype=torch.long),
                 "pixel_values": torch.randn(b * n_patches, 3 * 2 * 14 * 14, generator=gen),
                 "image_grid_thw": torch.tensor([GRID] * b)}
        out.append((batch, modality))
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def phase_cache_fp(key: str, n_tokens: int, work: Path) -> dict:
    """Embeddings + layer 0 over the N tokens; X (float16) and the layer context to disk."""
    import torch

    from stages.common import peak_rss_mb, save_safetensors
    from vlmq.models import get_adapter

    model = build_model(key)
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[0]
    base = _rss_mb()
    t0 = time.perf_counter()
    ctx, xs, mods = {}, {}, {}
    for b, (batch, modality) in enumerate(calib_batches(n_tokens)):
        li = adapter.prepare_inputs(model, batch)
        for k, v in li.state_dict().items():
            if k != "hidden_states":
                ctx[f"b{b:04d}.{k}"] = v
        ctx[f"b{b:04d}.modality"] = modality
        with torch.no_grad():
            adapter.run_layer(layer, li.hidden_states, li)  # what cache_fp spends per layer
        xs[f"b{b:04d}"] = li.hidden_states.to(torch.float16)
    seconds = time.perf_counter() - t0
    save_safetensors(ctx, work / "context.safetensors")
    save_safetensors(xs, work / "layer_000.safetensors")
    return {"phase": "cache_fp", "seconds": seconds, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base,
            "disk_bytes_per_layer": (work / "layer_000.safetensors").stat().st_size,
            "tokens": sum(int(x.shape[0] * x.shape[1]) for x in xs.values())}


def phase_quantize(key: str, method: str, work: Path, bits: int = 3, group_size: int = 128) -> dict:
    """The quantize stage's work on layer 0: importance (VLMQ) and every linear's solve."""
    import torch
    from safetensors.torch import load_file

    from stages.common import peak_rss_mb
    from vlmq.models import LayerInputs, get_adapter
    from vlmq.quantize import CalibBatch, LayerQuantConfig, layer_importance, quantize_layer

    model = build_model(key)
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[0]
    flat, xs = load_file(str(work / "context.safetensors")), load_file(str(work / "layer_000.safetensors"))
    gen = torch.Generator().manual_seed(1)
    batches = []
    for name in sorted(xs):
        part = {k[len(name) + 1:]: v for k, v in flat.items() if k.startswith(name + ".")}
        modality = part.pop("modality")
        part["hidden_states"] = torch.empty(0)
        x = xs[name].float()
        noise = torch.randn(x.shape, generator=gen) * (0.01 * x.std())
        batches.append(CalibBatch(inputs=LayerInputs.from_state_dict(part), x_fp=x, x_hat=x + noise,
                                  modality=modality))
    del flat, xs
    cfg = LayerQuantConfig(method=method, bits=bits, group_size=group_size, precursor="gptaq")
    base = _rss_mb()
    times = {}
    t0 = time.perf_counter()
    outcome = None
    if cfg.uses_importance:
        with torch.enable_grad():
            outcome = layer_importance(adapter, layer, batches, cfg, generator=torch.Generator().manual_seed(0))
        times["importance_seconds"] = time.perf_counter() - t0
    res = quantize_layer(adapter, layer, batches, cfg, name="layers.0", importance=outcome)
    times["statistics_seconds"] = res.seconds["statistics"]  # sub-block forwards + accumulation (∝ N)
    times["solve_seconds"] = res.seconds["solve"]  # the solver (independent of N)
    return {"phase": method, "seconds": time.perf_counter() - t0, **times, "peak_rss_mb": peak_rss_mb(),
            "base_rss_mb": base}


def _run_phase(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    if r.returncode or not line:
        raise RuntimeError(f"scale phase {args} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def project(rows: list[dict], key: str, tokens: int = PAPER_TOKENS) -> dict:
    """Whole-model figures at ``tokens`` calibration tokens from the per-layer measurements of
    the largest N: the N-proportional part of each phase scaled to ``tokens``, the solves kept."""
    s = SHAPES[key]
    mine = [r for r in rows if r["model"] == key]
    out = {"model": s["name"], "layers": s["layers"], "tokens": tokens, "measured_tokens": sorted({r["tokens"] for r in mine})}
    # memory: past one batch (8 samples) only the two streams grow with N, X and X̂ of every token
    # in float32 (+ g per projection); the per-batch working set does not
    stream_mb_per_token = (2 * s["hidden"] * 4 + 4 * 4) / 2**20
    for phase in sorted({r["phase"] for r in mine}):
        big = max((r for r in mine if r["phase"] == phase), key=lambda r: r["tokens"])
        fixed = big.get("solve_seconds", 0.0)
        out[f"{phase}_hours"] = (fixed + (big["seconds"] - fixed) * tokens / big["tokens"]) * s["layers"] / 3600
        full_batch = big["tokens"] >= BATCH * SEQ
        extra = stream_mb_per_token * (tokens - big["tokens"]) if phase != "cache_fp" else 0.0
        out[f"{phase}_peak_rss_gb"] = (big["peak_rss_mb"] + extra) / 1024 if full_batch else None
    per_token = [r["disk_bytes_per_layer"] / r["tokens"] for r in mine if r["phase"] == "cache_fp"]
    if per_token:
        layer_bytes = per_token[0] * tokens
        stream = tokens * s["hidden"] * 4  # X̂ (and X with `first`) of the latest layer, float32, to resume
        out["disk_all_gb"] = (s["layers"] * layer_bytes + stream) / 1e9
        out["disk_first_gb"] = (layer_bytes * 2 + 2 * stream) / 1e9  # layer 0 in model dtype (fp32 = 2x fp16)
    return out


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def table(projections: list[dict]) -> str:
    def f(x, unit=""):
        return "n/a" if x is None else f"{x:.1f}{unit}"

    lines = ["| model | layers | cache_fp (h) | GPTQ (h) | GPTAQ (h) | VLMQ (h) | peak RSS GPTAQ / VLMQ (GiB) "
             "| disk `all` (GB) | disk `first` (GB) |", "|---|---|---|---|---|---|---|---|---|"]
    for p in projections:
        lines.append(f"| {p['model']} | {p['layers']} | {f(p.get('cache_fp_hours'))} | {f(p.get('gptq_hours'))} | "
                     f"{f(p.get('gptaq_hours'))} | {f(p.get('vlmq_hours'))} | {f(p.get('gptaq_peak_rss_gb'))} / "
                     f"{f(p.get('vlmq_peak_rss_gb'))} | {f(p.get('disk_all_gb'))} | {f(p.get('disk_first_gb'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["7b"], choices=sorted(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[32768])
    ap.add_argument("--methods", nargs="+", default=["gptaq", "vlmq"], choices=["gptq", "gptaq", "vlmq"])
    ap.add_argument("--out", default=str(REPO / "reports/bench/scale.json"))
    ap.add_argument("--append", action="store_true",
                    help="keep --out's rows of other (model, N, phase) and its other runs")
    ap.add_argument("--reproject", action="store_true", help="recompute the projection of --out's rows")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.phase:  # one phase in this (fresh) process
        res = (phase_cache_fp(a.model, a.n, Path(a.work)) if a.phase == "cache_fp"
               else phase_quantize(a.model, a.phase, Path(a.work)))
        print("RESULT " + json.dumps(res), flush=True)
        return
    if a.reproject:
        report = json.loads(Path(a.out).read_text())
        report["projection"] = [project(report["rows"], k) for k in dict.fromkeys(r["model"] for r in report["rows"])]
        _write(Path(a.out), report)
        print(table(report["projection"]))
        return
    rows, t_start = [], time.perf_counter()
    for key in a.models:
        for n in a.tokens:
            with tempfile.TemporaryDirectory(prefix=f"vlmq-scale-{key}-") as work:
                for phase in ["cache_fp", *a.methods]:
                    res = _run_phase(["--phase", phase, "--model", key, "--n", str(n), "--work", work])
                    res.update(model=key, tokens=res.get("tokens", n))
                    rows.append(res)
                    print(f"scale: {SHAPES[key]['name']} N={n} {phase}: {res['seconds']:.1f} s, "
                          f"peak RSS {res['peak_rss_mb']:.0f} MiB", flush=True)
    run = {"command": "benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine(), "seconds_total": time.perf_counter() - t_start,
           "date": time.strftime("%Y-%m-%d"), "commit": _commit()}
    for r in rows:
        r["run"] = run["command"]
    runs = []
    if a.append and Path(a.out).is_file():
        old = json.loads(Path(a.out).read_text())
        new_keys = {(r["model"], r["tokens"], r["phase"]) for r in rows}
        rows = [r for r in old["rows"] if (r["model"], r["tokens"], r["phase"]) not in new_keys] + rows
        runs = [r for r in old.get("runs", []) if r["command"] != run["command"]]
    models = list(dict.fromkeys(r["model"] for r in rows))
    report = {"note": __doc__.split("\n\n")[0], "runs": runs + [run],
              "sequence": {"tokens": SEQ, "image_tokens": IMAGE_TOKENS, "batch": BATCH},
              "rows": rows, "projection": [project(rows, k) for k in models],
              "gpu": "not measured (no GPU lent to this session)"}
    _write(Path(a.out), report)
    print(table(report["projection"]))


def _commit() -> str | None:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip() or None


def _write(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
