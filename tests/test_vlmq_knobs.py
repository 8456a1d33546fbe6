"""The GPTAQ and importance knobs of params.yaml through the whole quantize stage, and the
regularised importance against its closed form."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stages.params import load_params

os.environ["VLMQ_NO_PREFECT"] = "1"


def write_params(path, tiny_vlm, quant=None, importance=None):
    params = {
        "model": {"path": str(tiny_vlm["model"])},
        "calib": {"source": str(tiny_vlm["calib"]), "n_samples": 4, "batch_size": 4, "max_length": 64},
        "cache": {"dtype": "float32"},
        "quant": {"bits": 3, "group_size": 64, **(quant or {})},
        "importance": importance or {},
    }
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def front(tmp_path_factory, tiny_vlm):
    from stages.cache_fp import cache_fp
    from stages.prepare_calib import prepare_calib

    root = tmp_path_factory.mktemp("knobs")
    old = os.getcwd()
    os.chdir(root)
    try:
        p = write_params(root / "params.yaml", tiny_vlm)
        prepare_calib(p)
        cache_fp(p)
    finally:
        os.chdir(old)
    return root


def solve_all(front, tiny_vlm, name, quant=None, importance=None):
    """The quantize stage on the tiny model: every layer's solved tensors, and the run's g."""
    import pandas as pd

    from stages.quantize import QuantizeRun

    params = load_params(write_params(front / f"{name}.yaml", tiny_vlm, quant, importance))
    run = QuantizeRun(params, cache_dir=front / "data/cache", state_dir=front / name / "q",
                      importance_dir=front / name / "imp", report_dir=front / name / "r")
    for l in run.todo():
        run.step(l)
    run.finish(0.0)
    solved = {f"{l}/{k}": v for l in range(len(run.layers))
              for k, v in load_file(str(front / name / "q" / f"layer_{l:03d}" / "solved.safetensors")).items()}
    imp = sorted((front / name / "imp").glob("layer_*.parquet"))
    return solved, (pd.concat([pd.read_parquet(f) for f in imp]) if imp else None)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gptaq_alpha_zero_is_gptq_through_the_stage(front, tiny_vlm):
    gptq, _ = solve_all(front, tiny_vlm, "gptq", {"method": "gptq"})
    for update in ("reference", "exact"):
        a0, _ = solve_all(front, tiny_vlm, f"gptaq0_{update}", {"method": "gptaq", "gptaq": {"alpha": 0.0, "update": update}})
        assert same(a0, gptq), update
    ref, _ = solve_all(front, tiny_vlm, "gptaq_ref", {"method": "gptaq"})
    exact, _ = solve_all(front, tiny_vlm, "gptaq_exact", {"method": "gptaq", "gptaq": {"alpha": 1.0, "update": "exact"}})
    assert not same(ref, gptq) and not same(ref, exact)


def test_importance_knobs(front, tiny_vlm):
    quant = {"method": "vlmq", "precursor": "gptq"}
    paper, g_paper = solve_all(front, tiny_vlm, "vlmq", quant)
    # layer 0 has X^ = X: rtn_fallback gives a gradient g there, uniform gives g = 1
    assert set(g_paper[g_paper["layer"] == 0]["rule"]) == {"rtn_fallback"}
    uni, g_uni = solve_all(front, tiny_vlm, "vlmq_uniform", quant, {"first_layer": "uniform"})
    l0 = g_uni[g_uni["layer"] == 0]
    assert set(l0["rule"]) == {"uniform"} and (l0["g"] == 1.0).all()
    assert set(g_uni[g_uni["layer"] == 1]["rule"]) == set(g_paper[g_paper["layer"] == 1]["rule"])
    # layer 0 solved with g = 1 on every projection is the plain precursor there
    gptq, _ = solve_all(front, tiny_vlm, "gptq_for_vlmq", {"method": "gptq"})
    assert all(torch.equal(uni[k], gptq[k]) for k in uni if k.startswith("0/"))
    # power 0 with no floor: every token weighs the same, i.e. the plain precursor everywhere
    p0, _ = solve_all(front, tiny_vlm, "vlmq_p0", quant, {"power": 0.0})
    assert same(p0, gptq)
    fl, _ = solve_all(front, tiny_vlm, "vlmq_floor", quant, {"floor": 0.5})
    assert not same(fl, paper) and not same(fl, gptq)


def test_regularise_closed_form():
    from vlmq.importance import effective_sample_size, regularise

    gen = torch.Generator().manual_seed(7)
    g = [torch.rand(2, 5, generator=gen, dtype=torch.float64) * 4, torch.rand(3, 5, generator=gen, dtype=torch.float64)]
    m = [torch.rand(2, 5, generator=gen) > 0.3, torch.rand(3, 5, generator=gen) > 0.3]
    for power, floor in ((1.0, 0.0), (0.5, 0.0), (1.0, 0.4), (0.25, 0.9), (0.0, 0.0)):
        out = regularise(g, [x.double() for x in m], power, floor)
        vals = torch.cat([gb[mb] for gb, mb in zip(g, m)]) ** (2 * power)
        mean = vals.mean()
        for gb, mb, ob in zip(g, m, out):
            want = ((1 - floor) * gb ** (2 * power) / mean + floor).sqrt() * mb
            assert torch.allclose(ob, want, rtol=1e-12, atol=0)
            assert (ob[~mb] == 0).all()
    # the weight w = g'^2 has mean 1 over the real tokens for every setting
    out = regularise(g, [x.double() for x in m], 0.5, 0.3)
    w = torch.cat([ob[mb] for ob, mb in zip(out, m)]) ** 2
    assert abs(float(w.mean()) - 1.0) < 1e-12
    assert effective_sample_size(torch.ones(10)) == pytest.approx(10.0)
    assert effective_sample_size(torch.tensor([1.0, 0, 0, 0])) == pytest.approx(1.0)
    w = torch.rand(50, generator=gen, dtype=torch.float64)
    assert effective_sample_size(w) == pytest.approx(float(w.sum() ** 2 / (w ** 2).sum()))
    with pytest.raises(ValueError, match="floor"):
        regularise(g, [x.double() for x in m], 1.0, 1.5)


def test_a_new_method_is_one_class_and_a_registration(front, tiny_vlm):
    """A strategy registered at run time runs through the unchanged layer loop: here GPTQ with
    VLMQ's token weights on q_proj only, spelled as a subclass (equal to vlmq with enhance [q_proj]
    on the gptq precursor, bit for bit)."""
    from stages.cache_fp import load_layer
    from stages.quantize import QuantizeRun
    from vlmq.methods import REGISTRY, register
    from vlmq.methods.vlmq import VLMQ
    from vlmq.quantize import CalibBatch, LayerQuantConfig, quantize_layer

    class QOnly(VLMQ):
        name = "q_only"

        def token_weights(self, job, linear, batch):
            return super().token_weights(job, linear, batch) if linear.endswith("q_proj") else None

    register("q_only", QOnly)
    try:
        params = load_params(write_params(front / "plugin.yaml", tiny_vlm, {"method": "gptq"}))
        run = QuantizeRun(params, cache_dir=front / "data/cache", state_dir=front / "plugin" / "q",
                          importance_dir=front / "plugin" / "imp", report_dir=front / "plugin" / "r")
        x = load_layer(run.cache_dir, 1, run.dtype)
        batches = [CalibBatch(inputs=c, x_fp=xf, x_hat=xf + 0.01 * torch.randn(xf.shape, generator=torch.Generator().manual_seed(1)),
                              modality=lab["modality"]) for (c, lab), xf in zip(run.ctx, x)]
        import copy

        out = {}
        for name, cfg in (("plugin", LayerQuantConfig(method="q_only", precursor="gptq", bits=3, group_size=64)),
                          ("vlmq", LayerQuantConfig(method="vlmq", precursor="gptq", bits=3, group_size=64,
                                                    enhance=("q_proj",)))):
            layer = copy.deepcopy(run.layers[1])
            res = quantize_layer(run.adapter, layer, batches, cfg)
            out[name] = {k: r.int_weight for k, r in res.results.items()}
        assert out["plugin"].keys() == out["vlmq"].keys()
        assert all(torch.equal(out["plugin"][k], out["vlmq"][k]) for k in out["vlmq"])
    finally:
        REGISTRY.pop("q_only", None)
