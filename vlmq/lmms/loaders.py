"""Model loaders of the lmms-eval wrapper: how a local path becomes ``(model, processor)``.

Built in:

* ``fp`` - the full-precision model directory (:func:`vlmq.models.load_model`);
* ``fake_quant`` - the FP model with the solved (dequantized) weights of a finished quantize
  run (:func:`vlmq.state.load_fake_quantized_model`, state directory ``quant_state``).

``auto`` picks ``fake_quant`` when ``quant_state`` is given, else ``fp``. A loader for another
format (e.g. packed low-bit checkpoints) plugs in with :func:`register_loader`::

    @register_loader("packed")
    def load_packed(pretrained, *, dtype, device, quant_state=None, **kw) -> LoadedModel: ...

after which ``--model_args pretrained=DIR,loader=packed`` uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    adapter: Any = None
    info: dict = field(default_factory=dict)  # what was loaded (recorded in the results)


Loader = Callable[..., LoadedModel]
LOADERS: dict[str, Loader] = {}


def register_loader(name: str) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        LOADERS[name] = fn
        return fn

    return deco


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


@register_loader("fp")
def load_fp(pretrained: str, *, dtype: torch.dtype, device: str, **_: Any) -> LoadedModel:
    from vlmq.models import load_model

    model, processor, adapter = load_model(pretrained, dtype=dtype, device=device)
    return LoadedModel(model, processor, adapter, {"loader": "fp", "pretrained": str(pretrained)})


@register_loader("fake_quant")
def load_fake_quant(pretrained: str, *, dtype: torch.dtype, device: str, quant_state: str | None = None,
                    **_: Any) -> LoadedModel:
    from vlmq.state import STATE_DIR, load_fake_quantized_model

    state = quant_state or str(STATE_DIR)
    model, processor, adapter, summary = load_fake_quantized_model(pretrained, state, dtype=dtype)
    model.to(device)
    info = {"loader": "fake_quant", "pretrained": str(pretrained), "quant_state": str(state),
            "run": summary.get("run")}
    return LoadedModel(model, processor, adapter, info)


def load(pretrained: str, loader: str = "auto", quant_state: str | None = None, dtype: str | torch.dtype = "float32",
         device: str = "cpu", **kwargs: Any) -> LoadedModel:
    """Load ``pretrained`` with the named loader (``auto``: ``fake_quant`` if ``quant_state``)."""
    if loader == "auto":
        loader = "fake_quant" if quant_state else "fp"
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; registered: {sorted(LOADERS)}")
    loaded = LOADERS[loader](pretrained, dtype=resolve_dtype(dtype), device=device, quant_state=quant_state, **kwargs)
    if loaded.processor is None:
        raise ValueError(f"{pretrained}: no processor files (tokenizer / preprocessor config) next to the weights")
    loaded.model.eval().requires_grad_(False)
    return loaded
