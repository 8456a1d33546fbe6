"""Stage ``latency``: the kernel-backed latency benchmark (``benchmarks/latency.py``) as a DVC stage.

    python -m stages.latency

Writes ``latency.out`` (default ``reports/latency.json``); the report stage turns it into tables.
"""

from __future__ import annotations


from stages.common import call, get_logger, model_path, run_cli, stage_parser, stage_timer
from stages.params import load_params


def latency(params_path=None) -> dict:
    from benchmarks.latency import run_benchmark

    model_path(load_params(params_path))  # the decode benchmark loads it after minutes of shapes
    log = get_logger("latency")
    with stage_timer(log, "latency"):
        return run_benchmark(params_path, log=log.info)


def main(argv: list[str] | None = None, runner=call):
    """The stage's command line; ``runner(name, fn, *args)`` runs the stage function (plain here,
    as a Prefect flow from ``python -m pipeline.run``)."""
    ap = stage_parser(__doc__)
    a = ap.parse_args(argv)
    return runner("latency", latency, a.params)


if __name__ == "__main__":
    run_cli(main)
