"""Load a supported VLM from a local Hugging Face directory (safetensors weights only).

Nothing is ever downloaded: the directory must contain ``config.json`` and the weights as
``model.safetensors`` or sharded ``model-XXXXX-of-XXXXX.safetensors`` with a
``model.safetensors.index.json``. The processor (tokenizer + image processor) is loaded when
its files are present, otherwise ``None`` is returned for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import ADAPTERS, SUPPORTED_ARCHITECTURES, ModelAdapter, UnsupportedModelError, adapter_for_config
from .processor import load_processor as _load_processor

SAFE_INDEX = "model.safetensors.index.json"
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


class ModelLoadError(RuntimeError):
    """A model directory cannot be loaded (missing, incomplete or unsupported); ``problems``
    lists what is wrong, one item each."""

    problems: list[str] = []


def _fail(path: Path, problems: list[str]) -> ModelLoadError:
    lines = "\n".join(f"  - {p}" for p in problems)
    err = ModelLoadError(f"cannot load model from '{path}':\n{lines}")
    err.problems = list(problems)
    return err


def check_model_dir(path: str | Path) -> tuple[dict[str, Any], ModelAdapter]:
    """Validate a model directory without loading weights.

    Returns the parsed ``config.json`` and the adapter; raises one :class:`ModelLoadError`
    listing every problem found (missing directory, missing/invalid ``config.json``,
    unsupported architecture, missing or ``.bin``-only weights, missing shards)."""
    path = Path(path)
    if not path.exists():
        raise _fail(path, ["the directory does not exist"])
    if not path.is_dir():
        raise _fail(path, ["it is not a directory"])

    problems: list[str] = []
    config: dict[str, Any] = {}
    adapter: ModelAdapter | None = None
    config_file = path / "config.json"
    if not config_file.is_file():
        problems.append("config.json is missing")
    else:
        try:
            config = json.loads(config_file.read_text())
            adapter = adapter_for_config(config)
        except json.JSONDecodeError as exc:
            problems.append(f"config.json is not valid JSON ({exc})")
        except UnsupportedModelError as exc:
            problems.append(str(exc))

    problems.extend(_weight_problems(path))
    if problems:
        raise _fail(path, problems)
    assert adapter is not None
    return config, adapter


def _weight_problems(path: Path) -> list[str]:
    index = path / SAFE_INDEX
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            return [f"{SAFE_INDEX} is unreadable ({exc!r})"]
        missing = sorted(set(weight_map.values()) - set(shards))
        if missing:
            return [f"{SAFE_INDEX} references missing shard(s): {', '.join(missing)}"]
        return []
    if shards:
        if "model.safetensors" not in shards and len(shards) > 1:
            return [f"several .safetensors files ({', '.join(shards)}) but no {SAFE_INDEX}"]
        return []
    bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    if bins:
        return [
            f"no *.safetensors weights; found only {', '.join(bins)} — PyTorch pickle checkpoints are refused "
            "(safetensors only); convert them, e.g. load once and save_pretrained(safe_serialization=True)"
        ]
    return ["no model weights (*.safetensors) found"]


def _model_class(adapter: ModelAdapter) -> type[nn.Module]:
    import transformers

    return getattr(transformers, adapter.architectures[0])


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    load_processor: bool = True,
) -> tuple[nn.Module, Any | None, ModelAdapter]:
    """Load a supported VLM from a local directory.

    Args:
        path: a local Hugging Face model directory (``config.json`` + safetensors weights).
        dtype: parameter dtype.
        device: device to place the model on.
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``; decides the mask format of
            :class:`~vlmq.models.LayerInputs` (bool vs additive float).
        load_processor: also load the processor (:func:`vlmq.models.processor.load_processor`)
            when its files (tokenizer / preprocessor config) are present; otherwise ``None``.

    Returns:
        ``(model, processor_or_None, adapter)``; the model is in eval mode.

    Raises:
        ModelLoadError: the directory is missing, incomplete or holds an unsupported model
            (the message names the path and every problem).
    """
    path = Path(path)
    _, adapter = check_model_dir(path)
    cls = _model_class(adapter)
    try:
        model, info = cls.from_pretrained(
            str(path),
            dtype=dtype,
            attn_implementation=attn_implementation,
            use_safetensors=True,
            local_files_only=True,
            output_loading_info=True,
        )
    except Exception as exc:  # noqa: BLE001 - re-raised with the path and the cause
        raise _fail(path, [f"{cls.__name__}.from_pretrained failed: {type(exc).__name__}: {exc}"]) from exc
    missing = [k for k in info.get("missing_keys", []) if not _is_tied(model, k)]
    if missing:
        shown = ", ".join(sorted(missing)[:8]) + (" ..." if len(missing) > 8 else "")
        raise _fail(path, [f"the weights lack {len(missing)} parameter(s) of {cls.__name__}: {shown}"])
    model.to(device).eval()

    processor = None
    if load_processor and any((path / f).is_file() for f in PROCESSOR_FILES):
        try:
            processor = _load_processor(path)
        except Exception as exc:  # noqa: BLE001 - re-raised with the path and the cause
            problem = f"processor files are present but cannot be loaded: {type(exc).__name__}: {exc}"
            raise _fail(path, [problem]) from exc
    return model, processor, adapter


def _is_tied(model: nn.Module, key: str) -> bool:
    """Missing keys that are tied to another parameter (e.g. lm_head with tied embeddings)."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key in tied


__all__ = ["ADAPTERS", "SUPPORTED_ARCHITECTURES", "ModelLoadError", "check_model_dir", "load_model"]
