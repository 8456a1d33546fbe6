"""Model adapters (vlmq.models) on tiny, randomly initialised Qwen2-VL, Qwen2.5-VL and
LLaVA-OneVision models built in code (nothing is downloaded).

Each family gets a ChatML-templated, image-bearing batch built from a tiny word-level tokenizer
(so the image-token count, the chat structure and the token labels are all real), then:
adapter choice, layer-by-layer replay == model logits, Eq. 1 sub-blocks == the layer, token
labels, LayerInputs disk round trip, save_pretrained -> load_model round trip; plus the
load_model failure modes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

from vlmq.models import (
    MODALITY_NAMES,
    SEGMENT_NAMES,
    SUPPORTED_ARCHITECTURES,
    ChatTokens,
    LayerInputs,
    LlavaOnevisionAdapter,
    ModelLoadError,
    Qwen2_5_VLAdapter,
    Qwen2VLAdapter,
    UnsupportedModelError,
    adapter_for_config,
    allow_processors_without_video,
    get_adapter,
    load_model,
    token_labels,
)

ATOL = 1e-5
VOCAB = 64
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ image_placeholder }}{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>", "<image>", "<video>"]
WORDS = ["<unk>", "system", "user", "assistant", "You", "are", "a", "helpful", "assistant.",
         "Describe", "the", "image.", "What", "is", "it?", "A", "small", "red", "cat."]


# --------------------------------------------------------------------------- fixtures
def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with the Qwen2/ChatML special tokens (ids < VOCAB)."""
    vocab = {w: i for i, w in enumerate(WORDS + SPECIALS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<|endoftext|>",
                                  eos_token="<|im_end|>", extra_special_tokens=SPECIALS)
    tok.padding_side = "left"
    return tok


TOK = make_tokenizer()
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Describe the image."}]},
    {"role": "assistant", "content": "A small red cat."},
]
MESSAGES_SHORT = [  # no system turn, different length -> left padding in the batch
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is it?"}]},
    {"role": "assistant", "content": "A cat."},
]


def chat_batch(
    placeholders: list[str], messages: list[list[dict]], mm_token_id: int | None = None
) -> dict[str, torch.Tensor]:
    """Render the ChatML template with an expanded image placeholder per sample and tokenize,
    as the family's processor does (with ``mm_token_type_ids`` for the Qwen models)."""
    texts = [TOK.apply_chat_template(m, chat_template=CHATML, tokenize=False, image_placeholder=p)
             for p, m in zip(placeholders, messages)]
    batch = dict(TOK(texts, return_tensors="pt", padding=True))
    if mm_token_id is not None:
        batch["mm_token_type_ids"] = (batch["input_ids"] == mm_token_id).int()
    return batch


def tid(token: str) -> int:
    return TOK.convert_tokens_to_ids(token)


def qwen_text_config(**kw: Any) -> dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=None, eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>"), **kw)


QWEN_TOKEN_IDS = dict(image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
                      vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))


@dataclass
class Case:
    """One tiny model, a batch for it, and what the adapter must be."""

    model: torch.nn.Module
    batch: dict[str, torch.Tensor]
    adapter_cls: type
    image_token_id: int
    processor: Any = None
    processor_call: dict[str, Any] | None = None  # the processor arguments that built ``batch``


def random_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in sizes]


def qwen2_vl_case(attn: str = "sdpa") -> Case:
    """Qwen2-VL through its real processor (Qwen2VLProcessor with the PIL image processor and the
    tiny tokenizer, built in code); 2 samples of different length -> left padding."""
    torch.manual_seed(0)
    cfg = Qwen2VLConfig(text_config=qwen_text_config(),
                        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4,
                                           spatial_merge_size=2, temporal_patch_size=2),
                        **QWEN_TOKEN_IDS)
    cfg._attn_implementation = attn
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    allow_processors_without_video()  # no torchvision here
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                 min_pixels=8 * 8, max_pixels=32 * 32),
        tokenizer=TOK, chat_template=CHATML)
    ph = "<|vision_start|><|image_pad|><|vision_end|>"  # the processor expands <|image_pad|>
    texts = [TOK.apply_chat_template(m, chat_template=CHATML, tokenize=False, image_placeholder=ph)
             for m in (MESSAGES, MESSAGES_SHORT)]
    call = dict(text=texts, images=random_images([(16, 24), (24, 16)]), return_tensors="pt", padding=True,
                padding_side="left")
    batch = dict(processor(**call))
    assert "mm_token_type_ids" in batch and batch["attention_mask"][1, 0] == 0
    return Case(model, batch, Qwen2VLAdapter, cfg.image_token_id, processor, call)


