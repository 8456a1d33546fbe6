"""`dvc repro` end to end on a tiny configuration, in a throwaway git + DVC repository.

Checks: the whole chain runs; `dvc status` is clean afterwards; a second `dvc repro` runs
nothing; editing only an evaluation parameter re-runs exactly `evaluate` and `report`; a killed
`quantize` resumes; every `quant.method` the params schema accepts runs through quantize and pack;
`dvc exp run -S`; afterwards `git status` shows only what is meant to be committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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


def make_repo(tmp_path, tiny_vlm):
    """A throwaway git + DVC repository with the project's DAG and a tiny configuration."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("dvc.yaml", ".gitignore", "stages", "pipeline", "vlmq", "benchmarks"):  # .gitignore: dvc.lock must stay committable
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item,
                                                            **({"ignore": shutil.ignore_patterns("__pycache__")} if src.is_dir() else {}))
    for ignore in ("data/.gitignore", "data/demo/.gitignore", "reports/.gitignore"):  # as committed
        (repo / ignore).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / ignore, repo / ignore)
    shutil.copytree(tiny_vlm["model"], repo / "data" / "demo" / "model")
    params = yaml.safe_load((REPO / "params.yaml").read_text())  # dvc.yaml interpolates its values
    params["demo"]["data"].update(n_train=4, n_calib=8, eval_per_skill=2, grid=4, max_objects=3)
    params["calib"].update(n_samples=4, batch_size=4, max_length=64)
    params["cache"]["dtype"] = "float32"
    params["quant"].update(method="vlmq", bits=3, group_size=64)
    params["eval"].update(limit=4, max_new_tokens=4)
    params["latency"].update(shapes=[[256, 128]], batches=[1], runs=3, warmup=1, decode_tokens=2, decode_runs=1,
                             bits=[4], dense_dtypes=["float32"], backends=["auto"])  # the stage runs per repro
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
    return repo, params, env, dvc


