"""sha256 of every solved layer of every sweep branch: a refactor of the layer loop must not change
one bit of the quantized weights.

    python benchmarks/solved_hashes.py --out reports/bench/solved_hashes.json [--root /tmp/hashes]
    python benchmarks/solved_hashes.py --compare before.json after.json

Runs the quantize step of every branch of ``params.yaml``'s sweep grid (no evaluation) on the FP
cache in ``data/cache`` and records, per branch and layer, the sha256 over the solved tensors
(names, dtypes, shapes and bytes in sorted order; the safetensors metadata is left out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path


def tensor_digest(path: Path) -> str:
    import torch
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for key, t in sorted(load_file(str(path)).items()):
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run(params_path: str | None, root: Path, cache: Path) -> dict:
    from pipeline.sweep import expand_grid
    from stages.params import load_params, parse_params, run_name
    from stages.quantize import QuantizeRun

    params = load_params(params_path)
    out = {}
    for cfg in expand_grid(params):
        p = parse_params(cfg)
        name = run_name(p)
        d = root / name
        t0 = time.perf_counter()
        qr = QuantizeRun(p, cache_dir=cache, state_dir=d / "quantize", importance_dir=d / "importance",
                         report_dir=d / "reports")
        for l in qr.todo():
            qr.step(l)
        qr.finish(time.perf_counter() - t0)
        out[name] = {f"layer_{l:03d}": tensor_digest(d / "quantize" / f"layer_{l:03d}" / "solved.safetensors")
                     for l in range(len(qr.layers))}
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return out


def compare(a: dict, b: dict) -> list[str]:
    diffs = []
    for run_ in sorted(set(a) | set(b)):
        if run_ not in a or run_ not in b:
            diffs.append(f"{run_}: only in {'before' if run_ in a else 'after'}")
            continue
        for layer in sorted(set(a[run_]) | set(b[run_])):
            if a[run_].get(layer) != b[run_].get(layer):
                diffs.append(f"{run_} {layer}: {a[run_].get(layer)} != {b[run_].get(layer)}")
    return diffs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None)
    ap.add_argument("--root", type=Path, default=Path("data/hashes"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=Path("data/cache"), help="the FP cache (cache_fp's output)")
    ap.add_argument("--compare", nargs=2, type=Path, default=None, metavar=("BEFORE", "AFTER"))
    a = ap.parse_args(argv)
    if a.compare:
        before, after = (json.loads(p.read_text())["branches"] for p in a.compare)
        diffs = compare(before, after)
        n = sum(len(v) for v in before.values())
        print(f"{len(before)} branches, {n} solved layers: {'identical' if not diffs else f'{len(diffs)} differ'}")
        for d in diffs:
            print("  " + d)
        raise SystemExit(1 if diffs else 0)
    hashes = run(a.params, a.root, a.cache)
    doc = {"branches": hashes}
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