def qwen2_5_vl_case() -> Case:
    """Qwen2.5-VL; pixel patches and image_grid_thw constructed directly; one sample."""
    torch.manual_seed(1)
    cfg = Qwen2_5_VLConfig(text_config=qwen_text_config(),
                           vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                                              out_hidden_size=64, patch_size=4, spatial_merge_size=2,
                                              temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1]),
                           **QWEN_TOKEN_IDS)
    cfg._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    grid = torch.tensor([[1, 4, 8]])  # t, h, w in patches -> 32 patches -> 8 merged tokens
    pixel_values = torch.randn(int(grid.prod()), 3 * 2 * 4 * 4)
    ph = "<|vision_start|>" + " <|image_pad|>" * int(grid.prod() // 4) + " <|vision_end|>"
    batch = chat_batch([ph], [MESSAGES], cfg.image_token_id)
    batch.update(pixel_values=pixel_values, image_grid_thw=grid)
    return Case(model, batch, Qwen2_5_VLAdapter, cfg.image_token_id)


def llava_onevision_case() -> Case:
    """LLaVA-OneVision (tiny SigLIP + tiny Qwen2); anyres pixel patches constructed directly."""
    torch.manual_seed(2)
    text = qwen_text_config()
    text.pop("rope_parameters")
    cfg = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", rope_theta=10000.0, **text),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48,
                           num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8,
                           vision_use_head=False),
        image_grid_pinpoints=[[16, 16], [16, 32], [32, 16], [32, 32]],
        image_token_index=tid("<image>"), video_token_index=tid("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1,
    )
    cfg._attn_implementation = "sdpa"
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    image_sizes = torch.tensor([[16, 32]])  # best pinpoint [16, 32]: base view + 2 tiles
    pixel_values = torch.randn(1, 3, 3, 16, 16)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values, image_sizes, vision_feature_layer=-1,
                                               vision_feature_select_strategy="full").pooler_output
    n_tok = sum(f.shape[0] for f in feats)
    batch = chat_batch([" <image>" * n_tok + " "], [MESSAGES])
    batch.update(pixel_values=pixel_values, image_sizes=image_sizes)
    return Case(model, batch, LlavaOnevisionAdapter, cfg.image_token_id)


BUILDERS = {"qwen2_vl": qwen2_vl_case, "qwen2_5_vl": qwen2_5_vl_case, "llava_onevision": llava_onevision_case}
_CACHE: dict[str, Case] = {}


@pytest.fixture(params=list(BUILDERS), scope="module")
def case(request: pytest.FixtureRequest) -> Case:
    if request.param not in _CACHE:
        _CACHE[request.param] = BUILDERS[request.param]()
    return _CACHE[request.param]


def model_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def replay_logits(model: torch.nn.Module, inputs: LayerInputs) -> torch.Tensor:
    adapter = get_adapter(model)
    h = inputs.hidden_states
    with torch.no_grad():
        for layer in adapter.decoder_layers(model):
            h = adapter.run_layer(layer, h, inputs)
        return adapter.logits(model, h)


