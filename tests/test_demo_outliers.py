"""Planted outlier channels (vlmq.demo.outliers): exact reparametrisation, and what RTN sees."""

from __future__ import annotations

import pytest
import torch

from vlmq.demo.outliers import SITES, plant_outlier_channels
from vlmq.quant import fake_quant_rtn


def _model(seed: int):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [8, 12, 12]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=128, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=90, video_token_id=91, vision_start_token_id=92, vision_end_token_id=93)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).double().eval()
    with torch.no_grad():  # non-trivial norm gains and biases, as a trained model has
        for name, p in model.model.language_model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("sites", [tuple(SITES), ("qkv",), ("o", "down")])
def test_planting_keeps_the_fp_function_in_float64(sites) -> None:
    seed = int(torch.randint(0, 10_000, ()).item())
    model = _model(seed)
    ids = torch.randint(0, 90, (2, 17), generator=torch.Generator().manual_seed(seed))
    before = _logits(model, ids)
    w_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec = plant_outlier_channels(model, channels=3, scale=20.0, sites=sites, seed=seed)
    after = _logits(model, ids)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, w_before[n])}
    assert changed, "nothing was planted"
    assert not any("visual" in n or "embed" in n or "lm_head" in n for n in changed)
    layer0 = model.model.language_model.layers[0]
    for site in sites:
        idx = rec["layers"][0][site]
        assert len(idx) == 3
        lin_name = SITES[site][0]
        w_new = layer0.get_submodule(lin_name).weight
        w_old = w_before[f"model.language_model.layers.0.{lin_name}.weight"]
        torch.testing.assert_close(w_new[:, idx], w_old[:, idx] * 20.0, rtol=1e-12, atol=0)
        rest = [c for c in range(w_new.shape[1]) if c not in idx]
        assert torch.equal(w_new[:, rest], w_old[:, rest])
    if "qkv" in sites and "gate_up" in sites:  # the residual stream's outlier channels are shared
        assert all(lay["qkv"] == lay["gate_up"] == rec["layers"][0]["qkv"] for lay in rec["layers"])
        torch.testing.assert_close(layer0.input_layernorm.weight[rec["layers"][0]["qkv"]],
                                   w_before["model.language_model.layers.0.input_layernorm.weight"][rec["layers"][0]["qkv"]] / 20.0)


def test_outlier_columns_raise_the_rtn_output_error() -> None:
    """A ``scale``-times larger column sets its (row, group) range, so the other weights of the group
    are rounded on a coarser grid: RTN's output error ‖(Q(W) − W) x‖ grows with the scale while the
    FP product is unchanged; GPTQ-style error feedback is not needed to see it."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ()).item()))
    n, out, k = 256, 512, 4
    W = torch.randn(out, n, generator=g, dtype=torch.float64)
    X = torch.randn(n, 4096, generator=g, dtype=torch.float64)
    idx = torch.randperm(n, generator=g)[:k]
    errors = []
    for s in (1.0, 4.0, 8.0):
        scale = torch.ones(n, dtype=torch.float64)
        scale[idx] = s
        W2, X2 = W * scale, X / scale[:, None]
        torch.testing.assert_close(W2 @ X2, W @ X)
        errors.append(float(((fake_quant_rtn(W2, 3, 128) - W2) @ X2).pow(2).sum()))
        # the step of every (row, group) holding a planted column is at least its range / (2^3 - 1)
        if s > 1:
            for c in idx.tolist():
                grp = slice(128 * (c // 128), 128 * (c // 128 + 1))
                rng_ = W2[:, grp].amax(1) - W2[:, grp].amin(1)
                assert torch.all(rng_ >= W2[:, c].abs() - 1e-12)
    assert errors[0] < errors[1] < errors[2]
    assert errors[2] > 3 * errors[0]  # measured ~5.9x for k=4, s=8 at 3 bits (Gaussian W)


def test_bad_arguments_are_named() -> None:
    model = _model(0)
    with pytest.raises(ValueError, match="unknown outlier site"):
        plant_outlier_channels(model, 2, 8.0, sites=("qkv", "mlp"))
    with pytest.raises(ValueError, match="cannot choose 999"):
        plant_outlier_channels(model, 999, 8.0)
    with pytest.raises(ValueError, match="scale must be > 0"):
        plant_outlier_channels(model, 2, 0.0)
    rec = plant_outlier_channels(model, 0, 8.0)
    assert rec["layers"] == []


def test_stage_replants_a_trained_model_exactly(tiny_vlm, tmp_path) -> None:
    """``stages.demo_model --from-trained``: same FP logits, record of the planted channels, and a
    second planting on top of the first is refused (naming the directory)."""
    import json
    import shutil

    import yaml
    from transformers import Qwen2VLForConditionalGeneration

    from stages import demo_model
    from vlmq.demo import evaluate as ev
    from vlmq.demo.data import read_rows

    src = tmp_path / "trained"
    shutil.copytree(tiny_vlm["model"], src)
    (src / "demo_train.json").write_text(json.dumps({"seconds": 1.0, "log": ["step 1"], "total_seconds": 2.0,
                                                     "weights_sha256": "abc"}))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"demo": {"out_dir": str(tmp_path / "out"),
                                               "outliers": {"channels": 3, "scale": 8.0, "seed": 1}}}))
    demo_model.main(["--from-trained", str(src), "--params", str(params)])
    out = tmp_path / "out" / "model"
    rec = json.loads((out / "demo_train.json").read_text())
    assert rec["outliers"]["channels"] == 3 and rec["outliers"]["scale"] == 8.0
    assert rec["from_trained"]["weights_sha256"] == "abc" and rec["log"] == ["step 1"]
    assert rec["weights_sha256"] == demo_model.weights_sha256(out) != "abc"
    a = Qwen2VLForConditionalGeneration.from_pretrained(src).eval()
    b, processor = ev.load_demo_model(str(out))
    c = rec["outliers"]["layers"][0]["qkv"]
    torch.testing.assert_close(b.model.language_model.layers[0].self_attn.q_proj.weight[:, c],
                               a.model.language_model.layers[0].self_attn.q_proj.weight[:, c] * 8.0)
    rows = read_rows(tiny_vlm["eval"])[:3]
    la = ev.answer_logprobs(a, processor, rows, 3)
    lb = ev.answer_logprobs(b, processor, rows, 3)
    for (lp_a, t_a), (lp_b, t_b) in zip(la, lb):
        assert torch.equal(t_a, t_b)
        torch.testing.assert_close(lp_b, lp_a, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="already planted"):
        demo_model.main(["--from-trained", str(out), "--params", str(params)])
