"""prepare_calib -> cache_fp -> quantize on a tiny model: artifacts, constant == plain, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

os.environ["VLMQ_NO_PREFECT"] = "1"


def write_params(path: Path, tiny_vlm, **quant) -> Path:
    params = {
        "model": {"path": str(tiny_vlm["model"])},
        "calib": {"source": str(tiny_vlm["calib"]), "n_samples": 6, "batch_size": 4, "max_length": 64},
        "cache": {"dtype": "float32"},
        "quant": {"bits": 3, "group_size": 64, **{k: v for k, v in quant.items() if k != "importance"}},
    }
    if "importance" in quant:
        params["importance"] = quant["importance"]
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_vlm):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_front(workdir, tiny_vlm):
    from stages.cache_fp import cache_fp
    from stages.prepare_calib import prepare_calib

    p = write_params(workdir / "params.yaml", tiny_vlm, method="vlmq")
    s = prepare_calib(p)
    assert s["n_samples"] == 6 and s["vision_token_fraction"] > 0.2
    c = cache_fp(p)
    assert c["n_layers"] == 2 and c["n_batches"] == 2
    return p


def solved(state: Path):
    out = {}
    for d in sorted(state.glob("layer_*")):
        out.update({f"{d.name}/{k}": v for k, v in load_file(str(d / "solved.safetensors")).items()})
    return out


def test_quantize_artifacts_constant_equals_plain_and_resume(workdir, tiny_vlm):
    from stages.quantize import quantize

    run_front(workdir, tiny_vlm)
    # VLMQ with gradient importance: importance Parquet per layer with the documented columns
    p = write_params(workdir / "params.yaml", tiny_vlm, method="vlmq")
    summary = quantize(p)
    assert len(summary["layers"]) == 2
    df = pd.read_parquet("data/importance/layer_000.parquet")
    assert {"layer", "module", "sample_id", "token_index", "segment", "modality", "g", "err_norm"} <= set(df.columns)
    assert set(df["module"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(df["modality"]) == {"text", "vision"} and "image" in set(df["segment"])
    assert (df["rule"] == "rtn_fallback").all()  # layer 0: X_hat == X
    df1 = pd.read_parquet("data/importance/layer_001.parquet")
    assert (df1["rule"] == "gradient").all() and (df1["g"] > 0).all() and df1["g"].notna().all()
    vlmq = solved(Path("data/quantize"))
    from stages.inspect import importance_stats

    text = importance_stats(Path("data/importance"), 1)
    assert "g by module and segment" in text and "image" in text and "vision/text" in text

    # constant importance == plain GPTAQ, bit for bit
    p = write_params(workdir / "params.yaml", tiny_vlm, method="vlmq", importance={"source": "constant"})
    quantize(p)
    const = solved(Path("data/quantize"))
    p = write_params(workdir / "params.yaml", tiny_vlm, method="gptaq")
    quantize(p)
    plain = solved(Path("data/quantize"))
    assert const.keys() == plain.keys()
    assert all(torch.equal(const[k], plain[k]) for k in plain)
    assert any(not torch.equal(vlmq[k], plain[k]) for k in plain if k.endswith("int_weight"))

    # killed while writing layer 1 (its solved weights are on disk, done.json is not), resumed:
    # the result is bit-identical to the uninterrupted run
    import stages.quantize as sq

    real_write_json = sq.write_json

    def dying_write_json(path, obj):
        if str(path).endswith("layer_001/done.json"):
            raise KeyboardInterrupt("killed")
        return real_write_json(path, obj)

    import shutil

    shutil.rmtree("data/quantize")
    sq.write_json = dying_write_json
    try:
        with pytest.raises(KeyboardInterrupt):
            quantize(p)
    finally:
        sq.write_json = real_write_json
    assert (Path("data/quantize/layer_000/done.json")).is_file()
    assert not (Path("data/quantize/layer_001/done.json")).is_file()
    summary = quantize(p)
    resumed = solved(Path("data/quantize"))
    assert all(torch.equal(resumed[k], plain[k]) for k in plain)
    assert [r["layer"] for r in summary["layers"]] == [0, 1]


def test_missing_cache_file_names_layer_and_file(workdir, tiny_vlm):
    from stages.cache_fp import load_layer

    with pytest.raises(FileNotFoundError, match=r"layer 3: .*layer_003\.safetensors"):
        load_layer(workdir / "data/cache", 3)


def test_prepare_calib_skips_corrupt_and_overlong_samples(workdir, tiny_vlm, capfd):
    from stages.prepare_calib import prepare_calib

    df = pd.read_parquet(tiny_vlm["calib"])
    df.at[0, "image"] = {"bytes": b"\x89PNG not really", "path": None}
    df.to_parquet(workdir / "calib_bad.parquet")
    p = write_params(workdir / "params.yaml", tiny_vlm, method="rtn")
    cfg = yaml.safe_load(p.read_text())
    cfg["calib"].update(source=str(workdir / "calib_bad.parquet"), n_samples=len(df))
    p.write_text(yaml.safe_dump(cfg))
    s = prepare_calib(p)
    assert s["skipped"]["corrupt_image"] == 1 and s["n_samples"] == len(df) - 1
    err = capfd.readouterr().err
    assert "row 0 skipped: corrupt image" in err and "'corrupt_image': 1" in err
    # a max length that would cut the vision segment drops the sample (never crashes)
    cfg["calib"]["max_length"] = 12
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(RuntimeError, match="no usable calibration sample"):
        prepare_calib(p)
    # a max length that only cuts the text after the vision segment truncates and keeps the sample
    full = pd.read_parquet("data/calib/calib.parquet")
    last_vision = max(max(i for i, m in enumerate(mods) if m == 1) for mods in full["modality"])
    max_len = last_vision + 2
    assert max_len < full["n_tokens"].min()
    cfg["calib"]["max_length"] = max_len
    p.write_text(yaml.safe_dump(cfg))
    s = prepare_calib(p)
    out = pd.read_parquet("data/calib/calib.parquet")
    assert s["skipped"]["vision_truncated"] == 0 and out["truncated"].all()
    assert (out["n_tokens"] == max_len).all() and out["n_vision"].tolist() == full["n_vision"].tolist()


def test_quantize_flow_two_tasks_per_layer_same_result(workdir, tiny_vlm, prefect_harness, monkeypatch):
    """The Prefect quantize flow runs one importance and one solve task per layer and writes what
    the plain loop writes, bit for bit."""
    from prefect.client.orchestration import get_client

    from pipeline.flows import quantize_flow
    from stages.quantize import quantize

    p = run_front(workdir, tiny_vlm)
    quantize(p)
    plain = solved(Path("data/quantize"))
    import shutil

    shutil.rmtree("data/quantize")
    monkeypatch.setenv("VLMQ_NO_PREFECT", "0")
    quantize_flow(p)
    flowed = solved(Path("data/quantize"))
    assert plain.keys() == flowed.keys() and all(torch.equal(plain[k], flowed[k]) for k in plain)
    with get_client(sync_client=True) as client:
        names = {t.name for t in client.read_task_runs()}
    assert {"layer-000-importance", "layer-000-solve", "layer-001-importance", "layer-001-solve"} <= names
