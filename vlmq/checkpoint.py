"""Packed GPTQ checkpoints: write one from a quantize run, load one into a runnable model.

Layout (a Hugging Face model directory, what transformers / GPTQModel / vLLM read):

* ``model.safetensors`` — every tensor of the FP model, except that each quantized decoder
  linear ``<prefix>.<l>.<name>`` has ``qweight``/``qzeros``/``scales``/``g_idx`` (GPTQ layout,
  :mod:`vlmq.pack`) in place of ``weight``; its ``bias`` stays FP;
* ``config.json`` — the model config plus ``quantization_config`` {quant_method "gptq", bits,
  group_size, desc_act, sym, checkpoint_format, block_name_to_quantize, ...};
* the processor files (tokenizer, chat template, image processor);
* ``vlmq_manifest.json`` — sha256 and size of every other file, and what was packed.

Only the language backbone's decoder linears are quantized; the vision tower, merger/projector,
embeddings and ``lm_head`` stay FP (as in the paper and peer tools).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from vlmq.pack import pack_linear
from vlmq.qlinear import QuantLinear

MANIFEST = "vlmq_manifest.json"
WEIGHTS = "model.safetensors"


class CheckpointError(RuntimeError):
    """A packed checkpoint is missing, tampered with or inconsistent (the message names the file)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the second name of tensors that share storage (tied weights), clone to contiguous."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous().clone()
    return out


def quantization_config(bits: int, group_size: int, sym: bool, desc_act: bool, checkpoint_format: str,
                        block_name: str, method: str) -> dict[str, Any]:
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "true_sequential": True,
        "checkpoint_format": checkpoint_format,
        "block_name_to_quantize": block_name,
        "lm_head": False,
        # no "damp_percent": transformers' GPTQConfig rejects null there (it checks 0 < damp < 1) and
        # the loaders do not need it (the solver's damping is in reports/quantize)
        "meta": {"quantizer": [f"vlmq:{method}"]},
    }


def write_packed(model, processor, adapter, solved: list[dict[str, torch.Tensor]], out_dir: str | Path, *,
                 bits: int, group_size: int, sym: bool, desc_act: bool, method: str,
                 checkpoint_format: str = "auto", extra: dict | None = None) -> dict:
    """Write the packed checkpoint of ``model`` (FP) with the solved layers ``solved[l]``
    (``<name>.int_weight/scales/zeros/g_idx`` per linear, as the quantize stage stores them).

    ``checkpoint_format``: ``gptq`` (v1, zero − 1 stored), ``gptq_v2``, or ``auto`` = v1 unless
    some zero point is 0. Written to ``out_dir.tmp`` and renamed: never half-written.
    """
    from safetensors.torch import save_file

    layers = adapter.decoder_layers(model)
    if len(solved) != len(layers):
        raise ValueError(f"{len(solved)} solved layers for a model with {len(layers)} decoder layers")
    if checkpoint_format == "auto":
        any_zero = any(bool((t[f"{n}.zeros"] == 0).any()) for t in solved for n in adapter.linear_names)
        checkpoint_format = "gptq_v2" if any_zero else "gptq"
    prefix = adapter.layer_prefix(model)
    state = _unique_tensors(model.state_dict())
    for l, t in enumerate(solved):
        for name in adapter.linear_names:
            key = f"{prefix}.{l}.{name}"
            lin = adapter.get_linear(layers[l], name)
            packed = pack_linear(t[f"{name}.int_weight"], t[f"{name}.scales"], t[f"{name}.zeros"],
                                 t[f"{name}.g_idx"], bits, checkpoint_format)
            if packed["g_idx"].numel() != lin.in_features:
                raise ValueError(f"{key}: g_idx has {packed['g_idx'].numel()} entries, in_features is {lin.in_features}")
            del state[f"{key}.weight"]
            state.update({f"{key}.{k}": v for k, v in packed.items()})
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = quantization_config(bits, group_size, sym, desc_act, checkpoint_format, prefix, method)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if processor is not None:
        processor.save_pretrained(str(tmp))
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(tmp.iterdir()) if p.is_file()}
    manifest = {"format": "gptq", "checkpoint_format": checkpoint_format, "bits": bits, "group_size": group_size,
                "sym": sym, "desc_act": desc_act, "method": method, "quantized_prefix": prefix,
                "quantized_linears": list(adapter.linear_names), "n_layers": len(layers), "files": files,
                **(extra or {})}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def verify_manifest(path: Path) -> dict:
    """Check every file listed in the manifest against its sha256; returns the manifest."""
    mf = path / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"{mf}: manifest missing (not a checkpoint written by the pack stage?)")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{mf}: not valid JSON ({exc})") from exc
    for name, info in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in {MANIFEST} but missing")
        got = sha256_file(f)
        if got != info["sha256"]:
            raise CheckpointError(f"{f}: sha256 mismatch (manifest {info['sha256'][:16]}..., file {got[:16]}...; "
                                  f"{f.stat().st_size} bytes, manifest {info['bytes']}) - tampered or truncated")
    return manifest


