"""Shared fixtures: a tiny demo-style Qwen2-VL model directory built in code (no download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> dict[str, Path]:
    """A randomly initialised Qwen2-VL of the demo family (hidden 128, 2 layers, 112-px images =
    16 vision tokens), saved with save_pretrained + processor, and tiny demo data splits."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from vlmq.demo.data import SceneSpec, build_splits, read_rows
    from vlmq.demo.model import build_config
    from vlmq.demo.tokenizer import make_processor, train_tokenizer

    root = tmp_path_factory.mktemp("tiny_vlm")
    spec = SceneSpec(grid=4, max_objects=3)
    splits = build_splits(root / "data", seed=0, n_train=6, n_calib=10, eval_per_skill=2, spec=spec)
    texts = []
    for split in ("train", "calib", "eval"):
        for r in read_rows(splits[split]):
            for key in ("question", "answer"):
                v = r[key]
                texts += v if isinstance(v, list) else [v]
    tok = train_tokenizer(texts + ["system user assistant Describe the image."], vocab_size=400)
    processor = make_processor(tok, image_size=spec.grid * spec.cell)
    cfg = build_config(tok, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
                       mrope_section=[8, 12, 12], vision_depth=1, vision_embed_dim=64, vision_heads=2)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return {"root": root, "model": model_dir, **splits}


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's own test harness: a temporary database and API for the flows run in tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
