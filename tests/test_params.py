"""params.yaml: one typed schema; typos and bad values fail naming the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.params import ParamsError, load_params, run_name

REPO = Path(__file__).resolve().parents[1]


def test_shipped_params_are_valid():
    p = load_params(REPO / "params.yaml")
    assert p.quant.method in ("rtn", "gptq", "gptaq", "vlmq")


def write(tmp_path, data) -> Path:
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(data))
    return f


def test_typo_key_is_named(tmp_path):
    with pytest.raises(ParamsError) as e:
        load_params(write(tmp_path, {"quant": {"bitz": 3}}))
    assert "quant.bitz: unknown key" in str(e.value) and "params.yaml" in str(e.value)


def test_bad_value_names_key_and_allowed_values(tmp_path):
    with pytest.raises(ParamsError) as e:
        load_params(write(tmp_path, {"quant": {"bits": 5}}))
    msg = str(e.value)
    assert "quant.bits" in msg and "2, 3, 4 or 8" in msg and "5" in msg
    with pytest.raises(ParamsError, match="quant.group_size"):
        load_params(write(tmp_path, {"quant": {"group_size": 0}}))
    with pytest.raises(ParamsError, match="importance.source"):
        load_params(write(tmp_path, {"importance": {"source": "magic"}}))
    # the latency knobs of issue 23
    for bad, key in (({"batches": [16, 0]}, "latency.batches.1"), ({"batches": []}, "latency.batches"),
                     ({"cache": ["hot"]}, "latency.cache.0"), ({"prefill_from": 0}, "latency.prefill_from"),
                     ({"backends": ["cpu_magic"]}, "latency.backends.0"),
                     ({"sweep": {"batches": [-4]}}, "latency.sweep.batches.0"),
                     ({"group_size": 0}, "latency.group_size"), ({"shapes": [[3584, 0]]}, "latency.shapes.0.1"),
                     ({"shapes": []}, "latency.shapes"), ({"bits": []}, "latency.bits"), ({"cache": []}, "latency.cache"),
                     ({"threads": 0}, "latency.threads")):
        with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
            load_params(write(tmp_path, {"latency": bad}))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("quant: [1, 2")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_run_names(tmp_path):
    assert run_name(load_params(write(tmp_path, {"quant": {"method": "gptq", "bits": 2, "group_size": -1}}))) == "gptq-w2c"
    p = load_params(write(tmp_path, {"quant": {"method": "vlmq", "precursor": "gptq"}, "importance": {"source": "random"}}))
    assert run_name(p) == "vlmq-w3g128-gptq-random-li0.5-dw0.1"
    # every ablation axis gets its own name (branches of a sweep never overwrite each other)
    names = {run_name(load_params(write(tmp_path, {"importance": imp}))) for imp in
             [{}, {"granularity": "layer"}, {"granularity": "network"}, {"breakpoint": "o_proj_in"},
              {"norm": "l2"}, {"enhance": ["q_proj", "k_proj", "v_proj"]}, {"source": "fastv"}, {"source": "pact"},
              {"source": "random", "li_ratio": 0.25}, {"source": "random", "down_weight": 0.5}]}
    assert len(names) == 10 and "vlmq-w3g128" in names and "vlmq-w3g128-enh_qkv" in names


def test_new_method_knobs_and_run_names(tmp_path):
    p = load_params(write(tmp_path, {"quant": {"method": "vlmq+vlm_ptq", "vlm_ptq": {"target": "uncorrected"}}}))
    assert p.quant.vlm_ptq.target == "uncorrected" and p.quant.awq.grid == 20
    assert run_name(p) == "vlmq+vlm_ptq-w3g128-uncorrected"
    assert run_name(load_params(write(tmp_path, {"quant": {"method": "awq", "precursor": "gptq"}}))) == "awq-w3g128"
    p = load_params(write(tmp_path, {"quant": {"method": "mbq"}, "importance": {"source": "constant"}}))
    assert run_name(p) == "mbq-w3g128-constant"
    for bad, key in [({"awq": {"grid": 1}}, "quant.awq.grid"), ({"vlm_ptq": {"max_shrink": 1.0}}, "quant.vlm_ptq.max_shrink"),
                     ({"vlm_ptq": {"target": "nearest"}}, "quant.vlm_ptq.target"),
                     ({"vlm_ptq": {"vision_weight": -1}}, "quant.vlm_ptq.vision_weight"),
                     ({"vlm_ptq": {"gird": 3}}, "quant.vlm_ptq.gird: unknown key"), ({"method": "awq2"}, "quant.method")]:
        with pytest.raises(ParamsError, match=key):
            load_params(write(tmp_path, {"quant": bad}))


def test_demo_layer_knobs_checked_against_the_model(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["demo"]["train"]["attn_layer"] = 0
    p = tmp_path / "params.yaml"
    raw["demo"]["train"]["route_weight"] = 0.0      # no routing: layer 0 is a valid attn_layer
    p.write_text(yaml.safe_dump(raw))
    assert load_params(p).demo.train.attn_layer == 0
    raw["demo"]["train"]["route_weight"] = 1.0      # routing supervises the layer before attn_layer
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match="route_weight"):
        load_params(p)
    raw["demo"]["train"]["attn_layer"] = raw["demo"]["model"]["num_layers"] - 1
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match="attn_layer"):
        load_params(p)
