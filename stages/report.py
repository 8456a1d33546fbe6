"""Stage ``report``: what happened, as tables and pictures.

Reads every evaluated run (``reports/eval/<run>/result.json`` + ``per_question.parquet``), the
quantize summaries (``reports/quantize/<run>.json``), the importance Parquet and the FP cache, and
writes:

* ``reports/metrics.json`` — ``{"runs": [{method, bits, group_size, precursor, importance,
  accuracy, per_task, answer_nll, kl_to_fp, quantize_seconds, peak_rss_mb}, ...]}`` (FP as
  ``"method": "fp"``), the DVC metrics file;
* ``reports/summary.md`` and ``reports/summary.csv`` — the paper's Table 2 layout per bit width
  (rows FP and each method, columns per task and the average), quantize time and peak memory
  (Table 10 layout), paired comparisons (a method is called better than another only when the
  paired per-question difference is ≥ 2 standard errors, "within noise" otherwise);
* ``reports/plots/*.png`` (+ CSVs for ``dvc plots``): accuracy vs bits per method; token
  importance g by segment/modality per layer (Fig. 3 style); PCA of text vs vision activations
  of one layer from the FP cache (Fig. 2 style).

A missing or corrupt result file fails naming the file: never a silently partial table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from stages.common import atomic_path, call, get_logger, run_cli, stage_parser, stage_timer, write_json

EVAL = Path("reports/eval")
QUANT = Path("reports/quantize")
OUT = Path("reports")
IMPORTANCE = Path("data/importance")
CACHE = Path("data/cache")
BASELINES = ("rtn", "gptq", "gptaq", "awq", "mbq", "vlm_ptq")
RESULT_KEYS = ("accuracy", "per_task", "answer_nll", "kl_to_fp")


class ReportError(RuntimeError):
    """An input of the report is missing or corrupt (the message names the file)."""


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ReportError(f"report: {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReportError(f"report: {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ReportError(f"report: {path} must hold a JSON object")
    return data


def collect_runs(eval_dir: Path = EVAL, quant_dir: Path = QUANT) -> list[dict]:
    """One record per evaluated run; every run directory must be complete."""
    if not eval_dir.is_dir():
        raise ReportError(f"report: {eval_dir} is missing (run the evaluate stage)")
    runs = []
    for d in sorted(p for p in eval_dir.iterdir() if p.is_dir()):
        res = read_json(d / "result.json")
        missing = [k for k in RESULT_KEYS if k not in res]
        if missing:
            raise ReportError(f"report: {d / 'result.json'} lacks {missing}")
        if not (d / "per_question.parquet").is_file():
            raise ReportError(f"report: {d / 'per_question.parquet'} is missing")
        rec = {"run": d.name, "method": "fp", "bits": 16, "group_size": None, "precursor": None,
               "importance": None, "quantize_seconds": None, "peak_rss_mb": None}
        if d.name != "fp":
            q = read_json(quant_dir / f"{d.name}.json")
            rec.update({k: q.get(k) for k in ("method", "bits", "group_size", "precursor", "importance",
                                              "quantize_seconds", "peak_rss_mb")})
        rec.update({k: res[k] for k in RESULT_KEYS})
        runs.append(rec)
    if not runs:
        raise ReportError(f"report: no evaluated run under {eval_dir}")
    return runs


def paired(eval_dir: Path, a: str, b: str, column: str) -> tuple[float, float, int]:
    """Mean and standard error of the per-question difference a − b in ``column``."""
    pa = pd.read_parquet(eval_dir / a / "per_question.parquet")
    pb = pd.read_parquet(eval_dir / b / "per_question.parquet")
    key = [k for k in ("task", "question_id") if k in pa.columns and k in pb.columns]
    m = pa[key + [column]].merge(pb[key + [column]], on=key, suffixes=("_a", "_b"))
    d = (m[f"{column}_a"].astype(float) - m[f"{column}_b"].astype(float)).dropna()
    n = len(d)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return float(d.mean()) if n else float("nan"), se, n


def verdict(mean: float, se: float, lower_is_better: bool) -> str:
    if not math.isfinite(se) or se == 0 or abs(mean) < 2 * se:
        return "within noise"
    better = mean < 0 if lower_is_better else mean > 0
    return "better" if better else "worse"


def fmt(x, pct=False, digits=4):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.{digits}g}"


def task_columns(tasks) -> list[str]:
    """Table-2 column order: the paper's eight benchmarks in ``eval.paper_tasks``' order (the
    robust ScienceQA variant in ScienceQA's place), then any other task alphabetically."""
    from stages.params import PAPER_TASKS

    slot = {t: i for i, t in enumerate(PAPER_TASKS)}
    slot["vlmq_scienceqa_img"] = slot.get("scienceqa_img", len(PAPER_TASKS)) + 0.5
    return sorted(set(tasks), key=lambda t: (slot.get(t, len(PAPER_TASKS) + 1), t))


def tables(runs: list[dict], eval_dir: Path) -> tuple[str, pd.DataFrame]:
    from vlmq.lmms.results import TASK_LABELS

    fp = next((r for r in runs if r["method"] == "fp"), None)
    tasks = task_columns(t for r in runs for t in r["per_task"])
    rows = []
    for r in runs:
        row = {"run": r["run"], "method": r["method"], "bits": r["bits"], "group_size": r["group_size"],
               "precursor": r["precursor"], "importance": r["importance"], "accuracy": r["accuracy"],
               "answer_nll": r["answer_nll"], "kl_to_fp": r["kl_to_fp"],
               "quantize_seconds": r["quantize_seconds"], "peak_rss_mb": r["peak_rss_mb"]}
        row.update({f"task:{t}": r["per_task"].get(t) for t in tasks})
        rows.append(row)
    df = pd.DataFrame(rows)
    md = ["# Summary", ""]
    for bits in sorted({r["bits"] for r in runs if r["method"] != "fp"}):
        group = [r for r in runs if r["bits"] == bits and r["method"] != "fp"]
        md += [f"## W{bits} (accuracy %, answer NLL, KL to FP)", ""]
        head = ["method", "g", *(TASK_LABELS.get(t, t) for t in tasks), "avg", "answer NLL", "KL to FP"]
        md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        shown = ([fp] if fp else []) + group
        lacking = {r["run"]: [t for t in tasks if r["per_task"].get(t) is None] for r in shown}
        for r in shown:
            gs = "–" if r["group_size"] is None else ("ch" if r["group_size"] == -1 else r["group_size"])
            cells = [r["run"], str(gs)] + [fmt(r["per_task"].get(t), pct=True) for t in tasks]
            cells += [fmt(r["accuracy"], pct=True), fmt(r["answer_nll"]), fmt(r["kl_to_fp"])]
            md.append("| " + " | ".join(cells) + " |")
        if any(lacking.values()):  # never a silently partial table: say which cells have no score
            md += ["", "No score (–): " + "; ".join(f"{run}: {', '.join(ts)}" for run, ts in lacking.items() if ts)
                   + ". The avg column averages the tasks each run has."]
        ours = [r for r in group if r["method"].startswith("vlmq")]
        base = [r for r in group if r["method"] in BASELINES]
        if ours and base:
            bo = max(ours, key=lambda r: r["accuracy"])
            bb = max(base, key=lambda r: r["accuracy"])
            md += ["", f"Best VLMQ ({bo['run']}) vs best baseline ({bb['run']}): "
                       f"{100 * (bo['accuracy'] - bb['accuracy']):+.1f} accuracy points."]
            for col, low in (("correct", False), ("kl_to_fp", True), ("answer_nll", True)):
                mean, se, n = paired(eval_dir, bo["run"], bb["run"], col)
                md.append(f"- paired {col}: {mean:+.4g} ± {se:.2g} (SE, n={n}) → {verdict(mean, se, low)}")
        md.append("")
    md += ["## Quantization cost (Table 10 layout)", "", "| run | quantize time (s) | peak RSS (MiB) |", "|---|---|---|"]
    for r in runs:
        if r["method"] != "fp":
            md.append(f"| {r['run']} | {fmt(r['quantize_seconds'])} | {fmt(r['peak_rss_mb'])} |")
    return "\n".join(md) + "\n", df


def importance_by_layer(importance_dir: Path) -> pd.DataFrame:
    files = sorted(importance_dir.glob("layer_*.parquet"))
    parts = []
    for f in files:
        try:
            df = pd.read_parquet(f, columns=["layer", "module", "segment", "modality", "g"])
        except Exception as err:
            raise ReportError(f"report: {f} is not a readable importance Parquet ({err})") from None
        parts.append(df.groupby(["layer", "modality", "segment"], observed=True)["g"].mean().reset_index())
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def plot_all(runs: list[dict], imp: pd.DataFrame, cache_dir: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    # accuracy vs bits per method
    fig, ax = plt.subplots(figsize=(6, 4))
    fp = next((r for r in runs if r["method"] == "fp"), None)
    for method in sorted({r["method"] for r in runs if r["method"] != "fp"}):
        pts = sorted((r["bits"], r["accuracy"]) for r in runs if r["method"] == method)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=method)
    if fp:
        ax.axhline(100 * fp["accuracy"], color="k", ls="--", label="FP")
    ax.set_xticks(sorted({r["bits"] for r in runs if r["method"] != "fp"}))
    ax.set_xlabel("weight bits")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs weight bits")
    ax.legend()
    written.append(_save(fig, out / "accuracy_vs_bits.png"))
    # importance by segment per layer
    if not imp.empty:
        fig, ax = plt.subplots(figsize=(6, 4))
        for seg, part in imp.groupby("segment", observed=True):
            s = part.groupby("layer")["g"].mean()
            ax.plot(s.index, s.values, marker="o", label=str(seg))
        ax.set_yscale("log")
        ax.set_xticks(sorted(imp["layer"].unique()))
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("mean importance g (log)")
        ax.set_title("Token importance g by segment per layer")
        ax.legend()
        written.append(_save(fig, out / "importance_by_segment.png"))
    # PCA of text vs vision activations (FP cache, middle layer)
    pca = pca_points(cache_dir)
    if pca is not None:
        fig, ax = plt.subplots(figsize=(5, 5))
        for mod, color in (("text", "tab:blue"), ("vision", "tab:orange")):
            p = pca[pca["modality"] == mod]
            ax.scatter(p["pc1"], p["pc2"], s=4, alpha=0.5, c=color, label=f"{mod} ({len(p)})")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.set_title(f"FP activations, layer {int(pca['layer'].iloc[0])}: text vs vision")
        ax.legend()
        written.append(_save(fig, out / "pca_text_vision.png"))
    return written


def pca_points(cache_dir: Path, max_points: int = 4000) -> pd.DataFrame | None:
    import torch

    from stages.cache_fp import load_context, load_layer

    summary = cache_dir / "summary.json"
    if not summary.is_file():
        return None
    info = read_json(summary)
    stored = info.get("stored_layers", list(range(info["n_layers"])))  # cache.layers first: layer 0 only
    layer = stored[len(stored) // 2]
    ctx = load_context(cache_dir)
    xs, mods = [], []
    for (c, lab), x in zip(ctx, load_layer(cache_dir, layer, torch.float32)):
        m = c.token_mask
        xs.append(x[m])
        mods.append(lab["modality"][m])
    X = torch.cat(xs)
    mod = torch.cat(mods)
    if X.shape[0] > max_points:
        idx = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))[:max_points]
        X, mod = X[idx], mod[idx]
    Xc = X - X.mean(0)
    _, _, V = torch.pca_lowrank(Xc, q=2, center=False, niter=4)
    P = Xc @ V[:, :2]
    return pd.DataFrame({"layer": layer, "pc1": P[:, 0].numpy(), "pc2": P[:, 1].numpy(),
                         "modality": ["vision" if int(v) == 1 else "text" for v in mod]})


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _ratio(r: dict, key: str, of_medians: float) -> str:
    """A speed-up cell: the paired ratio ``r[key]`` [p10, p90] (reports before it: the ratio of medians)."""
    if key not in r:
        return "–" if math.isnan(of_medians) else f"{of_medians:.2f}x"  # –: no dense FP was timed
    return f"{r[key]:.2f}x [{r[key + '_p10']:.2f}, {r[key + '_p90']:.2f}]"