def test_dvc_repro_tiny_chain(tmp_path, tiny_vlm):
    repo, params, env, dvc = make_repo(tmp_path, tiny_vlm)
    first = sh(dvc + ["repro"], repo, env)
    assert set(ran(first)) == {"demo_data", "prepare_calib", "cache_fp", "quantize", "pack", "latency", "evaluate",
                               "report"}, first[-3000:]
    for f in ("reports/metrics.json", "reports/summary.md", "data/importance/layer_000.parquet",
              "reports/eval/fp/result.json", "reports/eval/vlmq-w3g64/per_question.parquet",
              "data/packed/model.safetensors", "data/packed/vlmq_manifest.json", "reports/latency.json"):
        assert (repo / f).is_file(), f
    assert "up to date" in sh(dvc + ["status"], repo, env)
    assert "## Latency" in (repo / "reports/summary.md").read_text()
    # the FP cache and the solver state are stored once: in the workspace, not also in .dvc/cache
    in_dvc_cache = {p.parent.name + p.name for p in (repo / ".dvc" / "cache").rglob("*") if p.is_file()}
    for out in ("data/cache", "data/quantize"):
        files = [f for f in (repo / out).rglob("*") if f.is_file()]
        assert files and not {hashlib.md5(f.read_bytes()).hexdigest() for f in files} & in_dvc_cache, out
    assert {hashlib.md5((repo / "data/packed/model.safetensors").read_bytes()).hexdigest()} & in_dvc_cache

    second = sh(dvc + ["repro"], repo, env)
    assert ran(second) == [], second[-2000:]

    params["eval"]["max_new_tokens"] = 5
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    third = sh(dvc + ["repro"], repo, env)
    assert ran(third) == ["evaluate", "report"], third[-3000:]
    assert "up to date" in sh(dvc + ["status"], repo, env)

    # the same chain as one flow without DVC (pipeline.flows), stage by stage in DAG order
    (repo / "reports/summary.md").unlink()
    out = sh([sys.executable, "-m", "pipeline.flows", "--skip", "latency"], repo, env)
    done = re.findall(r"pipeline: (\w+) finished", out)
    assert done == ["prepare_calib", "cache_fp", "quantize", "pack", "evaluate", "report"], out[-3000:]
    assert (repo / "reports/summary.md").is_file()
    r = subprocess.run([sys.executable, "-m", "pipeline.flows", "--skip", "latncy"], cwd=repo, env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "latncy" in r.stderr


def test_killed_repro_resumes(tmp_path, tiny_vlm):
    """SIGKILL `dvc repro` once quantize has finished layer 0; the next `dvc repro` resumes after it and
    gives the same integers as an uninterrupted run. (`dvc exp run -S`: test_every_method_through_dvc.)"""
    import signal
    import time

    from safetensors.torch import load_file

    repo, params, env, dvc = make_repo(tmp_path, tiny_vlm)
    sh(dvc + ["repro", "cache_fp"], repo, env)
    proc = subprocess.Popen(dvc + ["repro", "quantize"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    done0, summary = repo / "data/quantize/layer_000/done.json", repo / "data/quantize/summary.json"
    t0 = time.time()
    while not done0.exists() and proc.poll() is None and time.time() - t0 < 600:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert done0.exists() and not summary.exists(), "the kill must land between layer 0 and the end"
    out = sh(dvc + ["repro", "quantize"], repo, env)
    assert "resuming after 1 finished layer(s)" in out, out[-3000:]
    resumed = {f"{l}/{k}": v for l in (0, 1)
               for k, v in load_file(str(repo / f"data/quantize/layer_{l:03d}/solved.safetensors")).items()}
    shutil.rmtree(repo / "data/quantize")  # an uninterrupted run from scratch
    sh(dvc + ["repro", "quantize"], repo, env)
    fresh = {f"{l}/{k}": v for l in (0, 1)
             for k, v in load_file(str(repo / f"data/quantize/layer_{l:03d}/solved.safetensors")).items()}
    assert resumed.keys() == fresh.keys() and all(torch.equal(resumed[k], fresh[k]) for k in fresh)


# What `dvc repro` leaves for git: the lock file and the outs DVC keeps in git (cache: false).
GIT_OUTS = {"dvc.lock", "reports/pack.json", "reports/latency.json", "reports/summary.md", "reports/summary.csv",
            "reports/metrics.json", "reports/plots/"}


def test_every_method_through_dvc(tmp_path, tiny_vlm):
    """`dvc repro pack` for every quant.method of the schema (each run replaces the last: quantize
    and pack re-run, the importance directory exists for all), then `dvc exp run -S` with a
    non-default method and bit width through the whole chain (the data stages are not re-run);
    `git status` shows only the committed outs."""
    from stages.params import METHODS

    repo, params, env, dvc = make_repo(tmp_path, tiny_vlm)
    assert params["quant"]["method"] == "vlmq"
    for method in ("vlmq",) + tuple(m for m in METHODS if m != "vlmq"):
        params["quant"]["method"] = method
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        out = sh(dvc + ["repro", "pack"], repo, env)
        assert {"quantize", "pack"} <= set(ran(out)), (method, out[-3000:])
        imp = json.loads((repo / "data/importance/summary.json").read_text())
        assert imp["method"] == method
        has_g = bool(sorted((repo / "data/importance").glob("layer_*.parquet")))
        assert has_g == (imp["importance"] is not None) == (method in ("vlmq", "mbq", "vlmq+vlm_ptq")), (method, imp)
        assert json.loads((repo / "reports/pack.json").read_text())["run"].startswith(method + "-")

    params["quant"]["method"] = "vlmq"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    out = sh(dvc + ["exp", "run", "-S", "quant.method=gptq", "-S", "quant.bits=4"], repo, env)
    assert {"quantize", "pack", "evaluate", "report"} <= set(ran(out)) and "demo_data" not in ran(out), out[-3000:]
    q = yaml.safe_load((repo / "params.yaml").read_text())["quant"]
    assert (q["method"], q["bits"]) == ("gptq", 4), q
    assert (repo / "reports/eval/gptq-w4g64/result.json").is_file()
    status = sh(["git", "status", "--porcelain", "--untracked-files=normal"], repo, env)
    changed = {line[3:].strip() for line in status.splitlines() if line.strip()}
    assert changed - {"params.yaml"} <= GIT_OUTS, status
