"""Model adapters: the one interface the quantization loop uses to drive a supported VLM.

All supported models share the same language-backbone layout in transformers 5.x::

    model.model.language_model            # text backbone (Qwen2VLTextModel / Qwen2_5_VLTextModel / Qwen2Model)
        .embed_tokens                      # FP
        .layers[i]                         # decoder layers  <- quantized
            .input_layernorm               # FP
            .self_attn.{q,k,v,o}_proj      # quantized
            .post_attention_layernorm      # FP
            .mlp.{gate,up,down}_proj       # quantized
        .norm                              # FP (final norm)
        .rotary_emb                        # RoPE / M-RoPE
    model.lm_head                          # FP
    vision tower + merger / projector     # FP (family specific names)

so the base class :class:`ModelAdapter` does all the work and the per-family subclasses only
declare names. Layer inputs are captured from the model's *own* forward (a pre-hook on decoder
layer 0 stops it there), so the merged image features, M-RoPE position ids, rotary
embeddings and masks are exactly what the model computes, whatever the transformers internals.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from .labels import TokenLabels, token_labels
from .layer_inputs import LayerInputs

ATTN_LINEARS: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_LINEARS: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# Batch keys that are never forwarded to the model (training targets, bookkeeping).
_DROPPED_BATCH_KEYS = {"labels", "return_loss"}


class UnsupportedModelError(ValueError):
    """The model is not one of the supported architectures."""


class _StopForward(Exception):
    """Raised by the layer-0 pre-hook once the layer inputs are captured."""


class ModelAdapter:
    """Family-agnostic access to a supported VLM for layer-wise post-training quantization.

    Subclasses only set the class attributes below. Instances are stateless (one per family).
    """

    #: Short family name.
    family: ClassVar[str] = "base"
    #: ``config.model_type`` values handled by this adapter.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: ``config.architectures`` entries handled by this adapter (top-level class names).
    architectures: ClassVar[tuple[str, ...]] = ()
    #: Dotted path (from the top-level model) of the language backbone.
    backbone_path: ClassVar[str] = "model.language_model"
    #: Dotted path of the output head.
    lm_head_path: ClassVar[str] = "lm_head"
    #: Dotted paths of the vision-side modules / parameters (kept in full precision).
    vision_paths: ClassVar[tuple[str, ...]] = ()
    #: Whether the backbone uses 3D multimodal RoPE (position ids ``[3, B, T]``).
    uses_mrope: ClassVar[bool] = False

    #: Quantized linears of a decoder layer, in quantization order (attention, then MLP).
    linear_names: ClassVar[tuple[str, ...]] = ATTN_LINEARS + MLP_LINEARS
    #: The two sub-blocks of paper Eq. 1 and the linears inside each.
    linear_groups: ClassVar[dict[str, tuple[str, ...]]] = {"attention": ATTN_LINEARS, "mlp": MLP_LINEARS}
    #: Linears that read the same input (and so share one Hessian), in sequential order.
    shared_input_groups: ClassVar[tuple[tuple[str, ...], ...]] = (
        ATTN_LINEARS[:3],
        ATTN_LINEARS[3:],
        MLP_LINEARS[:2],
        MLP_LINEARS[2:],
    )

    #: AWQ/MBQ: the op before each input-sharing group, into which per-input-channel scales fold
    #: (an RMSNorm's weight, or the rows of a linear whose outputs are the group's inputs).
    scale_fold_ops: ClassVar[dict[tuple[str, ...], str]] = {
        ATTN_LINEARS[:3]: "input_layernorm",
        ATTN_LINEARS[3:]: "self_attn.v_proj",    # attention output channel = value channel (MHA only)
        MLP_LINEARS[:2]: "post_attention_layernorm",
        MLP_LINEARS[2:]: "mlp.up_proj",          # down's input = act(gate(x)) * up(x)
    }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r})"

    @classmethod
    def validate_config(cls, config: dict[str, Any]) -> None:
        """Family hook: raise :class:`UnsupportedModelError` for a variant this adapter cannot
        handle (default: accept)."""

    # ------------------------------------------------------------------ module access
    def language_model(self, model: nn.Module) -> nn.Module:
        """The text backbone (embeddings, decoder layers, final norm, rotary embedding)."""
        return model.get_submodule(self.backbone_path)

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        """The decoder layers of the language backbone: the modules that get quantized."""
        return list(self.language_model(model).layers)

    def layer_prefix(self, model: nn.Module | None = None) -> str:
        """Qualified name prefix of the decoder layers (``<prefix>.<i>.<linear name>``)."""
        return f"{self.backbone_path}.layers"

    def qualified_linear_names(self, model: nn.Module) -> list[str]:
        """Fully qualified names of all quantized linears, layer by layer, in order."""
        prefix = self.layer_prefix(model)
        return [f"{prefix}.{i}.{n}" for i in range(len(self.decoder_layers(model))) for n in self.linear_names]

    def embed_tokens(self, model: nn.Module) -> nn.Module:
        return self.language_model(model).embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.language_model(model).norm

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.lm_head_path)

    def vision_modules(self, model: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        """Vision tower, merger / projector (and LLaVA's ``image_newline``): stay full precision."""
        out: dict[str, nn.Module | nn.Parameter] = {}
        for path in self.vision_paths:
            parent, _, leaf = path.rpartition(".")
            obj = getattr(model.get_submodule(parent) if parent else model, leaf)
            out[path] = obj
        return out

    def input_modules(self, model: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        """What :meth:`prepare_inputs` runs: vision side, token embeddings, rotary embedding.
        Put these on the compute device (layers may stay offloaded) before preparing inputs."""
        out = self.vision_modules(model)
        out[f"{self.backbone_path}.embed_tokens"] = self.embed_tokens(model)
        out[f"{self.backbone_path}.rotary_emb"] = self.language_model(model).rotary_emb
        return out

    def full_precision_modules(self, model: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        """Everything outside the decoder layers' linears: vision side, embeddings, final norm,
        lm_head. (Layer norms inside the decoder layers also stay FP.)"""
        out = self.vision_modules(model)
        out[f"{self.backbone_path}.embed_tokens"] = self.embed_tokens(model)
        out[f"{self.backbone_path}.norm"] = self.final_norm(model)
        out[self.lm_head_path] = self.lm_head(model)
        return out

    # ------------------------------------------------------------------ linears
    def get_linear(self, layer: nn.Module, name: str) -> nn.Linear:
        """The linear ``name`` (one of :attr:`linear_names`) of a decoder layer."""
        if name not in self.linear_names:
            raise KeyError(f"{name!r} is not a quantized linear; expected one of {list(self.linear_names)}")
        module = layer.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name} is a {type(module).__name__}, expected nn.Linear")
        return module

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """``name -> nn.Linear`` for all quantized linears of a layer, in quantization order."""
        return {n: self.get_linear(layer, n) for n in self.linear_names}

    @torch.no_grad()
    def set_weight(self, layer: nn.Module, name: str, weight: torch.Tensor) -> None:
        """Overwrite the weight of linear ``name`` in place (cast to its dtype/device).

        ``weight`` must have the linear's shape ``[out_features, in_features]``."""
        linear = self.get_linear(layer, name)
        if tuple(weight.shape) != tuple(linear.weight.shape):
            raise ValueError(f"{name}: weight shape {tuple(weight.shape)} != {tuple(linear.weight.shape)}")
        linear.weight.data.copy_(weight.to(device=linear.weight.device, dtype=linear.weight.dtype))

    # ------------------------------------------------------------------ scale folding (AWQ / MBQ)
    def scale_fold_op(self, layer: nn.Module, subset: tuple[str, ...]) -> tuple[str, nn.Module] | None:
        """``(name, module)`` of the op that per-input-channel scales of ``subset`` fold into, or
        None where no exact fold exists: ``o_proj`` after grouped-query attention (a value channel
        feeds several heads' output channels, so v_proj rows cannot carry one scale per o_proj
        input)."""
        name = self.scale_fold_ops.get(tuple(subset))
        if name is None:
            raise KeyError(f"{list(subset)} is not an input-sharing group; expected one of "
                           f"{[list(k) for k in self.scale_fold_ops]}")
        module = layer.get_submodule(name)
        in_f = self.get_linear(layer, subset[0]).in_features
        if isinstance(module, nn.Linear):
            return (name, module) if module.out_features == in_f else None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (in_f,):
            return None
        return name, module

    @torch.no_grad()
    def fold_input_scales(self, layer: nn.Module, subset: tuple[str, ...], s: torch.Tensor) -> list[str]:
        """Fold ``diag(s)`` into ``subset``'s weights and ``diag(s)⁻¹`` into the op before them
        (:meth:`scale_fold_op`); the layer's full-precision function is unchanged. Returns the
        names of the changed parameters that are not quantized weights (``input_layernorm.weight``,
        ``self_attn.v_proj.bias``, ...): they must be saved with the quantized state."""
        from vlmq.awq import fold_into_linear, fold_into_norm

        op = self.scale_fold_op(layer, subset)
        if op is None:
            raise ValueError(f"{list(subset)}: no exact fold for per-channel scales (grouped-query attention)")
        name, module = op
        linears = [self.get_linear(layer, n) for n in subset]
        s = s.to(device=linears[0].weight.device)
        if isinstance(module, nn.Linear):
            fold_into_linear(module, linears, s)
            changed = [] if module.bias is None else [f"{name}.bias"]
            if name not in self.linear_names:
                changed.append(f"{name}.weight")
            return changed
        fold_into_norm(module, linears, s)
        return [f"{name}.weight"]

    # ------------------------------------------------------------------ inputs
    def input_device(self, model: nn.Module) -> torch.device:
        """Device of the input embeddings (where the batch must live)."""
        return self.embed_tokens(model).weight.device

    def preprocess_batch(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """Family hook: complete a processor batch before the forward (default: unchanged)."""
        return batch

    def _model_kwargs(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        base = model.get_submodule(self.backbone_path.rpartition(".")[0])
        accepted = set(inspect.signature(base.forward).parameters)
        device = self.input_device(model)
        kwargs = {}
        for key, value in dict(batch).items():
            if key in _DROPPED_BATCH_KEYS or key not in accepted or value is None:
                continue
            kwargs[key] = value.to(device) if isinstance(value, torch.Tensor) else value
        if "input_ids" not in kwargs:
            raise ValueError("batch has no 'input_ids'")
        return self.preprocess_batch(model, kwargs)

    @torch.no_grad()
    def prepare_inputs(self, model: nn.Module, batch: dict[str, Any]) -> LayerInputs:
        """Run the model's own forward up to decoder layer 0 and capture that layer's inputs.

        Args:
            model: the top-level ``...ForConditionalGeneration`` model.
            batch: a processor output (``input_ids``, ``attention_mask``, ``pixel_values``,
                ``image_grid_thw`` / ``image_sizes``, ...). Extra keys the model does not take
                (``labels``) are dropped.

        Returns:
            :class:`LayerInputs` with the merged input embeddings and the static per-layer
            context (mask, rotary embeddings, position ids), reusable for every layer.
        """
        kwargs = self._model_kwargs(model, batch)
        base = model.get_submodule(self.backbone_path.rpartition(".")[0])
        backbone = self.language_model(model)
        captured: dict[str, Any] = {}

        def rope_hook(_module: nn.Module, args: tuple, hook_kwargs: dict) -> None:
            pos = hook_kwargs.get("position_ids", args[1] if len(args) > 1 else None)
            captured.setdefault("rope_position_ids", pos)

        def layer_hook(_module: nn.Module, args: tuple, hook_kwargs: dict) -> None:
            captured["hidden_states"] = args[0] if args else hook_kwargs["hidden_states"]
            captured["kwargs"] = dict(hook_kwargs)
            raise _StopForward

        saved_rope_deltas = getattr(base, "rope_deltas", None)
        handles = [
            backbone.rotary_emb.register_forward_pre_hook(rope_hook, with_kwargs=True),
            backbone.layers[0].register_forward_pre_hook(layer_hook, with_kwargs=True),
        ]
        try:
            base(**kwargs, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
            if hasattr(base, "rope_deltas"):
                base.rope_deltas = saved_rope_deltas
        if "hidden_states" not in captured:
            raise RuntimeError("the forward pass never reached decoder layer 0")

        layer_kwargs = dict(captured["kwargs"])
        hidden = captured["hidden_states"]
        attn_mask = layer_kwargs.pop("attention_mask", None)
        cos, sin = layer_kwargs.pop("position_embeddings")
        for key in ("past_key_values", "past_key_value", "use_cache", "cache_position"):
            layer_kwargs.pop(key, None)
        extra = {k: v for k, v in layer_kwargs.items() if isinstance(v, torch.Tensor)}

        input_ids = kwargs["input_ids"]
        pad_mask = kwargs.get("attention_mask")
        token_mask = (
            pad_mask.to(torch.bool) if pad_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        )
        attn_mask = self._materialize_mask(backbone, attn_mask, hidden, token_mask)
        if attn_mask is not None:  # transformers returns expanded views; store a real tensor
            attn_mask = attn_mask.contiguous()
        return LayerInputs(
            hidden_states=hidden,
            position_embeddings=(cos, sin),
            attention_mask=attn_mask,
            position_ids=captured.get("rope_position_ids"),
            token_mask=token_mask,
            input_ids=input_ids,
            layer_kwargs=extra,
        )

    @staticmethod
    def _materialize_mask(
        backbone: nn.Module, mask: torch.Tensor | None, hidden: torch.Tensor, token_mask: torch.Tensor
    ) -> torch.Tensor | None:
        """sdpa lets transformers skip the mask (``None`` + ``is_causal``) when there is no padding;
        build the equivalent explicit bool causal mask so every stored sample has one."""
        if mask is not None or backbone.config._attn_implementation != "sdpa":
            return mask
        B, T = hidden.shape[:2]
        causal = torch.ones(T, T, dtype=torch.bool, device=hidden.device).tril()
        return (causal[None, None] & token_mask[:, None, None, :].to(hidden.device)).expand(B, 1, T, T)

    # ------------------------------------------------------------------ standalone layer forward
    def run_layer(self, layer: nn.Module, hidden_states: torch.Tensor, layer_inputs: LayerInputs) -> torch.Tensor:
        """Forward one decoder layer standalone (no KV cache) with the captured context."""
        out = layer(
            hidden_states,
            attention_mask=layer_inputs.attention_mask,
            position_embeddings=layer_inputs.position_embeddings,
            past_key_values=None,
            use_cache=False,
            **layer_inputs.layer_kwargs,
        )
        return out[0] if isinstance(out, tuple) else out

    def attention_block(
        self, layer: nn.Module, hidden_states: torch.Tensor, layer_inputs: LayerInputs
    ) -> torch.Tensor:
        """``Attn(X) = X + o_proj(MHSA(input_layernorm(X)))`` (paper Eq. 1, with its residual)."""
        attn_out = layer.self_attn(
            hidden_states=layer.input_layernorm(hidden_states),
            attention_mask=layer_inputs.attention_mask,
            position_embeddings=layer_inputs.position_embeddings,
            past_key_values=None,
            **layer_inputs.layer_kwargs,
        )
        return hidden_states + (attn_out[0] if isinstance(attn_out, tuple) else attn_out)

    def mlp_block(self, layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """``h + mlp(post_attention_layernorm(h))``: the MLP sub-block with its residual."""
        return hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))

    def logits(self, model: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """``lm_head(final_norm(h))`` for the output of the last decoder layer."""
        return self.lm_head(model)(self.final_norm(model)(hidden_states))

    # ------------------------------------------------------------------ token labels
    def token_labels(
        self, input_ids: torch.Tensor, processor_or_config: Any, attention_mask: torch.Tensor | None = None
    ) -> TokenLabels:
        """Segment (system/image/instruction/answer) and modality (text/vision) per token.

        See :mod:`vlmq.models.labels` for the rule. ``processor_or_config`` may be a processor,
        tokenizer, model config or model. Unpacks as ``segment, modality``."""
        return token_labels(input_ids, processor_or_config, attention_mask)


class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL (also the project's embedded demo model)."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    architectures = ("Qwen2VLForConditionalGeneration",)
    vision_paths = ("model.visual",)  # ViT blocks + PatchMerger
    uses_mrope = True

    def preprocess_batch(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """transformers 5.x needs ``mm_token_type_ids`` (0 text, 1 image, 2 video) to build the
        M-RoPE position ids; the processor returns it, a hand-built batch may not."""
        if batch.get("mm_token_type_ids") is None and (
            batch.get("image_grid_thw") is not None or batch.get("video_grid_thw") is not None
        ):
            ids = batch["input_ids"]
            types = torch.zeros_like(ids, dtype=torch.int32)
            types[ids == model.config.image_token_id] = 1
            types[ids == model.config.video_token_id] = 2
            batch = {**batch, "mm_token_type_ids": types}
        return batch


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: same backbone layout and M-RoPE as Qwen2-VL (window-attention ViT is FP)."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    architectures = ("Qwen2_5_VLForConditionalGeneration",)


class LlavaOnevisionAdapter(ModelAdapter):
    """LLaVA-OneVision with a Qwen2 language model (SigLIP vision tower, 2-layer MLP projector)."""

    family = "llava_onevision"
    model_types = ("llava_onevision",)
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    vision_paths = ("model.vision_tower", "model.multi_modal_projector", "model.image_newline")
    uses_mrope = False
    #: The only language-model type whose layer layout this adapter knows.
    text_model_types: ClassVar[tuple[str, ...]] = ("qwen2",)

    @classmethod
    def validate_config(cls, config: dict[str, Any]) -> None:
        text_type = (config.get("text_config") or {}).get("model_type", "qwen2")
        if text_type not in cls.text_model_types:
            raise UnsupportedModelError(
                f"LLaVA-OneVision with a {text_type!r} language model is not supported "
                f"(supported language models: {list(cls.text_model_types)})"
            )


ADAPTERS: tuple[type[ModelAdapter], ...] = (Qwen2VLAdapter, Qwen2_5_VLAdapter, LlavaOnevisionAdapter)
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(a for cls in ADAPTERS for a in cls.architectures)


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, dict):
        return config
    return config.to_dict() if hasattr(config, "to_dict") else vars(config)


def adapter_for_config(config: Any) -> ModelAdapter:
    """Choose the adapter from a config (object or ``config.json`` dict) by ``model_type``,
    falling back to ``architectures``. Raises :class:`UnsupportedModelError`."""
    cfg = _as_dict(config)
    model_type, archs = cfg.get("model_type"), list(cfg.get("architectures") or [])
    for cls in ADAPTERS:
        if model_type in cls.model_types or any(a in cls.architectures for a in archs):
            cls.validate_config(cfg)
            return cls()
    raise UnsupportedModelError(
        f"unsupported architecture {archs or None} (model_type={model_type!r}); "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for a loaded model, from ``model.config.model_type`` / ``architectures``
    (the class name is used when the config lists no architectures)."""
    cfg = dict(_as_dict(model.config))
    cfg["architectures"] = list(cfg.get("architectures") or [type(model).__name__])
    return adapter_for_config(cfg)