def latency_tables(latency_file: Path, pack_file: Path) -> str:
    """Markdown tables of ``reports/latency.json`` (and the packed checkpoint's size); empty if absent."""
    md = ""
    if pack_file.is_file():
        p = read_json(pack_file)
        md += (f"\n## Packed checkpoint ({p['run']}, `{p['out_dir']}`, format {p['checkpoint_format']})\n\n"
               f"Weights on disk: {p['packed_weights_bytes'] / 1e6:.2f} MB packed vs {p['fp_weights_bytes'] / 1e6:.2f} MB FP "
               f"(vision tower, embeddings and lm_head stay FP).\n")
    if not latency_file.is_file():
        return md
    lat = read_json(latency_file)
    for key in ("machine", "results"):
        if key not in lat:
            raise ReportError(f"report: {latency_file} lacks '{key}'")
    m = lat["machine"]
    llc = f", LLC {m['llc_bytes'] / 2**20:.0f} MiB" if m.get("llc_bytes") else ""
    md += (f"\n## Latency (paper Table 11 shapes; {m.get('cpu')}, {m.get('torch_threads')} threads, "
           f"memory bandwidth {m.get('memory_bandwidth_gbs')} GB/s{llc}, kernel {m.get('kernel_isa', '?')})\n\n")
    md += ("Median of the timed runs [p10, p90]; M = rows per call; cold = every call reads a weight copy "
           "that is not in cache (rotated copies > the LLC), warm = one copy again and again; floor = bytes "
           "read / measured bandwidth; speed-up vs the fastest dense FP of the same shape, M and cache: the "
           "median of the per-round ratios (the variants of a cell are timed in turns) [p10, p90]. "
           "`auto` runs the path in brackets.\n\n")
    md += ("| shape (in, out) | M | cache | weights | backend | median ms [p10, p90] | floor ms | speed-up |\n"
           "|---|---|---|---|---|---|---|---|\n")
    res = lat["results"]
    key = lambda r: (tuple(r["shape"]), r["batch"], r.get("cache", "warm").replace("cold_partial", "cold"))  # noqa: E731
    best_dense: dict[tuple, float] = {}
    for r in res:
        if r["backend"] == "dense":
            best_dense[key(r)] = min(best_dense.get(key(r), math.inf), r["median_ms"])
    for r in res:
        w = r["dtype_or_bits"] if r["backend"] == "dense" else f"W{r['dtype_or_bits']}g{r['group_size']}"
        b = r["backend"] if r.get("path", r["backend"]) == r["backend"] else f"{r['backend']} ({r['path']})"
        if r["backend"] != "dense" and r.get("act_dtype", "float32") != "float32":
            b += f", x {r['act_dtype']}"
        sp = _ratio(r, "vs_fastest_dense", best_dense.get(key(r), math.nan) / r["median_ms"])  # nan: no dense timed
        md += (f"| ({r['shape'][0]}, {r['shape'][1]}) | {r['batch']} | {r.get('cache', 'warm')} | {w} | {b} | "
               f"{r['median_ms']:.3f} [{r['p10_ms']:.3f}, {r['p90_ms']:.3f}] | {r['floor_ms']:.3f} | {sp} |\n")
    if lat.get("end_to_end"):
        e2e = lat["end_to_end"]
        fp = [r for r in e2e if r["backend"] == "dense"]
        ttft_fp = min(r["ttft_ms"] for r in fp) if fp else math.nan
        dec_fp = max(r["decode_tokens_per_s"] for r in fp) if fp else math.nan
        r0 = e2e[0]
        md += (f"\n### End to end: one image question at batch 1, cold ({r0['prompt_tokens']} prompt tokens, "
               f"{r0['decode_tokens']} decoded tokens)\n\n")
        md += ("Time to first token (the prefill) and decode speed; speed-ups vs the fastest FP dtype "
               "(> 1 = faster): the median of the per-run ratios (the variants run in turns) [p10, p90].\n\n")
        md += ("| weights | backend | TTFT ms [p10, p90] | TTFT speed-up | decode tokens/s | decode speed-up | "
               "disk MB | resident MB |\n|---|---|---|---|---|---|---|---|\n")
        for r in e2e:
            w = r["weights"] if r["backend"] == "dense" else f"W{r['weights']}" + (
                f" ({r['dtype']})" if r.get("dtype", "float32") != "float32" else "")
            md += (f"| {w} | {r['backend']} | {r['ttft_ms']:.1f} [{r['ttft_p10_ms']:.1f}, {r['ttft_p90_ms']:.1f}] | "
                   f"{_ratio(r, 'ttft_vs_fastest_fp', ttft_fp / r['ttft_ms'])} | {r['decode_tokens_per_s']:.1f} | "
                   f"{_ratio(r, 'decode_vs_fastest_fp', r['decode_tokens_per_s'] / dec_fp)} | {r['disk_bytes'] / 1e6:.2f} | "
                   f"{r['resident_bytes'] / 1e6:.2f} |\n")
    return md


