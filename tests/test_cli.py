"""Stage command lines: a params, config or input error is one line on stderr and a non-zero exit,
with no traceback unless --debug / VLMQ_DEBUG=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def run(args, tmp_path, **env):
    e = {**os.environ, "PYTHONPATH": str(REPO), "VLMQ_NO_PREFECT": "1", **env}
    e.pop("VLMQ_DEBUG", None) if "VLMQ_DEBUG" not in env else None
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=e, capture_output=True, text=True, timeout=300)


@pytest.fixture
def bad_params(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["quant"]["bits"] = 5
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(params))
    return f


@pytest.mark.parametrize("entry", [["-m", "stages.quantize"], ["-m", "pipeline.run", "quantize"],
                                   ["-m", "stages.cache_fp"]])
def test_bad_param_is_one_line(entry, bad_params, tmp_path):
    r = run([*entry, "--params", str(bad_params)], tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert "quant.bits" in lines[0] and "2, 3, 4 or 8" in lines[0] and str(bad_params) in lines[0]
    assert "Traceback" not in r.stderr


def test_debug_shows_the_traceback(bad_params, tmp_path):
    r = run(["-m", "stages.quantize", "--params", str(bad_params), "--debug"], tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr and "quant.bits" in r.stderr
    r = run(["-m", "stages.quantize", "--params", str(bad_params)], tmp_path, VLMQ_DEBUG="1")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_missing_input_is_one_line(tmp_path):
    """The pack stage without a finished quantize run names the missing file."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(params))
    r = run(["-m", "stages.pack", "--params", str(f)], tmp_path)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "summary.json" in lines[0], r.stderr


def test_unknown_stage(tmp_path):
    r = run(["-m", "pipeline.run", "nosuchstage"], tmp_path)
    assert r.returncode == 2 and "quantize" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("case", ["missing", "no_config", "no_weights"])
def test_bad_model_path_names_model_path(case, tmp_path):
    """An offline user with a wrong model.path gets the key and the path, not a hub lookup error."""
    model = tmp_path / "Qwen2-VL-7B-Instruct"
    if case != "missing":
        model.mkdir()
        (model / "tokenizer.json").write_text("{}")
    if case == "no_weights":
        (model / "config.json").write_text((REPO / "data/demo/model/config.json").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["path"] = str(model)
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(params))
    stages = [["-m", "stages.cache_fp"]] + ([["-m", "stages.quantize"], ["-m", "stages.evaluate", "--runs", "fp"],
                                            ["-m", "stages.latency"]]
                                           if case == "missing" else [])
    for entry in stages:
        r = run([*entry, "--params", str(f)], tmp_path)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert f"model.path: {model}" in lines[0] and "huggingface.co" not in lines[0]
        assert {"missing": "does not exist", "no_config": "config.json is missing",
                "no_weights": "no model weights"}[case] in lines[0]