def assert_close_on_tokens(a: torch.Tensor, b: torch.Tensor, token_mask: torch.Tensor) -> None:
    """Compare logits on real tokens (padding rows are undefined: fully masked attention)."""
    torch.testing.assert_close(a[token_mask], b[token_mask], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- adapter behaviour
def test_adapter_is_chosen_from_config(case: Case) -> None:
    adapter = get_adapter(case.model)
    assert type(adapter) is case.adapter_cls
    assert adapter.uses_mrope == (case.adapter_cls is not LlavaOnevisionAdapter)
    layers = adapter.decoder_layers(case.model)
    assert len(layers) == 2
    for name in adapter.linear_names:
        assert isinstance(adapter.get_linear(layers[0], name), torch.nn.Linear)
    assert list(adapter.linear_names) == list(adapter.linear_groups["attention"] + adapter.linear_groups["mlp"])
    # the vision side / embeddings / head are not among the quantized linears
    qualified = adapter.qualified_linear_names(case.model)
    assert len(qualified) == 2 * 7 and all(".layers." in n for n in qualified)
    for fp in adapter.full_precision_modules(case.model):
        assert not any(n.startswith(fp + ".") for n in qualified)
    assert set(adapter.vision_modules(case.model)) <= set(adapter.input_modules(case.model))


def test_run_layer_chain_reproduces_model_logits(case: Case) -> None:
    adapter = get_adapter(case.model)
    inputs = adapter.prepare_inputs(case.model, case.batch)
    B, T = case.batch["input_ids"].shape
    assert inputs.hidden_states.shape == (B, T, 64)
    assert inputs.attention_mask.shape == (B, 1, T, T) and inputs.attention_mask.dtype == torch.bool
    if adapter.uses_mrope:
        assert inputs.position_ids.shape == (3, B, T)
        # M-RoPE: image tokens share the temporal index, text tokens have equal t/h/w indices
        for b in range(B):
            img = case.batch["input_ids"][b] == case.image_token_id
            t_ids, h_ids = inputs.position_ids[0, b][img], inputs.position_ids[1, b][img]
            assert (t_ids == t_ids[0]).all() and h_ids.unique().numel() > 1
    else:
        assert inputs.position_ids.shape == (B, T)
    expected = model_logits(case.model, case.batch)
    assert_close_on_tokens(replay_logits(case.model, inputs), expected, inputs.token_mask)


def test_attention_block_then_mlp_block_equals_run_layer(case: Case) -> None:
    adapter = get_adapter(case.model)
    inputs = adapter.prepare_inputs(case.model, case.batch)
    h = inputs.hidden_states
    with torch.no_grad():
        for layer in adapter.decoder_layers(case.model):
            out = adapter.run_layer(layer, h, inputs)
            split = adapter.mlp_block(layer, adapter.attention_block(layer, h, inputs))
            torch.testing.assert_close(split, out, atol=ATOL, rtol=0)
            h = out


def test_token_labels_follow_chat_structure(case: Case) -> None:
    ids, mask = case.batch["input_ids"], case.batch["attention_mask"]
    adapter = get_adapter(case.model)
    for source in (TOK, case.model.config):  # a tokenizer, or only the config (vision ids only)
        segment, modality = adapter.token_labels(ids, source, mask)
        vision = modality == MODALITY_NAMES.index("vision")
        assert torch.equal(vision, ids == case.image_token_id)
        assert torch.equal(segment == SEGMENT_NAMES.index("image"), vision)
        assert (segment[mask == 0] == -1).all() and (modality[mask == 0] == -1).all()

    labels = adapter.token_labels(ids, TOK, mask)
    row, seg = ids[0].tolist(), labels.segment[0].tolist()
    starts = [i for i, t in enumerate(row) if t == tid("<|im_start|>")]
    assert len(starts) == 3  # system, user, assistant
    sys_part, user_part, answer_part = seg[starts[0]:starts[1]], seg[starts[1]:starts[2]], seg[starts[2]:]
    assert set(sys_part) == {SEGMENT_NAMES.index("system")}
    assert set(user_part) == {SEGMENT_NAMES.index("instruction"), SEGMENT_NAMES.index("image")}
    assert set(answer_part) == {SEGMENT_NAMES.index("answer")}
    # template tokens belong to their turn: <|im_end|> of the user turn is instruction
    user_end = max(i for i in range(starts[2]) if row[i] == tid("<|im_end|>"))
    assert seg[user_end] == SEGMENT_NAMES.index("instruction")
    assert labels.segment.dtype == torch.int8


def test_layer_inputs_save_load_replay(case: Case, tmp_path: Path) -> None:
    adapter = get_adapter(case.model)
    inputs = adapter.prepare_inputs(case.model, case.batch)
    inputs.save(tmp_path / "layer0.safetensors")
    loaded = LayerInputs.load(tmp_path / "layer0.safetensors")
    assert set(loaded.state_dict()) == set(inputs.state_dict())
    for k, v in inputs.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    expected = replay_logits(case.model, inputs)
    torch.testing.assert_close(replay_logits(case.model, loaded), expected, atol=0, rtol=0)


def test_save_pretrained_load_model_roundtrip(case: Case, tmp_path: Path) -> None:
    case.model.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
    if case.processor is not None:
        case.processor.save_pretrained(tmp_path)
    model, processor, adapter = load_model(tmp_path)
    assert type(adapter) is case.adapter_cls and not model.training
    if case.processor is None:
        assert processor is None
    else:  # the reloaded processor reproduces the batch
        assert type(processor) is type(case.processor)
        again = processor(**case.processor_call)
        assert set(again) == set(case.batch)
        for k in again:
            assert torch.equal(again[k], case.batch[k]), (k, again[k], case.batch[k])
    mask = case.batch["attention_mask"].bool()
    assert_close_on_tokens(model_logits(model, case.batch), model_logits(case.model, case.batch), mask)
    inputs = adapter.prepare_inputs(model, case.batch)
    assert_close_on_tokens(replay_logits(model, inputs), model_logits(case.model, case.batch), mask)


def test_set_weight_changes_the_layer_output() -> None:
    case = _CACHE.get("qwen2_vl") or qwen2_vl_case()
    model = qwen2_vl_case().model  # private copy: weights are modified
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[0]
    lin = adapter.get_linear(layer, "mlp.down_proj")
    w = torch.zeros_like(lin.weight)
    adapter.set_weight(layer, "mlp.down_proj", w)
    assert torch.equal(lin.weight, w)
    with pytest.raises(ValueError, match="shape"):
        adapter.set_weight(layer, "mlp.down_proj", w.T)
    with pytest.raises(KeyError):
        adapter.get_linear(layer, "model.visual.merger")
    inputs = adapter.prepare_inputs(model, case.batch)
    with torch.no_grad():  # zero down_proj: the MLP sub-block is the identity
        h = adapter.attention_block(layer, inputs.hidden_states, inputs)
        torch.testing.assert_close(adapter.mlp_block(layer, h), h, atol=0, rtol=0)


def test_prepare_inputs_derives_missing_mm_token_type_ids() -> None:
    case = _CACHE.get("qwen2_vl") or qwen2_vl_case()
    adapter = get_adapter(case.model)
    full = adapter.prepare_inputs(case.model, case.batch)
    bare = adapter.prepare_inputs(case.model, {k: v for k, v in case.batch.items() if k != "mm_token_type_ids"})
    assert torch.equal(bare.position_ids, full.position_ids)
    assert torch.equal(bare.hidden_states, full.hidden_states)


def test_eager_attention_uses_additive_float_mask() -> None:
    case = qwen2_vl_case(attn="eager")
    adapter = get_adapter(case.model)
    inputs = adapter.prepare_inputs(case.model, case.batch)
    assert inputs.attention_mask.is_floating_point()
    expected = model_logits(case.model, case.batch)
    assert_close_on_tokens(replay_logits(case.model, inputs), expected, inputs.token_mask)


def test_token_labels_plain_text_and_defaults() -> None:
    ids = torch.tensor([tid("What"), tid("is"), tid("<|image_pad|>"), tid("it?")])
    seg, mod = token_labels(ids, TOK)  # no chat template at all -> instruction
    assert seg.tolist() == [2, 2, 1, 2] and mod.tolist() == [0, 0, 1, 0]
    spec = ChatTokens.from_tokenizer(TOK)
    assert spec.turn_start_id == tid("<|im_start|>") and tid("<image>") in spec.vision_ids
    # config-only defaults: real Qwen2 tokenizer ids
    real = torch.tensor([151644, 8948, 198, 9, 151645, 198, 151644, 872, 198, 151655, 151655, 5, 151645,
                         198, 151644, 77091, 198, 7])
    cfg = Qwen2VLConfig(text_config=dict(num_hidden_layers=1))
    labels = token_labels(real, cfg)
    assert [SEGMENT_NAMES[c] for c in labels.segment.tolist()] == (
        ["system"] * 6 + ["instruction"] * 3 + ["image"] * 2 + ["instruction"] * 3 + ["answer"] * 4)


# --------------------------------------------------------------------------- load_model failures
def _expect_load_error(path: Path, *fragments: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    msg = str(info.value)
    assert str(path) in msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def test_load_model_missing_dir(tmp_path: Path) -> None:
    _expect_load_error(tmp_path / "nope", "does not exist")


def test_load_model_without_config(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    _expect_load_error(tmp_path, "config.json is missing")


def test_load_model_without_weights_and_bin_only(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"]}))
    _expect_load_error(tmp_path, "no model weights")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    _expect_load_error(tmp_path, "pytorch_model.bin", "safetensors only")


def test_load_model_index_with_missing_shard(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"]}))
    save_file({"a": torch.zeros(1)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    _expect_load_error(tmp_path, "missing shard", "model-00002-of-00002.safetensors")


def test_load_model_unsupported_architecture(tmp_path: Path) -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    gpt2.save_pretrained(tmp_path)
    msg = _expect_load_error(tmp_path, "GPT2LMHeadModel", "unsupported")
    assert all(a in msg for a in SUPPORTED_ARCHITECTURES)


def test_load_model_rejects_a_file_and_unsupported_llava_variant(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    _expect_load_error(tmp_path / "config.json", "not a directory")
    with pytest.raises(UnsupportedModelError, match="llama"):
        adapter_for_config({"model_type": "llava_onevision", "text_config": {"model_type": "llama"}})


def test_load_model_refuses_checkpoint_with_missing_tensors(tmp_path: Path) -> None:
    case = _CACHE.get("qwen2_5_vl") or qwen2_5_vl_case()
    case.model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "model.safetensors"))
    dropped = next(k for k in weights if "layers.1.mlp.up_proj" in k)
    del weights[dropped]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    _expect_load_error(tmp_path, "lack", "up_proj")


@pytest.mark.parametrize("bits", [4, 3])
def test_packed_checkpoint_round_trip_all_families(case: Case, tmp_path: Path, bits: int) -> None:
    """pack (GPTQ layout) -> load_packed: per backend, logits of the fake-quantized model (same
    integers, fp16 scales) on every model family."""
    import copy

    from vlmq.checkpoint import load_packed, write_packed
    from vlmq.qlinear import BF16_BACKENDS, available_backends
    from vlmq.quant import dequantize, rtn

    adapter = get_adapter(case.model)
    solved, fq = [], copy.deepcopy(case.model)
    for layer, fq_layer in zip(adapter.decoder_layers(case.model), adapter.decoder_layers(fq)):
        t = {}
        for name, lin in adapter.linears(layer).items():
            q, s, z, g = rtn(lin.weight, bits, 32)
            t.update({f"{name}.int_weight": q, f"{name}.scales": s, f"{name}.zeros": z, f"{name}.g_idx": g})
            adapter.set_weight(fq_layer, name, dequantize(q, s.half().float(), z, g))
        solved.append(t)
    write_packed(case.model, case.processor, adapter, solved, tmp_path / "packed", bits=bits, group_size=32,
                 sym=False, desc_act=False, method="rtn")
    mask = case.batch["attention_mask"].bool()
    ref = model_logits(fq, case.batch)[mask]
    for backend in available_backends(bits):
        model, _, qc = load_packed(tmp_path / "packed", backend=backend)
        assert type(model) is type(case.model) and qc["bits"] == bits
        got = model_logits(model, case.batch)[mask]
        rel = float((got - ref).norm() / ref.norm())
        assert rel < (2e-2 if backend in BF16_BACKENDS else 1e-3), (backend, rel)  # bf16 activations: bf16's error


def test_linear_inputs_stop_early_and_match_a_full_forward(case: Case) -> None:
    """The quantize loop reads each sub-block's input at its first linear and stops the layer's
    forward there: the same tensor a full forward feeds every linear of that sub-block (SUBSETS
    are input-sharing groups), and nothing after it runs, that linear included."""
    from vlmq.quantize import SUBSETS, linear_inputs

    adapter = get_adapter(case.model)
    inputs = adapter.prepare_inputs(case.model, case.batch)
    layer = adapter.decoder_layers(case.model)[0]
    linears = adapter.linears(layer)
    full: dict[str, torch.Tensor] = {}
    hs = [m.register_forward_pre_hook(lambda _m, a, n=n: full.__setitem__(n, a[0].clone())) for n, m in linears.items()]
    with torch.no_grad():
        adapter.run_layer(layer, inputs.hidden_states, inputs)
    for h in hs:
        h.remove()
    for subset in SUBSETS:
        called = []
        hs = [m.register_forward_hook(lambda _m, a, o, n=n: called.append(n)) for n, m in linears.items()]
        with torch.no_grad():
            got = linear_inputs(adapter, layer, inputs.hidden_states, inputs, {subset[0]: linears[subset[0]]})
        for h in hs:
            h.remove()
        done = list(linears)[:list(linears).index(subset[0])]
        assert set(called) <= set(done) and list(got) == [subset[0]]  # nothing from subset[0] on ran
        for n in subset:
            assert torch.equal(got[subset[0]], full[n]), n
