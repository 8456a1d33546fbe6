"""Prefect flows: every stage command runs as a flow; the quantize flow has one task per layer.

Without a Prefect server, Prefect starts an ephemeral API for the run (state under
``PREFECT_HOME``, kept in the repo's ignored ``.prefect/`` by the Makefile). With a server
running (``prefect server start --host 127.0.0.1 --port 4200`` and
``PREFECT_API_URL=http://127.0.0.1:4200/api``), the runs appear in its UI.

``VLMQ_NO_PREFECT=1`` runs the same stage functions without Prefect (used by unit tests).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from prefect import flow, task
from prefect.cache_policies import NO_CACHE


def _prefect_enabled() -> bool:
    return os.environ.get("VLMQ_NO_PREFECT", "0") != "1"


def run_stage(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a stage function as a Prefect flow named ``name`` (or plainly, see module doc); the
    quantize stage runs as :func:`quantize_flow` (one task per layer step)."""
    if not _prefect_enabled():
        return fn(*args, **kwargs)
    if name == "quantize":
        return quantize_flow(*args, **kwargs)
    return flow(name=name, log_prints=True, validate_parameters=False)(fn)(*args, **kwargs)


@flow(name="quantize", log_prints=True, validate_parameters=False)
def quantize_flow(params_path: str | Path | None = None) -> dict:
    """Algorithm 1 over all decoder layers; one task per layer (importance + solve + propagate)."""
    from stages.params import load_params
    from stages.quantize import QuantizeRun

    params = load_params(params_path)
    t0 = time.perf_counter()
    run = QuantizeRun(params)
    for l in run.todo():  # two tasks per layer: importance (step 1), solve + propagate (steps 2-3)
        work = task(run.importance_step, name="importance", task_run_name=f"layer-{l:03d}-importance",
                    cache_policy=NO_CACHE)(l)
        task(run.solve_step, name="solve", task_run_name=f"layer-{l:03d}-solve", cache_policy=NO_CACHE)(l, work)
    return run.finish(time.perf_counter() - t0)


@flow(name="vlmq-pipeline", log_prints=True, validate_parameters=False)
def pipeline_flow(params_path: str | Path | None = None, skip: tuple[str, ...] = ()) -> dict:
    """The whole chain without DVC, each stage a subflow in DAG order (the same order as
    ``dvc.yaml``): [demo_data →] prepare_calib → cache_fp → quantize → pack → latency → evaluate →
    report. ``demo_data`` runs only when the calibration source or the demo eval file is missing.

    ``python -m pipeline.flows [--skip latency ...]``. Unlike ``dvc repro`` it reruns every stage
    (quantize still resumes finished layers of an unchanged configuration)."""
    from stages.cache_fp import cache_fp
    from stages.demo_data import demo_data
    from stages.evaluate import evaluate
    from stages.latency import latency
    from stages.pack import pack
    from stages.prepare_calib import prepare_calib
    from stages.quantize import quantize
    from stages.report import report

    from stages.params import load_params

    params = load_params(params_path)
    missing = [f for f in (params.calib.source, params.eval.demo_eval) if not Path(f).exists()]
    chain: list[tuple[str, Callable[[], Any]]] = [
        ("demo_data", lambda: run_stage("demo_data", demo_data, params_path)),
        ("prepare_calib", lambda: run_stage("prepare_calib", prepare_calib, params_path)),
        ("cache_fp", lambda: run_stage("cache_fp", cache_fp, params_path)),
        ("quantize", lambda: run_stage("quantize", quantize, params_path)),
        ("pack", lambda: run_stage("pack", pack, params_path)),
        ("latency", lambda: run_stage("latency", latency, params_path)),
        ("evaluate", lambda: run_stage("evaluate", evaluate, params_path)),
        ("report", lambda: run_stage("report", report)),
    ]
    if not missing:
        chain = chain[1:]  # the demo splits are there (or a real model's data is used)
    unknown = set(skip) - {n for n, _ in chain} - {"demo_data"}
    if unknown:
        raise ValueError(f"skip: unknown stage(s) {sorted(unknown)}; stages are {[n for n, _ in chain]}")
    seconds: dict[str, float] = {}
    for name, fn in chain:
        if name in skip:
            continue
        t0 = time.perf_counter()
        fn()
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"pipeline: {name} finished in {seconds[name]} s")
    return seconds


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Run the whole pipeline as one Prefect flow (no DVC).")
    ap.add_argument("--params", default=None)
    ap.add_argument("--skip", nargs="*", default=[], help="stages to leave out, e.g. latency")
    a = ap.parse_args(argv)
    if _prefect_enabled():
        pipeline_flow(a.params, tuple(a.skip))
    else:
        pipeline_flow.fn(a.params, tuple(a.skip))


if __name__ == "__main__":
    main()
