"""Run one stage as a Prefect flow: what ``dvc.yaml``'s commands call.

    python -m pipeline.run <stage> [the stage's own options, e.g. --params FILE]

``<stage>`` is a module of ``stages/`` (``cache_fp``, ``quantize``, …); its ``main(argv, runner)``
parses the options and hands the stage function to :func:`pipeline.flows.run_stage`, which wraps
it in a Prefect flow (the quantize stage: one task per layer step). ``params.yaml`` (or
``--params``) is validated before Prefect starts, so a bad value is one line, not a flow
failure. ``python -m stages.<stage>`` runs the same function without Prefect.
"""

from __future__ import annotations

import os
import sys
from importlib import import_module

STAGES = ("demo_data", "prepare_calib", "cache_fp", "quantize", "pack", "latency", "evaluate", "report")


def main(argv: list[str] | None = None):
    from stages.common import run_cli, stage_parser
    from stages.params import load_params

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STAGES:
        got = repr(argv[0]) if argv else "nothing"
        print(f"error: pipeline.run: stage must be one of {', '.join(STAGES)} (got {got})", file=sys.stderr)
        raise SystemExit(2)
    stage, rest = argv[0], argv[1:]

    def body(_argv):
        known, _ = stage_parser(None).parse_known_args(rest)
        load_params(known.params)  # validate before any flow starts
        if os.environ.get("VLMQ_NO_PREFECT", "0") == "1":  # plain, without importing Prefect at all
            from stages.common import call as run_stage
        else:
            from pipeline.flows import run_stage

        return import_module(f"stages.{stage}").main(rest, runner=run_stage)

    return run_cli(body, rest)


if __name__ == "__main__":
    main()
