"""Quantization methods: small strategies over the one layer loop (:func:`vlmq.quantize.quantize_layer`).

A method says what it needs and how it solves a sub-block, through the hooks of
:class:`vlmq.methods.base.QuantMethod`: whether token importance g is computed (step 1), which
solver runs (``rtn`` / ``gptq`` / ``gptaq``), what happens to the layer before the solve (AWQ/MBQ's
scale fold), which token weights enter H̃ (VLMQ), which extra statistics are observed and which
solver options follow from them (VLM-PTQ's clipping search). The layer loop never branches on a
method's name.

Adding a method is one module with a :class:`~vlmq.methods.base.QuantMethod` subclass plus one
line in ``REGISTRY`` below; ``params.yaml``'s schema (``quant.method``) takes its names from here.
This module imports nothing heavy, so the schema can read the names without loading torch.
"""

from __future__ import annotations

from importlib import import_module

# name in params.yaml -> "module:class" (imported on first use) or the class itself (register())
REGISTRY: dict[str, object] = {
    "rtn": "vlmq.methods.rtn:RTN",
    "gptq": "vlmq.methods.gptq:GPTQ",
    "gptaq": "vlmq.methods.gptq:GPTAQ",
    "vlmq": "vlmq.methods.vlmq:VLMQ",
    "awq": "vlmq.methods.awq:AWQ",
    "mbq": "vlmq.methods.awq:MBQ",
    "vlm_ptq": "vlmq.methods.vlm_ptq:VLMPTQ",
    "vlmq+vlm_ptq": "vlmq.methods.vlmq_vlm_ptq:VLMQWithVLMPTQ",
}
METHOD_NAMES: tuple[str, ...] = tuple(REGISTRY)

_INSTANCES: dict = {}


def register(name: str, cls) -> None:
    """Register a strategy class under ``name`` at run time (a plugin; the params schema lists the
    names of ``REGISTRY`` as it was when ``stages.params`` was imported)."""
    REGISTRY[name] = cls
    _INSTANCES.pop(name, None)


def get_method(name: str):
    """The strategy object of method ``name`` (one stateless instance per name)."""
    if name not in REGISTRY:
        raise ValueError(f"method={name!r} must be one of {tuple(REGISTRY)}")
    if name not in _INSTANCES:
        target = REGISTRY[name]
        if isinstance(target, str):
            module, cls = target.split(":")
            target = getattr(import_module(module), cls)
        _INSTANCES[name] = target()
    return _INSTANCES[name]
