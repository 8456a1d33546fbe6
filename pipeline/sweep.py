"""The sweep flow: a grid of quantize → evaluate branches on Prefect's task runner.

``params.yaml``'s ``sweep`` section lists the grid (methods × (bits × group sizes + extra points)
× importance sources). Every branch quantizes the model into ``data/sweep/<run>/`` (its own state and importance
Parquet) and evaluates it into ``reports/sweep/eval/<run>/``; the results land in one table,
``reports/sweep/sweep.csv``, and the report of all branches in ``reports/sweep/`` (summary.md,
metrics.json, plots). With ``sweep.engine: dask`` (``prefect-dask``) the same branches fan out
over a Dask cluster: a local one with ``sweep.workers`` worker processes by default, or an existing
cluster given by ``sweep.dask_address`` — users outgrowing one machine use Dask's own cluster
tooling, no home-made scheduler.

    .venv/bin/python -m pipeline.sweep            # the grid of params.yaml
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path

from prefect import flow, task

SWEEP_ROOT = Path("data/sweep")
SWEEP_REPORTS = Path("reports/sweep")


def expand_grid(params) -> list[dict]:
    """The branch configurations (plain dicts, picklable for Dask workers)."""
    from stages.params import parse_params, run_name
    from vlmq.methods import get_method

    sw = params.sweep
    base = params.model_dump()
    out, seen = [], set()
    settings = list(itertools.product(sw.bits, sw.group_sizes)) + [(p.bits, p.group_size) for p in sw.extra_points]
    for method, (bits, gs), source in itertools.product(sw.methods, settings, sw.importance):
        if not get_method(method).uses_importance and source != sw.importance[0]:
            continue  # the importance source only matters for the methods that use token importance
        cfg = {**base, "quant": {**base["quant"], "method": method, "bits": bits, "group_size": gs},
               "importance": {**base["importance"], "source": source}}
        if bits <= 2 and sw.gptq_precursor_at_2bit:
            cfg["quant"]["precursor"] = "gptq"  # the paper's ‡ rows (Appendix E)
        name = run_name(parse_params(cfg))
        if name not in seen:
            seen.add(name)
            out.append(cfg)
    for i, extra in enumerate(sw.extra_branches):
        cfg = _merge(base, extra)
        if cfg["quant"]["bits"] <= 2 and sw.gptq_precursor_at_2bit and "precursor" not in extra.get("quant", {}):
            cfg["quant"]["precursor"] = "gptq"
        name = run_name(parse_params(cfg, source=f"sweep.extra_branches[{i}]"))
        if name not in seen:
            seen.add(name)
            out.append(cfg)
    return out


def _merge(base: dict, over: dict) -> dict:
    """``base`` with the nested overrides of ``over`` (a new dict)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def run_branch(cfg: dict, root: str, evaluate: bool = True, reports: str = str(SWEEP_REPORTS),
               fp_logprobs=None) -> dict:
    """One branch: quantize into ``root/<run>/`` (resumable), then evaluate into
    ``reports/eval/<run>/`` (summary json in ``reports/quantize/``). ``fp_logprobs``: the FP
    model's answer log-probs, computed once per sweep (else recomputed per branch)."""
    import torch

    from stages.params import parse_params, run_name
    from stages.quantize import QuantizeRun

    params = parse_params(cfg)
    torch.set_num_threads(params.sweep.torch_threads)  # the results depend on it (README, thread count)
    name = run_name(params)
    d = Path(root) / name
    t0 = time.perf_counter()
    run = QuantizeRun(params, state_dir=d / "quantize", importance_dir=d / "importance",
                      report_dir=Path(reports) / "quantize")
    for l in run.todo():
        run.step(l)
    summary = run.finish(time.perf_counter() - t0)
    row = {"run": name, "method": params.quant.method, "bits": params.quant.bits,
           "group_size": params.quant.group_size, "importance": summary.get("importance"),
           "precursor": summary.get("precursor"), "quantize_seconds": summary["quantize_seconds"],
           "peak_rss_mb": summary["peak_rss_mb"], "worker_pid": os.getpid()}
    if evaluate:
        from stages.evaluate import evaluate_run  # lmms-eval based evaluation of the branch

        res = evaluate_run(params, state_dir=d / "quantize", run=name, out_dir=Path(reports) / "eval",
                           fp_logprobs=fp_logprobs)
        row.update({k: res[k] for k in ("accuracy", "answer_nll", "kl_to_fp") if k in res})
    return row


