"""The sweep flow fans branches out over a local Dask cluster of 2 workers."""

from __future__ import annotations

import os

import pytest
import yaml

pytestmark = pytest.mark.integration


def test_dask_sweep_runs_branches_in_parallel_workers(tmp_path, monkeypatch, tiny_vlm, prefect_harness):
    from stages.cache_fp import cache_fp
    from stages.prepare_calib import prepare_calib
    from pipeline.sweep import sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLMQ_NO_PREFECT", "1")
    params = {
        "model": {"path": str(tiny_vlm["model"])},
        "calib": {"source": str(tiny_vlm["calib"]), "n_samples": 4, "batch_size": 4, "max_length": 64},
        "cache": {"dtype": "float32"},
        "quant": {"group_size": 64},
        "sweep": {"methods": ["rtn", "gptq"], "bits": [3], "group_sizes": [64], "engine": "dask", "workers": 2},
    }
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    prepare_calib(p)
    cache_fp(p)
    rows = sweep(p, root=tmp_path / "sweep", evaluate=False, reports=tmp_path / "reports")
    assert sorted(r["run"] for r in rows) == ["gptq-w3g64", "rtn-w3g64"]
    assert len({r["worker_pid"] for r in rows}) == 2 and os.getpid() not in {r["worker_pid"] for r in rows}
    for r in rows:
        assert (tmp_path / "sweep" / r["run"] / "quantize" / "summary.json").is_file()
    assert (tmp_path / "reports" / "sweep.csv").read_text().count("\n") == 3
    assert (tmp_path / "reports" / "quantize" / "rtn-w3g64.json").is_file()
