"""Load the processor (tokenizer + image processor) of a supported VLM from local files.

transformers 5.x makes the Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision processors require a video
sub-processor, and the video processors require torchvision, which this project does not
install (CPU torch, images only). Nothing image-related needs torchvision (the image processors
fall back to their PIL backend), so when torchvision is missing :func:`allow_processors_without_video`
drops ``video_processor`` from these classes' sub-processor lists: the stock classes then build,
load and save with an image processor and a tokenizer only (videos are unsupported). With
torchvision installed nothing is patched.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

_PROCESSOR_CLASSES = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "LlavaOnevisionProcessor")
_MARK = "_vlmq_without_video"


def allow_processors_without_video() -> None:
    """Idempotently let the supported processors load without a video processor (no torchvision)."""
    if importlib.util.find_spec("torchvision") is not None:
        return
    import transformers

    for name in _PROCESSOR_CLASSES:
        cls = getattr(transformers, name)
        if cls.__dict__.get(_MARK):
            continue
        original = cls.get_attributes.__func__

        def get_attributes(klass: type, _original: Any = original) -> list[str]:
            return [a for a in _original(klass) if a != "video_processor"]

        cls.get_attributes = classmethod(get_attributes)
        setattr(cls, _MARK, True)


def load_processor(path: str | Path) -> Any:
    """``AutoProcessor.from_pretrained(path)`` from local files only (never downloads), with
    :func:`allow_processors_without_video` applied."""
    from transformers import AutoProcessor

    allow_processors_without_video()
    return AutoProcessor.from_pretrained(str(path), local_files_only=True)