def _task_runner(params):
    sw = params.sweep
    if sw.engine == "dask":
        from prefect_dask import DaskTaskRunner

        if sw.dask_address:
            return DaskTaskRunner(address=sw.dask_address)
        import dask

        # Dask's default worker environment sets MALLOC_TRIM_THRESHOLD_=65536; glibc then returns
        # freed memory at once and torch's allocations fault pages back in: the demo model's
        # answer-NLL pass ran 1.7x slower that way (18.8 vs 11.0 s, 400 questions, 1 thread)
        threads = str(sw.torch_threads)
        dask.config.set({"distributed.nanny.pre-spawn-environ": {
            "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}})
        return DaskTaskRunner(cluster_kwargs={"n_workers": sw.workers, "threads_per_worker": 1,
                                              "processes": True})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=sw.workers)


def sweep(params_path: str | Path | None = None, root: str | Path = SWEEP_ROOT, evaluate: bool = True,
          reports: str | Path = SWEEP_REPORTS, only: tuple[str, ...] = ()) -> list[dict]:
    """Build the flow with the configured task runner and run it; with ``evaluate``, the FP
    model is evaluated once and ``reports/sweep/`` gets the report of all branches
    (``metrics.json``, ``summary.md``, plots) besides ``sweep.csv``. ``only``: run just these
    branches of the grid (by run name) and replace their rows in an existing ``sweep.csv``."""
    import pandas as pd

    from stages.common import atomic_path
    from stages.evaluate import DEMO_TASK, demo_rows, evaluate_fp, fp_answer_logprobs
    from stages.params import load_params, parse_params, run_name

    params = load_params(params_path)
    configs = expand_grid(params)
    if only:
        names = {run_name(parse_params(c)): c for c in configs}
        missing = sorted(set(only) - set(names))
        if missing:
            raise ValueError(f"sweep --only: {missing} are no branches of the grid; branches: {sorted(names)}")
        configs = [names[n] for n in only]

    @flow(name="sweep", task_runner=_task_runner(params), log_prints=True, validate_parameters=False)
    def sweep_flow() -> list[dict]:
        branch = task(run_branch, name="branch")
        fp_lp = None
        if evaluate and not only:  # before the branches: lmms-eval's task loading is not safe in two threads at once
            # the FP row of the report, and its answer log-probs: the KL reference of every branch
            fp_lp = task(evaluate_fp, name="evaluate-fp")(params, Path(reports) / "eval")
        elif evaluate and DEMO_TASK in params.eval.task_list():
            fp_lp = task(fp_answer_logprobs, name="fp-logprobs")(params, demo_rows(params))
        futures = [branch.with_options(task_run_name=f"branch-{i}").submit(cfg, str(root), evaluate, str(reports),
                                                                           fp_lp)
                   for i, cfg in enumerate(configs)]
        return [f.result() for f in futures]

    rows = sweep_flow()
    table = pd.DataFrame(rows)
    csv = Path(reports) / "sweep.csv"
    if only and csv.is_file():  # keep the other branches' rows, in their order
        old = pd.read_csv(csv)
        table = pd.concat([old[~old["run"].isin(table["run"])], table], ignore_index=True)
    with atomic_path(csv) as tmp:
        table.to_csv(tmp, index=False)
    if evaluate:
        from stages.report import report

        report(Path(reports) / "eval", Path(reports) / "quantize", Path(reports), importance_dir=Path(root) / "none")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run the params.yaml sweep grid")
    ap.add_argument("--params", default=None)
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--only", nargs="+", default=(), help="run just these branches (run names); their rows "
                                                          "replace those in an existing sweep.csv")
    a = ap.parse_args(argv)
    sweep(a.params, evaluate=not a.no_eval, only=tuple(a.only))


if __name__ == "__main__":
    main()
