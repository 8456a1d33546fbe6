"""When does VLMQ's token importance help? A measured study on the demo model.

    python benchmarks/vlmq_study.py curve            # calibration size n ∈ {64, 128, 256, 512}, on val
    python benchmarks/vlmq_study.py grid --n N       # first-layer rule and regularised G at n = N, on val
    python benchmarks/vlmq_study.py eval --n N --w3 RUN --w2 RUN   # the chosen settings, once, on eval
    python benchmarks/vlmq_study.py report           # study.csv, summary.md, study.png from what ran

Every branch quantizes the demo model (``params.yaml`` plus the branch's overrides) on its own FP
cache of the first n calibration samples (``data/study/cache_n{n}``; the calibration order is
fixed by ``calib.seed``, so the sets are nested) and is evaluated on the ``val`` split (settings
are chosen there) or, for the chosen settings only, on ``eval``. Per branch,
``reports/vlmq_study/eval/<split>/<run>/`` holds ``result.json`` and ``per_question.parquet``.

Compared against best(GPTQ, GPTAQ-reference) of the same bits, n and split: the baseline with the
lower mean KL(FP ‖ q); differences are paired per question (mean ± SE); a verdict needs ≥ 2 SE.
The effective sample size of a projection's H̃ is (Σw)²/Σw² over its tokens, w = g'² the weight
a token gets (regularised as configured); ``ess_median`` is the median over the layers ≥ 1 and
q/k/v/o (layer 0 has no gradient signal: X̂ = X).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import yaml

ROOT = Path("data/study")
OUT = Path("reports/vlmq_study")
N_LIST = (64, 128, 256, 512)
SETTINGS = {"w3g128": (3, 128), "w2g128": (2, 128)}
# the regularised / first-layer variants of the grid (importance knobs), on top of the paper's VLMQ
GRID = ({"power": 0.5}, {"power": 0.25}, {"floor": 0.5}, {"floor": 0.9}, {"power": 0.5, "floor": 0.5},
        {"first_layer": "uniform"})
SPLITS = {"val": "data/demo/val.parquet", "eval": "data/demo/eval.parquet"}
SEGMENTS = ("system", "image", "vision_end", "instruction", "answer")


# ----------------------------------------------------------------------------- configurations
def base_params(params_path: str | None) -> dict:
    from stages.params import load_params

    return load_params(params_path).model_dump()


def branch_cfg(base: dict, method: str, setting: str, n: int, gptaq: dict | None = None,
               importance: dict | None = None, precursor: str | None = None) -> dict:
    bits, gs = SETTINGS[setting]
    cfg = copy.deepcopy(base)
    cfg["calib"]["n_samples"] = n
    q = cfg["quant"]
    q.update(method=method, bits=bits, group_size=gs)
    q["precursor"] = precursor or ("gptq" if bits <= 2 else "gptaq")  # the paper's per bit width (App. E)
    q["gptaq"] = {"alpha": 0.25, "update": "reference", **(gptaq or {})}
    cfg["importance"] = {**cfg["importance"], "source": "gradient", "power": 1.0, "floor": 0.0,
                         "first_layer": "rtn_fallback", **(importance or {})}
    return cfg


def branch_name(cfg: dict) -> str:
    from stages.params import parse_params, run_name

    return f"{run_name(parse_params(cfg))}-n{cfg['calib']['n_samples']}"


def curve_branches(base: dict) -> list[dict]:
    out = []
    for n in N_LIST:
        for setting in SETTINGS:
            for method in ("gptq", "gptaq", "vlmq"):
                out.append(branch_cfg(base, method, setting, n))
    return out


def grid_branches(base: dict, n: int) -> list[dict]:
    """At n: GPTAQ's exact update (for comparison), and VLMQ with each knob set of GRID on the
    paper's precursor; at 2 bits also VLMQ on the GPTAQ (reference) precursor, plain and with GRID."""
    out = []
    for setting, (bits, _) in SETTINGS.items():
        out.append(branch_cfg(base, "gptaq", setting, n, gptaq={"alpha": 1.0, "update": "exact"}))
        precursors = ("gptq", "gptaq") if bits <= 2 else ("gptaq",)
        for precursor in precursors:
            if precursor == "gptaq" and bits <= 2:
                out.append(branch_cfg(base, "vlmq", setting, n, precursor=precursor))
            for knobs in GRID:
                out.append(branch_cfg(base, "vlmq", setting, n, importance=knobs, precursor=precursor))
    return out


