"""Compatibility shim: Qwen2-VL processors without torchvision.

transformers 5 makes ``Qwen2VLProcessor`` require a video processor, and its video processor
requires torchvision, which this project does not install (CPU-only, images only). Without
torchvision, neither ``Qwen2VLProcessor(...)`` nor ``AutoProcessor.from_pretrained`` can build the
processor, although nothing image-related needs torchvision (``Qwen2VLImageProcessor`` falls back
to its PIL backend). :func:`allow_processor_without_video` drops the video sub-processor from the
processor's attribute list when torchvision is missing, so the stock class loads and saves with an
image processor and a tokenizer only. With torchvision installed it does nothing.
"""

from __future__ import annotations

import importlib.util

_PATCHED = False


def allow_processor_without_video() -> None:
    """Idempotently let Qwen2-VL processors load without a video processor (no torchvision)."""
    global _PATCHED
    if _PATCHED or importlib.util.find_spec("torchvision") is not None:
        return
    from transformers import Qwen2VLProcessor

    original = Qwen2VLProcessor.get_attributes.__func__

    def get_attributes(cls) -> list[str]:
        return [a for a in original(cls) if a != "video_processor"]

    Qwen2VLProcessor.get_attributes = classmethod(get_attributes)
    _PATCHED = True


def load_processor(path: str):
    """``AutoProcessor.from_pretrained(path)`` (local files only), with the shim applied."""
    from transformers import AutoProcessor

    allow_processor_without_video()
    return AutoProcessor.from_pretrained(path, local_files_only=True)
