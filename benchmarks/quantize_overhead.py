"""VLMQ vs its precursor: quantize time and peak RSS on the configured model, one fresh process per run.

    python benchmarks/quantize_overhead.py      # after `dvc repro cache_fp` (needs data/cache)

W3g128 VLMQ vs GPTAQ and W2g128 VLMQ (GPTQ precursor) vs GPTQ, 3 interleaved repetitions, each in
its own process (peak RSS = that process's ru_maxrss). Writes reports/bench/quantize_overhead.json
with every run and the medians.
"""
import json, os, statistics, subprocess, sys, tempfile

import yaml

base = yaml.safe_load(open("params.yaml"))
out = []
for rep in range(3):
    for method, bits, prec in [("gptaq", 3, "gptaq"), ("vlmq", 3, "gptaq"), ("gptq", 2, "gptq"), ("vlmq", 2, "gptq")]:
        p = dict(base); p["quant"] = {**base["quant"], "method": method, "bits": bits, "precursor": prec}
        d = tempfile.mkdtemp(prefix="vlmq-overhead-")
        yaml.safe_dump(p, open(f"{d}/params.yaml", "w"))
        code = ("import json; from pathlib import Path; from stages.quantize import quantize; "
                f"s = quantize('{d}/params.yaml', state_dir=Path('{d}/q'), importance_dir=Path('{d}/i'), report_dir=Path('{d}/r')); "
                "print('RESULT', json.dumps({k: s[k] for k in ('run', 'quantize_seconds', 'peak_rss_mb')}))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "VLMQ_NO_PREFECT": "1"})
        line = [l for l in r.stdout.splitlines() if l.startswith("RESULT")]
        if not line:
            print(r.stderr[-2000:]); sys.exit(1)
        res = json.loads(line[0][7:]); res["rep"] = rep; out.append(res); print(res, flush=True)
med = {}
for r in out:
    med.setdefault(r["run"], []).append(r)
summary = {k: {"median_seconds": statistics.median(x["quantize_seconds"] for x in v),
               "median_peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in v)} for k, v in med.items()}
os.makedirs("reports/bench", exist_ok=True)
tmp = "reports/bench/quantize_overhead.json.tmp"
json.dump({"model": base["model"]["path"], "runs": out, "median": summary}, open(tmp, "w"), indent=1)
os.replace(tmp, "reports/bench/quantize_overhead.json")
print(json.dumps(summary, indent=1))
