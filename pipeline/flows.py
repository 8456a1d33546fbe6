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


def _prefect_enabled() -> bool:
    return os.environ.get("VLMQ_NO_PREFECT", "0") != "1"


def run_stage(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a stage function as a Prefect flow named ``name`` (or plainly, see module doc)."""
    if not _prefect_enabled():
        return fn(*args, **kwargs)
    return flow(name=name, log_prints=True, validate_parameters=False)(fn)(*args, **kwargs)


@flow(name="quantize", log_prints=True, validate_parameters=False)
def quantize_flow(params_path: str | Path | None = None) -> dict:
    """Algorithm 1 over all decoder layers; one task per layer (importance + solve + propagate)."""
    from stages.params import load_params
    from stages.quantize import QuantizeRun

    params = load_params(params_path)
    t0 = time.perf_counter()
    run = QuantizeRun(params)
    for l in run.todo():
        task(run.step, name=f"layer-{l:03d}", task_run_name=f"layer-{l:03d}")(l)
    return run.finish(time.perf_counter() - t0)
