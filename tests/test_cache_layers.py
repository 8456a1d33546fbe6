"""``cache.layers: first`` (layer 0 on disk, the FP stream carried by the quantize loop) gives
results bit-identical to ``cache.layers: all``, also when the run is resumed half-way."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

os.environ["VLMQ_NO_PREFECT"] = "1"


def _params(path: Path, tiny_vlm, layers: str, method: str) -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_vlm["model"])},
        "calib": {"source": str(tiny_vlm["calib"]), "n_samples": 6, "batch_size": 4, "max_length": 64},
        "cache": {"dtype": "float16", "layers": layers},  # rounded on disk: the stream must round alike
        "quant": {"method": method, "bits": 3, "group_size": 64},
    }))
    return path


def _solved(state: Path) -> dict[str, torch.Tensor]:
    out = {}
    for d in sorted(state.glob("layer_*")):
        out.update({f"{d.name}/{k}": v for k, v in load_file(str(d / "solved.safetensors")).items()})
    return out


@pytest.mark.parametrize("method", ["vlmq", "gptaq"])
def test_first_layer_cache_is_bit_identical_to_all(tmp_path, monkeypatch, tiny_vlm, method):
    from stages.cache_fp import cache_fp
    from stages.params import load_params
    from stages.prepare_calib import prepare_calib
    from stages.quantize import QuantizeRun, quantize

    monkeypatch.chdir(tmp_path)
    out = {}
    for layers in ("all", "first"):
        p = _params(tmp_path / f"params_{layers}.yaml", tiny_vlm, layers, method)
        prepare_calib(p, out_dir=tmp_path / "calib")
        summary = cache_fp(p, calib_path=tmp_path / "calib" / "calib.parquet", out_dir=tmp_path / f"cache_{layers}")
        stored = sorted(f.name for f in (tmp_path / f"cache_{layers}").glob("layer_*.safetensors"))
        assert summary["layers"] == layers
        assert stored == (["layer_000.safetensors"] if layers == "first" else
                          ["layer_000.safetensors", "layer_001.safetensors"])
        dirs = {"cache_dir": tmp_path / f"cache_{layers}", "state_dir": tmp_path / f"state_{layers}",
                "importance_dir": tmp_path / f"imp_{layers}", "report_dir": tmp_path / f"rep_{layers}"}
        quantize(p, **dirs)
        out[layers] = dirs
        if layers == "first":  # resumed after layer 0: the FP stream comes back from x_fp.safetensors
            resume = {**dirs, "state_dir": tmp_path / "state_resume", "importance_dir": tmp_path / "imp_resume"}
            run = QuantizeRun(load_params(p), **resume)
            run.step(0)
            assert (resume["state_dir"] / "layer_000" / "x_fp.safetensors").is_file()
            del run
            run = QuantizeRun(load_params(p), **resume)
            assert run.start == 1
            for l in run.todo():
                run.step(l)
            run.finish(0.0)
            out["resume"] = resume

    ref = _solved(out["all"]["state_dir"])
    assert ref
    for other in ("first", "resume"):
        got = _solved(out[other]["state_dir"])
        assert sorted(got) == sorted(ref)
        for k in ref:
            assert torch.equal(got[k], ref[k]), f"{other}: {k} differs from cache.layers=all"
        last = load_file(str(out[other]["state_dir"] / "layer_001" / "x_hat.safetensors"))
        last_ref = load_file(str(out["all"]["state_dir"] / "layer_001" / "x_hat.safetensors"))
        assert all(torch.equal(last[k], last_ref[k]) for k in last_ref)
        if method == "vlmq":  # the token importance, computed from the FP stream, is the same too
            for f in sorted(out["all"]["importance_dir"].glob("layer_*.parquet")):
                pd.testing.assert_frame_equal(pd.read_parquet(out[other]["importance_dir"] / f.name),
                                              pd.read_parquet(f))
