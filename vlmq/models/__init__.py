"""Model adapters: load a supported VLM and give the quantization loop uniform access to it.

Supported: Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision (Qwen2 language model). See docs/models.md.

    model, processor, adapter = load_model("/path/to/Qwen2-VL-2B-Instruct")
    inputs = adapter.prepare_inputs(model, processor(text=..., images=..., return_tensors="pt"))
    h = inputs.hidden_states
    for layer in adapter.decoder_layers(model):
        h = adapter.run_layer(layer, h, inputs)       # == mlp_block(attention_block(...))
    logits = adapter.logits(model, h)
"""

from .adapter import (
    ADAPTERS,
    ATTN_LINEARS,
    MLP_LINEARS,
    SUPPORTED_ARCHITECTURES,
    LlavaOnevisionAdapter,
    ModelAdapter,
    Qwen2_5_VLAdapter,
    Qwen2VLAdapter,
    UnsupportedModelError,
    adapter_for_config,
    get_adapter,
)
from .labels import MODALITY_NAMES, PAD_CODE, SEGMENT_NAMES, ChatTokens, TokenLabels, chat_tokens, token_labels
from .layer_inputs import LayerInputs
from .loading import ModelLoadError, check_model_dir, load_model
from .processor import allow_processors_without_video, load_processor

__all__ = [
    "ADAPTERS",
    "ATTN_LINEARS",
    "MLP_LINEARS",
    "MODALITY_NAMES",
    "PAD_CODE",
    "SEGMENT_NAMES",
    "SUPPORTED_ARCHITECTURES",
    "ChatTokens",
    "LayerInputs",
    "LlavaOnevisionAdapter",
    "ModelAdapter",
    "ModelLoadError",
    "Qwen2VLAdapter",
    "Qwen2_5_VLAdapter",
    "TokenLabels",
    "UnsupportedModelError",
    "adapter_for_config",
    "allow_processors_without_video",
    "chat_tokens",
    "check_model_dir",
    "get_adapter",
    "load_model",
    "load_processor",
    "token_labels",
]
