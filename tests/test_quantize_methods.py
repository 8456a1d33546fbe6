"""awq, mbq, vlm_ptq, vlmq+vlm_ptq end to end on the tiny Qwen2-VL: the scale folds keep the FP
function, the saved state (incl. folded norms) rebuilds the quantized model, pack restores it."""

from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stages.params import load_params

os.environ["VLMQ_NO_PREFECT"] = "1"

NEW_METHODS = ("awq", "mbq", "vlm_ptq", "vlmq+vlm_ptq")


def write_params(path: Path, tiny_vlm, **quant) -> Path:
    params = {
        "model": {"path": str(tiny_vlm["model"])},
        "calib": {"source": str(tiny_vlm["calib"]), "n_samples": 4, "batch_size": 4, "max_length": 64},
        "cache": {"dtype": "float32"},
        "quant": {"bits": 3, "group_size": 64, "awq": {"grid": 6}, "vlm_ptq": {"grid": 5}, **quant},
    }
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def front(tmp_path_factory, tiny_vlm):
    """prepare_calib + cache_fp once for the module (a working directory of its own)."""
    from stages.cache_fp import cache_fp
    from stages.prepare_calib import prepare_calib

    root = tmp_path_factory.mktemp("methods")
    old = os.getcwd()
    os.chdir(root)
    try:
        p = write_params(root / "params.yaml", tiny_vlm, method="rtn")
        prepare_calib(p)
        cache_fp(p)
    finally:
        os.chdir(old)
    return root


def batches_of(run, l=0):
    from stages.cache_fp import load_layer
    from vlmq.quantize import CalibBatch

    x_fp = load_layer(run.cache_dir, l, run.dtype)
    return [CalibBatch(inputs=c, x_fp=xf, x_hat=xf.clone(), modality=lab["modality"])
            for (c, lab), xf in zip(run.ctx, x_fp)]


