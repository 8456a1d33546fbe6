"""Stage ``latency``: the kernel-backed latency benchmark (``benchmarks/latency.py``) as a DVC stage.

    python -m stages.latency

Writes ``latency.out`` (default ``reports/latency.json``); the report stage turns it into tables.
"""

from __future__ import annotations

import argparse

from stages.common import get_logger, stage_timer


def latency(params_path=None) -> dict:
    from benchmarks.latency import run_benchmark

    log = get_logger("latency")
    with stage_timer(log, "latency"):
        return run_benchmark(params_path, log=log.info)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None)
    a = ap.parse_args(argv)
    from pipeline.flows import run_stage

    run_stage("latency", latency, a.params)


if __name__ == "__main__":
    main()