def _canonical_keys(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys of the older layouts other GPTQ tools write (e.g. ``model.layers.N``
    and ``visual.*`` for Qwen2-VL) to the model's, with transformers' own renaming rules."""
    import re

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        rules = [(src, tgt) for r in get_model_conversion_mapping(model)
                 if hasattr(r, "source_patterns") and type(r).__name__ in ("WeightRenaming", "PrefixChange")
                 for src, tgt in zip(r.source_patterns, r.target_patterns * len(r.source_patterns))]
    except ImportError:  # older transformers: keys are used as they are
        rules = []
    modules = {n for n, _ in model.named_modules()}
    out = {}
    for k, v in state.items():
        if k.rpartition(".")[0] not in modules:
            for src, tgt in rules:  # the first rule that applies, as transformers does
                if re.search(src, k):
                    k = re.sub(src, tgt, k)
                    break
        out[k] = v
    return out


def _quantized_names(state_keys: list[str]) -> list[str]:
    return sorted(k[: -len(".qweight")] for k in state_keys if k.endswith(".qweight"))


def load_packed(path: str | Path, backend: str = "auto", dtype: torch.dtype = torch.float32,
                verify: bool = True, load_processor: bool = True, prefill_from: int | None = None,
                bf16_prefill: bool | None = None):
    """Load a packed GPTQ checkpoint (ours, or another GPTQ tool's in the same layout) into a model
    whose quantized linears are :class:`~vlmq.qlinear.QuantLinear` running ``backend``.

    Returns ``(model, processor_or_None, quantization_config)``. Checks: the manifest's sha256
    (when present and ``verify``), and that bits / group size in the config agree with every
    tensor's shape. ``prefill_from``, ``bf16_prefill``: see :meth:`~vlmq.qlinear.QuantLinear.prepare`
    (``None``: the library default).
    """
    from safetensors import safe_open

    from vlmq.models import adapter_for_config
    from vlmq.models.processor import load_processor as _load_processor

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing")
    if verify and (path / MANIFEST).is_file():
        verify_manifest(path)
    cfg = json.loads(cfg_file.read_text())
    qc = cfg.get("quantization_config")
    if not qc or qc.get("quant_method") != "gptq":
        raise CheckpointError(f"{cfg_file}: no quantization_config with quant_method 'gptq'")
    bits, group_size = int(qc["bits"]), int(qc["group_size"])
    fmt = qc.get("checkpoint_format", "gptq")
    adapter = adapter_for_config(cfg)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{path}: no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for w in weights:
        with safe_open(str(w), framework="pt") as f:
            for k in f.keys():
                state[k] = f.get_tensor(k)

    import transformers

    config_obj = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    if hasattr(config_obj, "quantization_config"):
        del config_obj.quantization_config
    cls = getattr(transformers, adapter.architectures[0])
    model = cls._from_config(config_obj, dtype=dtype)  # CPU: non-persistent buffers (RoPE) get built
    state = _canonical_keys(model, state)
    qnames = _quantized_names(list(state))
    if not qnames:
        raise CheckpointError(f"{path}: no '*.qweight' tensors in the weights")
    for name in qnames:
        lin = model.get_submodule(name)
        in_f, out_f = lin.in_features, lin.out_features
        qw, sc = state[f"{name}.qweight"], state[f"{name}.scales"]
        n_groups = 1 if group_size == -1 else -(-in_f // group_size)
        if tuple(qw.shape) != (in_f * bits // 32, out_f) or tuple(sc.shape) != (n_groups, out_f):
            raise CheckpointError(
                f"{path}: {name} has qweight {tuple(qw.shape)} and scales {tuple(sc.shape)}, but config.json says "
                f"bits={bits}, group_size={group_size} for a {in_f}->{out_f} linear (expected qweight "
                f"{(in_f * bits // 32, out_f)}, scales {(n_groups, out_f)})")
        q = QuantLinear(in_f, out_f, bits, group_size, lin.bias is not None, fmt)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {sorted(unexpected)[:6]}")
    if missing:
        raise CheckpointError(f"{path}: tensors missing from the weights: {sorted(missing)[:6]}")
    if getattr(model.config, "tie_word_embeddings", False) or getattr(
            getattr(model.config, "text_config", None), "tie_word_embeddings", False):
        model.tie_weights()
    for name in qnames:
        model.get_submodule(name).prepare(backend, compute_dtype=dtype, bf16_prefill=bf16_prefill,
                                          **({} if prefill_from is None else {"prefill_from": prefill_from}))
    model.eval()
    processor = _load_processor(str(path)) if load_processor and (path / "tokenizer_config.json").is_file() else None
    return model, processor, qc

