"""Packed GPTQ checkpoints: QuantLinear backends, write/load round trip, tamper and mismatch errors."""

from __future__ import annotations

import io
import json
import zlib

import pytest
import torch
from PIL import Image

from vlmq.checkpoint import MANIFEST, CheckpointError, load_packed, write_packed
from vlmq.pack import pack_linear
from vlmq.qlinear import BF16_BACKENDS, QuantLinear, available_backends
from vlmq.quant import dequantize, group_index, rtn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_quant_linear_backends_match_float64_dequantized_matmul(bits, act_order):
    g = torch.Generator().manual_seed(zlib.crc32(f"ql{bits}{act_order}".encode()))
    out_f, in_f, gs = 96, 256, 64  # 96 outputs: one full 64-column kernel tile and a tail
    W = torch.randn(out_f, in_f, generator=g)
    q, s, z, g_idx = rtn(W, bits, gs)
    if act_order:
        g_idx = group_index(in_f, gs, torch.randperm(in_f, generator=g))
    fmt = "gptq" if bool((z > 0).all()) else "gptq_v2"
    t = pack_linear(q, s, z, g_idx, bits, fmt)
    bias = torch.randn(out_f, generator=g)
    ql = QuantLinear(in_f, out_f, bits, gs, True, fmt)
    ql.load_state_dict({**t, "bias": bias})
    # independent float64 reference: the definition W = (q - z) s with the stored fp16 scales
    Wd = dequantize(q.double(), t["scales"].T.double(), z.double(), g_idx)
    x = torch.randn(2, 7, in_f, generator=g)
    ref = x.double() @ Wd.T + bias.double()
    for backend in available_backends(bits):
        ql.prepare(backend)
        y = ql(x)
        assert y.shape == (2, 7, out_f) and y.dtype == x.dtype
        # aten_int4 runs bf16 activations/scales, cpu_tiled_bf16 rounds float32 x and y to bf16 (8
        # mantissa bits): their tolerance is bf16's (cpu_tiled_bf16 on bf16 x: _check_bf16_exact)
        tol = 1e-2 if backend in BF16_BACKENDS else 1e-5
        assert _rel(y, ref) < tol, (backend, _rel(y, ref))
    assert ("aten_int4" in available_backends(bits)) == (bits == 4)
    assert "cpu_fused" in available_backends(bits)  # g++ and ninja are install requirements here


