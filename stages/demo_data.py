"""Stage: write the demo visual-QA splits (``train``, ``calib``, ``eval``, ``val``) as Parquet.

    python -m stages.demo_data

Knobs: ``demo.data`` and ``demo.out_dir`` in params.yaml. Deterministic: the same seed writes
byte-identical files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from stages.common import call, run_cli, stage_parser
from stages.params import DemoParams, load_params
from vlmq.demo.data import SceneSpec, build_splits


def scene_spec(p: DemoParams) -> SceneSpec:
    d = p.data
    return SceneSpec(grid=d.grid, cell=d.cell, min_objects=d.min_objects, max_objects=d.max_objects,
                     min_code=d.min_code, max_code=d.max_code, jitter=d.jitter,
                     count_kinds=tuple(d.count_kinds))


def demo_data(params_path: str | Path | None = None) -> dict:
    p = load_params(params_path).demo
    t0 = time.time()
    paths = build_splits(Path(p.out_dir), p.data.seed, p.data.n_train, p.data.n_calib, p.data.eval_per_skill,
                         scene_spec(p), val_per_skill=p.data.val_per_skill)
    out = {k: str(v) for k, v in paths.items()} | {"seconds": round(time.time() - t0, 1)}
    print(json.dumps(out))
    return out


def main(argv: list[str] | None = None, runner=call):
    """The stage's command line; ``runner(name, fn, *args)`` runs the stage function (plain here,
    as a Prefect flow from ``python -m pipeline.run``)."""
    a = stage_parser(__doc__).parse_args(argv)
    return runner("demo_data", demo_data, a.params)


if __name__ == "__main__":
    run_cli(main)
