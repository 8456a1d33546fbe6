"""Why the prefill path computes in float32: what bfloat16 tiles would do to the demo model's logits.

    python -m benchmarks.prefill_precision     # writes reports/bench/prefill_precision.json

The demo model (``model.path``) with every decoder linear RTN-quantized (W``bits`` g``group_size`` of
``latency:``), on rendered image questions: logits with the dequantized weights in float32 (what
``reference``/``cpu_fused``/``cpu_tiled`` compute) against the same model with (a) the weights
rounded to bfloat16 (a bfloat16 tile of the prefill path), (b) weights and activations rounded to
bfloat16 (a bfloat16 GEMM, as AMX / AVX-512-BF16 would run it). Relative Frobenius error of the
logits, the measure the kernel tests hold to 1e-3.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Rounded(nn.Module):
    """A linear whose weight (and optionally input) is rounded to bfloat16, computed in float32."""

    def __init__(self, lin: nn.Linear, inputs: bool):
        super().__init__()
        self.weight = nn.Parameter(lin.weight.detach().bfloat16().float(), requires_grad=False)
        self.bias = lin.bias
        self.inputs = inputs

    def forward(self, x):
        if self.inputs:
            x = x.bfloat16().float()
        return F.linear(x, self.weight, self.bias)


def run(params_path=None, n_questions: int = 8, log=print) -> dict:
    import copy

    from benchmarks.latency import demo_inputs
    from stages.common import write_json
    from stages.params import load_params
    from vlmq.models import load_model
    from vlmq.quant import dequantize, rtn

    params = load_params(params_path)
    cfg = params.latency
    model, processor, adapter = load_model(params.model.path)
    for layer in adapter.decoder_layers(model):
        for name, lin in adapter.linears(layer).items():
            q, s, z, g = rtn(lin.weight.detach(), cfg.bits[0], cfg.group_size)
            adapter.set_weight(layer, name, dequantize(q, s.half().float(), z, g).float())
    inputs = demo_inputs(processor, n_questions, seed=1)
    with torch.no_grad():
        ref = model(**inputs).logits.double()
    out = {"model": params.model.path, "bits": cfg.bits[0], "group_size": cfg.group_size,
           "questions": n_questions, "command": "python -m benchmarks.prefill_precision"}
    for label, inp in (("bf16_weights", False), ("bf16_weights_and_activations", True)):
        m = copy.deepcopy(model)
        for layer in adapter.decoder_layers(m):
            for name, lin in adapter.linears(layer).items():
                parent, _, leaf = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, leaf, _Rounded(lin, inp))
        with torch.no_grad():
            got = m(**inputs).logits.double()
        out[label] = float((got - ref).norm() / ref.norm())
        log(f"{label}: logits relative error {out[label]:.2e}")
    write_json("reports/bench/prefill_precision.json", out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None)
    run(ap.parse_args(argv).params)


if __name__ == "__main__":
    main()