def test_unknown_backend_and_wrong_bits_backend_fail():
    ql = QuantLinear(128, 32, 3, 64, False)
    with pytest.raises(ValueError, match="backend='fast'"):
        ql.prepare("fast")
    with pytest.raises(ValueError, match="cannot run 3-bit"):
        ql.prepare("aten_int4")
    odd = QuantLinear(128, 32, 4, 48, False)  # groups of 48: not a multiple of 32
    odd.g_idx.copy_(torch.arange(128) // 48)
    with pytest.raises(ValueError, match="multiple of 32"):
        odd.prepare("cpu_fused")
    one_group = QuantLinear(512, 32, 4, -1, False)  # aten's int4 kernel takes groups of 32..256 only
    with pytest.raises(ValueError, match="group size of 32, 64, 128 or 256"):
        one_group.prepare("aten_int4")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cpu_fused_every_instruction_set_matches_float64_reference(bits):
    """Every copy of the kernel this CPU runs (AVX-512, AVX2, portable) against the float64
    definition: random shapes (column tails of the 64-wide blocks), group sizes incl. one group,
    act_order g_idx, both checkpoint formats, batches that hit the 4/2/1-row tiles and the 64-row
    passes."""
    from vlmq.kernels import ISAS, kernel_isas

    isas = kernel_isas()
    assert isas and isas[-1] == "generic" and set(isas) <= set(ISAS)
    g = torch.Generator().manual_seed(zlib.crc32(f"isa{bits}".encode()))
    cases = [(32, 128, 32, False, 1), (96, 256, 64, True, 3), (224, 384, 128, True, 6), (160, 256, -1, False, 17),
             (64, 512, 128, False, 70), (288, 128, 64, True, 4),
             (320, 512, 128, True, 16)]  # >= 2M weight-rows: the threaded path (2 threads below)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_isas(bits, isas, cases, g)
    finally:
        torch.set_num_threads(threads)


def _check_isas(bits, isas, cases, g):
    from vlmq.kernels import gptq_cpu

    for out_f, in_f, gs, act_order, batch in cases:
        W = torch.randn(out_f, in_f, generator=g)
        q, s, z, g_idx = rtn(W, bits, gs)
        if act_order:
            g_idx = group_index(in_f, gs, torch.randperm(in_f, generator=g))
        fmt = "gptq" if bool((z > 0).all()) and batch % 2 else "gptq_v2"
        t = pack_linear(q, s, z, g_idx, bits, fmt)
        ql = QuantLinear(in_f, out_f, bits, gs, False, fmt)
        ql.load_state_dict(t, strict=False)
        Wd = dequantize(q.double(), t["scales"].T.double(), z.double(), g_idx)
        x = torch.randn(batch, in_f, generator=g) * torch.rand(in_f, generator=g) * 4  # uneven channels
        ref = x.double() @ Wd.T
        for isa in isas:
            for backend in ("cpu_fused", "cpu_tiled"):
                y = ql.prepare(backend, isa=isa)(x)
                assert y.shape == (batch, out_f) and y.dtype == torch.float32
                assert _rel(y, ref) < 1e-5, (backend, isa, out_f, in_f, gs, act_order, batch, _rel(y, ref))
            # the tiled path's tile shapes: units of 1 or 3 blocks (column tails), input chunks of
            # 32 or 96 (K tails), and the wide tiles shared by all threads with rows split between
            # them (split_from <= rows), against the same float64 reference
            p, group = ql._prepared, ql._group
            xp = x.index_select(1, p["perm"]) if "perm" in p else x
            for cols, kc, split_from in ((1, 32, 0), (3, 96, 0), (2, 64, 1), (2, 1024, batch)):
                y = gptq_cpu().gptq_gemm_tiled(xp.contiguous(), p["qweight"], p["scales"], p["zeros"], bits, group,
                                               out_f, isa, cols, kc, split_from)
                assert _rel(y, ref) < 1e-5, (isa, cols, kc, split_from, out_f, in_f, gs, batch, _rel(y, ref))
            # the bf16 prefill path: W held exactly as two bf16 parts, so for bf16 x the result is the
            # exact product rounded once to bf16 (bit for bit but where float32 summation order decides
            # a rounding; W rounded to bf16 alone matches ~60 % of the outputs), every tile shape
            xb = xp.bfloat16().contiguous()
            Wp = Wd.index_select(1, p["perm"]) if "perm" in p else Wd
            for cols, kc, split_from in ((1, 256, 0), (1, 32, 0), (3, 96, 0), (1, 64, 1)):  # 1: wide tiles
                y = gptq_cpu().gptq_gemm_tiled_bf16(xb, p["qweight"], p["scales"], p["zeros"], bits, group, out_f,
                                                    isa, cols, kc, None, split_from)
                _check_bf16_exact(y, xb, Wp, (isa, cols, kc, split_from, bits, out_f, in_f, gs, batch))
            y = ql.prepare("cpu_tiled_bf16", isa=isa)(x.bfloat16())  # the backend (act_order: x permuted)
            _check_bf16_exact(y, x.bfloat16(), Wd, (isa, "backend", bits, out_f, in_f, gs, batch))
        assert torch.equal(ql.prepare("cpu_fused", isa=None)(x), ql.prepare("cpu_fused", isa=isas[0])(x))
        # auto: the fused kernel below prefill_from rows, the tiled path from it on, bit for bit
        auto = ql.prepare("auto", prefill_from=batch)
        assert (auto.path(batch - 1), auto.path(batch)) == ("cpu_fused", "cpu_tiled") and "cpu_tiled from" in repr(auto)
        assert torch.equal(auto(x), ql.prepare("cpu_tiled")(x))
        assert torch.equal(ql.prepare("auto", prefill_from=batch + 1)(x), ql.prepare("cpu_fused")(x))
        # bf16 activations: cpu_tiled_bf16 from prefill_from rows where bf16 GEMMs are fast (forced
        # here), else (and for float32 x) the float32 paths on the bf16 x
        xb = x.bfloat16()
        auto = ql.prepare("auto", prefill_from=batch, bf16_prefill=True)
        assert auto.path(batch, torch.bfloat16) == "cpu_tiled_bf16" and auto.path(batch) == "cpu_tiled"
        assert auto.path(batch - 1, torch.bfloat16) == "cpu_fused" and "cpu_tiled_bf16 for bf16" in repr(auto)
        assert torch.equal(auto(xb), ql.prepare("cpu_tiled_bf16")(xb))
        auto = ql.prepare("auto", prefill_from=batch, bf16_prefill=False)
        assert auto.path(batch, torch.bfloat16) == "cpu_tiled"
        assert torch.equal(auto(xb), ql.prepare("cpu_tiled")(xb.float()).bfloat16())


def test_cpu_tiled_bf16_adds_the_bias_before_its_one_rounding():
    """The bias as 3 more GEMM inputs (ones × its exact bf16 parts): y is bf16(x Wᵀ + b) of float64,
    per-thread and wide tiles, column tails, each ISA; a bias added after the rounding fails this."""
    from vlmq.kernels import gptq_cpu, kernel_isas

    g = torch.Generator().manual_seed(zlib.crc32(b"bf16bias"))
    out_f, in_f, gs, bits = 608, 384, 128, 4  # 608 outputs: 9 blocks of 64 and a tail of 32
    q, s, z, g_idx = rtn(torch.randn(out_f, in_f, generator=g), bits, gs)
    t = pack_linear(q, s, z, g_idx, bits, "gptq_v2")
    bias = torch.randn(out_f, generator=g) * 3
    ql = QuantLinear(in_f, out_f, bits, gs, True, "gptq_v2")
    ql.load_state_dict({**t, "bias": bias})
    Wd = dequantize(q.double(), t["scales"].T.double(), z.double(), g_idx)
    x = (torch.randn(40, in_f, generator=g) * 2).bfloat16()
    ones = torch.ones(40, 1, dtype=torch.bfloat16)
    xa, Wa = torch.cat([x, ones], 1), torch.cat([Wd, bias.double()[:, None]], 1)  # x Wᵀ + b as one product
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        p = ql.prepare("cpu_tiled_bf16")._prepared
        for isa in kernel_isas():
            for split_from in (0, 1):
                y = gptq_cpu().gptq_gemm_tiled_bf16(x, p["qweight"], p["scales"], p["zeros"], bits, gs, out_f, isa,
                                                    1, 256, bias, split_from)
                _check_bf16_exact(y, xa, Wa, (isa, split_from))
        _check_bf16_exact(ql(x), xa, Wa, "backend")
        late = (gptq_cpu().gptq_gemm_tiled_bf16(x, p["qweight"], p["scales"], p["zeros"], bits, gs, out_f) + bias).bfloat16()
        with pytest.raises(AssertionError):
            _check_bf16_exact(late, xa, Wa, "bias after the rounding")
    finally:
        torch.set_num_threads(threads)


def _check_bf16_exact(y: torch.Tensor, x: torch.Tensor, W: torch.Tensor, what) -> None:
    """``y`` (bf16) is the float64 ``x Wᵀ`` rounded to bf16: each output within one bf16 step plus
    float32 summation error (K 2⁻²⁴ Σ|x w|), and 99 % of them equal to the rounded value."""
    exact = x.double() @ W.T
    assert y.dtype == torch.bfloat16 and y.shape == exact.shape, what
    step = 2.0 ** (torch.frexp(exact).exponent.double() - 8)  # one bf16 ulp at |exact|
    slack = x.shape[1] * 2.0 ** -24 * (x.double().abs() @ W.abs().T)
    assert bool(((y.double() - exact).abs() <= step + slack).all()), what
    assert float((y == exact.to(torch.bfloat16)).double().mean()) >= 0.99, what


def test_kernel_isa_override_auto_order_and_fallbacks(monkeypatch):
    from vlmq.kernels import gptq_cpu, kernel_isa, kernel_isas

    best = kernel_isas()[0]
    monkeypatch.setenv("VLMQ_KERNEL_ISA", "generic")
    assert kernel_isa() == "generic"
    monkeypatch.setenv("VLMQ_KERNEL_ISA", "no-such-isa")
    assert kernel_isa() == best
    monkeypatch.delenv("VLMQ_KERNEL_ISA")
    # auto: the float32 kernel first at every bit width (faster than aten_int4 at batch 1 with AVX2 and
    # AVX-512, README); aten_int4 (bfloat16 activations) is listed but never auto's choice
    assert available_backends(4) == ["cpu_fused", "cpu_tiled", "cpu_tiled_bf16", "aten_int4", "dequant", "reference"]
    assert available_backends(3) == ["cpu_fused", "cpu_tiled", "cpu_tiled_bf16", "dequant", "reference"]
    ql = QuantLinear(128, 32, 4, 64, False)
    ql.g_idx.copy_(torch.arange(128) // 64)
    assert ql.prepare("auto").backend == "cpu_fused" and ql.path(10**6) == "cpu_tiled"
    assert ql.prepare("cpu_fused").path(10**6) == "cpu_fused" and ql.prepare("cpu_tiled").path(1) == "cpu_tiled"
    with pytest.raises(ValueError, match="prefill_from=0"):
        ql.prepare("auto", prefill_from=0)
    with pytest.raises(ValueError, match="isa='sse9'"):
        QuantLinear(128, 32, 3, 64, False).prepare("cpu_fused", isa="sse9")
    # the kernel checks its layout
    with pytest.raises(RuntimeError, match="qw: contiguous int32"):
        gptq_cpu().gptq_gemm(torch.zeros(1, 128), torch.zeros(1, 15, 64, dtype=torch.int32),
                             torch.zeros(1, 2, 64, dtype=torch.float16), torch.zeros(1, 2, 64, dtype=torch.uint8),
                             4, 64, 64)

    # auto takes the first backend that accepts the layer; a refused one leaves the layer as it was
    g = torch.Generator().manual_seed(3)
    odd = QuantLinear(96, 32, 4, 48, False)  # groups of 48: neither cpu_fused nor aten_int4
    q, s, z, g_idx = rtn(torch.randn(32, 96, generator=g), 4, 48)
    odd.load_state_dict(pack_linear(q, s, z, g_idx, 4, "gptq_v2"), strict=False)
    x = torch.randn(2, 96, generator=g)
    ref = odd.prepare("reference")(x)
    assert odd.prepare("auto").backend == "dequant"
    with pytest.raises(ValueError, match="multiple of 32"):
        odd.prepare("cpu_fused")
    assert odd.backend == "dequant" and torch.allclose(odd(x), ref, rtol=1e-5, atol=1e-6)
    # 8 bits in format gptq (v1) with a stored zero of 255 means z = 256: not a uint8 for the kernel
    big = QuantLinear(64, 32, 8, 32, False, "gptq")
    q = torch.randint(0, 256, (32, 64), generator=g, dtype=torch.int32)
    t = pack_linear(q, torch.rand(32, 2, generator=g) * 0.01, torch.full((32, 2), 256), torch.arange(64) // 32, 8)
    big.load_state_dict(t, strict=False)
    ref = big.prepare("reference")(x[:, :64])
    with pytest.raises(ValueError, match="uint8"):
        big.prepare("cpu_fused")
    assert big.prepare("auto").backend == "dequant"
    assert torch.allclose(big(x[:, :64]), ref, rtol=1e-5, atol=1e-5)


def _solved_rtn(model, adapter, bits, gs, act_order):
    """Per-layer solved tensors in the quantize stage's layout (RTN; random act_order perms)."""
    solved = []
    g = torch.Generator().manual_seed(7)
    for layer in adapter.decoder_layers(model):
        t = {}
        for name, lin in adapter.linears(layer).items():
            W = lin.weight.detach()
            q, s, z, g_idx = rtn(W, bits, gs)
            if act_order:
                perm = torch.randperm(W.shape[1], generator=g)
                g_idx = group_index(W.shape[1], gs, perm)
                # re-quantize so every column uses the scales of its (permuted) group
                s2, z2 = s.clone(), z.clone()
                W_perm = W[:, perm]
                q_p, s2, z2, _ = rtn(W_perm, bits, gs)
                q = torch.empty_like(q_p)
                q[:, perm] = q_p
                s, z = s2, z2
            t.update({f"{name}.int_weight": q.to(torch.uint8), f"{name}.scales": s, f"{name}.zeros": z.to(torch.uint8),
                      f"{name}.g_idx": g_idx})
        solved.append(t)
    return solved


def _fake_quant(model, adapter, solved):
    import copy

    fq = copy.deepcopy(model)
    for layer, t in zip(adapter.decoder_layers(fq), solved):
        for name in adapter.linear_names:
            adapter.set_weight(layer, name, dequantize(t[f"{name}.int_weight"], t[f"{name}.scales"].half().float(),
                                                       t[f"{name}.zeros"], t[f"{name}.g_idx"]))
    return fq


def _inputs(tiny_vlm, processor):
    from vlmq.demo.data import read_rows
    from vlmq.demo.tokenizer import user_prompt

    rows = read_rows(tiny_vlm["eval"])[:2]
    texts = [processor.apply_chat_template(user_prompt(r["question"]), add_generation_prompt=True, tokenize=False)
             for r in rows]
    return processor(text=texts, images=[Image.open(io.BytesIO(r["image"])).convert("RGB") for r in rows],
                     padding=True, return_tensors="pt")


@pytest.mark.parametrize("bits,act_order", [(4, False), (3, True), (2, False), (8, True)])
def test_pack_load_round_trip_logits(tiny_vlm, tmp_path, bits, act_order):
    from vlmq.models import load_model

    model, processor, adapter = load_model(tiny_vlm["model"])
    solved = _solved_rtn(model, adapter, bits, 64, act_order)
    out = tmp_path / "packed"
    manifest = write_packed(model, processor, adapter, solved, out, bits=bits, group_size=64, sym=False,
                            desc_act=act_order, method="rtn")
    assert (out / "model.safetensors").is_file() and (out / MANIFEST).is_file()
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["desc_act"] == act_order
    from transformers import GPTQConfig

    GPTQConfig.from_dict(dict(qc))  # transformers' own config class accepts it (GPTQ loading path)
    inputs = _inputs(tiny_vlm, processor)
    with torch.no_grad():
        ref = _fake_quant(model, adapter, solved)(**inputs).logits
    for backend in available_backends(bits):
        loaded, proc2, _ = load_packed(out, backend=backend)
        assert proc2 is not None
        # the packed integers are exactly the solver's
        for l, layer in enumerate(adapter.decoder_layers(loaded)):
            for name in adapter.linear_names:
                q, *_ = layer.get_submodule(name).unpacked()
                assert torch.equal(q, solved[l][f"{name}.int_weight"].to(torch.int32))
        with torch.no_grad():
            got = loaded(**inputs).logits
        # bf16 activations (aten_int4; cpu_tiled_bf16 forced on this float32 model): bf16's tolerance
        tol = 2e-2 if backend in BF16_BACKENDS else 1e-3
        assert _rel(got, ref) < tol, (backend, _rel(got, ref))


def test_tampered_truncated_and_mismatched_checkpoints_fail(tiny_vlm, tmp_path):
    from vlmq.models import load_model

    model, processor, adapter = load_model(tiny_vlm["model"])
    out = tmp_path / "packed"
    write_packed(model, processor, adapter, _solved_rtn(model, adapter, 4, 64, False), out, bits=4, group_size=64,
                 sym=False, desc_act=False, method="rtn")
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 mismatch"):
        load_packed(out)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 mismatch.*truncated"):
        load_packed(out)
    # bits in config.json disagreeing with the tensors (manifest check off to reach the shape check)
    write_packed(model, processor, adapter, _solved_rtn(model, adapter, 4, 64, False), out, bits=4, group_size=64,
                 sym=False, desc_act=False, method="rtn")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: sha256 mismatch"):
        load_packed(out)
    with pytest.raises(CheckpointError, match=r"bits=3, group_size=64"):
        load_packed(out, verify=False)


def test_pack_stage_matches_fake_quantized_model_and_latency_report(tiny_vlm, tmp_path, monkeypatch):
    """quantize (GPTAQ, act_order) -> pack stage -> load_packed: the solver's integers exactly, logits of
    the fake-quantized model; then the latency benchmark on small shapes feeds the report's tables."""
    import os

    import yaml

    from stages.cache_fp import cache_fp
    from stages.pack import pack
    from stages.prepare_calib import prepare_calib
    from stages.quantize import quantize
    from vlmq.state import load_fake_quantized_model
    from stages.report import latency_tables

    os.environ["VLMQ_NO_PREFECT"] = "1"
    monkeypatch.chdir(tmp_path)
    params = {"model": {"path": str(tiny_vlm["model"])},
              "calib": {"source": str(tiny_vlm["calib"]), "n_samples": 4, "batch_size": 4, "max_length": 64},
              "cache": {"dtype": "float32"},
              "quant": {"method": "gptaq", "bits": 4, "group_size": 64, "act_order": True},
              "latency": {"shapes": [[256, 128]], "bits": [4, 2], "group_size": 64, "batches": [1, 4], "runs": 3,
                          "warmup": 1, "decode_tokens": 3, "decode_runs": 1, "prefill_from": 4,
                          "dense_dtypes": ["float32", "bfloat16"],
                          "backends": ["auto", "aten_int4", "dequant", "reference", "cpu_tiled_bf16"]}}
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    prepare_calib(p)
    cache_fp(p)
    quantize(p)
    out = pack(p)
    assert out["packed_weights_bytes"] < out["fp_weights_bytes"]
    fq, processor, adapter, _ = load_fake_quantized_model(tiny_vlm["model"], "data/quantize")
    # the fake-quantized reference with the fp16 scales the checkpoint stores
    from safetensors.torch import load_file

    for l, layer in enumerate(adapter.decoder_layers(fq)):
        t = load_file(f"data/quantize/layer_{l:03d}/solved.safetensors")
        for name in adapter.linear_names:
            adapter.set_weight(layer, name, dequantize(t[f"{name}.int_weight"], t[f"{name}.scales"].half().float(),
                                                       t[f"{name}.zeros"], t[f"{name}.g_idx"]))
    inputs = _inputs(tiny_vlm, processor)
    with torch.no_grad():
        ref = fq(**inputs).logits
    for backend in ("dequant", "aten_int4"):
        loaded, _, qc = load_packed("data/packed", backend=backend)
        assert qc["desc_act"] is True and qc["bits"] == 4
        with torch.no_grad():
            got = loaded(**inputs).logits
        assert _rel(got, ref) < (2e-2 if backend == "aten_int4" else 1e-3), backend

    from benchmarks.latency import run_benchmark

    import vlmq.qlinear  # as on a machine with AMX: bf16 activations are timed too (auto and cpu_tiled_bf16)

    monkeypatch.setattr(vlmq.qlinear, "bf16_gemm_fast", lambda: True)
    rep = run_benchmark(p, out=str(tmp_path / "reports" / "latency.json"), log=lambda s: None)
    assert rep["machine"]["bf16_gemm_fast"] is True
    kinds = {(r["dtype_or_bits"], r["backend"], r["path"], r["batch"], r["cache"].replace("cold_partial", "cold"),
              r["act_dtype"]) for r in rep["results"]}
    for cache in ("cold", "warm"):
        assert {("float32", "dense", "dense", 1, cache, "float32"), (4, "aten_int4", "aten_int4", 4, cache, "float32"),
                (2, "dequant", "dequant", 1, cache, "float32"), (2, "auto", "cpu_fused", 1, cache, "float32"),
                (2, "auto", "cpu_tiled", 4, cache, "float32"), (2, "auto", "cpu_tiled_bf16", 4, cache, "bfloat16"),
                (2, "auto", "cpu_fused", 1, cache, "bfloat16"),
                (4, "cpu_tiled_bf16", "cpu_tiled_bf16", 4, cache, "bfloat16")} <= kinds, kinds
    assert all(r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["floor_ms"] > 0 for r in rep["results"])
    # paired speed-ups: per cell vs the dense dtype of the lowest median, which is 1 against itself
    cell_of = lambda r: (r["shape"], r["batch"], r["cache"].replace("cold_partial", "cold"))  # noqa: E731
    for r in rep["results"]:
        cell = [o for o in rep["results"] if cell_of(o) == cell_of(r)]
        best = min((o for o in cell if o["backend"] == "dense"), key=lambda o: o["median_ms"])
        assert r["fastest_dense"] == best["dtype_or_bits"] and len(r["times_ms"]) in (1, best["runs"])
        assert r["vs_fastest_dense_p10"] <= r["vs_fastest_dense"] <= r["vs_fastest_dense_p90"]
        if r is best:
            assert r["vs_fastest_dense_p10"] == r["vs_fastest_dense_p90"] == 1.0
    # cold: copies rotated through more than twice the last-level cache (toy shapes: capped at
    # MAX_COPIES, then labelled cold_partial); warm: one copy
    from benchmarks.latency import MAX_COPIES

    llc = rep["machine"]["llc_bytes"]
    assert llc > 0 and all(r["rotation_bytes"] >= 2 * llc for r in rep["results"]
                           if r["cache"] == "cold" and r["backend"] != "reference")
    assert all(r["copies"] == MAX_COPIES for r in rep["results"] if r["cache"] == "cold_partial")
    assert all(r["copies"] == 1 for r in rep["results"] if r["cache"] == "warm")
    e2e = rep["end_to_end"]
    assert [(r["weights"], r["backend"], r["dtype"]) for r in e2e] == [
        ("float32", "dense", "float32"), ("bfloat16", "dense", "bfloat16"), (4, "auto", "float32"),
        (4, "auto", "bfloat16"), (2, "auto", "float32"), (2, "auto", "bfloat16")]
    assert all(r["ttft_ms"] > 0 and r["decode_tokens_per_s"] > 0 and r["prompt_tokens"] > 16 for r in e2e)
    assert e2e[2]["disk_bytes"] < e2e[0]["disk_bytes"]
    for what in ("ttft", "decode"):  # the fastest FP dtype is 1 against itself
        fp = {r["weights"]: r for r in e2e if r["backend"] == "dense"}[e2e[0][f"fastest_fp_{what}"]]
        assert fp[f"{what}_vs_fastest_fp"] == 1.0 and all(
            r[f"{what}_vs_fastest_fp_p10"] <= r[f"{what}_vs_fastest_fp"] <= r[f"{what}_vs_fastest_fp_p90"] for r in e2e)
    md = latency_tables(tmp_path / "reports" / "latency.json", tmp_path / "reports" / "pack.json")
    assert "| (256, 128) | 4 | warm | W2g64 | auto (cpu_tiled) |" in md and "End to end: one image question" in md
    assert "| W2g64 | auto (cpu_tiled_bf16), x bfloat16 |" in md and "| W4 (bfloat16) | auto |" in md
    from benchmarks.latency import plot_sweep, speedup_table

    tab = speedup_table(rep)
    assert "| (256, 128) | 4 | warm |" in tab and "(tiled)" in tab and "(fused)" in tab
    assert plot_sweep(rep, tmp_path / "sweep.png").stat().st_size > 1000

    # what the schema also accepts: no dense dtype at all (no speed-ups then), one bit width, warm only
    params["latency"].update(dense_dtypes=[], bits=[2], cache=["warm"], batches=[4], backends=["auto"])
    p.write_text(yaml.safe_dump(params))
    rep = run_benchmark(p, out=str(tmp_path / "reports" / "latency.json"), log=lambda s: None)
    assert [(r["dtype_or_bits"], r["path"]) for r in rep["results"]] == [(2, "cpu_tiled")]
    assert "vs_fastest_dense" not in rep["results"][0] and "ttft_vs_fastest_fp" not in rep["end_to_end"][0]
    md = latency_tables(tmp_path / "reports" / "latency.json", tmp_path / "reports" / "pack.json")
    assert "| (256, 128) | 4 | warm | W2g64 | auto (cpu_tiled) |" in md and "| W2 | auto |" in md


def test_paired_ratio_is_exact_for_proportional_rounds_and_ignores_one_outlier_round():
    import random

    from benchmarks.latency import paired_ratio

    rng = random.Random()
    n = rng.choice([5, 7, 9])
    other = [rng.uniform(1.0, 5.0) for _ in range(n)]  # a drift of the machine, round by round
    c = rng.uniform(0.5, 3.0)
    r = paired_ratio([c * o for o in other], other)
    assert abs(r["median"] - c) < 1e-12 and abs(r["p10"] - c) < 1e-12 and abs(r["p90"] - c) < 1e-12
    hiccup = list(other)
    hiccup[rng.randrange(n)] *= 10  # one round of the other variant hit by the machine
    assert abs(paired_ratio([c * o for o in other], hiccup)["median"] - c) < 1e-12
    noisy = [c * o * rng.uniform(0.8, 1.2) for o in other]  # odd n: swapping the two inverts the median
    fwd, back = paired_ratio(noisy, other), paired_ratio(other, noisy)
    assert fwd["p10"] <= fwd["median"] <= fwd["p90"] and abs(back["median"] * fwd["median"] - 1) < 1e-12
    # a variant timed once (too slow) or in other rounds: the ratio of the medians
    assert paired_ratio([2.0, 4.0, 6.0], [8.0]) == {"median": 0.5, "p10": 0.5, "p90": 0.5}


def test_latency_leaves_out_a_backend_that_cannot_run_the_shape_and_says_so():
    """aten_int4 packs 16 output columns at a time: at 200 columns it is not timed (one log line),
    and the shape is still timed through the others; loading such a layer on aten_int4 names why."""
    from benchmarks.latency import bench_linears, random_quant_linear
    from stages.params import LatencyParams

    cfg = LatencyParams(shapes=[(384, 200)], bits=[4], group_size=128, batches=[1, 16], cache=["warm"], runs=3,
                        warmup=0, seconds_per_row=0.05, dense_dtypes=["float32"], backends=["aten_int4", "auto"])
    lines = []
    rows = bench_linears(cfg, 10.0, log=lines.append)
    assert [(r["backend"], r["path"], r["batch"]) for r in rows if r["backend"] != "dense"] == [
        ("auto", "cpu_fused", 1), ("auto", "cpu_tiled", 16)]
    assert any("aten_int4: not timed (aten_int4 needs out_features divisible by 16" in s for s in lines), lines
    with pytest.raises(ValueError, match="out_features divisible by 16"):
        random_quant_linear(384, 200, 4, 128, torch.Generator().manual_seed(0)).prepare("aten_int4")


def test_cold_rotation_holds_enough_copies_within_the_ram_cap():
    from benchmarks.latency import MAX_COPIES, Rotation

    mb = 1 << 20
    rot = Rotation(lambda i: i, 10 * mb, 32 * mb, 2.0, 1 << 30, cold=True)
    assert rot.cold and len(rot.copies) == 1 + 7  # 7 other copies: 70 MB >= 2 x 32 MB between two uses
    assert [rot.next() for _ in range(10)] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    capped = Rotation(lambda i: i, 10 * mb, 32 * mb, 2.0, 30 * mb, cold=True)
    assert not capped.cold and len(capped.copies) == 3
    assert len(Rotation(lambda i: i, 10, 32 * mb, 2.0, 1 << 40, cold=True).copies) == MAX_COPIES
    warm = Rotation(lambda i: i, 10 * mb, 32 * mb, 2.0, 1 << 30, cold=False)
    assert not warm.cold and warm.copies == [0] and warm.info() == {"copies": 1, "rotation_bytes": 10 * mb}


def test_checkpoint_in_the_legacy_key_layout_of_other_gptq_tools_loads(tiny_vlm, tmp_path):
    """GPTQ checkpoints of Qwen2-VL written by AutoGPTQ/GPTQModel name the decoder `model.layers.N`
    and the vision tower `visual.*` (the layout before transformers 5): same tensors, same logits."""
    from safetensors.torch import load_file, save_file

    from vlmq.models import load_model

    model, processor, adapter = load_model(tiny_vlm["model"])
    out = tmp_path / "ours"
    write_packed(model, processor, adapter, _solved_rtn(model, adapter, 4, 64, False), out, bits=4, group_size=64,
                 sym=False, desc_act=False, method="rtn")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in out.iterdir():
        if f.name not in ("model.safetensors", MANIFEST):
            (legacy / f.name).write_bytes(f.read_bytes())
    renamed = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
               for k, v in load_file(str(out / "model.safetensors")).items()}
    assert any(k.startswith("model.layers.0.self_attn.q_proj.qweight") for k in renamed)
    save_file(renamed, str(legacy / "model.safetensors"))
    inputs = _inputs(tiny_vlm, processor)
    a, _, _ = load_packed(out, backend="dequant")
    b, _, _ = load_packed(legacy, backend="dequant")  # no manifest: another tool's checkpoint
    with torch.no_grad():
        assert torch.equal(a(**inputs).logits, b(**inputs).logits)


# --- GPTQ tensors written by a reference tool (GPTQModel), see tests/fixtures/make_gptqmodel_fixture.py ---
_GPTQMODEL_FIXTURE = __import__("pathlib").Path(__file__).parent / "fixtures" / "gptqmodel_packed.safetensors"


def _gptqmodel_cases() -> list[dict]:
    from safetensors import safe_open

    with safe_open(str(_GPTQMODEL_FIXTURE), "pt") as f:
        return json.loads(f.metadata()["cases"])


@pytest.mark.parametrize("case", _gptqmodel_cases(), ids=lambda c: c["name"])
def test_gptqmodel_packed_tensors_unpack_bit_exactly(case):
    """qweight/qzeros/scales/g_idx packed by GPTQModel's own packer (TorchLinear.pack_original, v1 zero
    points from its v2→v1 exporter) unpack to the source integers, and every backend computes with them."""
    from safetensors import safe_open

    from vlmq.pack import unpack_linear

    with safe_open(str(_GPTQMODEL_FIXTURE), "pt") as f:
        meta = f.metadata()
        t = {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(case["name"] + ".")}
    assert meta["gptqmodel_version"] and "pack_original" in meta["packer"]
    bits, gs, in_f, out_f = case["bits"], case["group_size"], case["in_features"], case["out_features"]
    q0, z0, s0, g0 = t["src_q"].int(), t["src_z"].int(), t["src_s"], t["src_g_idx"]
    assert bool((g0[1:] < g0[:-1]).any()) == case["act_order"]  # act_order cases really are non-monotone
    # GPTQModel packs the zero point itself (its in-memory v2); its exporter writes v1 = zero − 1 per field
    for fmt, qz in (("gptq", t["qzeros_v1"]), ("gptq_v2", t["qzeros_v2"])):
        tensors = {"qweight": t["qweight"], "qzeros": qz, "scales": t["scales"], "g_idx": t["g_idx"]}
        q, s, z, g_idx = unpack_linear(tensors, bits, in_f, out_f, fmt)
        assert torch.equal(q, q0), (fmt, int((q != q0).sum()))
        assert torch.equal(z, z0), (fmt, int((z != z0).sum()))
        assert torch.equal(s, s0.float()) and torch.equal(g_idx, g0)
        # and our packer writes GPTQModel's words exactly
        ours = pack_linear(q0, s0.float(), z0, g0, bits, fmt)
        assert torch.equal(ours["qweight"], t["qweight"]) and torch.equal(ours["qzeros"], qz), fmt
    assert not torch.equal(t["qzeros_v1"], t["qzeros_v2"])  # the two formats differ: the offset is real

    ql = QuantLinear(in_f, out_f, bits, gs, False, "gptq")
    ql.load_state_dict({"qweight": t["qweight"], "qzeros": t["qzeros_v1"], "scales": t["scales"], "g_idx": t["g_idx"]})
    gi = g0.long()
    W = s0.float()[:, gi] * (q0 - z0[:, gi]).float()  # scales[g_idx] * (q - z), [out, in]
    assert torch.equal(ql.dequantized(), W)
    g = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()))
    x = torch.randn(3, in_f, generator=g)
    ref = x.double() @ W.double().T
    for backend in ("reference", "cpu_fused"):
        y = ql.prepare(backend)(x)
        assert _rel(y, ref) < 1e-5, (backend, _rel(y, ref))