# ----------------------------------------------------------------------------- running
def write_params(cfg: dict, name: str) -> Path:
    f = ROOT / "params" / f"{name}.yaml"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(yaml.safe_dump(cfg))
    return f


def ensure_cache(base: dict, n: int) -> Path:
    """The FP cache of the first n calibration samples (built once)."""
    from stages.cache_fp import cache_fp
    from stages.prepare_calib import prepare_calib

    cache = ROOT / f"cache_n{n}"
    if (cache / "summary.json").is_file():
        return cache
    cfg = copy.deepcopy(base)
    cfg["calib"]["n_samples"] = n
    p = write_params(cfg, f"calib_n{n}")
    prepare_calib(p, ROOT / f"calib_n{n}")
    cache_fp(p, ROOT / f"calib_n{n}" / "calib.parquet", cache)
    return cache


_FP_LOGPROBS: dict = {}


def run_branch(cfg: dict, split: str) -> dict:
    """Quantize (resumable, shared by the splits) and evaluate one branch on one split."""
    from stages.evaluate import demo_rows, evaluate_run, fp_answer_logprobs
    from stages.params import parse_params
    from stages.quantize import QuantizeRun

    name = branch_name(cfg)
    out_dir = OUT / "eval" / split
    if (out_dir / name / "result.json").is_file():
        return json.loads((out_dir / name / "result.json").read_text())
    n = cfg["calib"]["n_samples"]
    cfg = copy.deepcopy(cfg)
    cfg["eval"]["demo_eval"] = SPLITS[split]
    params = parse_params(cfg)
    d = ROOT / "runs" / name
    t0 = time.perf_counter()
    run = QuantizeRun(params, cache_dir=ensure_cache(cfg, n), state_dir=d / "quantize",
                      importance_dir=d / "importance", report_dir=d / "reports")
    for l in run.todo():
        run.step(l)
    run.finish(time.perf_counter() - t0)
    if split not in _FP_LOGPROBS:
        fp_dir = out_dir / "fp"
        _FP_LOGPROBS[split] = fp_answer_logprobs(params, demo_rows(params))
        if not (fp_dir / "result.json").is_file():
            from stages.evaluate import evaluate

            evaluate(write_params(cfg, f"fp_{split}"), out_dir=out_dir, runs=("fp",))
    res = evaluate_run(params, state_dir=d / "quantize", run=name, out_dir=out_dir, fp_logprobs=_FP_LOGPROBS[split])
    for f in (out_dir / name).glob("samples_*.jsonl"):
        f.unlink()  # lmms-eval's per-sample log: per_question.parquet keeps what the study reads
    print(f"study: {split} {name}: acc {res['accuracy']:.4f} KL {res['kl_to_fp']:.5f} "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return res


# ----------------------------------------------------------------------------- analysis
def paired(a, b) -> tuple[float, float]:
    """Mean and standard error of the paired differences a − b."""
    import numpy as np

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def vision_end_id() -> int:
    from vlmq.models.processor import load_processor

    tok = load_processor(base_params(None)["model"]["path"]).tokenizer
    return int(tok.convert_tokens_to_ids("<|vision_end|>"))


def importance_stats(name: str, imp: dict, n: int, ve_id: int) -> dict:
    """ESS per module (median over layers ≥ 1) and the share of Σw held by each segment and by the
    top 1 % of tokens, w = g'² (the weight in H̃, regularised as configured)."""
    import numpy as np
    import pandas as pd
    import torch

    from vlmq.importance import effective_sample_size, regularise

    files = sorted((ROOT / "runs" / name / "importance").glob("layer_*.parquet"))
    if not files:
        return {}
    calib = pd.read_parquet(ROOT / f"calib_n{n}" / "calib.parquet", columns=["sample_id", "input_ids"])
    ids = {int(s): list(t) for s, t in zip(calib["sample_id"], calib["input_ids"])}
    ess, shares, top1 = {}, {s: [] for s in SEGMENTS}, []
    for f in files:
        df = pd.read_parquet(f)
        layer = int(df["layer"].iloc[0])
        for module, part in df.groupby("module", observed=True):
            g = torch.tensor(part["g"].to_numpy(), dtype=torch.float64)
            w = regularise([g[None]], [torch.ones_like(g)[None]], imp["power"], imp["floor"])[0][0] ** 2
            if layer >= 1:
                ess.setdefault(str(module), []).append(effective_sample_size(w))
                seg = part["segment"].astype(str).to_numpy().copy()
                is_ve = np.array([ids[int(s)][int(t)] == ve_id for s, t in
                                  zip(part["sample_id"], part["token_index"])])
                seg[is_ve] = "vision_end"
                wn = w.numpy()
                total = wn.sum()
                for s in SEGMENTS:
                    shares[s].append(float(wn[seg == s].sum() / total) if total > 0 else 0.0)
                k = max(1, int(math.ceil(0.01 * len(wn))))
                top1.append(float(np.sort(wn)[-k:].sum() / total) if total > 0 else 0.0)
    out = {f"ess_{m}": float(np.median(v)) for m, v in sorted(ess.items())}
    out["ess_median"] = float(np.median([x for v in ess.values() for x in v]))
    out["tokens"] = int(len(part))
    out.update({f"share_{s}": float(np.mean(v)) for s, v in shares.items()})
    out["share_top1pct"] = float(np.mean(top1))
    return out


def collect() -> "pd.DataFrame":
    """One row per (branch, split) that has a result, with the paired comparison to the best baseline."""
    import pandas as pd

    rows = []
    ve_id = vision_end_id()
    for cfg_file in sorted((ROOT / "params").glob("*.yaml")):
        cfg = yaml.safe_load(cfg_file.read_text())
        if cfg_file.stem.startswith(("calib_", "fp_")):
            continue
        name = branch_name(cfg)
        q, imp = cfg["quant"], cfg["importance"]
        for split in SPLITS:
            d = OUT / "eval" / split / name
            if not (d / "result.json").is_file():
                continue
            res = json.loads((d / "result.json").read_text())
            summ = json.loads((ROOT / "runs" / name / "quantize" / "summary.json").read_text())
            row = {"run": name, "method": q["method"], "bits": q["bits"], "group_size": q["group_size"],
                   "n_samples": cfg["calib"]["n_samples"],
                   "precursor": q["precursor"] if q["method"] == "vlmq" else None,
                   "gptaq_update": q["gptaq"]["update"], "gptaq_alpha": q["gptaq"]["alpha"],
                   "importance_power": imp["power"] if q["method"] == "vlmq" else None,
                   "importance_floor": imp["floor"] if q["method"] == "vlmq" else None,
                   "first_layer": imp["first_layer"] if q["method"] == "vlmq" else None,
                   "split": split, "accuracy": res["accuracy"], "kl_to_fp": res["kl_to_fp"],
                   "answer_nll": res["answer_nll"], "quantize_seconds": summ["quantize_seconds"]}
            if q["method"] == "vlmq":
                row.update(importance_stats(name, imp, cfg["calib"]["n_samples"], ve_id))
            rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    # the GPTAQ that runs in the paper's tables: the reference update, alpha 0.25
    is_base = (df["method"] == "gptq") | ((df["method"] == "gptaq") & (df["gptaq_update"] == "reference")
                                          & (df["gptaq_alpha"] == 0.25))
    for col in ("dkl_vs_best_baseline", "dkl_se", "dacc_vs_best_baseline", "dacc_se", "best_baseline"):
        df[col] = None
    pq = {}

    def per_q(r):
        key = (r["split"], r["run"])
        if key not in pq:
            pq[key] = pd.read_parquet(OUT / "eval" / r["split"] / r["run"] / "per_question.parquet")
        return pq[key]

    for (bits, gs, n, split), grp in df.groupby(["bits", "group_size", "n_samples", "split"]):
        base = grp[is_base.loc[grp.index]]
        if base.empty:
            continue
        best = base.loc[base["kl_to_fp"].idxmin()]
        b = per_q(best)
        for i, r in grp.iterrows():
            a = per_q(r)
            if a["question_id"].tolist() != b["question_id"].tolist():
                raise RuntimeError(f"{r['run']} and {best['run']} were scored on other questions")
            df.at[i, "dkl_vs_best_baseline"], df.at[i, "dkl_se"] = paired(a["kl_to_fp"], b["kl_to_fp"])
            df.at[i, "dacc_vs_best_baseline"], df.at[i, "dacc_se"] = paired(a["correct"].astype(float),
                                                                            b["correct"].astype(float))
            df.at[i, "best_baseline"] = best["run"]
    return df


def verdict(d, se) -> str:
    if d is None or se is None or not math.isfinite(se) or se == 0:
        return "–"
    z = d / se
    return "better" if z <= -2 else "worse" if z >= 2 else "within noise"


def plot(df, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paper_precursor = df["bits"].map(lambda b: "gptq" if b <= 2 else "gptaq")
    curve = df[(df["split"] == "val") & ((df["method"] != "vlmq") | ((df["importance_power"] == 1.0)
                                                                     & (df["importance_floor"] == 0.0)
                                                                     & (df["first_layer"] == "rtn_fallback")
                                                                     & (df["precursor"] == paper_precursor)))]
    curve = curve[(curve["gptaq_update"] == "reference") | (curve["method"] == "gptq")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, bits in zip(axes[:2], (3, 2)):
        for method, style in (("gptq", "o-"), ("gptaq", "s-"), ("vlmq", "^-")):
            sub = curve[(curve["bits"] == bits) & (curve["method"] == method)].sort_values("n_samples")
            if sub.empty:
                continue
            se = [0.0 if s is None else s for s in sub["dkl_se"]]
            ax.errorbar(sub["n_samples"], sub["kl_to_fp"], yerr=se, fmt=style, capsize=3,
                        label=method if method != "vlmq" else f"vlmq ({'gptq' if bits <= 2 else 'gptaq'} precursor)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration samples n")
        ax.set_ylabel("mean KL(FP ‖ q), val (bars: paired SE vs best baseline)")
        ax.set_title(f"W{bits}g128")
        ax.legend()
    ax = axes[2]
    sub = curve[(curve["method"] == "vlmq") & (curve["bits"] == 3)].sort_values("n_samples")
    for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if f"ess_{m}" in sub:
            ax.plot(sub["n_samples"], sub[f"ess_{m}"], "o-", label=m)
    if "tokens" in sub:
        ax.plot(sub["n_samples"], sub["tokens"], "k--", label="tokens (ESS if g uniform)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("calibration samples n")
    ax.set_ylabel("effective sample size of H̃ (median over layers ≥ 1)")
    ax.set_title("VLMQ W3g128: ESS of G²")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(x, p=5):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{p}g}" if isinstance(x, float) else str(x)


def summary_md(df) -> str:
    lines = ["# When does VLMQ's token importance help? (demo model)", "",
             "Written by `python benchmarks/vlmq_study.py report`. KL = mean KL(FP ‖ q) of the answer tokens; "
             "Δ vs best(GPTQ, GPTAQ-reference) of the same bits, n and split, paired per question (± SE); "
             "verdict at ≥ 2 SE. ESS = median effective sample size of H̃ over layers ≥ 1 and q/k/v/o.", ""]
    for split in ("eval", "val"):
        sub = df[df["split"] == split]
        if sub.empty:
            continue
        lines += [f"## {split}", "", "| run | n | acc % | KL | ΔKL ± SE | Δacc (pts) ± SE | verdict (KL) | vs | ESS | s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for _, r in sub.sort_values(["bits", "n_samples", "method", "run"], ascending=[False, True, True, True]).iterrows():
            dk, dks = r["dkl_vs_best_baseline"], r["dkl_se"]
            da, das = r["dacc_vs_best_baseline"], r["dacc_se"]
            lines.append(f"| {r['run']} | {r['n_samples']} | {100 * r['accuracy']:.1f} | {fmt(r['kl_to_fp'])} | "
                         f"{fmt(dk, 3)} ± {fmt(dks, 2)} | {fmt(None if da is None else 100 * da, 3)} ± "
                         f"{fmt(None if das is None else 100 * das, 2)} | {verdict(dk, dks)} | {r['best_baseline']} | "
                         f"{fmt(r.get('ess_median'), 4)} | {r['quantize_seconds']:.0f} |")
        lines.append("")
    vl = df[(df["method"] == "vlmq") & df["share_image"].notna()] if "share_image" in df else df.iloc[0:0]
    if not vl.empty:
        lines += ["## Where G² sits (share of Σ g'² over the tokens, mean over layers ≥ 1 and q/k/v/o)", "",
                  "| run | n | " + " | ".join(SEGMENTS) + " | top 1 % of tokens | ESS q / k / v / o | tokens |",
                  "|---|---|" + "---|" * (len(SEGMENTS) + 3)]
        for _, r in vl[vl["split"] == "val"].sort_values(["bits", "n_samples", "run"], ascending=[False, True, True]).iterrows():
            ess = " / ".join(fmt(r.get(f"ess_{m}"), 4) for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
            lines.append(f"| {r['run']} | {r['n_samples']} | " + " | ".join(f"{100 * r[f'share_{s}']:.1f} %" for s in SEGMENTS)
                         + f" | {100 * r['share_top1pct']:.1f} % | {ess} | {r['tokens']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def report() -> None:
    from stages.common import atomic_path, write_json

    df = collect()
    OUT.mkdir(parents=True, exist_ok=True)
    cols = ["method", "bits", "group_size", "n_samples", "gptaq_update", "gptaq_alpha", "importance_power",
            "importance_floor", "first_layer", "split", "accuracy", "kl_to_fp", "answer_nll", "dkl_vs_best_baseline",
            "dkl_se", "dacc_vs_best_baseline", "dacc_se", "ess_median", "quantize_seconds"]
    rest = [c for c in df.columns if c not in cols]
    with atomic_path(OUT / "study.csv") as tmp:
        df[cols + rest].to_csv(tmp, index=False)
    with atomic_path(OUT / "summary.md") as tmp:
        tmp.write_text(summary_md(df))
    plot(df, OUT / "study.png")
    write_json(OUT / "machine.json", {"python": sys.version.split()[0], "written": time.strftime("%Y-%m-%d %H:%M")})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=("curve", "grid", "eval", "report"))
    ap.add_argument("--params", default=None)
    ap.add_argument("--n", type=int, default=None, help="calibration samples of the grid / eval phase")
    ap.add_argument("--w3", default=None, help="eval: the VLMQ run chosen on val at W3g128 (its importance knobs)")
    ap.add_argument("--w2", default=None, help="eval: the VLMQ run chosen on val at W2g128")
    a = ap.parse_args(argv)
    base = base_params(a.params)
    if a.phase == "report":
        report()
        return
    if a.phase == "curve":
        todo = [(c, "val") for c in curve_branches(base)]
    elif a.phase == "grid":
        todo = [(c, "val") for c in grid_branches(base, a.n)]
    else:  # eval: the baselines, the paper's VLMQ and the chosen VLMQ per bit width, at n
        chosen = {"w3g128": a.w3, "w2g128": a.w2}
        todo = []
        for setting in SETTINGS:
            cands = [branch_cfg(base, m, setting, a.n) for m in ("gptq", "gptaq", "vlmq")]
            cands += [c for c in grid_branches(base, a.n) if branch_name(c) == chosen[setting]]
            if chosen[setting] and not any(branch_name(c) == chosen[setting] for c in cands):
                raise SystemExit(f"--{setting[:2]} {chosen[setting]!r} is no branch of the grid at n={a.n}")
            todo += [(c, "eval") for c in cands]
    for cfg, split in todo:
        write_params(cfg, branch_name(cfg))
        run_branch(cfg, split)
    report()


if __name__ == "__main__":
    main()