@pytest.mark.parametrize("method", ["awq", "mbq"])
def test_scale_fold_keeps_the_fp_function(front, tiny_vlm, monkeypatch, method):
    from stages.quantize import QuantizeRun
    from vlmq.methods.awq import mbq_loss_weights, scale_layer

    monkeypatch.chdir(front)
    run = QuantizeRun(load_params(write_params(front / "params.yaml", tiny_vlm, method=method)),
                      state_dir=front / f"s_{method}")
    batches = batches_of(run)
    layer = copy.deepcopy(run.layers[0])
    with torch.no_grad():
        before = [run.adapter.run_layer(layer, b.x_hat, b.inputs) for b in batches]
    sens = None
    if method == "mbq":
        from vlmq.quantize import layer_importance

        with torch.enable_grad():
            outcome = layer_importance(run.adapter, layer, batches, run.cfg)
        sens = mbq_loss_weights(outcome, batches)
        assert all(set(v) == {"text", "vision"} for v in sens.values())
    info, params = scale_layer(run.adapter, layer, batches, run.cfg, loss_weights=sens)
    assert set(params) == {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.v_proj.bias"}
    assert all(v["alpha"] is not None for v in info.values()) and any(v["alpha"] > 0 for v in info.values())
    norms = {"input_layernorm": "q_proj,k_proj,v_proj", "post_attention_layernorm": "gate_proj,up_proj"}
    for norm, key in norms.items():
        changed = not torch.equal(getattr(layer, norm).weight, getattr(run.layers[0], norm).weight)
        assert changed == (info[key]["alpha"] > 0)
    with torch.no_grad():
        after = [run.adapter.run_layer(layer, b.x_hat, b.inputs) for b in batches]
    for a, b_, c in zip(before, after, batches):
        m = c.inputs.token_mask
        assert (a[m] - b_[m]).abs().max() <= 1e-5 * max(1.0, float(a[m].abs().max()))


def test_gqa_o_proj_has_no_exact_fold(front, tiny_vlm):
    from vlmq.models import load_model
    from vlmq.quantize import SUBSETS

    _, _, adapter = load_model(tiny_vlm["model"])

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = torch.nn.Module()
            self.self_attn.o_proj = torch.nn.Linear(16, 16)
            self.self_attn.v_proj = torch.nn.Linear(16, 8)  # 2 KV heads for 4 query heads

    assert adapter.scale_fold_op(Fake(), SUBSETS[1]) is None
    with pytest.raises(ValueError, match="grouped-query"):
        adapter.fold_input_scales(Fake(), SUBSETS[1], torch.ones(16))


@pytest.mark.parametrize("method", NEW_METHODS)
def test_new_method_end_to_end(front, tiny_vlm, monkeypatch, method):
    from stages.quantize import QuantizeRun
    from vlmq.state import load_fake_quantized_model
    from vlmq.models import load_model

    monkeypatch.chdir(front)
    state = front / f"state_{method.replace('+', '_')}"
    p = write_params(front / "params.yaml", tiny_vlm, method=method)
    run = QuantizeRun(load_params(p), state_dir=state, importance_dir=front / f"imp_{method.replace('+', '_')}",
                      report_dir=front / "reports")
    for l in run.todo():
        record = run.step(l)
        assert "search" in record
    summary = run.finish(0.0)
    assert summary["method"] == method and summary["run"] == f"{method}-w3g64"
    assert summary["precursor"] == {"awq": None, "mbq": None, "vlm_ptq": "gptaq", "vlmq+vlm_ptq": "gptaq"}[method]
    assert summary["importance"] == ("gradient" if method in ("mbq", "vlmq+vlm_ptq") else None)
    done = json.loads((state / "layer_001" / "done.json").read_text())
    if method in ("awq", "mbq"):
        assert all(v["loss"] <= v["loss_rtn"] and v["loss"] == v["loss"] for v in done["search"]["scales"].values())
    else:
        clip = done["search"]["clip"]
        assert len(clip) == 7 and all(0.5 <= v["mean_ratio"] <= 1.0 for v in clip.values())

    fp_model, _, adapter = load_model(tiny_vlm["model"])
    fq, _, _, _ = load_fake_quantized_model(tiny_vlm["model"], state)
    fp_layers, q_layers = adapter.decoder_layers(fp_model), adapter.decoder_layers(fq)
    moved = []
    for l, (mem, loaded, fp) in enumerate(zip(run.layers, q_layers, fp_layers)):
        # the saved state rebuilds exactly what the run holds in memory (folded norms included)
        for key, v in mem.state_dict().items():
            assert torch.allclose(loaded.state_dict()[key], v, rtol=0, atol=1e-6), (l, key)
        for name in adapter.linear_names:
            assert not torch.equal(adapter.get_linear(loaded, name).weight, adapter.get_linear(fp, name).weight)
        t = load_file(str(state / f"layer_{l:03d}" / "solved.safetensors"))
        folded = method in ("awq", "mbq")
        assert ("input_layernorm.weight" in t) == folded
        if folded:
            moved.append(not torch.equal(loaded.input_layernorm.weight, fp.input_layernorm.weight)
                         or not torch.equal(loaded.post_attention_layernorm.weight, fp.post_attention_layernorm.weight))
    assert all(moved) if method in ("awq", "mbq") else not moved  # every layer folded some scales
    # the quantized model runs and its layer outputs are finite
    b = batches_of(run)[0]
    with torch.no_grad():
        h = b.x_hat
        for layer in q_layers:
            h = adapter.run_layer(layer, h, b.inputs)
    assert torch.isfinite(h).all()
    if method == "awq":
        _check_pack(front, tiny_vlm, p, state, fq)


def _check_pack(front, tiny_vlm, p, state, fq):
    """pack restores the folded norms: packed logits == fake-quantized logits (fp16 scales)."""
    from PIL import Image

    from stages.pack import pack
    from vlmq.checkpoint import load_packed
    from vlmq.demo.data import read_rows
    from vlmq.demo.tokenizer import user_prompt
    from vlmq.quant import dequantize

    from vlmq.models import get_adapter

    pack(p, state_dir=state, report=front / "reports" / "pack.json")
    loaded, processor, _ = load_packed("data/packed", backend="dequant")
    adapter = get_adapter(fq)
    for l, layer in enumerate(adapter.decoder_layers(fq)):
        t = load_file(str(state / f"layer_{l:03d}" / "solved.safetensors"))
        for name in adapter.linear_names:
            adapter.set_weight(layer, name, dequantize(t[f"{name}.int_weight"], t[f"{name}.scales"].half().float(),
                                                       t[f"{name}.zeros"], t[f"{name}.g_idx"]))
    rows = read_rows(tiny_vlm["eval"])[:2]
    texts = [processor.apply_chat_template(user_prompt(r["question"]), add_generation_prompt=True, tokenize=False)
             for r in rows]
    inputs = processor(text=texts, images=[Image.open(io.BytesIO(r["image"])).convert("RGB") for r in rows],
                       padding=True, return_tensors="pt")
    with torch.no_grad():
        ref, got = fq(**inputs).logits, loaded(**inputs).logits
    assert float((got - ref).norm() / ref.norm()) < 1e-3


def test_sweep_grid_varies_importance_only_where_it_matters():
    from pipeline.sweep import expand_grid
    from stages.params import parse_params, run_name

    p = parse_params({"sweep": {"methods": ["awq", "mbq", "vlm_ptq", "vlmq+vlm_ptq"], "bits": [3, 2],
                                "importance": ["gradient", "constant"]}})
    names = sorted(run_name(parse_params(c)) for c in expand_grid(p))
    assert names == sorted(["awq-w3g128", "awq-w2g128", "vlm_ptq-w3g128", "vlm_ptq-w2g128",
                            "mbq-w3g128", "mbq-w3g128-constant", "mbq-w2g128", "mbq-w2g128-constant",
                            "vlmq+vlm_ptq-w3g128", "vlmq+vlm_ptq-w3g128-constant",
                            "vlmq+vlm_ptq-w2g128-gptq", "vlmq+vlm_ptq-w2g128-gptq-constant"])


@pytest.mark.parametrize("kw,needle", [
    (dict(method="awq2"), "method='awq2'"),
    (dict(awq_grid=1), "awq_grid=1"),
    (dict(vlm_ptq_target="nearest"), "vlm_ptq_target='nearest'"),
    (dict(vlm_ptq_vision_weight=-0.5), "vlm_ptq_vision_weight=-0.5"),
    (dict(vlm_ptq_grid=0), "vlm_ptq_grid=0"),
    (dict(vlm_ptq_max_shrink=1.0), "vlm_ptq_max_shrink=1.0"),
])
def test_layer_config_names_the_bad_field(kw, needle):
    from vlmq.quantize import LayerQuantConfig

    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("+", r"\+")):
        LayerQuantConfig(**kw)


