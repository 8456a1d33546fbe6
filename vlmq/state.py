"""The solved state of a quantize run: its layout on disk and how a model is rebuilt from it.

A state directory (``data/quantize`` by default) holds, per decoder layer ``l``,
``layer_{l:03d}/solved.safetensors``: per quantized linear ``<name>.int_weight`` (uint8
``[out, in]``), ``.scales`` (float32 ``[out, n_groups]``), ``.zeros`` (uint8) and ``.g_idx``
(int32 ``[in]``), with weight = ``scales[:, g_idx] * (int_weight − zeros[:, g_idx])``
(:func:`vlmq.quant.dequantize`), plus the FP parameters a method changed (AWQ/MBQ's folded
``input_layernorm.weight``, ``self_attn.v_proj.bias``, …) under their names in the layer; and
``summary.json`` once the run finished. The quantize stage writes it; evaluation, packing and the
lmms-eval wrapper read it through this module.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

STATE_DIR = Path("data/quantize")
QUANT_SUFFIXES = (".int_weight", ".scales", ".zeros", ".g_idx")


def layer_dir(state_dir: str | Path, layer: int) -> Path:
    return Path(state_dir) / f"layer_{layer:03d}"


def solved_file(state_dir: str | Path, layer: int) -> Path:
    return layer_dir(state_dir, layer) / "solved.safetensors"


def solved_tensors(results: dict, fp_params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a solved layer stores: the solver's results per linear (:class:`vlmq.solver.QuantResult`)
    in the layout above, plus the changed FP parameters."""
    tensors = {}
    for name, r in results.items():
        tensors.update({f"{name}.int_weight": r.int_weight.to(torch.uint8), f"{name}.scales": r.scales,
                        f"{name}.zeros": r.zeros.to(torch.uint8), f"{name}.g_idx": r.g_idx})
    tensors.update({k: v.contiguous() for k, v in fp_params.items()})
    return tensors


def apply_solved_layer(adapter, layer, path: str | Path) -> None:
    """Set a decoder layer's linears to the dequantized solved weights stored at ``path``, and its
    other stored parameters (AWQ/MBQ's folded ``<norm>.weight``, ``self_attn.v_proj.bias``) to the
    stored FP values."""
    from safetensors.torch import load_file

    from vlmq.quant import dequantize

    if not Path(path).is_file():
        raise FileNotFoundError(f"quantized state: {path} is missing (run the quantize stage)")
    t = load_file(str(path))
    for name in adapter.linear_names:
        W = dequantize(t[f"{name}.int_weight"], t[f"{name}.scales"], t[f"{name}.zeros"], t[f"{name}.g_idx"])
        adapter.set_weight(layer, name, W)
    apply_fp_tensors(layer, t, path)


def apply_fp_tensors(layer, t: dict, path) -> None:
    """Copy the stored non-quantized parameters of a solved layer (every key of ``t`` that is not
    ``<linear>.int_weight/scales/zeros/g_idx``, e.g. AWQ's folded ``input_layernorm.weight``)
    into ``layer``."""
    for key, value in t.items():
        if key.endswith(QUANT_SUFFIXES):
            continue
        try:
            param = layer.get_parameter(key)
        except AttributeError:
            raise ValueError(f"quantized state: {path} has tensor {key!r}, which is no parameter of the layer") from None
        if tuple(param.shape) != tuple(value.shape):
            raise ValueError(f"quantized state: {path}: {key} has shape {list(value.shape)}, "
                             f"the layer's is {list(param.shape)}")
        with torch.no_grad():
            param.copy_(value.to(device=param.device, dtype=param.dtype))


def read_summary(state_dir: str | Path) -> dict:
    summary_file = Path(state_dir) / "summary.json"
    if not summary_file.is_file():
        raise FileNotFoundError(f"quantized state: {summary_file} is missing (quantize did not finish)")
    return json.loads(summary_file.read_text())


def load_fake_quantized_model(model_path: str | Path, state_dir: str | Path = STATE_DIR,
                              dtype: torch.dtype = torch.float32):
    """The FP model with every decoder layer's linears replaced by the solved (dequantized)
    weights of a finished quantize run: ``(model, processor, adapter, summary)``."""
    from vlmq.models import load_model

    summary = read_summary(state_dir)
    model, processor, adapter = load_model(model_path, dtype=dtype)
    for l, layer in enumerate(adapter.decoder_layers(model)):
        apply_solved_layer(adapter, layer, solved_file(state_dir, l))
    return model, processor, adapter, summary