def report(eval_dir: str | Path = EVAL, quant_dir: str | Path = QUANT, out_dir: str | Path = OUT,
           importance_dir: str | Path = IMPORTANCE, cache_dir: str | Path = CACHE) -> dict:
    eval_dir, quant_dir, out_dir = Path(eval_dir), Path(quant_dir), Path(out_dir)
    log = get_logger("report")
    with stage_timer(log, "report") as info:
        runs = collect_runs(eval_dir, quant_dir)
        md, df = tables(runs, eval_dir)
        imp = importance_by_layer(Path(importance_dir))
        if not imp.empty:
            piv = imp.groupby(["layer", "modality"], observed=True)["g"].mean().unstack()
            md += "\n## Mean token importance g, vision vs text (paper Fig. 3)\n\n"
            md += "| layer | text | vision | vision / text |\n|---|---|---|---|\n"
            for layer, r in piv.iterrows():
                t, v = r.get("text", float("nan")), r.get("vision", float("nan"))
                md += f"| {layer} | {t:.4g} | {v:.4g} | {v / t:.3g} |\n"
        md += latency_tables(out_dir / "latency.json", out_dir / "pack.json")
        metrics = {"runs": [{k: r[k] for k in ("method", "bits", "group_size", "precursor", "importance",
                                               "accuracy", "per_task", "answer_nll", "kl_to_fp",
                                               "quantize_seconds", "peak_rss_mb")} | {"run": r["run"]}
                            for r in runs]}
        write_json(out_dir / "metrics.json", metrics)
        with atomic_path(out_dir / "summary.md") as tmp:
            tmp.write_text(md)
        with atomic_path(out_dir / "summary.csv") as tmp:
            df.to_csv(tmp, index=False)
        plots = plot_all(runs, imp, Path(cache_dir), out_dir / "plots")
        if not imp.empty:
            with atomic_path(out_dir / "plots" / "importance_by_layer.csv") as tmp:
                imp.to_csv(tmp, index=False)
        info["read"] += [eval_dir, quant_dir, importance_dir, cache_dir]
        info["wrote"] += [out_dir / "metrics.json", out_dir / "summary.md", out_dir / "summary.csv", *plots]
    return metrics


def main(argv: list[str] | None = None, runner=call):
    """The stage's command line; ``runner(name, fn, *args)`` runs the stage function (plain here,
    as a Prefect flow from ``python -m pipeline.run``)."""
    ap = stage_parser(__doc__, params=False)
    ap.parse_args(argv)
    return runner("report", report)


if __name__ == "__main__":
    run_cli(main)
