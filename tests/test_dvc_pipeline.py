"""`dvc repro` end to end on a tiny configuration, in a throwaway git + DVC repository.

Checks: the whole chain runs; `dvc status` is clean afterwards; a second `dvc repro` runs
nothing; editing only an evaluation parameter re-runs exactly `evaluate` and `report`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def sh(args, cwd, env, check=True):
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r.stdout + r.stderr


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def test_dvc_repro_tiny_chain(tmp_path, tiny_vlm):
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("dvc.yaml", "stages", "pipeline", "vlmq", "benchmarks"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item,
                                                            **({"ignore": shutil.ignore_patterns("__pycache__")} if src.is_dir() else {}))
    shutil.copytree(tiny_vlm["model"], repo / "data" / "demo" / "model")
    params = yaml.safe_load((REPO / "params.yaml").read_text())  # dvc.yaml interpolates its values
    params["demo"]["data"].update(n_train=4, n_calib=8, eval_per_skill=2, grid=4, max_objects=3)
    params["calib"].update(n_samples=4, batch_size=4, max_length=64)
    params["cache"]["dtype"] = "float32"
    params["quant"].update(method="vlmq", bits=3, group_size=64)
    params["eval"].update(limit=4, max_new_tokens=4)
    params["latency"].update(shapes=[[256, 128]], batches=[1], runs=3, warmup=1, decode_tokens=2, decode_runs=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "VLMQ_NO_PREFECT": "1", "PYTHONPATH": str(repo), "DVC_NO_ANALYTICS": "1",
           "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "MPLCONFIGDIR": str(tmp_path / "mpl"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = [sys.executable, "-m", "dvc"]
    sh(["git", "init", "-q"], repo, env)
    sh(dvc + ["init", "-q"], repo, env)
    sh(dvc + ["config", "core.analytics", "false"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "tiny"], repo, env)

    first = sh(dvc + ["repro"], repo, env)
    assert set(ran(first)) == {"demo_data", "prepare_calib", "cache_fp", "quantize", "pack", "latency", "evaluate",
                               "report"}, first[-3000:]
    for f in ("reports/metrics.json", "reports/summary.md", "data/importance/layer_000.parquet",
              "reports/eval/fp/result.json", "reports/eval/vlmq-w3g64/per_question.parquet",
              "data/packed/model.safetensors", "data/packed/vlmq_manifest.json", "reports/latency.json"):
        assert (repo / f).is_file(), f
    assert "up to date" in sh(dvc + ["status"], repo, env)
    assert "## Latency" in (repo / "reports/summary.md").read_text()

    second = sh(dvc + ["repro"], repo, env)
    assert ran(second) == [], second[-2000:]

    params["eval"]["max_new_tokens"] = 5
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    third = sh(dvc + ["repro"], repo, env)
    assert ran(third) == ["evaluate", "report"], third[-3000:]
    assert "up to date" in sh(dvc + ["status"], repo, env)
