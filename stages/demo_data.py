"""Stage: write the demo visual-QA splits (``train``, ``calib``, ``eval``) as Parquet.

    python -m stages.demo_data

Knobs: ``demo.data`` and ``demo.out_dir`` in params.yaml. Deterministic: the same seed writes
byte-identical files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from stages.params import DemoParams, load_params
from vlmq.demo.data import SceneSpec, build_splits


def scene_spec(p: DemoParams) -> SceneSpec:
    d = p.data
    return SceneSpec(grid=d.grid, cell=d.cell, min_objects=d.min_objects, max_objects=d.max_objects,
                     min_code=d.min_code, max_code=d.max_code, jitter=d.jitter,
                     count_kinds=tuple(d.count_kinds))


def main(params_path: str | Path | None = None) -> None:
    p = load_params(params_path).demo
    t0 = time.time()
    paths = build_splits(Path(p.out_dir), p.data.seed, p.data.n_train, p.data.n_calib, p.data.eval_per_skill,
                         scene_spec(p))
    print(json.dumps({k: str(v) for k, v in paths.items()} | {"seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