def test_solver_method_per_method():
    from vlmq.quantize import LayerQuantConfig

    got = {m: LayerQuantConfig(method=m, precursor="gptq").solver_method
           for m in ("awq", "mbq", "vlm_ptq", "vlmq+vlm_ptq", "vlmq", "gptaq")}
    assert got == {"awq": "rtn", "mbq": "rtn", "vlm_ptq": "gptaq", "vlmq+vlm_ptq": "gptq", "vlmq": "gptq",
                   "gptaq": "gptaq"}


def test_sweep_extra_points_add_settings_for_every_method():
    from pipeline.sweep import expand_grid
    from stages.params import parse_params, run_name

    p = parse_params({"sweep": {"methods": ["rtn", "gptq"], "bits": [4], "group_sizes": [128],
                                "extra_points": [{"bits": 3, "group_size": -1}]}})
    cfgs = expand_grid(p)
    got = sorted((c["quant"]["method"], c["quant"]["bits"], c["quant"]["group_size"]) for c in cfgs)
    assert got == [("gptq", 3, -1), ("gptq", 4, 128), ("rtn", 3, -1), ("rtn", 4, 128)]
    assert len({run_name(parse_params(c)) for c in cfgs}) == 4
    with pytest.raises(Exception, match="group_size"):
        parse_params({"sweep": {"extra_points": [{"bits": 3, "group_size": 0}]}})
